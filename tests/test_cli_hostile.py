"""The command line against the outside attack on issue 21b (issue 21d).

Each finding is modelled from the outside: the malicious CoAP server on
loopback (``crafted_coap``) serving the attacker's payloads, every command
bounded in time; time zones through ``TZ`` in a subprocess; the C locale
and an ASCII terminal in a subprocess reading the raw bytes written;
Windows path rules through ``ntpath``/``PureWindowsPath``; the real server
where the finding is the server's. The finding's number is in each test's
docstring (``/work/wt/findings-21b.md``).
"""

import ast
import asyncio
import io
import json
import ntpath
import os
import pathlib
import shutil
import sys
import unicodedata
from datetime import datetime, timezone

from twisted.trial import unittest

from .crafted_coap import (BAD_REQUEST, Body, Observed, Raw, Slow, honest_routes, serve)
from .helpers import ServerTestCase
from .test_cli_distrust import BOUND, ESC, FILE, Crafted, _doc, _meta, in_loop, piccolo3
from .test_wire import coro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "piccolo_twisted", "cli")
SERVICE_UNAVAILABLE = (5, 3)


def pico_text(**meta):
    return json.dumps(_doc(_meta(**meta)))


async def subprocess_piccolo3(url, *argv, env=None):
    """``python -m piccolo_twisted.cli --server URL ARGV`` in a process of
    its own: (exit status, stdout bytes, stderr bytes)."""
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("LC_", "PYTHONIO", "PYTHONUTF8", "TZ", "LANG"))}
    environment.update(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "piccolo_twisted.cli", "--server", url, "--timeout", "2",
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL, env=environment, cwd=ROOT)
    try:
        out, err = await asyncio.wait_for(process.communicate(), BOUND)
    except asyncio.TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, out, err


# -- 1: a linear answer, of bounded size ----------------------------------------

class AnswerSizeTests(Crafted):

    @in_loop
    async def test_an_unclosed_string_of_escapes_is_one_line_at_once(self):
        """Finding 1: ``"`` then ``\\"`` 150,000 times kept status and
        health at 100% CPU for more than 120 s (the depth check scanned
        the unclosed string again from every quote in it); now each is one
        line, exit 2, within the bound. Health may be megabytes, so its
        answer is read whole and the check itself is linear."""
        quadratic = Raw(b'"' + b'\\"' * 150000)
        for command, path in (("status", "control/status"), ("health", "sysinfo/health")):
            routes = honest_routes()
            routes[path] = quadratic
            code, out, err = await self.against(routes, command)
            self.assertEqual(code, 2, err)
            self.assertOneLine(err, f"GET /{path}: malformed answer from the server")

    @in_loop
    async def test_an_endless_answer_stops_at_its_resource_limit(self):
        """Finding 1: aiocoap assembles a multi-block answer of any length
        (and copies it whole for every block). Now the blocks stop at the
        resource's limit (64 KiB for a status), or at the first block when
        Size2 says the answer is longer."""
        endless = Body(1 << 40, lambda offset, n: b"[" * n, size2=False)
        server, url, close = await serve({**honest_routes(), "control/status": endless})
        try:
            code, out, err = await piccolo3("--server", url, "--timeout", "2", "status")
        finally:
            close()
        self.assertEqual(code, 2, err)
        self.assertOneLine(err, "GET /control/status: malformed answer from the server: "
                                "more than 65536 bytes long, at most 65536 bytes")
        asked = [p for _, p, _ in server.requests if p == "control/status"]
        self.assertLessEqual(len(asked), 65)

        announced = Body(1 << 40, lambda offset, n: b"a" * n)      # with Size2
        routes = {"data_dir/runs/field/spectra_list": [FILE],
                  "data_dir/runs/field/spectra": announced}
        target = os.path.join(self.parent, "DIR")
        server, url, close = await serve(routes)
        try:
            code, out, err = await piccolo3("--server", url, "--timeout", "2",
                                            "fetch", "field", target)
        finally:
            close()
        self.assertEqual(code, 2, err)
        self.assertIn("1099511627776 bytes long, at most", err)
        self.assertEqual([p for _, p, _ in server.requests].count("data_dir/runs/field/spectra"),
                         1)
        self.assertEqual(os.listdir(os.path.join(target, "field")), [])

    def test_the_depth_check_is_right(self):
        from piccolo_twisted.cli.shape import depth
        for text, expected in (('[[["[[[[", "\\"[[["]]]', 3), ("[" * 100000, 33),
                               ("[" * 100000 + "]" * 100000, 33), ('"\\', 0),
                               ('{"a": [{"b": []}]}', 4), ("[1, [2, {}], []]", 3),
                               ("[}" + "[" * 50, 1), ('"' + '\\"' * 10 + '"', 0)):
            self.assertEqual(depth(text, 32), expected, text[:40])


# -- 2: numbers ---------------------------------------------------------------------

#: (command, path, answer); health answers given as a dict are merged into
#: the honest one. Each was a traceback (OverflowError) on 5e135a1.
HUGE = 10 ** 400
NUMBER_CASES = [
    ("status", "spectrometer/S_sim_QEP00981/last_spectrum/upwelling",
     Raw(json.dumps({"peak": 1, "kind": "light", "saturated": 0}).replace(
         "}", f', "integration_time": {HUGE}}}'))),
    ("status", "spectrometer/S_sim_QEP00981/last_temperature",
     Raw(f'{{"temperature": {HUGE}, "age": 3}}')),
    ("health", "sysinfo/health", Raw(f'{{"uptime": {HUGE}}}')),
    ("health", "sysinfo/health", Raw(f'{{"disk_free": {HUGE}, "disk_total": 2e9}}')),
    ("jobs", "control/scheduler/jobs",
     Raw(f'[[1, ["record", ["r", 3, {HUGE}, 10.0, 80.0]], "2030-06-01T10:00:00+00:00", '
         f'null, 60, "active"]]')),
    ("jobs", "control/scheduler/jobs",
     [[1, ["record", ["r", 3, -1, 10.0, 80.0]], "2020-06-01T10:00:00+00:00", None, 5e-324,
       "active"]]),
    ("status", "control/scheduler/jobs",
     [[1, ["record", ["r", 3, -1, 10.0, 80.0]], "2020-06-01T10:00:00+00:00", None, 5e-324,
       "active"]]),
]

#: answers at the edges of what a float holds, which a shape may take:
#: each is shown (exit 0), never a traceback
EDGES = [
    ("status", "spectrometer/S_sim_QEP00981/last_spectrum/upwelling",
     {"peak": 1.7e308, "kind": "light", "integration_time": -1.7e308, "saturated": 2 ** 62}),
    ("status", "spectrometer/S_sim_QEP00981/last_temperature",
     {"temperature": -1.7e308, "age": 1.7e308}),
    ("status", "control/current_sequence", 2 ** 63 - 2),
    ("health", "sysinfo/health", {"disk_free": 1.7e308, "disk_total": 5e-324,
                                  "days_left": 1.7e308, "uptime": 1e10, "files_today": 2 ** 62}),
    ("health", "sysinfo/health", {"disk_free": 10 ** 99, "disk_total": 10 ** 99 + 1}),
    ("health", "sysinfo/health", {"last_batch_summary": {
        "run": "r", "batch": 2 ** 63 - 1, "sequences": 2 ** 63 - 1,
        "integration_times": {"S": {"up": [1.7e308, 5e-324]}}, "temperature_wait": 1.7e308,
        "temperature_unstable": [{"spectrometer": "S", "channel": "up", "type": "light",
                                  "sequences": [[0, 2 ** 62]], "temperature_min": -1.7e308,
                                  "temperature_max": 1.7e308, "set_point": 1.7e308,
                                  "tolerance": 5e-324}]}}),
    ("jobs", "control/scheduler/jobs",
     [[2 ** 63 - 1, ["record", ["r", 1.7e308, -1.7e308, 5e-324, 1.7e308]],
       "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00", 1.0, "active"],
      [2, ["record", ["r", 1, -1, 0, 80]], "0001-01-01T00:00:00+14:00", None, 31622400,
       "active"]]),
]


class NumberTests(Crafted):

    def routes(self, path, answer):
        routes = honest_routes()
        if path == "sysinfo/health" and isinstance(answer, dict):
            answer = {**routes[path], **answer}
        routes[path] = answer
        return routes

    @in_loop
    async def test_numbers_no_float_holds_are_malformed_answers(self):
        """Finding 2: 10**400 where a number belongs (a temperature, an
        integration time, a disk size, uptime, a job's argument) and an
        interval of 5e-324 s each gave a traceback; now each is one line,
        exit 2, naming the resource."""
        tracebacks, problems = [], []
        for command, path, answer in NUMBER_CASES:
            try:
                code, out, err = await self.against(self.routes(path, answer), command)
            except Exception as e:
                tracebacks.append(f"{command} {path}: {type(e).__name__}: {e}")
                continue
            problem = (self.one_line_problem(err, f"/{path}: malformed answer") if code == 2
                       else f"exit {code}: {err!r}")
            if problem:
                problems.append((command, path, problem))
        self.assertEqual(tracebacks, [])
        self.assertEqual(problems, [])

    @in_loop
    async def test_numbers_at_the_edges_are_shown(self):
        tracebacks, problems = [], []
        for command, path, answer in EDGES:
            try:
                code, out, err = await self.against(self.routes(path, answer), command)
            except Exception as e:
                tracebacks.append(f"{command} {path}: {type(e).__name__}: {e}")
                continue
            if (code, err) != (0, ""):
                problems.append((command, path, code, err))
        self.assertEqual(tracebacks, [])
        self.assertEqual(problems, [])

    def test_the_formatter_never_raises(self):
        from piccolo_twisted.cli.terminal import number
        values = [0, -0.0, 1, -1, 2 ** 63, 10 ** 400, -10 ** 400, 10 ** 5000, 1.7e308,
                  -1.7e308, 5e-324, float("inf"), float("-inf"), float("nan"), True, None,
                  "12", "\x1b[2J", [1], {"a": 1}]
        for value in values:
            for spec in ("", "g", ".1f", ".0f", "02d", "d", "e", "%", ",", "x"):
                text = number(value, spec)
                self.assertIsInstance(text, str)
                self.assertTrue(text.isprintable(), (value, spec, text))
        self.assertEqual(number(10 ** 400, "g"), "~1e+400")
        self.assertEqual(number(2.5, ".1f"), "2.5")
        self.assertEqual(number(7, "02d"), "07")

    def test_every_number_the_command_line_formats_goes_through_the_formatter(self):
        """No format spec for numbers (``:g``, ``:.1f``, ``:02d``) and no
        ``%``/``str.format`` numbers in the command line's code: one such
        place is a traceback waiting for 10**400. Only terminal.py, which
        holds ``number``, formats numbers itself."""
        numeric = set("bcdeEfFgGnoxX%")
        found = []
        for name in sorted(os.listdir(CLI)):
            if not name.endswith(".py") or name == "terminal.py":
                continue
            with open(os.path.join(CLI, name), encoding="utf-8") as f:
                tree = ast.parse(f.read(), name)
            for node in ast.walk(tree):
                if isinstance(node, ast.FormattedValue) and node.format_spec is not None:
                    spec = "".join(part.value for part in node.format_spec.values
                                   if isinstance(part, ast.Constant))
                    if spec and spec[-1] in numeric and "%" not in spec[:-1]:
                        found.append(f"{name}:{node.lineno} :{spec}")
                elif (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod)
                      and isinstance(node.left, ast.Constant)
                      and isinstance(node.left.value, str)):
                    found.append(f"{name}:{node.lineno} %-formatting")
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                      and node.func.attr == "format" and isinstance(node.func.value, ast.Constant)):
                    found.append(f"{name}:{node.lineno} str.format")
        self.assertEqual(found, [])


# -- 3, 15: strings -----------------------------------------------------------------

SURROGATES = {
    ("status", "control/status"): Raw(b'"\\udc9bbusy\\ud800"'),
    ("status", "control/fault"): Raw(b'"\\udc9b[2J\\ud800 fault"'),
    ("jobs", "control/scheduler/jobs"): Raw(b'[[1,["\\ud800",[]],null,null,null,"\\udc9b"]]'),
    ("health", "sysinfo/health"): Raw(b'{"fault":"\\udc9b[31m\\ud800"}'),
    ("schedule quiet", "control/scheduler/quietStart"): Raw(b'"\\udc9b[2J"'),
    ("abort", "control/abort"): (BAD_REQUEST, b"\xed\xa0\x80 \xc2\x9b[2J refused"),
}
#: what a terminal must never receive from the server's words: ESC, CSI
#: (0x9b, the 8-bit ESC [) and every other C1 byte, which the C locale
#: writes raw for \udc80-\udcff
RAW_CONTROLS = bytes(range(0x00, 0x20)).replace(b"\n", b"") + bytes(range(0x7f, 0xa0))


class StringTests(Crafted):

    @in_loop
    async def test_lone_surrogates_are_shown_escaped(self):
        """Finding 3: a lone surrogate from the server ended status, jobs,
        health, schedule quiet and abort with UnicodeEncodeError; now each
        is printed with ``\\ud800`` in its place."""
        problems = []
        for (command, path), answer in SURROGATES.items():
            routes = honest_routes()
            routes.update({"control/scheduler/powerOffEnabled": False,
                           "control/scheduler/powerDelay": 600, path: answer})
            try:
                code, out, err = await self.against(routes, *command.split())
            except Exception as e:
                problems.append((command, f"{type(e).__name__}: {e}"))
                continue
            text = out + err
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                problems.append((command, "unencodable text written"))
            if "Traceback" in text or ESC in text or "\x9b" in text:
                problems.append((command, text))
            if command != "abort" and ("\\ud800" not in text and "\\udc9b" not in text):
                problems.append((command, f"not shown escaped: {text!r}"))
        self.assertEqual(problems, [])

    @in_loop
    async def test_the_c_locale_and_an_ascii_terminal_get_no_raw_control_byte(self):
        """Finding 3: under the C locale Python writes \\udc80-\\udcff as the
        raw bytes 0x80-0xff (``\\udc9b`` is CSI, the 8-bit ESC [). In a
        process of its own, under C, C.UTF-8 and an ASCII terminal, no
        control byte of the server's reaches stdout or stderr, and a
        name with an accent is written as an escape where the terminal
        cannot show it (never UnicodeEncodeError)."""
        routes = honest_routes()
        routes["control/status"] = Raw(b'"\\udc9b[2J\\udc1b]0;x\\u0007 busy"')
        routes["control/fault"] = Raw(b'"\\udc9b31m caf\\u00e9 \\u202e\\u200b"')
        routes["spectrometer/spectrometers"] = ["S_sim_QEP00981", "S_caf\u00e9"]
        routes["spectrometer/S_caf\u00e9/status"] = 6
        routes["spectrometer/S_caf\u00e9/haveTEC"] = False
        server, url, close = await serve(routes)
        try:
            for env in ({"LC_ALL": "C"}, {"LC_ALL": "C.UTF-8"}, {"PYTHONIOENCODING": "ascii"},
                        {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}):
                code, out, err = await subprocess_piccolo3(url, "status", env=env)
                self.assertEqual((code, err), (0, b""), env)
                raw = [hex(b) for b in out if bytes([b]) in RAW_CONTROLS]
                self.assertEqual(raw, [], env)
                self.assertIn(b"\\udc9b[2J", out)
                self.assertRegex(out, rb"S_caf(\xc3\xa9|\\xe9)", env)
        finally:
            close()

    @in_loop
    async def test_invisible_characters_are_shown_escaped(self):
        """Finding 15: U+061C, U+FEFF, U+200B (and every other format,
        separator or unassigned character) were printed raw."""
        from piccolo_twisted.cli.terminal import shown
        invisible = "\u061c\ufeff\u200b\u2028\u2029\u00a0\u00ad\U000e0001\ue000\U0010ffff"
        routes = honest_routes()
        routes["control/fault"] = "a" + invisible + "b"
        code, out, err = await self.against(routes, "status")
        self.assertEqual((code, err), (0, ""))
        line = [line for line in out.splitlines() if line.startswith("last fault")][0]
        self.assertTrue(line.isprintable(), line)
        self.assertIn("a\\u061c\\ufeff\\u200b\\u2028\\u2029\\xa0\\xad\\U000e0001\\ue000"
                      "\\U0010ffffb", line)
        # every category a terminal does not show as itself
        for code_point in range(0x110000):
            char = chr(code_point)
            if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") \
                    or (unicodedata.category(char) == "Zs" and char != " "):
                self.assertNotEqual(shown(char), char, hex(code_point))

    @in_loop
    async def test_a_file_text_with_a_lone_surrogate_is_not_written(self):
        """Finding 3: fetch stopped with a traceback writing such a file."""
        target = os.path.join(self.parent, "DIR")
        routes = {"data_dir/runs/field/spectra_list": [FILE],
                  "data_dir/runs/field/spectra": Raw(b'"{\\"Spectra\\": \\"\\ud800\\"}"')}
        code, out, err = await self.against(routes, "fetch", "field", target)
        self.assertEqual(code, 2, err)
        self.assertOneLine(err, "malformed answer from the server", "lone surrogate")
        self.assertEqual(os.listdir(os.path.join(target, "field")), [])


# -- 4: plot ------------------------------------------------------------------------

class PlotTests(Crafted):

    @in_loop
    async def test_the_attackers_two_files_plot(self):
        """Finding 4: a Datetime of 9999-12-31T23:59:59-1400 (OverflowError)
        and a SerialNumber holding a lone surrogate (a crash inside
        matplotlib) gave tracebacks; now both plot, the time left out of
        the title and the serial escaped."""
        cases = {
            "datetime": _doc(_meta(Datetime="9999-12-31T23:59:59.000000-1400")),
            "early": _doc(_meta(Datetime="0001-01-01T00:00:00.000000+1400")),
            "surrogate": _doc(_meta(SerialNumber="\ud800", Direction="up\udc9b",
                                    Run="r\ufeff", Type="\u202elight")),
        }
        for name, doc in cases.items():
            path = os.path.join(self.parent, name + ".pico")
            with open(path, "w") as f:
                f.write(json.dumps(doc))
            png = os.path.join(self.parent, name + ".png")
            code, out, err = await piccolo3("plot", path, "-o", png)
            self.assertEqual((code, err), (0, ""), name)
            self.assertGreater(os.path.getsize(png), 1000, name)

    def test_counts_per_ms_of_the_smallest_time(self):
        """An IntegrationTime of 5e-324 ms with --per-ms: infinite counts
        plotted without a word from numpy on the terminal."""
        import warnings
        path = os.path.join(self.parent, "tiny.pico")
        with open(path, "w") as f:
            f.write(json.dumps(_doc(_meta(IntegrationTime=5e-324))))
        png = os.path.join(self.parent, "tiny.png")
        from piccolo_twisted.cli.plot import plot
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            self.assertEqual(plot([path], png, per_ms=True), 0)


# -- 5, 18: local names ---------------------------------------------------------------

WINDOWS_ATTACKS = ["C:evil", "c:", "a:b", "CON", "con", "nul.txt", "Com1", "LPT9.log",
                   "COM\u00b9", "run.", "run ", "a<b", "a>b", 'a"b', "a|b", "a?b", "a*b",
                   "x" * 300, "\u202eexe.txt", "zero\u200bwidth", "AUX .txt"]


class LocalNameTests(Crafted):

    @in_loop
    async def test_no_run_name_leads_out_of_dir_on_windows(self):
        """Finding 5: run names ``C:evil``, ``c:``, ``a:b`` passed the check;
        on Windows os.path.join(DIR, "C:evil") is a path on drive C, and
        ``CON``, ``run.``, ``run `` are a device and other folders' names.
        Now fetch --all leaves each such run out with a line saying why
        (exit 1) and fetches the others."""
        names = [n for n in WINDOWS_ATTACKS if len(n.encode()) <= 100] + ["ok"]
        routes = {"data_dir/all_runs": names}
        for name in names:
            routes[f"data_dir/runs/{name}/spectra_list"] = [FILE]
            routes[f"data_dir/runs/{name}/spectra"] = pico_text()
        target = os.path.join(self.parent, "DIR")
        code, out, err = await self.against(routes, "fetch", "--all", target)
        self.assertEqual(code, 1, err)
        self.assertEqual(os.listdir(target), ["ok"])
        self.assertEqual(os.listdir(os.path.join(target, "ok")), [FILE])
        left_out = [line for line in err.splitlines() if "not fetched:" in line]
        self.assertEqual(len(left_out), len(names) - 1 + 1, err)   # one per run, and the last
        self.assertIn(f"fetch: {len(names) - 1} runs not fetched (first: run 'C:evil' not "
                      f"fetched: holds ':' (not in a name on Windows))", err.splitlines()[-1])
        self.assertNotIn(ESC, err)
        self.assertNotIn("\u202e", err)
        # typed by the user: one line, nothing made
        code, out, err = await self.against(routes, "fetch", "CON", target)
        self.assertEqual(code, 1, err)
        self.assertOneLine(err, "run 'CON' cannot be a folder name here: a device name on "
                                "Windows")

    def test_every_name_taken_is_one_plain_name_on_windows(self):
        """The local rule against Windows' own path rules (ntpath,
        PureWindowsPath): a name it takes stays one component inside DIR,
        is not a device, and is not changed by Windows (a trailing dot or
        space dropped)."""
        from piccolo_twisted.cli.names import local_name_problem
        directory = "D:\\Users\\me\\piccolo"
        candidates = list(WINDOWS_ATTACKS) + ["ok", "Run 2024-06-01", "café", "日本", "🙂",
                                              "a.b", ".x", "x.", " x", "-dash", "a#b", "a%2Fb"]
        candidates += [f"a{chr(c)}b" for c in range(0x20, 0x7f)]
        candidates += [f"{d}{e}" for d in ("CON", "PRN", "AUX", "NUL", "COM1", "LPT1", "COM0")
                       for e in ("", ".txt", " ", ".", " .x")]
        candidates += [f"{c}:" for c in "AbZ"] + [f"{c}:x" for c in "AbZ"]
        taken = 0
        for name in candidates:
            if local_name_problem(name) is not None:
                continue
            taken += 1
            joined = ntpath.join(directory, name, FILE)
            self.assertEqual(ntpath.dirname(ntpath.dirname(joined)), directory, name)
            self.assertEqual(ntpath.basename(ntpath.dirname(joined)), name, name)
            self.assertEqual(ntpath.splitdrive(name)[0], "", name)
            self.assertFalse(ntpath.isabs(name), name)
            self.assertFalse(pathlib.PureWindowsPath(name).is_reserved(), name)
            self.assertEqual(name.rstrip(". "), name, name)
            self.assertFalse(set(name) & set('<>:"/\\|?*'), name)
            self.assertFalse({unicodedata.category(c) for c in name}
                             & {"Cc", "Cf", "Cs", "Zl", "Zp"}, name)
        self.assertGreater(taken, 90)

    @in_loop
    async def test_runs_one_folder_on_a_case_insensitive_disk(self):
        """Finding 18: ``Run`` and ``run`` are one folder on Windows, macOS
        and a FAT stick: the second run's files overwrote the first's. Now
        the later one is left out with a line (exit 1), and so is a run
        whose folder is already there under another case or another
        Unicode normal form."""
        decomposed = unicodedata.normalize("NFD", "Café")
        routes = {"data_dir/all_runs": ["Run", "café", "run", decomposed, "RUN2"]}
        for name in routes["data_dir/all_runs"]:
            routes[f"data_dir/runs/{name}/spectra_list"] = [FILE]
            routes[f"data_dir/runs/{name}/spectra"] = pico_text(Run=name)
        target = os.path.join(self.parent, "DIR")
        os.makedirs(os.path.join(target, "run2"))
        code, out, err = await self.against(routes, "fetch", "--all", target)
        self.assertEqual(code, 1, err)
        self.assertEqual(sorted(os.listdir(target)), ["Run", "café", "run2"])
        self.assertIn("run 'run' not fetched: one folder with 'Run'", err)
        self.assertIn("one folder with 'café'", err)
        self.assertIn("run 'RUN2' not fetched: one folder with 'run2'", err)
        with open(os.path.join(target, "Run", FILE)) as f:
            self.assertEqual(json.load(f)["Spectra"][0]["Metadata"]["Run"], "Run")


# -- 6, 7: times --------------------------------------------------------------------

class TimeZoneTests(Crafted):

    def routes(self):
        routes = honest_routes()
        jobs = []
        routes["control/scheduler/jobs"] = lambda code, path, payload: jobs
        routes["control/record_sequence"] = None
        routes["control/power_on"] = None
        return routes

    @staticmethod
    def sent(server, path):
        return [json.loads(p)[1] for c, p_, p in server.requests if c == 3 and p_ == path]

    @in_loop
    async def test_a_time_without_offset_takes_that_dates_offset(self):
        """Finding 6: in Berlin in December, ``--at "2030-06-01 10:00"`` was
        stored as 09:00 UTC (December's +01:00); it is 08:00 UTC (summer
        time). --until and power-on --at alike. Run with TZ in a process
        of its own: whatever today is, one of the two dates has another
        offset than today."""
        if not os.path.exists("/usr/share/zoneinfo/Europe/Berlin"):
            raise unittest.SkipTest("no time zone data (tzdata) for TZ=Europe/Berlin")
        server, url, close = await serve(self.routes())
        try:
            for date, utc in (("2030-06-01", "08"), ("2030-12-01", "09")):
                code, out, err = await subprocess_piccolo3(
                    url, "schedule", "record", "--run", "r", "-n", "1", "--at",
                    f"{date} 10:00", "--every", "1h", "--until", f"{date} 12:30",
                    env={"TZ": "Europe/Berlin"})
                self.assertEqual(code, 0, err)
                code, out, err = await subprocess_piccolo3(
                    url, "schedule", "power-on", "--at", f"{date} 10:00",
                    env={"TZ": "Europe/Berlin"})
                self.assertEqual(code, 0, err)
            records = self.sent(server, "control/record_sequence")
            self.assertEqual([(r["at_time"], r["end_time"]) for r in records],
                             [("2030-06-01T08:00:00+00:00", "2030-06-01T10:30:00+00:00"),
                              ("2030-12-01T09:00:00+00:00", "2030-12-01T11:30:00+00:00")])
            self.assertEqual([r["at_time"] for r in self.sent(server, "control/power_on")],
                             ["2030-06-01T08:00:00+00:00", "2030-12-01T09:00:00+00:00"])
            # a time the clocks skip (the last Sunday of March, 02:30)
            before = len(server.requests)
            code, out, err = await subprocess_piccolo3(
                url, "schedule", "power-on", "--at", "2030-03-31 02:30",
                env={"TZ": "Europe/Berlin"})
            self.assertEqual(code, 2, err)
            self.assertIn(b"does not exist in this computer's time zone", err)
            self.assertEqual(err.count(b"\n"), 1, err)
            self.assertEqual(len(server.requests), before)
        finally:
            close()

    @in_loop
    async def test_times_out_of_range_are_usage_errors(self):
        """Finding 7: ``--at 9999-12-31T23:59:59-14:00`` (or
        ``0001-01-01T00:00+14:00``) was an OverflowError; now one line,
        exit 2, nothing sent."""
        server, url, close = await serve(self.routes())
        try:
            for at in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00+14:00",
                       "1969-12-31T23:59:59Z", "0001-01-01 00:00"):
                for argv in (("schedule", "record", "--run", "r", "-n", "1", "--at", at),
                             ("schedule", "record", "--run", "r", "-n", "1", "--at",
                              "2030-01-01T00:00Z", "--every", "1h", "--until", at),
                             ("schedule", "power-off", "--at", at)):
                    before = len(server.requests)
                    code, out, err = await piccolo3("--server", url, *argv)
                    self.assertEqual(code, 2, (argv, err))
                    self.assertEqual(err.count("\n"), 1, err)
                    self.assertIn("out of range (1970 to 9999 in UTC)", err)
                    self.assertEqual(len(server.requests), before, argv)
        finally:
            close()


# -- 9: the quiet window ------------------------------------------------------------------

class QuietServer:
    """The quiet-time resources of a scheduler, as state: each PUT is
    taken (or refused, for ``refuse``), and the state after it kept."""

    def __init__(self, state, now, refuse=()):
        self.state = dict(state)
        self.history = []
        self.refuse = set(refuse)
        self.now = now

    def routes(self):
        routes = {"sysinfo/clock": self.now.isoformat()} if self.now else {}
        for key in self.state:
            routes[f"control/scheduler/{key}"] = self.handler(key)
        return routes

    def handler(self, key):
        def answer(code, path, payload):
            if code == 1:
                return self.state[key]
            if key in self.refuse:
                return (BAD_REQUEST, f"{key}: refused".encode())
            self.state[key] = json.loads(payload)[0][0]
            self.history.append(dict(self.state))
        return answer


class QuietWindowTests(Crafted):

    OLD = {"quietTimeEnabled": True, "quietStart": "22:00:00+0000", "quietEnd": "04:00:00+0000",
           "powerOffEnabled": True, "powerDelay": 0}
    NOW = datetime(2030, 6, 1, 10, 0, tzinfo=timezone.utc)

    @staticmethod
    def effect(state, now):
        """What the server's own scheduler does with ``state`` at ``now``."""
        from piccolo_twisted import scheduler
        if not state["quietTimeEnabled"]:
            return (False, False)
        t = now.timestamp()
        quiet = scheduler.in_quiet(t, state["quietStart"], state["quietEnd"])
        start, end = scheduler.quiet_window(t, state["quietStart"], state["quietEnd"])
        delay = state["powerDelay"]
        off = (state["powerOffEnabled"] and quiet and end - start > 2 * delay
               and start + delay <= t < end - delay)
        return (quiet, off)

    async def quiet(self, server, *argv):
        crafted, url, close = await serve(server.routes())
        try:
            return await piccolo3("--server", url, "--timeout", "2", "schedule", "quiet", *argv)
        finally:
            close()

    @in_loop
    async def test_every_value_is_checked_before_anything_is_sent(self):
        """Finding 9: ``--end 06:00+9999`` was taken here; the server stored
        the new start, refused the end, and the old end with the new
        start (an hour ago) switched the spectrometers off. Now nothing
        is sent and it is one line, exit 2."""
        server = QuietServer(self.OLD, self.NOW)
        code, out, err = await self.quiet(server, "on", "--start", "09:00+0000",
                                          "--end", "06:00+9999")
        self.assertEqual(code, 2, err)
        self.assertOneLine(err, "not a time of day: '06:00+9999'")
        self.assertEqual(server.history, [])
        for bad in ("06:00+1460", "06:00-15:00", "06:00+0060"):
            code, out, err = await self.quiet(server, "--end", bad)
            self.assertEqual(code, 2, (bad, err))
        code, out, err = await self.quiet(server, "--start", "09:00Z", "--power-delay", "43201")
        self.assertEqual(code, 1, err)
        self.assertOneLine(err, "schedule quiet: powerDelay: must be 0 to 43200 s")
        self.assertEqual(server.history, [])

    @in_loop
    async def test_a_refusal_half_way_puts_the_old_window_back(self):
        """Finding 9: a refusal after the start was written left the window
        on with the new start and the old end. Now nothing is written
        before a step that can be refused leaves a window on that neither
        setting has, and what was written is put back."""
        for refused, words in (("quietEnd", "nothing changed"),
                               ("quietStart", "the old settings are back: nothing changed")):
            server = QuietServer(self.OLD, self.NOW, refuse={refused})
            code, out, err = await self.quiet(server, "on", "--start", "09:00+0000",
                                              "--end", "09:30+0000")
            self.assertEqual(code, 1, err)
            self.assertOneLine(err, f"schedule quiet: {refused}: {refused}: refused; {words}")
            self.assertEqual(server.state, self.OLD)
            for state in server.history:
                self.assertEqual(self.effect(state, self.NOW), self.effect(self.OLD, self.NOW),
                                 state)

    @in_loop
    async def test_no_step_acts_as_neither_window(self):
        """Finding 9: with the window on, new times were written one by
        one: start 09:00 first made 09:00 to 04:00 (old end) a window over
        10:00, switching the spectrometers off. Now the end goes first:
        every state on the way does now what the old or the new window
        does (by the server's own arithmetic), and the quiet time is never
        switched off around them."""
        server = QuietServer(self.OLD, self.NOW)
        code, out, err = await self.quiet(server, "--start", "09:00+0000", "--end", "09:30+0000")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(server.state, {**self.OLD, "quietStart": "09:00:00+0000",
                                        "quietEnd": "09:30:00+0000"})
        allowed = {self.effect(self.OLD, self.NOW), self.effect(server.state, self.NOW)}
        for state in server.history:
            self.assertIn(self.effect(state, self.NOW), allowed, state)
            self.assertTrue(state["quietTimeEnabled"])

    @in_loop
    async def test_an_instrument_clock_at_the_end_of_time_is_no_traceback(self):
        """The window arithmetic with the server's clock in 9999 (or a
        power delay of 1e308 s from a hostile server): the quiet time is
        switched off around the writes, never an OverflowError."""
        for old, now in (({**self.OLD, "powerDelay": 1.7e308}, self.NOW),
                         (self.OLD, datetime(9999, 12, 31, 23, 59, 30, tzinfo=timezone.utc))):
            server = QuietServer(old, now)
            code, out, err = await self.quiet(server, "--start", "09:00+0000",
                                              "--end", "09:30+0000")
            self.assertEqual((code, err), (0, ""))
            self.assertEqual([s["quietTimeEnabled"] for s in server.history],
                             [False, False, False, True])

    @in_loop
    async def test_without_the_instruments_time_the_window_is_off_around_the_writes(self):
        server = QuietServer(self.OLD, None)            # no /sysinfo/clock
        code, out, err = await self.quiet(server, "--start", "09:00+0000", "--end", "09:30+0000")
        self.assertEqual((code, err), (0, ""))
        enabled = [s["quietTimeEnabled"] for s in server.history]
        self.assertEqual(enabled, [False, False, False, True])
        self.assertEqual(server.state["quietStart"], "09:00:00+0000")


# -- 12: watch --------------------------------------------------------------------------

class WatchTests(Crafted):

    @in_loop
    async def test_a_malformed_update_ends_the_watch(self):
        """Finding 12: a malformed notification was dropped without a word
        (and later good ones for the resource ignored until the 10-s
        recheck). Now it ends the watch: one line naming the resource,
        exit 2."""
        routes = honest_routes()
        routes["control/status"] = Observed("idle", ["recording", ["x"]], interval=0.3,
                                           stepped=True)
        code, out, err = await self.against(routes, "status", "--watch", "--updates", "5")
        self.assertEqual(code, 2, (out, err))
        self.assertOneLine(err, "GET /control/status: malformed answer from the server: "
                                "the answer is a list of 1, not a string")
        self.assertIn("\n-- ", out)             # the good update before it was shown


# -- 13: a slow server ------------------------------------------------------------------

class SlowServerTests(Crafted):

    @in_loop
    async def test_fetch_from_a_server_that_answers_slowly_ends_saying_so(self):
        """Finding 13: each file had 60 s, the fetch as a whole no limit:
        files sent a block now and then kept fetch busy for files x 60 s /
        4, and the end said "cannot reach the server". Now a transfer
        worker keeps a pace (4 kB/s after its first seconds): the fetch
        ends after a few files with a line saying the server is slow."""
        names = [f"b000000_s{i:06d}.pico" for i in range(20)]
        text = json.dumps("x" * 2500)                   # three blocks
        routes = {"data_dir/runs/field/spectra_list": names,
                  "data_dir/runs/field/spectra": Slow(Raw(text), 0.7)}
        target = os.path.join(self.parent, "DIR")
        server, url, close = await serve(routes)
        try:
            code, out, err = await piccolo3("--server", url, "--timeout", "2",
                                            "fetch", "field", target, "-j", "1")
        finally:
            close()
        self.assertEqual(code, 1, err)
        self.assertOneLine(err, "the server answers too slowly (", "): stopped")
        self.assertNotIn("cannot reach", err)
        transfers = [p for _, p, _ in server.requests if p == "data_dir/runs/field/spectra"]
        self.assertLess(len(transfers), 20)
        self.assertLess(len(os.listdir(os.path.join(target, "field"))), 20)

    @in_loop
    async def test_a_silent_server_is_no_answer(self):
        routes = honest_routes()
        routes["control/status"] = Slow("idle", 60)
        code, out, err = await self.against(routes, "status")
        self.assertEqual(code, 1, err)
        self.assertOneLine(err, "no answer within 2 s (is the server running?)")


# -- 14: record after the stick is pulled ---------------------------------------------

class RecordCountTests(Crafted):

    def routes(self, summary):
        routes = honest_routes()
        reason = b"the data directory /mnt/piccolo_data is missing (a pulled stick?)"
        routes.update({
            "control/status": Observed("idle", ["waiting", "recording", "idle"], 0.2),
            "data_dir/runs/field/current_batch": -1,
            "control/record_sequence": None,
            "data_dir/runs/field/spectra_list": (SERVICE_UNAVAILABLE, reason),
            "control/last_batch": summary,
        })
        fault = "cannot write b000000_s000003_light.pico: the data directory is missing"
        routes["control/fault"] = lambda code, path, payload: (
            fault if any(p == "control/record_sequence" for _, p, _ in self.server.requests)
            else "")
        return routes

    async def record(self, routes):
        self.server, url, close = await serve(routes)
        try:
            return await piccolo3("--server", url, "--timeout", "2", "record", "--run",
                                  "field", "-n", "20")
        finally:
            close()

    @in_loop
    async def test_the_batch_summary_counts_when_the_files_cannot_be_listed(self):
        """Finding 14: with the stick pulled mid-batch the run's file list
        answered 5.03, was read as empty, and record said "0 of 20
        sequences recorded" with 3 on the stick. Now the batch's summary
        counts; without one that fits, the line says it cannot tell."""
        summary = {"kind": "batch", "run": "field", "batch": 0, "sequences": 3,
                   "files": ["b000000_s000000_dark.pico"] + [
                       f"b000000_s00000{i}_light.pico" for i in range(3)]}
        code, out, err = await self.record(self.routes(summary))
        self.assertEqual(code, 3, err)
        self.assertIn("(3 of 20 sequences recorded)", err.splitlines()[-1])
        code, out, err = await self.record(self.routes({**summary, "run": "other"}))
        self.assertEqual(code, 3, err)
        last = err.splitlines()[-1]
        self.assertNotIn("0 of 20", last)
        self.assertIn("how many of 20 sequences were recorded is unknown: the server cannot "
                      "list the run's files (the data directory /mnt/piccolo_data is missing",
                      last)


class PulledStickRecordTests(ServerTestCase):

    @coro
    async def test_record_counts_what_the_stick_holds(self):
        """Finding 14 against the real server: the stick is pulled after a
        few sequences; record says as many recorded as the batch wrote."""
        from piccolo_twisted.cli.main import run
        out, err = io.StringIO(), io.StringIO()
        recording = asyncio.ensure_future(run(
            ["--server", self.base, "record", "--run", "field", "-n", "20", "--auto", "-1",
             "--delay", "0.3"], out=out, err=err))
        await self.wait_for("control/current_sequence", lambda s: s >= 3)
        # pulled while a file is being written: a temporary file may vanish
        # under rmtree (renamed into place), and one may appear after it
        while os.path.lexists(self.datadir):
            shutil.rmtree(self.datadir, ignore_errors=True)
        code = await asyncio.wait_for(recording, 60)
        summary = await self.get("control/last_batch")
        self.assertGreaterEqual(summary["sequences"], 3)
        last = err.getvalue().strip().splitlines()[-1]
        self.assertEqual(code, 3, err.getvalue())
        self.assertIn(f"({summary['sequences']} of 20 sequences recorded)", last)


# -- 10: the server, a missing data directory ------------------------------------------

class MissingDataDirectoryRecordTests(ServerTestCase):

    @coro
    async def test_record_without_a_run_is_503_with_the_stick_pulled(self):
        """Finding 10: record_sequence and record_dark without ``run``
        answered 2.04 and then stopped on a fault; docs/API.md says 5.03
        (as with a run given). Now 5.03 with the reason, nothing started."""
        shutil.rmtree(self.datadir)
        reason = f"the data directory {self.datadir} is missing"
        for path, payload in (("control/record_sequence", {"nsequence": 1, "auto": -1}),
                              ("control/record_sequence", [[], {}]),
                              ("control/record_dark", None), ("control/record_dark", [[], {}])):
            response = await self.request("PUT", path, payload)
            self.assertTrue(str(response.code).startswith("5.03"), (path, response.code))
            self.assertIn(reason, response.payload.decode())
        self.assertEqual(await self.get("control/status"), "idle")
        self.assertEqual(await self.get("control/fault"), "")


# -- 15, 16, 18 on the server: names of new runs --------------------------------------------

class NewRunNameTests(ServerTestCase):

    @coro
    async def test_new_runs_have_names_every_client_and_disk_can_use(self):
        """Findings 5, 15, 16, 18 on the server: run names with ``:`` (a
        drive on Windows), ``CON``, a trailing dot, ``?``/``#``/``%`` (the
        deployed client cannot put them in a URI), RLO, U+2028, BOM or a
        zero-width space (invisible), or another run's name in another
        case were accepted; now each is 4.00 with the reason, and no
        directory is made. A run made so by hand stays reachable."""
        bad = ["C:evil", "CON", "nul.txt", "run.", "run ", "a?b", "a#b", "a%2Fb",
               "\u202eexe.txt", "a\u2028b", "\ufeffbom", "zero\u200bwidth", "a<b", "SPECTRA"]
        for name in bad:
            response = await self.request("PUT", "data_dir/current_run", name)
            self.assertEqual(str(response.code)[:4], "4.00", name)
            self.assertIn("invalid name for a new run", response.payload.decode(), name)
            response = await self.request("PUT", "control/record_sequence",
                                          {"run": name, "nsequence": 1,
                                           "at_time": "2031-01-01T00:00:00Z"})
            self.assertEqual(str(response.code)[:4], "4.00", name)
        self.assertEqual(sorted(os.listdir(self.datadir)), [".piccolo", "spectra"])
        self.assertEqual(await self.get("control/scheduler/jobs"), [])
        # made by hand (or by an earlier version): listed and usable
        os.mkdir(os.path.join(self.datadir, "10:00"))
        self.assertIn("10:00", await self.put("data_dir/all_runs", None))
        await self.put("data_dir/current_run", "10:00")
        self.assertEqual(await self.get("data_dir/current_run"), "10:00")


class SharedNewNameTests(unittest.SynchronousTestCase):

    def test_new_run_names_agree_and_are_local_names(self):
        """The server's rule for new runs and the command line's agree name
        for name, and every name the server creates a run with is a
        folder name fetch can make on any system."""
        from piccolo_twisted import datadir
        from piccolo_twisted.cli import names
        candidates = (list(WINDOWS_ATTACKS) + ["spectra", "Run 2024-06-01", "café", "日本",
                                               "🙂", "a#b", "a%b", "a b", "a\xa0b", "x" * 100,
                                               "x" * 101, "\ud800", "..", ".x", "a/b"]
                      + [f"a{chr(c)}b" for c in range(0x00, 0x250)])
        for name in candidates:
            server = datadir.new_run_name_problem(name) is None
            self.assertEqual(names.new_run_name_problem(name) is None, server, repr(name))
            if server:
                self.assertIsNone(names.local_name_problem(name), repr(name))
                self.assertTrue(datadir.is_run_name(name), repr(name))


# -- 17: a job already so ---------------------------------------------------------------

class JobStateTests(Crafted):

    @in_loop
    async def test_a_job_already_so_is_said_to_be(self):
        """Finding 17: ``schedule resume 7`` of an active job said
        "resumed"; now it says the job is active already, and sends
        nothing (suspend of a suspended job alike)."""
        for state, action in (("active", "resume"), ("suspended", "suspend")):
            routes = honest_routes()
            routes["control/scheduler/jobs"] = [
                [7, ["power_on"], "2031-01-01T05:30:00+00:00", None, 86400.0, state]]
            server, url, close = await serve(routes)
            try:
                code, out, err = await piccolo3("--server", url, "schedule", action, "7")
            finally:
                close()
            self.assertEqual((code, err), (0, ""))
            self.assertRegex(out, rf"^job #7 is {state} already: job #7: switch the "
                                  rf"spectrometers on: next .* \[{state}\]\n$")
            self.assertEqual([p for c, p, _ in server.requests if c == 3], [])


class PaceTests(Crafted):

    @in_loop
    async def test_many_small_answers_over_a_slow_link_are_not_too_slow(self):
        """The pace counts a small answer as a block's worth: checking 80
        files already here at 60 ms a round trip (a link to a field) is
        not a slow server, and reading the local copies is no waiting."""
        names = [f"b000000_s{i:06d}.pico" for i in range(80)]
        text = "{}"                             # small files: an answer of 4 bytes
        routes = {"data_dir/runs/field/spectra_list": names,
                  "data_dir/runs/field/spectra": Slow(text, 0.06)}
        target = os.path.join(self.parent, "DIR")
        os.makedirs(os.path.join(target, "field"))
        for name in names:
            with open(os.path.join(target, "field", name), "w") as f:
                f.write(text)
        server, url, close = await serve(routes)
        try:
            code, out, err = await piccolo3("--server", url, "--timeout", "2",
                                            "fetch", "field", target, "-j", "1")
        finally:
            close()
        self.assertEqual(code, 0, err)
        self.assertIn("80 files in 1 run: 0 downloaded, 80 already here", err)

    @in_loop
    async def test_a_flood_of_notifications_is_not_kept(self):
        """A server may send notifications faster than they are read: the
        unread ones kept are bounded (the newest kept), not memory."""
        from piccolo_twisted.cli.client import MAX_QUEUED, Client
        notes = [f"s{i}" for i in range(3 * MAX_QUEUED)]
        server, url, close = await serve({"control/status": Observed("idle", notes, 0.001)})
        try:
            async with Client(url, 2) as client:
                observation = client.observe("control/status")
                self.assertEqual(await observation.start(), "idle")
                await asyncio.sleep(3 * MAX_QUEUED * 0.001 + 1.5)   # all of them sent
                self.assertLessEqual(observation.queue.qsize(), MAX_QUEUED)
                values = [await observation.next(1) for _ in range(MAX_QUEUED)]
                self.assertEqual(values[-1], notes[-1])
                observation.cancel()
        finally:
            close()
