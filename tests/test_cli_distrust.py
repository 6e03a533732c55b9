"""The command line against a malicious server (issue 21): names that lead
out of DIR, special files, answers of the wrong shape, escape sequences.

Each command runs in-process against ``crafted_coap.CraftedServer`` on
127.0.0.1 (an ephemeral port, this test's event loop, closed at the end),
with a 2 s answer timeout and every run bounded by ``asyncio.wait_for``.
The counts in the docstrings are what ba916b9 did with the same cases.
"""

import asyncio
import io
import json
import os
import shutil
import stat
import tempfile
import unicodedata

from twisted.trial import unittest

from .crafted_coap import BAD_REQUEST, Raw, honest_routes, serve

FILE = "b000000_s000000_light.pico"
BOUND = 30          # seconds any one command may take here
ESC = "\x1b"


def in_loop(coro_fn):
    """Run ``coro_fn(self)`` on an event loop of its own (never installed:
    the reactor's loop stays the thread's loop for the tests after)."""
    def test(self):
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(asyncio.wait_for(coro_fn(self), 120))
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
    test.__name__ = coro_fn.__name__
    test.__doc__ = coro_fn.__doc__
    return test


async def piccolo3(*argv):
    """(exit status, stdout, stderr); an exception escaping is a traceback."""
    from piccolo_twisted.cli.main import run
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.wait_for(run(list(argv), out=out, err=err), BOUND)
    return code, out.getvalue(), err.getvalue()


class Crafted(unittest.SynchronousTestCase):

    def setUp(self):
        self.parent = tempfile.mkdtemp(prefix="piccolo-crafted-")
        self.addCleanup(shutil.rmtree, self.parent, True)

    async def against(self, routes, *argv):
        server, url, close = await serve(routes)
        try:
            return await piccolo3("--server", url, "--timeout", "2", *argv)
        finally:
            close()

    @staticmethod
    def one_line_problem(err, *fragments):
        """None if ``err`` holds one error line with ``fragments``, no
        traceback and no raw ESC; else what is wrong."""
        lines = [line for line in err.splitlines() if line.startswith("piccolo3: ")]
        if len(lines) != 1 or "Traceback" in err or ESC in err:
            return f"not one clean error line: {err!r}"
        missing = [f for f in fragments if f not in lines[0]]
        return f"{missing} not in {lines[0]!r}" if missing else None

    def assertOneLine(self, err, *fragments):
        problem = self.one_line_problem(err, *fragments)
        if problem:
            self.fail(problem)

    def files_outside(self, target):
        """Every file under the test's private parent but outside ``target``."""
        found = []
        for directory, _, files in os.walk(self.parent):
            for name in files:
                path = os.path.join(directory, name)
                if not path.startswith(target + os.sep):
                    found.append(path)
        return found


class CraftedNameTests(Crafted):

    def cases(self):
        outside = os.path.join(self.parent, "outside.pico")
        return [
            ("--all", {"data_dir/all_runs": [".."],
                       "data_dir/runs/../spectra_list": [FILE]}),
            ("--all", {"data_dir/all_runs": ["../../escaped"],
                       "data_dir/runs/../../escaped/spectra_list": [FILE]}),
            ("field", {"data_dir/runs/field/spectra_list": ["../../escaped.pico"]}),
            ("field", {"data_dir/runs/field/spectra_list": [outside]}),
        ]

    @in_loop
    async def test_crafted_names_never_leave_dir(self):
        """4 of 4 crafted names were written outside DIR on ba916b9: now
        each is one line, exit 2, and nothing is written at all."""
        outside, problems = [], []
        for i, (run, routes) in enumerate(self.cases()):
            case = os.path.join(self.parent, f"case{i}")
            target = os.path.join(case, "a", "DIR")
            os.makedirs(target)
            for path in list(routes):           # any file asked for: some text
                if path.endswith("/spectra_list"):
                    routes[path[:-len("_list")]] = '{"Spectra": []}'
            argv = ["fetch", "--all", target] if run == "--all" else ["fetch", run, target]
            code, out, err = await self.against(routes, *argv)
            escaped = [p for p in self.files_outside(target)
                       if p.startswith(case + os.sep) or not p.startswith(
                           os.path.join(self.parent, "case"))]
            if escaped:
                outside.append(escaped)
            problem = (self.one_line_problem(err, "malformed answer from the server")
                       if code == 2 else f"exit {code}")
            if problem or os.listdir(target):
                problems.append((i, problem, os.listdir(target)))
        self.assertEqual(outside, [], f"{len(outside)} of 4 written outside DIR")
        self.assertEqual(problems, [])

    @in_loop
    async def test_dev_zero_is_never_read(self):
        """A file named /dev/zero was read "to compare the local copy" until
        MemoryError at 757 MB."""
        target = os.path.join(self.parent, "DIR")
        code, out, err = await self.against(
            {"data_dir/runs/field/spectra_list": ["/dev/zero"]}, "fetch", "field", target)
        self.assertEqual(code, 2, err)
        self.assertOneLine(err, "'/dev/zero'", "not a spectrum file name")
        self.assertFalse(os.path.exists(os.path.join(target, "field")))

    @in_loop
    async def test_special_and_linked_local_files_are_not_opened(self):
        """A FIFO named like a spectrum file in DIR is neither opened nor
        read (it blocked for ever); a symlink there is not followed (the
        file outside stays as it was); both are replaced by the file."""
        target = os.path.join(self.parent, "DIR")
        run_dir = os.path.join(target, "field")
        os.makedirs(run_dir)
        os.mkfifo(os.path.join(run_dir, FILE))
        sentinel = os.path.join(self.parent, "sentinel.pico")
        with open(sentinel, "w") as f:
            f.write("mine")
        other = "b000000_s000001_light.pico"
        os.symlink(sentinel, os.path.join(run_dir, other))
        routes = {"data_dir/runs/field/spectra_list": [FILE, other],
                  "data_dir/runs/field/spectra": lambda code, path, payload: json.loads(payload)}
        code, out, err = await self.against(routes, "fetch", "field", target)
        self.assertEqual(code, 0, err)
        self.assertIn("2 downloaded", err)
        for name in (FILE, other):
            path = os.path.join(run_dir, name)
            self.assertTrue(stat.S_ISREG(os.lstat(path).st_mode), name)
            with open(path) as f:
                self.assertEqual(f.read(), name)
        with open(sentinel) as f:
            self.assertEqual(f.read(), "mine")

    @in_loop
    async def test_a_symlinked_run_directory_is_refused(self):
        target = os.path.join(self.parent, "DIR")
        os.makedirs(target)
        elsewhere = os.path.join(self.parent, "elsewhere")
        os.makedirs(elsewhere)
        os.symlink(elsewhere, os.path.join(target, "field"))
        routes = {"data_dir/runs/field/spectra_list": [FILE],
                  "data_dir/runs/field/spectra": "text"}
        code, out, err = await self.against(routes, "fetch", "field", target)
        self.assertEqual(code, 1, err)
        self.assertOneLine(err, "not a directory (a symlink is not followed)")
        self.assertEqual(os.listdir(elsewhere), [])


def _meta(**changes):
    meta = {"SerialNumber": "QEP1", "Direction": "upwelling", "Dark": False, "Run": "r",
            "Batch": 0, "SequenceNumber": 0, "IntegrationTime": 100.0,
            "SaturationLevel": 200000, "WavelengthCalibrationCoefficients": [300.0, 0.5]}
    meta.update(changes)
    return meta


def _doc(meta=None, pixels=(1, 2, 3)):
    return {"Spectra": [{"Metadata": _meta() if meta is None else meta,
                         "Pixels": list(pixels) if isinstance(pixels, tuple) else pixels}]}


#: name: (content, exit status now). The first ten gave a traceback on
#: ba916b9; "mathtext" plots now (its labels are text, not TeX).
CRAFTED_PLOTS = {
    "coeff_strings": (_doc(_meta(WavelengthCalibrationCoefficients=["a", "b"])), 1),
    "coeff_number": (_doc(_meta(WavelengthCalibrationCoefficients=5)), 1),
    "itime_string": (_doc(_meta(IntegrationTime="100")), 1),
    "serial_list": (_doc(_meta(SerialNumber=["x"])), 1),
    "direction_object": (_doc(_meta(Direction={"a": 1})), 1),
    "run_list": (_doc(_meta(Run=[1])), 1),
    "pixels_ragged": (_doc(pixels=[[1, 2], [3]]), 1),
    "deep": ("[" * 100000 + "]" * 100000, 1),
    "mathtext": (_doc(_meta(SerialNumber="$\\frac{$")), 0),
    "coeff_huge": (_doc(_meta(WavelengthCalibrationCoefficients=[1e308, 1e308])), 1),
    "saturation_string": (_doc(_meta(SaturationLevel="high")), 1),
    "pixels_string": (_doc(pixels="abc"), 1),
    "spectra_empty": ({"Spectra": []}, 1),
    "pixels_null": (_doc(pixels=[None, 1, 2]), 1),
    "escape_in_run": (_doc(_meta(Run="\x1b[2J\x1b]0;pwned\x07")), 0),
    "pixels_strings": (_doc(pixels=["a", "b"]), 1),
    "metadata_list": ({"Spectra": [{"Metadata": [], "Pixels": [1]}]}, 1),
}


class CraftedPlotTests(Crafted):

    @in_loop
    async def test_seventeen_crafted_files(self):
        """10 of 17 crafted files gave a traceback on ba916b9: now each is
        plotted or refused in one line (exit 1), none a traceback."""
        self.assertEqual(len(CRAFTED_PLOTS), 17)
        tracebacks, problems = [], {}
        for name, (content, expected) in CRAFTED_PLOTS.items():
            path = os.path.join(self.parent, name + ".pico")
            with open(path, "w") as f:
                f.write(content if isinstance(content, str) else json.dumps(content))
            png = os.path.join(self.parent, name + ".png")
            try:
                code, out, err = await piccolo3("plot", path, "-o", png)
            except Exception as e:          # what a person saw as a traceback
                tracebacks.append(f"{name}: {type(e).__name__}")
                continue
            if code != expected:
                problems[name] = f"exit {code}: {err!r}"
            elif expected:
                problems[name] = (self.one_line_problem(err, f"{name}.pico: not a .pico file (")
                                  or (os.path.exists(png) and "a PNG was written"))
            elif os.path.getsize(png) < 1000:
                problems[name] = "no plot"
        self.assertEqual(tracebacks, [], f"{len(tracebacks)} of 17 gave a traceback")
        self.assertEqual({k: v for k, v in problems.items() if v}, {})

    @in_loop
    async def test_special_files_are_not_plotted(self):
        fifo = os.path.join(self.parent, "fifo.pico")
        os.mkfifo(fifo)
        for path in (fifo, "/dev/zero"):
            code, out, err = await piccolo3("plot", path, "-o", os.path.join(self.parent, "x.png"))
            self.assertEqual(code, 1, err)
            self.assertOneLine(err, "not a regular file")


HEALTH_PATH = "sysinfo/health"
DEEP = Raw("[" * 100000 + "]" * 100000)

#: (command, path, crafted answer); the answer of sysinfo/health given as
#: a dict is merged into the honest one. On ba916b9 all but the two with
#: escape sequences (which reached the terminal raw) ended in a traceback.
CRAFTED_ANSWERS = [
    ("status", "control/current_sequence", "3"),
    ("status", "spectrometer/spectrometers", 5),
    ("status", "spectrometer/channels", 7),
    ("status", "shutter/shutters", None),
    ("status", "control/scheduler/jobs", [[1]]),
    ("status", "spectrometer/S_sim_QEP00981/status", []),
    ("status", "control/status", DEEP),
    ("status", "control/fault", "\x1b[2J\x1b[31mhacked\x1b[0m"),
    ("jobs", "control/scheduler/jobs",
     [[1, ["record", ["r", 1]], "2030-01-01T00:00:00+00:00", None, "x", "active"]]),
    ("jobs", "control/scheduler/jobs", {"a": 1}),
    ("jobs", "control/scheduler/jobs", [[1, ["record"], 5, None, None, "active"]]),
    ("jobs", "control/scheduler/jobs",
     [[1, ["record", ["r", 1]], "2020-01-01T00:00:00+00:00", None, 1e300, "active"]]),
    ("health", HEALTH_PATH, []),
    ("health", HEALTH_PATH, {"disk_free": "lots"}),
    ("health", HEALTH_PATH, {"spectrometers": {"x": "broken"}}),
    ("health", HEALTH_PATH, {"uptime": "forever"}),
    ("health", HEALTH_PATH, {"faults": {"datadir": "\x1b]0;pwned\x07\x1b[2J"}}),
]


def _holds_escape(value):
    if isinstance(value, str):
        return ESC in value
    if isinstance(value, dict):
        return any(map(_holds_escape, value.values()))
    return False


class CraftedAnswerTests(Crafted):

    def routes(self, path, answer):
        routes = honest_routes()
        if path == HEALTH_PATH and isinstance(answer, dict):
            answer = {**routes[HEALTH_PATH], **answer}
        routes[path] = answer
        return routes

    @in_loop
    async def test_honest_answers(self):
        """The crafted server's honest answers make the usual screens (so
        each crafted case below differs from a good answer in one place)."""
        for command in ("status", "jobs", "health"):
            code, out, err = await self.against(honest_routes(), command)
            self.assertEqual((code, err), (0, ""), command)
        self.assertRegex(out, r"(?m)^sim_QEP00981\s+idle, 0 errors, temperature -10.0 °C$")

    @in_loop
    async def test_seventeen_crafted_answers(self):
        """15 of 17 crafted answers to status, jobs and health gave a
        traceback on ba916b9: now each is one line and exit 2, and the
        two carrying escape sequences are shown escaped."""
        self.assertEqual(len(CRAFTED_ANSWERS), 17)
        tracebacks, problems = [], []
        for command, path, answer in CRAFTED_ANSWERS:
            try:
                code, out, err = await self.against(self.routes(path, answer), command)
            except Exception as e:
                tracebacks.append(f"{command} {path}: {type(e).__name__}")
                continue
            if _holds_escape(answer):
                if (code, err) != (0, "") or ESC in out or "\\x1b" not in out:
                    problems.append((command, path, "escape sequence not escaped", code))
            elif code != 2:
                problems.append((command, path, f"exit {code}"))
            else:
                problem = self.one_line_problem(err, "malformed answer from the server",
                                                f"/{path}")
                if problem:
                    problems.append((command, path, problem))
        self.assertEqual(tracebacks, [], f"{len(tracebacks)} of 17 gave a traceback")
        self.assertEqual(problems, [])

    @in_loop
    async def test_run_names_are_checked_and_errors_escaped(self):
        """A run name with ESC is not a run name (exit 2); a server's error
        message is one line, its ESC and newlines escaped."""
        code, out, err = await self.against(
            self.routes("data_dir/current_run", "\x1b[2Jrun"), "status")
        self.assertEqual(code, 2, err)
        self.assertOneLine(err, "GET /data_dir/current_run", "\\x1b[2Jrun")
        routes = honest_routes()
        routes["control/abort"] = (BAD_REQUEST, "\x1b[2Jno\r\nforged: line".encode())
        code, out, err = await self.against(routes, "abort")
        self.assertEqual(code, 1, err)
        self.assertOneLine(err, "abort: \\x1b[2Jno")
        self.assertEqual(err.count("\n"), 1, err)

    @in_loop
    async def test_newer_answers_are_checked_too(self):
        """The batch summary in health and a spectrometer's last
        temperature (issue 20) go through the same shapes: a row of three
        where a pair is unpacked, a text where numbers are joined."""
        summary = {"run": "r", "batch": 0, "sequences": 1, "files": [],
                   "integration_times": {"S_a": {"up": [100]}},
                   "saturated": [{"spectrometer": "S_a", "channel": "up", "type": "light",
                                  "sequences": [[0, 1]], "pixels_min": 1, "pixels_max": 2,
                                  "level": 65535}]}
        code, out, err = await self.against(
            self.routes(HEALTH_PATH, {"last_batch_summary": summary}), "health")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("S_a: up 100 ms", out)
        for bad in ({**summary, "integration_times": {"S_a": {"up": "x"}}},
                    {**summary, "saturated": [{**summary["saturated"][0],
                                               "sequences": [[0, 1, 2]]}]}):
            code, out, err = await self.against(
                self.routes(HEALTH_PATH, {"last_batch_summary": bad}), "health")
            self.assertEqual(code, 2, err)
            self.assertOneLine(err, "GET /sysinfo/health: malformed answer",
                               "last_batch_summary.")
        code, out, err = await self.against(
            self.routes("spectrometer/S_sim_QEP00981/last_temperature",
                        {"temperature": "hot", "age": 1}), "status")
        self.assertEqual(code, 2, err)
        self.assertOneLine(err, "last_temperature: malformed answer", "temperature is a string")

    @in_loop
    async def test_rows_may_grow(self):
        """A newer server may add columns to a job row (its last outcome,
        say): they are kept, never a malformed answer."""
        routes = honest_routes()
        routes["control/scheduler/jobs"][0].append({"outcome": "ok"})
        code, out, err = await self.against(routes, "jobs")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("#1 record run night, 2 sequences", out)


class SharedRuleTests(unittest.SynchronousTestCase):
    """The command line restates the server's name rules (it imports
    nothing of the server): the two must agree on every name."""

    NAMES = [
        "spectra", "field1", "Run 2024-06-01", "café", "日本", "🙂",
        "", ".", "..", ".hidden", "a/b", "/abs", "a\\b", "a\x00b", "tab\there",
        "new\nline", "cr\r", "esc\x1b[2J", "del\x7f", "c1\x85", "csi\x9b", "nbsp\xa0ok",
        "x" * 100, "x" * 101, "é" * 50, "é" * 51, "b000000_s000000_light.pico",
        "\ud800", "trailing.", "-dash",
    ]
    FILES = [
        "b000000_s000000_light.pico", "b000000_s000000_dark.pico", "b123456_s654321.pico",
        "b000000_s000000_light.pico\n", "b٠٠٠٠٠٠_s000000.pico", "b00000_s000000.pico",
        "b000000_s000000_light.pico.tmp", "../b000000_s000000.pico", "/dev/zero",
        "b1234567_s000000.pico", "b0123456_s000000.pico", "b123456789012_s000000.pico",
        "b000000_s12345678.pico", "b000000_s1234567_dark.pico",
        "xb000000_s000000.pico", "b000000_s000000_other.pico", "B000000_S000000.PICO",
        "b0000000_s000000.pico", "b000000_s000000_light.pic", "",
    ]

    def test_run_names_agree(self):
        from piccolo_twisted import datadir
        from piccolo_twisted.cli import names
        for name in self.NAMES:
            self.assertEqual(names.is_run_name(name), datadir.is_run_name(name),
                             repr(name))
        # every control character, one at a time
        for code in list(range(0x00, 0x20)) + list(range(0x7f, 0xa1)):
            name = f"a{chr(code)}b"
            self.assertEqual(names.is_run_name(name), datadir.is_run_name(name), hex(code))
            self.assertEqual(names.is_run_name(name),
                             unicodedata.category(chr(code)) != "Cc", hex(code))

    def test_spectrum_file_names_agree(self):
        from piccolo_twisted import runindex
        from piccolo_twisted.cli import names
        for name in self.FILES:
            self.assertEqual(names.is_spectrum_file(name), runindex.parse(name) is not None,
                             repr(name))
        self.assertEqual(sum(map(names.is_spectrum_file, self.FILES)), 5)


class ShapeTests(unittest.SynchronousTestCase):

    def test_depth_is_counted_outside_strings(self):
        from piccolo_twisted.cli.shape import depth
        self.assertEqual(depth('[[["[[[[", "\\"[[["]]]', 32), 3)
        self.assertEqual(depth("[" * 100000, 32), 33)
        self.assertEqual(depth('{"a": [{"b": []}]}', 32), 4)

    def test_values(self):
        from piccolo_twisted.cli import shape
        with self.assertRaises(shape.BadAnswer) as e:
            shape.loads(b"[NaN]", "GET /x")
        self.assertEqual(e.exception.code, 2)
        for bad in (b"1e999", b"\xff", b"[" * 40 + b"]" * 40):
            with self.assertRaises(shape.BadAnswer):
                shape.check(shape.loads(bad, "GET /x"), shape.NUM, "GET /x")
        self.assertEqual(shape.check(3.0, shape.INT, "x"), 3)
        for bad in (True, 3.5, "3", None):
            with self.assertRaises(shape.BadAnswer):
                shape.check(bad, shape.INT, "x")
        row = shape.check([1, ["power_on"], None, None, 86400.0, "active", "extra"],
                          shape.JOB_ROW, "x")
        self.assertEqual(row[-1], "extra")

    def test_catalogue_knows_every_answer_read(self):
        from piccolo_twisted.cli.shape import IGNORED, answer_shape
        for method, path in (("GET", "control/status"), ("GET", "sysinfo/health"),
                             ("GET", "spectrometer/S_x/current_time/up"),
                             ("GET", "data_dir/runs/r/spectra_list"),
                             ("PUT", "data_dir/runs/r/spectra"), ("PUT", "control/paused")):
            self.assertIsNot(answer_shape(method, path), IGNORED, path)
        self.assertIs(answer_shape("PUT", "control/target"), IGNORED)
        with self.assertRaises(LookupError):
            answer_shape("GET", "no/such/thing")

    def test_terminal_escapes(self):
        from piccolo_twisted.cli.terminal import emit, shown
        self.assertEqual(shown("a\x1b[2Jb\nc\u202ed\x85"), "a\\x1b[2Jb\\x0ac\\u202ed\\x85")
        out = io.StringIO()
        emit(out, "one\ntwo\x1b]0;x\x07")
        self.assertEqual(out.getvalue(), "one\ntwo\\x1b]0;x\\x07\n")
