"""The operator's commands (issue 21): abort, pause, resume, set, clock,
schedule -- each over CoAP against a real server on loopback, each with its
one-line confirmation and its one-line error; and the bytes each sends,
compared with what the deployed piccolo3 client sends for the same thing.
"""

import asyncio
import io
import json
import re
from datetime import datetime, timedelta, timezone

from twisted.internet import defer
from twisted.trial import unittest

from .crafted_coap import serve
from .helpers import ServerTestCase
from .test_cli import piccolo3
from .test_wire import coro


class OperatorCommandTests(ServerTestCase):

    async def cli(self, *argv):
        return await piccolo3("--server", self.base, *argv)

    def assertConfirmed(self, result, pattern):
        code, out, err = result
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(len(out.splitlines()), 1, out)
        self.assertRegex(out.strip(), pattern)

    def assertOneLineError(self, result, code, *fragments):
        status, out, err = result
        self.assertEqual(status, code, (out, err))
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("piccolo3: "), err)
        self.assertNotIn("Traceback", err)
        for fragment in fragments:
            self.assertIn(fragment, err)

    async def long_batch(self, run="long"):
        await self.put("control/record_sequence", {"run": run, "nsequence": 500,
                                                   "auto": -1, "delay": 0.02})
        await self.wait_for("control/current_sequence", lambda s: s >= 1)

    @coro
    async def test_abort(self):
        self.assertOneLineError(await self.cli("abort"), 1,
                                "abort: nothing to abort: piccolo system is idle")
        await self.long_batch()
        self.assertConfirmed(await self.cli("abort"),
                             r"^aborted: piccolo is idle, every shutter closed$")
        self.assertEqual(await self.get("control/status"), "idle")
        self.assertEqual(await self.get("control/fault"), "")

    @coro
    async def test_pause_and_resume(self):
        self.assertOneLineError(await self.cli("pause"), 1,
                                "pause: nothing to pause: piccolo system is idle")
        self.assertOneLineError(await self.cli("resume"), 1,
                                "resume: nothing to resume: piccolo system is idle")
        seen = []
        self.service.control.status.watch(seen.append)
        await self.long_batch()
        # resume while it runs: nothing changes (the legacy toggle paused it)
        self.assertConfirmed(await self.cli("resume"), r"^not paused: nothing to resume$")
        sequence = await self.get("control/current_sequence")
        await self.wait_for("control/current_sequence", lambda s: s > sequence + 1)
        self.assertNotIn("paused", seen)
        self.assertConfirmed(await self.cli("pause"), r"^paused: the batch stops at its "
                                                      r"next step \(piccolo3 resume goes on\)$")
        await self.wait_for("control/status", lambda s: s == "paused")
        self.assertConfirmed(await self.cli("pause"), r"^already paused$")
        self.assertEqual(await self.get("control/status"), "paused")
        self.assertConfirmed(await self.cli("resume"), r"^resumed$")
        await self.wait_for("control/status", lambda s: s != "paused")
        await self.get("control/abort")

    @coro
    async def test_set(self):
        self.assertConfirmed(await self.cli("set", "auto", "-2"),
                             r"^autointegration -1 \(never\); -2 was taken as -1$")
        self.assertEqual(await self.get("control/autointegration"), -1)
        self.assertConfirmed(await self.cli("set", "auto", "3"),
                             r"^autointegration 3 \(before every 3-th sequence\)$")
        self.assertConfirmed(await self.cli("set", "target", "70"),
                             r"^target 70 % of saturation$")
        self.assertEqual(await self.get("control/target"), 70.0)
        self.assertConfirmed(await self.cli("set", "delay", "2.5"),
                             r"^delay 2.5 s between sequences$")
        self.assertConfirmed(await self.cli("set", "sequences", "4"), r"^sequences per batch 4$")
        self.assertEqual(await self.get("control/numSequences"), 4)
        self.assertOneLineError(await self.cli("set", "target", "95"), 1,
                                "set target: target must be at most 90")
        self.assertEqual(await self.get("control/target"), 70.0)

        code, out, err = await self.cli("set", "time", "upwelling", "250")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), ["S_sim_FLMT01234 upwelling 250 ms",
                                            "S_sim_QEP00981 upwelling 250 ms"])
        self.assertConfirmed(await self.cli("set", "time", "downwelling", "40", "-s",
                                            "S_sim_QEP00981"),
                             r"^S_sim_QEP00981 downwelling 40 ms$")
        spec = "spectrometer/S_sim_QEP00981/current_time"
        self.assertEqual((await self.get(f"{spec}/upwelling"), await self.get(f"{spec}/downwelling")),
                         (250, 40))
        self.assertEqual(await self.get("spectrometer/S_sim_FLMT01234/current_time/downwelling"),
                         100)
        self.assertOneLineError(await self.cli("set", "time", "sideways", "10"), 1,
                                "no channel 'sideways' (channels: downwelling, upwelling)")
        self.assertOneLineError(await self.cli("set", "time", "upwelling", "10", "-s", "S_x"), 1,
                                "no spectrometer 'S_x'")
        self.assertOneLineError(await self.cli("set", "time", "upwelling", "20000"), 1,
                                "set time: S_sim_FLMT01234: ", "(and 1 more)")
        self.assertEqual(await self.get(f"{spec}/upwelling"), 250)
        code, out, err = await self.cli("set", "auto", "x")
        self.assertEqual(code, 2)               # usage

    @coro
    async def test_clock(self):
        calls = []

        def date(argv):
            calls.append(argv)
            return defer.succeed((b"", b"", 0))
        self.service.sysinfo._run = date
        self.assertConfirmed(await self.cli("clock", "--check"),
                             r"^the instrument's clock is (in step with|\d+\.\d s (ahead "
                             r"of|behind)) this computer$")
        self.assertEqual(calls, [])
        result = await self.cli("clock")
        self.assertConfirmed(result, r"^clock set to \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: "
                                     r"it was .+ this computer, now .+ this computer$")
        self.assertEqual(len(calls), 1)
        self.assertEqual(calls[0][:4], ("sudo", "-n", "date", "-s"))
        sent = datetime.strptime(calls[0][4], "%Y-%m-%dT%H:%M:%S%z")
        self.assertLess(abs((sent - datetime.now(timezone.utc)).total_seconds()), 5)

        def refused(argv):
            return defer.succeed((b"", b"sudo: a password is required\n", 1))
        self.service.sysinfo._run = refused
        self.assertOneLineError(await self.cli("clock"), 1, "clock: ",
                                "sudo: a password is required")

    @coro
    async def test_schedule_jobs(self):
        result = await self.cli("schedule", "record", "--run", "night", "-n", "2",
                                "--at", "2031-01-01T10:00:00Z", "--every", "1h",
                                "--until", "2031-01-02 00:00:00+00:00", "--auto", "0",
                                "--delay", "5")
        self.assertConfirmed(result, r"^scheduled job #(\d+): record run night, 2 sequences "
                                     r"\(autointegration 0, delay 5 s, target 80 %\): next "
                                     r"2031-01-01 10:00:00 UTC, every hour until 2031-01-02 "
                                     r"00:00:00 UTC \[active\]$")
        record = int(re.search(r"#(\d+)", result[1]).group(1))
        result = await self.cli("schedule", "power-on", "--at", "2031-01-01T05:30:00+01:00")
        self.assertConfirmed(result, r"^scheduled job #\d+: switch the spectrometers on: next "
                                     r"2031-01-01 04:30:00 UTC, every day \[active\]$")
        power = int(re.search(r"#(\d+)", result[1]).group(1))
        jobs = await self.get("control/scheduler/jobs")
        self.assertEqual([j[0] for j in jobs], [record, power])
        self.assertEqual(jobs[0][1], ["record", ["night", 2, 0, 5.0, 80.0]])

        self.assertConfirmed(await self.cli("schedule", "suspend", str(power)),
                             rf"^suspended job #{power}: switch the spectrometers on: .*"
                             r"\[suspended\]$")
        self.assertEqual((await self.get("control/scheduler/jobs"))[1][5], "suspended")
        self.assertConfirmed(await self.cli("schedule", "resume", str(power)),
                             rf"^resumed job #{power}: .*\[active\]$")
        self.assertConfirmed(await self.cli("schedule", "delete", str(record)),
                             rf"^deleted job #{record}: record run night, 2 sequences")
        self.assertEqual([j[0] for j in await self.get("control/scheduler/jobs")], [power])
        self.assertOneLineError(await self.cli("schedule", "delete", str(record)), 1,
                                f"schedule delete: no job #{record} (piccolo3 jobs lists them)")

        self.assertOneLineError(await self.cli("schedule", "record", "--run", "x", "-n", "1",
                                               "--at", "2020-01-01T00:00:00Z"), 1,
                                "schedule: at_time is in the past and the job does not repeat")
        self.assertOneLineError(await self.cli("schedule", "record", "--run", "x", "-n", "1",
                                               "--at", "tomorrow"), 2, "not a time: 'tomorrow'")
        self.assertOneLineError(await self.cli("schedule", "record", "--run", "../x", "-n", "1",
                                               "--at", "2031-01-01T00:00:00Z"), 1,
                                "schedule: invalid run name")
        self.assertEqual(len(await self.get("control/scheduler/jobs")), 1)

    @coro
    async def test_schedule_quiet(self):
        now = datetime.now(timezone.utc)
        start, end = now + timedelta(hours=2), now + timedelta(hours=3)   # not now
        result = await self.cli("schedule", "quiet", "on", "--start", f"{start:%H:%M}+0000",
                                "--end", f"{end:%H:%M}Z", "--power-off", "on",
                                "--power-delay", "300")
        self.assertConfirmed(result, rf"^quiet time on: {start:%H:%M}:00\+0000 to "
                                     rf"{end:%H:%M}:00\+0000; spectrometers switched off in "
                                     r"it \(300 s after its start, on 300 s before its end\)$")
        scheduler = "control/scheduler"
        self.assertEqual([await self.get(f"{scheduler}/{r}") for r in
                          ("quietTimeEnabled", "quietStart", "quietEnd", "powerOffEnabled",
                           "powerDelay")],
                         [True, f"{start:%H:%M}:00+0000", f"{end:%H:%M}:00+0000", True, 300])
        self.assertConfirmed(await self.cli("schedule", "quiet", "off", "--power-off", "off"),
                             r"^quiet time off: .* spectrometers left on in it$")
        self.assertFalse(await self.get(f"{scheduler}/quietTimeEnabled"))
        self.assertOneLineError(await self.cli("schedule", "quiet", "--start", "25:00"), 2,
                                "not a time of day: '25:00'")
        self.assertOneLineError(await self.cli("schedule", "quiet", "--power-delay", "-5"), 1,
                                "schedule quiet: powerDelay: ")
        self.assertEqual(await self.get(f"{scheduler}/powerDelay"), 300)


def deployed_put(*args, **kwargs):
    """What ``PiccoloClientComponent.a_put(resource, *args, **kwargs)`` of
    the deployed piccolo3 client sends."""
    return json.dumps([args, kwargs]).encode()


class PayloadTests(unittest.SynchronousTestCase):
    """Each command's requests, byte for byte, against what the deployed
    client sends for the same operation (recorded by a crafted server)."""

    def run_against(self, routes, *argv):
        async def go():
            server, url, close = await serve(routes)
            try:
                out, err = io.StringIO(), io.StringIO()
                from piccolo_twisted.cli.main import run
                code = await asyncio.wait_for(
                    run(["--server", url, "--timeout", "2", *argv], out=out, err=err), 30)
                return code, err.getvalue(), [(c, p, b) for c, p, b in server.requests
                                              if c == 3]
            finally:
                close()
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(go())
        finally:
            loop.close()

    def routes(self):
        job = [7, ["record", ["night", 2, 0, 5.0, 80.0]], "2031-01-01T10:00:00+00:00",
               None, 3600.0, "active"]
        jobs = [[]]

        def listing(code, path, payload):
            return jobs[0]

        def add(code, path, payload):
            jobs[0] = [job]

        def suspend(code, path, payload):
            job[5] = "suspended"
        return {
            "control/autointegration": -1, "control/target": 70.0,
            "spectrometer/channels": ["downwelling", "upwelling"],
            "spectrometer/spectrometers": ["S_a"],
            "spectrometer/S_a/current_time/upwelling": 200,
            "control/paused": True, "sysinfo/clock": datetime.now(timezone.utc).isoformat(),
            "control/scheduler/jobs": listing, "control/record_sequence": add,
            "control/power_on": None, "control/scheduler/suspend": suspend,
            "control/scheduler/quietStart": "22:00:00+0000",
            "control/scheduler/quietEnd": "04:00:00+0000",
            "control/scheduler/quietTimeEnabled": True,
            "control/scheduler/powerOffEnabled": False, "control/scheduler/powerDelay": 600,
        }

    def test_payloads_are_the_deployed_clients(self):
        cases = [
            (("set", "auto", "-1"), [("control/autointegration", deployed_put(-1))]),
            (("set", "target", "70"), [("control/target", deployed_put(70.0))]),
            (("set", "time", "upwelling", "200"),
             [("spectrometer/S_a/current_time/upwelling", deployed_put(200))]),
            (("pause",), [("control/paused", deployed_put(True))]),
            (("schedule", "record", "--run", "night", "-n", "2", "--at",
              "2031-01-01T10:00:00Z", "--every", "1h", "--auto", "0"),
             [("control/record_sequence", deployed_put(
                 run="night", nsequence=2, auto=0, delay=None, target=None,
                 at_time="2031-01-01T10:00:00+00:00", interval=3600.0, end_time=None))]),
            (("schedule", "power-on", "--at", "2031-01-01T05:30:00Z"),
             [("control/power_on", deployed_put(at_time="2031-01-01T05:30:00+00:00"))]),
            (("schedule", "suspend", "7"), [("control/scheduler/suspend", deployed_put(7))]),
            (("schedule", "quiet", "on", "--start", "22:00+0000", "--end", "04:00Z"),
             [("control/scheduler/quietStart", deployed_put("22:00:00+0000")),
              ("control/scheduler/quietEnd", deployed_put("04:00:00+0000")),
              ("control/scheduler/quietTimeEnabled", deployed_put(True))]),
            (("schedule", "quiet", "off", "--power-off", "off", "--power-delay", "60"),
             [("control/scheduler/quietTimeEnabled", deployed_put(False)),
              ("control/scheduler/powerOffEnabled", deployed_put(False)),
              ("control/scheduler/powerDelay", deployed_put(60))]),
        ]
        for argv, expected in cases:
            routes = self.routes()
            if argv[:2] == ("schedule", "suspend"):
                routes["control/record_sequence"](3, "", b"")
            code, err, puts = self.run_against(routes, *argv)
            self.assertEqual(code, 0, (argv, err))
            self.assertEqual([(p, b) for _, p, b in puts], expected, argv)

    def test_clock_payload(self):
        code, err, puts = self.run_against(self.routes(), "clock")
        self.assertEqual(code, 0, err)
        [(_, path, body)] = puts
        self.assertEqual(path, "sysinfo/clock")
        [[when], kwargs] = json.loads(body)
        self.assertEqual(kwargs, {})
        sent = datetime.fromisoformat(when)
        self.assertEqual(sent.microsecond, 0)
        self.assertLess(abs((sent - datetime.now(timezone.utc)).total_seconds()), 5)


class TimeWordsTests(unittest.SynchronousTestCase):
    """Times as a person types them: without an offset, local time."""

    def test_when(self):
        from piccolo_twisted.cli.operate import parse_clock, parse_interval, parse_when
        from piccolo_twisted.cli.errors import CliError
        tz = timezone(timedelta(hours=2))
        now = datetime(2030, 6, 1, 8, 0, tzinfo=timezone.utc)        # 10:00 at +02:00
        self.assertEqual(parse_when("14:30", now, tz),
                         datetime(2030, 6, 1, 12, 30, tzinfo=timezone.utc))
        self.assertEqual(parse_when("2030-06-02 14:30", now, tz),
                         datetime(2030, 6, 2, 12, 30, tzinfo=timezone.utc))
        self.assertEqual(parse_when("2030-06-02T14:30:00Z", now, tz),
                         datetime(2030, 6, 2, 14, 30, tzinfo=timezone.utc))
        self.assertEqual(parse_clock("22:00", now, tz), "22:00:00+0200")
        self.assertEqual(parse_clock("22:00:30-03:30", now, tz), "22:00:30-0330")
        self.assertEqual(parse_clock("4:05Z", now, tz), "04:05:00+0000")
        self.assertEqual([parse_interval(t) for t in ("90", "90s", "15m", "1.5h", "2d")],
                         [90, 90, 900, 5400, 172800])
        for bad in ("25:00", "12:60", "noon"):
            with self.assertRaises(CliError) as e:
                parse_clock(bad, now, tz)
            self.assertEqual(e.exception.code, 2)
        for bad in ("soon", "24:00", "2030-13-01"):
            self.assertRaises(CliError, parse_when, bad, now, tz)
        self.assertRaises(CliError, parse_interval, "1w")


class ReadmeCommandTests(unittest.SynchronousTestCase):

    def test_every_piccolo3_command_in_the_readme_parses(self):
        """Every ``piccolo3 ...`` line the README shows is a command line
        the parser takes (what each does is tested above and in
        test_cli.py / test_cli_distrust.py)."""
        import os
        import shlex
        from piccolo_twisted.cli.main import build_parser
        readme = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
        with open(readme) as f:
            lines = [line.split("#", 1)[0].strip() for line in f
                     if line.startswith("    piccolo3 ")]
        commands = {shlex.split(line)[1] for line in lines}
        self.assertLessEqual({"abort", "pause", "resume", "set", "clock", "schedule"}, commands)
        parser = build_parser()
        for line in lines:
            try:
                parser.parse_args(shlex.split(line)[1:])
            except SystemExit:
                self.fail(f"the README's {line!r} does not parse")

    def test_global_options_after_nested_commands(self):
        """``--server``/``--timeout`` after ``set auto -1`` or ``schedule
        quiet`` too, as after every other command (issue 21a)."""
        from piccolo_twisted.cli.main import build_parser
        parser = build_parser()
        for argv in (["set", "auto", "-1"], ["schedule", "quiet", "on"],
                     ["schedule", "delete", "3"], ["clock", "--check"], ["pause"]):
            args = parser.parse_args(argv + ["--server", "coap://[::1]:6000", "--timeout", "9"])
            self.assertEqual((args.server, args.timeout), ("coap://[::1]:6000", 9.0), argv)
            args = parser.parse_args(["--server", "coap://[::1]:7000"] + argv)
            self.assertEqual(args.server, "coap://[::1]:7000", argv)
