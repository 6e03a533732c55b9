"""The ``piccolo3`` command line, driven against a live server on loopback.

The commands run in-process through their asyncio entry point
(``piccolo_twisted.cli.main.run``) on the test's event loop, except where
the terminal matters (Ctrl-C during ``record``): there the installed
``piccolo3`` script runs as a subprocess against the test server.
"""

import ast
import asyncio
import configparser
import io
import json
import os
import signal
import struct
import sys
import tempfile
import time

from twisted.internet import defer
from twisted.trial import unittest

from .helpers import ServerTestCase
from .test_wire import coro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_DIR = os.path.join(ROOT, "piccolo_twisted", "cli")


async def piccolo3(*argv):
    """Run one command in-process: (exit status, stdout, stderr)."""
    from piccolo_twisted.cli.main import run
    out, err = io.StringIO(), io.StringIO()
    code = await run(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", head[:8]
    return struct.unpack(">II", head[16:24])


class CommandLineWireTests(ServerTestCase):

    async def cli(self, *argv):
        return await piccolo3("--server", self.base, *argv)

    def assertOneLineError(self, err, *fragments):
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertTrue(err.startswith("piccolo3: "), err)
        self.assertNotIn("Traceback", err)
        for fragment in fragments:
            self.assertIn(fragment, err)

    @coro
    async def test_record_fetch_plot(self):
        """From the field to the laptop: record with progress, fetch
        byte-identical and resumable, plot the result."""
        code, out, err = await self.cli("record", "--run", "field", "-n", "3",
                                        "--auto", "-1", "--delay", "0.05")
        self.assertEqual(code, 0, err)
        self.assertEqual(await self.get("control/status"), "idle")
        self.assertIn("run field batch 0: 3 sequences recorded", out)
        # the batch summary, and a warning naming every saturated spectrum
        # (at 100 ms without autointegration the downwelling channel is)
        self.assertRegex(out, r"(?m)^batch 0 of run field: 3 sequences, 5 files, ")
        # channels in legacy (sorted) order (issue 21)
        self.assertRegex(out, r"(?m)^  S_sim_QEP00981: downwelling 100 ms, upwelling 100 ms$")
        self.assertRegex(out, r"(?m)^  saturated spectra: [1-9]\d*; temperature-unstable spectra: \d+$")
        self.assertRegex(err, r"(?m)^warning: S_sim_QEP00981 downwelling light, sequences "
                              r"0-2: \d+(-\d+)? pixels saturated \(at or above 200000\)$")
        self.assertRegex(err, r"(?m)^warning: S_sim_FLMT01234 downwelling light, sequences "
                              r"0-2: \d+(-\d+)? pixels saturated \(at or above 65535\)$")
        # progress: the bar went through the sequences and the steps
        self.assertIn("sequence 1/3", err)
        self.assertIn("sequence 3/3", err)
        self.assertIn("light", err)
        self.assertIn("3/3", err)
        server_files = sorted(f for f in os.listdir(self.run_dir("field"))
                              if f.endswith(".pico"))
        self.assertEqual(len(server_files), 5)      # 3 light, first and last dark

        laptop = self.mktemp()
        code, out, err = await self.cli("fetch", "field", laptop)
        self.assertEqual(code, 0, err)
        self.assertIn("5 downloaded, 0 already here", err)
        local = os.path.join(laptop, "field")
        self.assertEqual(sorted(os.listdir(local)), server_files)   # no temporaries
        for name in server_files:
            with open(os.path.join(local, name), "rb") as a, \
                    open(os.path.join(self.run_dir("field"), name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)

        # resumable: nothing again; a damaged or missing file only
        code, out, err = await self.cli("fetch", "field", laptop)
        self.assertEqual(code, 0, err)
        self.assertIn("0 downloaded, 5 already here", err)
        damaged = os.path.join(local, server_files[1])
        with open(damaged, "r+b") as f:                   # same size, one byte off
            f.seek(2000)
            byte = f.read(1)
            f.seek(2000)
            f.write(b"7" if byte != b"7" else b"8")
        os.unlink(os.path.join(local, server_files[2]))
        code, out, err = await self.cli("fetch", "--all", laptop)
        self.assertEqual(code, 0, err)
        self.assertIn("2 downloaded, 3 already here", err)
        for name in server_files:
            with open(os.path.join(local, name), "rb") as a, \
                    open(os.path.join(self.run_dir("field"), name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)

        # plot a light and a dark file: one panel per spectrometer
        png = os.path.join(laptop, "field.png")
        code, out, err = await self.cli(
            "plot", os.path.join(local, "b000000_s000000_light.pico"),
            os.path.join(local, "b000000_s000000_dark.pico"), "-o", png)
        self.assertEqual(code, 0, err)
        # one panel per spectrometer and channel, the legend beside the data:
        # 11 x (4 x 2.9 + 0.9) in at 100 dpi
        self.assertEqual(png_size(png), (1100, 1250))
        self.assertGreater(os.path.getsize(png), 30000)   # drawn lines, not an empty frame

    @coro
    async def test_status_jobs_health(self):
        code, out, err = await self.cli("status")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"(?m)^control\s+idle$")
        # channels in legacy order: sorted (issue 21)
        self.assertRegex(out, r"(?m)^S_sim_QEP00981\s+idle; integration downwelling \d+ ms, "
                              r"upwelling \d+ ms; temperature -?\d+\.\d °C \(\d+ s ago\)"
                              r"( \(set point -10 °C: not stable\))?$")
        self.assertRegex(out, r"(?m)^S_sim_FLMT01234\s+idle; integration downwelling")
        self.assertNotIn("temperature", out.split("S_sim_FLMT01234")[1].splitlines()[0])
        self.assertRegex(out, r"(?m)^shutters\s+downwelling closed, upwelling closed$")
        self.assertRegex(out, r"(?m)^scheduler\s+0 active, 0 suspended$")
        self.assertRegex(out, r"(?m)^last fault\s+none$")

        await self.put("control/record_sequence",
                       {"run": "night", "nsequence": 2, "auto": 0, "delay": 1.5,
                        "at_time": "2030-01-01T12:00:00+00:00", "interval": 3600,
                        "end_time": "2030-01-02T00:00:00+00:00"})
        code, out, err = await self.cli("jobs")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"#\d+ record run night, 2 sequences \(autointegration 0, "
                              r"delay 1.5 s, target \d+ %\): next 2030-01-01 12:00:00 UTC, "
                              r"every hour until 2030-01-02 00:00:00 UTC \[active\]")
        self.assertIn("quiet time", out)
        code, out, err = await self.cli("status")
        self.assertRegex(out, r"(?m)^scheduler\s+1 active, 0 suspended; next at 2030-01-01")

        code, out, err = await self.cli("health")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"(?m)^disk\s+[\d.]+ [kMGT]?B free of [\d.]+ [kMGT]?B")
        self.assertRegex(out, r"(?m)^clock\s+(synchronised|NOT synchronised|unknown)$")
        self.assertRegex(out, r"(?m)^sim_QEP00981\s+idle, 0 errors, temperature -?\d+\.\d °C "
                              r"\(\d+ s ago\)( \(set point -10 °C: not stable\))?$")
        self.assertRegex(out, r"(?m)^sim_FLMT01234\s+idle, 0 errors$")

    @coro
    async def test_status_watch_follows_changes(self):
        from piccolo_twisted.cli.main import run
        out = io.StringIO()
        watching = asyncio.ensure_future(run(["--server", self.base, "status", "--watch",
                                              "--updates", "1"], out=out, err=out))
        # the first screen, then the run observed (the watch registers its
        # observations one by one: a change before that one's registration
        # is in its first answer, never notified, and the watch waited its
        # 10 s refresh; a 2 s poll and 0.1 s more were not that under load)
        targets = self.service.coap.protocol.observations.targets
        deadline = time.monotonic() + 30
        while not ("last fault" in out.getvalue()
                   and any(t.observers for path, t in targets.items()
                           if "current_run" in str(path))) \
                and time.monotonic() < deadline and not watching.done():
            await asyncio.sleep(0.01)
        await self.put("data_dir/current_run", "watched")
        self.assertEqual(await asyncio.wait_for(watching, 5), 0)
        screens = out.getvalue().split("\n-- ")
        self.assertEqual(len(screens), 2, out.getvalue())
        self.assertNotIn("run watched", screens[0])
        self.assertIn("run watched", screens[1])

    @coro
    async def test_record_fault_exits_3(self):
        self.disk_full_at("s000001")
        code, out, err = await self.cli("record", "--run", "full", "-n", "3", "--auto", "-1")
        self.assertEqual(code, 3, err)
        last = err.strip().splitlines()[-1]
        self.assertTrue(last.startswith("piccolo3: record: run full batch 0 stopped:"), err)
        self.assertIn("No space left", last)

    @coro
    async def test_errors_are_one_line(self):
        code, out, err = await self.cli("fetch", "nosuch", self.mktemp())
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "unknown run 'nosuch'")
        code, out, err = await self.cli("fetch", "../etc", self.mktemp())
        self.assertEqual(code, 1)
        self.assertOneLineError(err)
        await self.put("control/record_sequence", {"run": "busy", "nsequence": 20,
                                                   "delay": 0.2, "auto": -1})
        code, out, err = await self.cli("record", "--run", "x", "-n", "1")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "busy")
        # the screen during a batch: no temperature read waits for a busy
        # device, and the last reading is shown with its age (issue 20:
        # it was "-" all through a batch)
        await self.wait_for("control/current_sequence", lambda s: s >= 1)  # files written
        code, out, err = await self.cli("status")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"(?m)^current\s+run busy, batch 0, sequence \d+ of 20$")
        self.assertRegex(out, r"(?m)^S_sim_QEP00981\s+(recording|idle);.*; "
                              r"temperature -?\d+\.\d °C \(\d+ s ago\)"
                              r"( \(set point -10 °C: not stable\))?$")
        await self.get("control/abort")
        # nobody listening: ICMP says so at once, or the short timeout ends it
        code, out, err = await piccolo3("--server", "coap://127.0.0.1:9", "--timeout", "1",
                                        "status")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "coap://127.0.0.1:9")
        code, out, err = await piccolo3("--server", "http://example.org", "health")
        self.assertEqual(code, 1)
        self.assertOneLineError(err, "not a coap:// server address")

    @coro
    async def test_ctrl_c_asks_then_aborts(self):
        """The installed script, as an operator runs it: Ctrl-C, "y"."""
        script = os.path.join(os.path.dirname(sys.executable), "piccolo3")
        proc = await asyncio.create_subprocess_exec(
            script, "--server", self.base, "record", "--run", "ctrlc", "-n", "50",
            "--auto", "-1", "--delay", "0.1",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            await self.wait_for("control/current_sequence", lambda s: s >= 1, timeout=20)
            proc.send_signal(signal.SIGINT)
            await self.wait_for("control/current_sequence", lambda s: s >= 2, timeout=20)
            # a question, not an abort: the batch goes on until answered
            self.assertNotEqual(await self.get("control/status"), "idle")
            proc.stdin.write(b"y\n")
            await proc.stdin.drain()
            out, err = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        err = err.decode()
        self.assertEqual(proc.returncode, 4, err)
        self.assertIn("abort the batch? [y/N]", err)
        self.assertTrue(err.strip().splitlines()[-1].endswith("aborted"), err)
        self.assertNotIn("Traceback", err)
        self.assertEqual(await self.get("control/status"), "idle")
        self.assertEqual(await self.get("control/fault"), "")
        self.assertLess(len(os.listdir(self.run_dir("ctrlc"))), 50)


class CommandLineReviewTests(ServerTestCase):
    """What an operator met in the field (issue 12 review)."""

    async def cli(self, *argv):
        return await piccolo3("--server", self.base, *argv)

    def assertOneLineError(self, err, *fragments):
        lines = [l for l in err.strip().splitlines() if l.startswith("piccolo3: ")]
        self.assertEqual(len(lines), 1, err)
        self.assertNotIn("Traceback", err)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])

    @coro
    async def test_batch_aborted_by_another_client(self):
        """The dashboard aborts the batch: record says so and exits 4 (it
        said "50 sequences recorded" and exited 0)."""
        recording = asyncio.ensure_future(self.cli(
            "record", "--run", "other", "-n", "50", "--auto", "-1", "--delay", "0.1"))
        await self.wait_for("control/current_sequence", lambda s: s >= 1)
        await self.get("control/abort")
        code, out, err = await asyncio.wait_for(recording, 20)
        self.assertEqual(code, 4, err)
        self.assertNotIn("recorded\n", out)
        self.assertOneLineError(err, "run other batch 0", "of 50 sequences recorded",
                                "aborted")

        # a file saved as PUT .../spectra answers it (coap-client -o): a JSON
        # string holding the file's JSON (docs/API.md) plots like the file
        name = "b000000_s000000_light.pico"
        response = await self.request("PUT", "data_dir/runs/other/spectra", name)
        self.assertTrue(response.code.is_successful(), response)
        saved = os.path.join(self.mktemp() + "-coap.pico")
        with open(saved, "wb") as f:
            f.write(response.payload)
        png = self.mktemp() + ".png"
        code, out, err = await self.cli("plot", saved, "-o", png)
        self.assertEqual(code, 0, err)
        self.assertEqual(png_size(png), (1100, 1250))     # as the file itself plots

        # a file the server will not give (not UTF-8) does not stop the rest
        with open(os.path.join(self.run_dir("other"), "b000099_s000000_light.pico"),
                  "wb") as f:
            f.write(b'{"Spectra": "\xff\xfe"}')
        laptop = self.mktemp()
        code, out, err = await self.cli("fetch", "other", laptop)
        self.assertEqual(code, 1, err)
        self.assertIn("b000099_s000000_light.pico", err.strip().splitlines()[-1])
        good = sorted(n for n in os.listdir(self.run_dir("other")) if "b000099" not in n)
        self.assertEqual(sorted(os.listdir(os.path.join(laptop, "other"))), good)
        for name in good:
            with open(os.path.join(laptop, "other", name), "rb") as a, \
                    open(os.path.join(self.run_dir("other"), name), "rb") as b:
                self.assertEqual(a.read(), b.read(), name)

    async def _script(self, *argv):
        script = os.path.join(os.path.dirname(sys.executable), "piccolo3")
        proc = await asyncio.create_subprocess_exec(
            script, "--server", self.base, *argv, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self.addCleanup(lambda: proc.returncode is None and proc.kill())
        return proc

    async def _prompted(self, proc):
        """stderr up to the question (read as it comes, stdin left open)."""
        seen = b""
        while b"abort the batch? [y/N]" not in seen:
            chunk = await asyncio.wait_for(proc.stderr.read(256), 20)
            self.assertTrue(chunk, seen)
            seen += chunk
        return seen

    @coro
    async def test_second_ctrl_c_ends_the_program(self):
        """Ctrl-C, then Ctrl-C at the question: the batch is aborted and
        piccolo3 ends, without waiting for a line nobody will type (it hung
        until Enter was pressed)."""
        proc = await self._script("record", "--run", "twice", "-n", "50", "--auto", "-1",
                                  "--delay", "0.1")
        await self.wait_for("control/current_sequence", lambda s: s >= 1, timeout=20)
        proc.send_signal(signal.SIGINT)
        await self._prompted(proc)
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 10)   # stdin still open
        err = (await proc.stderr.read()).decode()
        self.assertEqual(code, 4, err)
        self.assertTrue(err.strip().splitlines()[-1].endswith("aborted"), err)
        self.assertEqual(await self.get("control/status"), "idle")

    @coro
    async def test_batch_ended_before_the_answer(self):
        """The batch finishes while the question is on the screen: the
        question goes, every sequence is recorded, exit 0 (it waited for an
        answer, and "y" then said aborted, exit 4)."""
        proc = await self._script("record", "--run", "late", "-n", "3", "--auto", "-1",
                                  "--delay", "0.2")
        await self.wait_for("control/current_sequence", lambda s: s >= 1, timeout=20)
        proc.send_signal(signal.SIGINT)
        await self._prompted(proc)
        await self.wait_for("control/status", lambda s: s == "idle", timeout=20)
        code = await asyncio.wait_for(proc.wait(), 10)   # nobody answers, stdin open
        out = (await proc.stdout.read()).decode()
        err = (await proc.stderr.read()).decode()
        self.assertEqual(code, 0, err)
        self.assertIn("the batch has ended", err)
        self.assertIn("run late batch 0: 3 sequences recorded", out)

    @coro
    async def test_batch_ended_as_the_answer_came(self):
        """"y" that reaches the server after the batch's end aborts nothing:
        every sequence is recorded, exit 0 (it said aborted, exit 4)."""
        from piccolo_twisted.cli import commands

        async def late_yes(question, interrupts):
            await self.wait_for("control/status", lambda s: s == "idle")
            return True

        class CtrlC:
            def __init__(self, install):
                self.event = asyncio.Event()
                self.event.set()                  # Ctrl-C at once

            def remove(self):
                pass
        self.patch(commands, "_Interrupts", CtrlC)

        async def until_never(observation):
            await asyncio.Event().wait()
        self.patch(commands, "_until_idle", until_never)   # the answer wins the race
        from piccolo_twisted.cli.main import build_parser
        from piccolo_twisted.cli.client import Client
        args = build_parser().parse_args(["record", "--run", "late", "-n", "3",
                                          "--auto", "-1", "--delay", "0.2"])
        out, err = io.StringIO(), io.StringIO()
        async with Client(self.base) as client:
            code = await commands.record(client, args, out, err, confirm=late_yes)
        self.assertEqual(code, 0, err.getvalue())
        self.assertIn("run late batch 0: 3 sequences recorded", out.getvalue())

    @coro
    async def test_watch_follows_a_restart_and_ends_when_the_server_goes(self):
        """status --watch kept showing the screen of a server that had
        restarted (observations forgotten) or gone, for ever."""
        from twisted.internet import reactor
        from piccolo_twisted.cli import commands
        from piccolo_twisted.cli.main import run
        old = getattr(commands, "REFRESH", None)
        commands.REFRESH = 0.3          # seconds without news before it asks itself
        self.addCleanup(setattr, commands, "REFRESH", old)
        out = io.StringIO()
        watching = asyncio.ensure_future(run(["--server", self.base, "status", "--watch"],
                                             out=out, err=out))
        async def until(condition, timeout=30.0):
            deadline = time.monotonic() + timeout
            while not condition() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        # watching (a 2 s wait fell through under load: the restart then
        # came before the watch had followed anything)
        await until(lambda: (self.service.control.status._watchers
                             and "last fault" in out.getvalue()) or watching.done())
        self.assertTrue(self.service.control.status._watchers, out.getvalue())
        # a restart: the same address, every observation forgotten. Closed
        # and listening again in one step, after answering what the watch
        # already sent: a datagram of its meeting the closed port between
        # the two (its ICMP error ends the watch, as a server gone does),
        # or lost in the closed socket (its retransmission comes after the
        # client's timeout) was a race with the watch's 0.3 s refresh
        coap = self.service.coap
        protocol = coap._port.protocol
        port = coap._port
        port.doRead()
        port.stopReading()
        port.connectionLost()
        coap._port = reactor.listenUDP(self.port, protocol, interface="::1")
        await self.put("data_dir/current_run", "after_restart")
        # 0.3 s and a status round
        await until(lambda: "run after_restart" in out.getvalue() or watching.done())
        self.assertIn("run after_restart", out.getvalue())
        self.assertFalse(watching.done(), out.getvalue())
        # gone: one line, exit 1
        await defer.maybeDeferred(coap._port.stopListening).asFuture(
            asyncio.get_running_loop())
        try:
            code = await asyncio.wait_for(watching, 10)
        finally:
            coap._port = reactor.listenUDP(self.port, protocol, interface="::1")
        self.assertEqual(code, 1, out.getvalue())
        last = out.getvalue().strip().splitlines()[-1]
        self.assertTrue(last.startswith(f"piccolo3: {self.base}"), last)

    @coro
    async def test_jobs_show_each_jobs_last_outcome(self):
        """``piccolo3 jobs`` names each job's last slot from the scheduler's
        history: done with its batch, or missed with the reason."""
        from datetime import datetime, timedelta, timezone
        soon = datetime.now(timezone.utc) + timedelta(seconds=1)
        await self.put("control/record_sequence",
                       {"run": "hourly", "nsequence": 1, "auto": -1,
                        "at_time": soon.isoformat(), "interval": 3600})
        history = await self.wait_for("control/scheduler/history", lambda h: h, timeout=20)
        self.assertEqual(history[0]["outcome"], "done", history)
        code, out, err = await self.cli("jobs")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"#\d+ record run hourly, 1 sequence .*\[active\]; last: done "
                              rf"at {soon:%Y-%m-%d %H:%M:%S} UTC \(batch 0\)")
        code, out, err = await self.cli("health")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"(?m)^slots 24 h   0 missed, 0 failed")

    @coro
    async def test_jobs_next_is_the_next_slot(self):
        """A repeating job whose first time has passed: "next" is its next
        slot on the grid start + k * interval, not the first time (which
        showed a time in the past)."""
        from datetime import datetime, timedelta, timezone
        now = datetime.now(timezone.utc).replace(microsecond=0)
        start = now - timedelta(seconds=7000)
        await self.put("control/record_sequence",
                       {"run": "grid", "nsequence": 1, "auto": -1,
                        "at_time": start.isoformat(), "interval": 3600.5})
        slot = start + timedelta(seconds=7201)            # 2 x 3600.5: the first ahead
        code, out, err = await self.cli("jobs")
        self.assertEqual(code, 0, err)
        self.assertIn(f"next {slot:%Y-%m-%d %H:%M:%S} UTC, every 3600.5 s [active]", out)
        code, out, err = await self.cli("status")
        self.assertRegex(out, rf"(?m)^scheduler\s+1 active, 0 suspended; "
                              rf"next at {slot:%Y-%m-%d %H:%M:%S} UTC$")


class CommandLineLocalTests(unittest.SynchronousTestCase):

    def run_cli(self, *argv):
        # a loop of its own, never installed: asyncio.run() would leave the
        # thread without the reactor's event loop for the tests after this
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(piccolo3(*argv))
        finally:
            loop.close()

    def test_plot_bad_files_one_line(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        cases = {"notjson.pico": b"{\"Spectra\": [", "nospectra.pico": b"{\"x\": 1}",
                 "binary.pico": b"\xff\xfe\x00garbage"}
        for name, data in cases.items():
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(data)
            code, out, err = self.run_cli("plot", path, "-o", os.path.join(tmp, "x.png"))
            self.assertEqual(code, 1, name)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(f"{name}: not a .pico file", err)
        code, out, err = self.run_cli("plot", os.path.join(tmp, "missing.pico"), "-o", "x.png")
        self.assertEqual((code, err.strip()),
                         (1, f"piccolo3: {tmp}/missing.pico: No such file or directory"))
        self.assertFalse(os.path.exists(os.path.join(tmp, "x.png")))

    def test_bad_server_addresses_one_line(self):
        """A URL a person can mistype: one line, never a traceback."""
        for url in ("coap://[::1]:99999", "coap://[::1]:abc", "coap://[::1",
                    "coap://user@[::1]:5683", "coap://[::1]:0"):
            code, out, err = self.run_cli("--server", url, "status")
            self.assertEqual(code, 1, (url, err))
            self.assertEqual(len(err.strip().splitlines()), 1, (url, err))
            self.assertTrue(err.startswith("piccolo3: not a coap:// server address"),
                            (url, err))
        for timeout in ("0", "-1", "nan", "inf"):
            code, out, err = self.run_cli("--server", "coap://[::1]:9", "--timeout",
                                          timeout, "status")
            self.assertEqual(code, 2, (timeout, err))    # argparse: usage on stderr

    def test_plot_of_several_sequences_tells_them_apart(self):
        """Light spectra of two sequences in one panel: each line says its
        batch and sequence (the legend read "upwelling light" twice)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        tmp = self.mktemp()
        os.makedirs(tmp)
        paths = []
        for seq in (1, 2):
            path = os.path.join(tmp, f"b000003_s00000{seq}_light.pico")
            meta = {"SerialNumber": "x", "Direction": "upwelling", "Dark": False,
                    "Run": "r", "Batch": 3, "SequenceNumber": seq, "IntegrationTime": 100.0}
            with open(path, "w") as f:
                json.dump({"Spectra": [{"Metadata": meta, "Pixels": [1, 2, 3]}]}, f)
            paths.append(path)
        figures = []
        real_close = plt.close
        self.patch(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
        code, out, err = self.run_cli("plot", *paths, "-o", os.path.join(tmp, "two.png"))
        self.assertEqual(code, 0, err)
        legend = [t.get_text() for t in figures[0].axes[0].get_legend().get_texts()]
        self.assertEqual(legend[:2], ["b3 s1 upwelling light (100 ms)",
                                      "b3 s2 upwelling light (100 ms)"])

    def test_unknown_host_name(self):
        """A host name that does not resolve is said so (it read "cannot
        reach the server", as for a stopped server). aiocoap raises
        ResolutionError for it; a stand-in context raises it here, so no
        name is looked up on the network."""
        import aiocoap
        from piccolo_twisted.cli.client import Client, Unreachable

        class Request:
            def __init__(self):
                self.response = asyncio.get_running_loop().create_future()
                self.response.set_exception(aiocoap.error.ResolutionError(
                    "No address information found for requests to 'piccolo.lan'"))

        class Context:
            def request(self, msg, **kw):
                return Request()

        async def ask():
            client = Client("coap://piccolo.lan")
            client.ctx = Context()
            with self.assertRaises(Unreachable) as caught:
                await client.get("control/status")
            return str(caught.exception)
        loop = asyncio.new_event_loop()
        try:
            message = loop.run_until_complete(ask())
        finally:
            loop.close()
        self.assertEqual(message, "coap://piccolo.lan: unknown host name "
                                  "(is the address right?)")

    def test_show_without_a_display(self):
        """plot --show where no window can open: one line, not a silent 0."""
        tmp = self.mktemp()
        os.makedirs(tmp)
        path = os.path.join(tmp, "one.pico")
        with open(path, "w") as f:
            json.dump({"Spectra": [{"Metadata": {"SerialNumber": "x", "Direction": "up",
                                                 "Dark": False, "Run": "r", "Batch": 0,
                                                 "SequenceNumber": 0},
                                    "Pixels": [1, 2, 3]}]}, f)
        env = {k: v for k, v in os.environ.items()
               if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
        self.patch(os, "environ", env)
        code, out, err = self.run_cli("plot", path, "--show")
        self.assertEqual(code, 1, err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("-o OUT.png", err)

    def test_without_the_cli_extra(self):
        """The server's own install has the piccolo3 script but not aiocoap:
        one line saying what to install (it was a traceback)."""
        import subprocess
        code = ("import sys; sys.modules['aiocoap'] = None\n"
                "from piccolo_twisted.cli.main import main\n"
                "sys.exit(main(['--server', 'coap://[::1]:9', 'status']))")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                              text=True, timeout=60)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        # as the README says (the package is not on PyPI), with this pip
        pip = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "pip")
        self.assertIn(f"in a copy of piccolo-twisted, {pip} install '.[cli]'", proc.stderr)
        self.assertNotIn("piccolo-twisted[cli]", proc.stderr)

    def test_usage(self):
        code, out, err = self.run_cli("fetch", "somedir")
        self.assertEqual(code, 2)
        self.assertIn("give RUN DIR, or --all DIR", err)

    def test_server_default_from_environment(self):
        from piccolo_twisted.cli.main import build_parser
        self.patch(os, "environ", dict(os.environ, PICCOLO_SERVER="coap://[::1]:6000"))
        self.assertEqual(build_parser().parse_args(["status"]).server, "coap://[::1]:6000")
        os.environ.pop("PICCOLO_SERVER", None)
        self.assertEqual(build_parser().parse_args(["status"]).server, "coap://localhost")


class PackagingTests(unittest.SynchronousTestCase):

    def setup_cfg(self):
        cfg = configparser.ConfigParser()
        cfg.read(os.path.join(ROOT, "setup.cfg"))
        return cfg

    @staticmethod
    def names(requirements):
        import re
        return {re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower()
                for line in requirements.splitlines() if line.strip()}

    def test_server_install_stays_lean(self):
        cfg = self.setup_cfg()
        server = self.names(cfg["options"]["install_requires"])
        cli = self.names(cfg["options.extras_require"]["cli"])
        test = self.names(cfg["options.extras_require"]["test"])
        self.assertEqual(cli, {"aiocoap", "tqdm", "matplotlib"})
        self.assertFalse(server & cli, "the server's install must not pull the CLI's")
        self.assertLessEqual(cli, test, "CI installs .[test]: it needs the CLI's too")
        self.assertIn("piccolo3 = piccolo_twisted.cli.main:main",
                      cfg["options.entry_points"]["console_scripts"])

    def test_cli_and_server_do_not_import_each_other(self):
        """The CLI speaks CoAP only; the server never loads the CLI."""
        for name in os.listdir(CLI_DIR):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(CLI_DIR, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    self.assertFalse(node.level == 0 and (node.module or "").startswith(
                        "piccolo_twisted"), f"{name} imports {node.module}")
                    self.assertLessEqual(node.level, 1, f"{name} reaches out of cli/")
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        self.assertFalse(alias.name.startswith("piccolo_twisted"), name)
        for dirpath, _, files in os.walk(os.path.join(ROOT, "piccolo_twisted")):
            if dirpath.startswith(CLI_DIR):
                continue
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name)) as f:
                        self.assertNotIn("cli", {m for m in _imported(f.read())},
                                         os.path.join(dirpath, name))


def _imported(source):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            yield from (node.module or "").split(".")
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield from a.name.split(".")
