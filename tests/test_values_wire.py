"""One validation vocabulary (issue 11.10) and helper commands that fail
(issue 10.4), over real UDP with aiocoap as the client.

The spellings are those a deployed client sends: the Python client sends
JSON booleans and numbers, the web dashboard sends form fields as strings
("true", "20"). Every boolean resource and every numeric resource must
accept or refuse each spelling alike.
"""

import functools
import json
import os
from datetime import datetime, timedelta, timezone

from twisted.trial import unittest

from piccolo_twisted import commands
from piccolo_twisted.errors import PiccoloError
from piccolo_twisted.values import to_bool, to_datetime, to_float, to_int

from .helpers import ServerTestCase
from .test_config import script
from .test_wire import coro

Q = "S_sim_QEP00981"
FUTURE = "2099-01-01T00:00:00+00:00"
NAN = float("nan")

BOOL_YES = [True, False, "true", "false", "True", "FALSE", " true "]
BOOL_NO = [1, 0, 1.0, "yes", "no", "1", "0", "", "on", "t", "truth"]
# every spelling of the integral value 20
NUM_YES = [20, 20.0, "20", "20.0", " 20 ", "2e1", "+20", "020"]
NUM_NO = [True, False, "twenty", "0x14", "2_0", "nan", "inf", "-inf", "Infinity",
          NAN, float("inf"), "", "20 ms", "1e999", "--20"]
# (a bare [] or {} payload means "no argument", not a value: unit tests only)


class ValueUnitTests(unittest.SynchronousTestCase):
    """The validators themselves, so a failure points at them."""

    def test_booleans(self):
        for v in BOOL_YES:
            self.assertIsInstance(to_bool(v, "x"), bool)
        for v in BOOL_NO + [[], {}, None]:
            self.assertRaises(PiccoloError, to_bool, v, "x")

    def test_numbers(self):
        for v in NUM_YES:
            self.assertEqual(to_int(v, "x"), 20)
            self.assertEqual(to_float(v, "x"), 20.0)
        for v in NUM_NO + [[], {}, None]:
            self.assertRaises(PiccoloError, to_int, v, "x")
            self.assertRaises(PiccoloError, to_float, v, "x")
        self.assertRaises(PiccoloError, to_int, "20.5", "x")
        self.assertRaises(PiccoloError, to_int, 20.5, "x")
        self.assertEqual(to_float("20.5", "x"), 20.5)
        self.assertRaises(PiccoloError, to_int, "9" * 100, "x")     # long text
        self.assertRaises(PiccoloError, to_int, 21, "x", hi=20)

    def test_dates(self):
        utc = timezone.utc
        self.assertEqual(to_datetime("2026-11-25T12:00:00Z"),
                         datetime(2026, 11, 25, 12, tzinfo=utc))
        self.assertEqual(to_datetime("2026-11-25T13:00:00+01:00"),
                         datetime(2026, 11, 25, 12, tzinfo=utc))
        self.assertEqual(to_datetime("2026-11-25T12:00:00"),
                         datetime(2026, 11, 25, 12, tzinfo=utc))
        for bad in ["9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00",
                    "1969-12-31T23:59:59Z", "2026-99-99T00:00:00", "yesterday",
                    "", 5, None, True, 1.5e9]:
            self.assertRaises(PiccoloError, to_datetime, bad)


class VocabularyWireTests(ServerTestCase):

    async def code(self, path, value):
        raw = json.dumps(value, allow_nan=True).encode()
        r = await self.request("PUT", path, raw=raw)
        self.assertNotEqual(r.code.class_, 5, f"{path} {raw!r}: {r.payload!r}")
        return r.code.is_successful()

    async def matrix(self, resources, yes, no):
        """{spelling: {resource: accepted}}; asserts one answer per spelling
        across every resource, and that it is the expected one."""
        for spellings, expected in ((yes, True), (no, False)):
            for v in spellings:
                answers = {}
                for path, wrap in resources:
                    key = f"{path} {json.dumps(wrap('?'))}"
                    answers[key] = await self.code(path, wrap(v))
                self.assertEqual(set(answers.values()), {expected},
                                 f"{v!r} is not answered alike: {answers}")

    @coro
    async def test_same_spelling_same_answer_everywhere(self):
        # keep the scheduler's power window away from now whatever the hour
        now = datetime.now(timezone.utc)
        await self.put("control/scheduler/quietStart",
                       (now + timedelta(hours=2)).strftime("%H:%M:%S+0000"))
        await self.put("control/scheduler/quietEnd",
                       (now + timedelta(hours=3)).strftime("%H:%M:%S+0000"))
        self.service.datadir.device = "/dev/piccolo-test-none"
        self.service.datadir.mntpnt = self.datadir
        one = (lambda v: v)
        booleans = [
            ("shutter/upwelling/open_shutter", one),
            ("shutter/upwelling/close_shutter", one),
            (f"spectrometer/{Q}/TECenabled", one),
            ("control/scheduler/quietTimeEnabled", one),
            ("control/scheduler/powerOffEnabled", one),
            ("data_dir/mount", one),
            ("data_dir/all_runs", lambda v: {"alpha": v}),
            ("data_dir/all_runs", lambda v: {"reverse": v}),
        ]
        await self.matrix(booleans, BOOL_YES, BOOL_NO)
        numbers = [
            ("control/numSequences", one),
            ("control/autointegration", one),
            ("control/delay", one),
            ("control/target", one),
            (f"spectrometer/{Q}/min_time", one),
            (f"spectrometer/{Q}/current_time/upwelling", one),
            (f"spectrometer/{Q}/target_temperature", one),
            ("control/scheduler/powerDelay", one),
            ("data_dir/all_runs", lambda v: {"nitems": v}),
            ("data_dir/all_runs", lambda v: {"nitems": 1, "page": v}),
        ] + [("control/record_sequence",
               functools.partial(lambda k, v: {k: v, "at_time": FUTURE}, k))
            for k in ("nsequence", "auto", "delay", "target", "interval")]
        await self.matrix(numbers, NUM_YES, NUM_NO)
        # 20.5: refused by every integer setting, accepted by every number
        # setting, whichever way it is spelled
        for path, wrap in numbers:
            self.assertEqual(await self.code(path, wrap(20.5)),
                             await self.code(path, wrap("20.5")), path)
        self.assertEqual(await self.get("control/status"), "idle")


class DatesAndHelpersWireTests(ServerTestCase):

    async def refused(self, path, payload, *words):
        import aiocoap
        r = await self.request("PUT", path, payload)
        self.assertEqual(r.code, aiocoap.BAD_REQUEST, f"{path} {payload}: "
                                                      f"{r.code} {r.payload!r}")
        text = r.payload.decode()
        for word in words:
            self.assertIn(word, text)
        return text

    def use_path(self, path, timeout=commands.TIMEOUT):
        run = functools.partial(commands.run, env={"PATH": path}, timeout=timeout)
        self.service.sysinfo._run = run
        self.service.datadir._run = run

    @coro
    async def test_dates_out_of_range_are_4_00(self):
        far = "9999-12-31T23:59:59-14:00"
        early = "0001-01-01T00:00:00+14:00"
        jobs = await self.get("control/scheduler/jobs")
        for value in (far, early):
            await self.refused("sysinfo/clock", value, "out of range")
            await self.refused("control/record_sequence", {"at_time": value},
                               "at_time", "out of range")
            await self.refused("control/record_sequence",
                               {"at_time": FUTURE, "end_time": value, "interval": 60},
                               "end_time", "out of range")
            await self.refused("control/power_on", {"at_time": value}, "out of range")
            await self.refused("control/power_off", [value], "out of range")
        self.assertEqual(await self.get("control/scheduler/jobs"), jobs)
        self.assertEqual(await self.get("control/status"), "idle")

    @coro
    async def test_clock_and_mount_helpers(self):
        bin_dir = os.path.abspath(self.mktemp())
        calls = os.path.join(bin_dir, "calls")
        self.service.datadir.device = "/dev/piccolo-test-none"
        self.service.datadir.mntpnt = self.datadir
        uid_gid = f"uid={os.getuid()},gid={os.getgid()}"

        # a sudo that works: the legacy commands, 2.04
        script(bin_dir, "sudo", f'printf "%s\\n" "$*" >> {calls}')
        self.use_path(bin_dir)
        # the payloads piccolo3-client sends: json.dumps([args, kwargs])
        await self.put("sysinfo/clock", [["2026-11-25T13:00:00+01:00"], {}])
        await self.put("data_dir/mount", [[True], {}])
        with open(calls) as f:
            self.assertEqual(f.read().splitlines(), [
                "-n date -s 2026-11-25T12:00:00+0000",
                f"-n mount -o {uid_gid} /dev/piccolo-test-none {self.datadir}"])
        # the deployed client's keyword spelling
        await self.put("data_dir/mount", {"mount": False})

        # sudo fails (non-zero exit): 4.00 with what it said
        script(bin_dir, "sudo", 'echo "sudo: a password is required" >&2; exit 1')
        await self.refused("sysinfo/clock", "2026-11-25T12:00:00Z",
                           "sudo -n date -s 2026-11-25T12:00:00+0000 failed",
                           "a password is required")
        await self.refused("data_dir/mount", True, "sudo -n mount",
                           "a password is required")

        # sudo is there, date and mount are not
        script(bin_dir, "sudo", 'shift; exec "$@"')
        await self.refused("sysinfo/clock", "2026-11-25T12:00:00Z", "date", "not found")
        await self.refused("data_dir/mount", True, "mount", "not found")

        # the executable cannot be started (ENOENT from exec: its
        # interpreter is missing)
        with open(os.path.join(bin_dir, "sudo"), "w") as f:
            f.write("#!/nonexistent/interpreter\n")
        await self.refused("sysinfo/clock", "2026-11-25T12:00:00Z",
                           "cannot start", "No such file")
        await self.refused("data_dir/mount", True, "cannot start")

        # no sudo at all
        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        self.use_path(empty)
        await self.refused("sysinfo/clock", "2026-11-25T12:00:00Z",
                           "sudo: command not found")
        await self.refused("data_dir/mount", True, "sudo: command not found")

        # a helper that hangs is killed and refused
        script(bin_dir, "sudo", "exec /bin/sleep 30")
        self.use_path(bin_dir, timeout=0.3)
        await self.refused("sysinfo/clock", "2026-11-25T12:00:00Z",
                           "no answer within 0.3 s")

        # mounted somewhere else: refused without running anything
        mounts = os.path.join(bin_dir, "mounts")
        with open(mounts, "w") as f:
            f.write("/dev/piccolo-test-none /media/elsewhere vfat rw 0 0\n")
        self.service.datadir.mounts_file = mounts
        await self.refused("data_dir/mount", True, "mounted at /media/elsewhere")
        import aiocoap
        r = await self.request("GET", "data_dir/mount")
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        self.assertEqual(await self.get("control/status"), "idle")

    @coro
    async def test_hanging_helper_whose_child_keeps_the_pipes(self):
        """A hung ``sudo mount`` on a dying USB stick: killing sudo leaves
        its child (mount) running with sudo's stdout and stderr. The answer
        is 4.00 at the timeout all the same, not when the child lets go of
        the pipes (a stand-in sudo whose sleep outlives it answered only
        after the sleep: 100 s for a 60 s timeout)."""
        bin_dir = os.path.abspath(self.mktemp())
        self.service.datadir.device = "/dev/piccolo-test-none"
        self.service.datadir.mntpnt = self.datadir
        # not exec: the shell (sudo) is killed, its child (mount) lives on
        # with the pipes until the test lets it go (it reads a FIFO nobody
        # writes): the answer comes while it holds them, whatever the
        # machine's speed (a 4 s sleep against "under 2.5 s" was a race)
        hold = os.path.join(bin_dir, "hold")
        os.makedirs(bin_dir)
        os.mkfifo(hold)
        script(bin_dir, "sudo", f"/bin/cat '{hold}'; true")
        self.use_path(bin_dir, timeout=0.3)

        def let_go():
            try:
                os.close(os.open(hold, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass            # no child reading (any more)
        self.addCleanup(let_go)
        # the payloads piccolo3-client sends: json.dumps([args, kwargs])
        for path, payload in (("data_dir/mount", [[True], {}]),
                              ("sysinfo/clock", [["2026-11-25T12:00:00Z"], {}])):
            await self.refused(path, payload, "no answer within 0.3 s")
            let_go()
        self.assertEqual(await self.get("control/status"), "idle")
