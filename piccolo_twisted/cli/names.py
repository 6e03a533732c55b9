"""The names a server may hand the command line, checked before they touch
the disk: the server's own rules, restated here (the command line imports
nothing of the server; ``tests/test_cli_distrust.py`` checks that the two
agree name for name), and the rules of every file system a laptop may
have.

- A run name is one path component: not empty, not ``.`` or ``..``, not
  hidden (a leading ``.``), no ``/``, ``\\`` or control character (C0, DEL,
  C1), at most 100 bytes of UTF-8 (``piccolo_twisted/datadir.py``,
  ``check_run_name``: what names an existing run).
- A *new* run name (``datadir.check_new_run_name``: what the server creates
  a run with) is also a good local name (below) and holds no ``#`` or ``%``
  (the deployed client puts run names into URIs as they are).
- A local name (``local_name_problem``) is the strictest of POSIX, Windows
  and macOS: none of ``< > : " / \\ | ? *`` (``C:evil`` is a drive-relative
  path on Windows, ``:`` a path separator in macOS's Finder), no
  control, format or line/paragraph separator character (nothing that
  reorders a name or hides in it),
  not ending in ``.`` or a space (Windows drops them: ``run.`` is ``run``),
  not a Windows device name (``CON``, ``nul.txt``, ``COM1``), at most 255
  bytes of UTF-8 and 255 UTF-16 units. Whatever system ``fetch`` runs on, it
  writes only such names, so a copied folder stays the same everywhere.
- ``folded(name)``: what a case-insensitive, normalisation-insensitive
  file system (Windows, macOS, a FAT stick) takes to be the same name:
  ``Run`` and ``run`` are one folder there.
- A spectrum file is ``b<batch>_s<sequence>[_light|_dark].pico``: six ASCII
  digits each, or more without a leading zero (batches up to 11 digits,
  sequences up to 7), nothing before or after (``runindex.SPECTRUM_FILE``).
"""

import re
import unicodedata

MAX_RUN_NAME = 100              # bytes of UTF-8
MAX_LOCAL_NAME = 255            # bytes of UTF-8, and UTF-16 units (Windows)
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
SPECTRUM_FILE = re.compile(
    r"b([0-9]{6}|[1-9][0-9]{6,10})_s([0-9]{6}|[1-9][0-9]{6})(_light|_dark)?\.pico\Z")
#: not in a file name on Windows (and ':' not on macOS either)
WINDOWS_FORBIDDEN = frozenset('<>:"/\\|?*')
#: Windows device names: reserved with any extension, in any case
WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"])
#: what the deployed client's URIs cannot carry in a path segment
URI_RESERVED = frozenset("#%?")
#: Unicode categories no name holds: controls, format characters (bidi
#: overrides, zero-width spaces, the BOM), surrogates, line and paragraph
#: separators -- nothing that reorders a name or hides in it
INVISIBLE = frozenset(["Cc", "Cf", "Cs", "Zl", "Zp"])


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


def local_name_problem(name):
    """None when ``name`` can be a file or folder name on any system the
    command line runs on, else what is wrong with it (in words)."""
    if not isinstance(name, str):
        return "not a string"
    if not name or name in (".", ".."):
        return "empty, '.' or '..'"
    for char in name:
        if char in WINDOWS_FORBIDDEN:
            return f"holds {char!r} (not in a name on Windows)"
        if unicodedata.category(char) in INVISIBLE:
            return "holds a control, format or line separator character"
    if name[-1] in ". ":
        return "ends in '.' or a space (Windows drops them)"
    if name.split(".")[0].rstrip(" ").upper() in WINDOWS_DEVICES:
        return "a device name on Windows"
    if (len(name.encode("utf-8")) > MAX_LOCAL_NAME
            or len(name.encode("utf-16-le")) // 2 > MAX_LOCAL_NAME):
        return f"longer than {MAX_LOCAL_NAME} bytes"
    return None


def new_run_name_problem(name):
    """None for a name the server creates a run with, else why not."""
    problem = run_name_problem(name) or local_name_problem(name)
    if problem:
        return problem
    reserved = URI_RESERVED.intersection(name)
    if reserved:
        return f"holds {min(reserved)!r} (not in a URI's path as it is)"
    return None


def folded(name):
    """``name`` as a case- and normalisation-insensitive file system
    compares it."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def is_spectrum_file(name):
    return isinstance(name, str) and SPECTRUM_FILE.match(name) is not None
