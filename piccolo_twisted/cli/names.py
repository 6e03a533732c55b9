"""The names a server may hand the command line, checked before they touch
the disk: the server's own rules, restated here (the command line imports
nothing of the server; ``tests/test_cli_distrust.py`` checks that the two
agree name for name).

- A run name is one path component: not empty, not ``.`` or ``..``, not
  hidden (a leading ``.``), no ``/``, ``\\`` or control character (C0, DEL,
  C1), at most 100 bytes of UTF-8 (``piccolo_twisted/datadir.py``,
  ``check_run_name``).
- A spectrum file is ``b<batch>_s<sequence>[_light|_dark].pico``: six ASCII
  digits each, or more without a leading zero (batches up to 11 digits,
  sequences up to 7), nothing before or after (``runindex.SPECTRUM_FILE``).
"""

import re

MAX_RUN_NAME = 100              # bytes of UTF-8
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
SPECTRUM_FILE = re.compile(
    r"b([0-9]{6}|[1-9][0-9]{6,10})_s([0-9]{6}|[1-9][0-9]{6})(_light|_dark)?\.pico\Z")


def run_name_problem(name):
    """None for a good run name, else what is wrong with it (in words)."""
    if not isinstance(name, str):
        return "not a string"
    if not name or name in (".", ".."):
        return "empty, '.' or '..'"
    if name.startswith("."):
        return "hidden (starts with '.')"
    if "/" in name or "\\" in name:
        return "more than one path component"
    if CONTROL.search(name):
        return "holds a control character"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if size > MAX_RUN_NAME:
        return f"longer than {MAX_RUN_NAME} bytes"
    return None


def is_run_name(name):
    return run_name_problem(name) is None


def is_spectrum_file(name):
    return isinstance(name, str) and SPECTRUM_FILE.match(name) is not None
