"""The ``piccolo3`` command line, driven against a live server on loopback.

The commands run in-process through their asyncio entry point
(``piccolo_twisted.cli.main.run``) on the test's event loop, except where
the terminal matters (Ctrl-C during ``record``): there the installed
``piccolo3`` script runs as a subprocess against the test server.
"""

import ast
import asyncio
import configparser
import errno
import io
import json
import os
import signal
import struct
import sys
import tempfile

from twisted.trial import unittest

from piccolo_twisted.acquisition import pico

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
        self.assertEqual(png_size(png), (900, 720))       # 9 x (2 x 3.2 + 0.8) in at 100 dpi
        self.assertGreater(os.path.getsize(png), 30000)   # drawn lines, not an empty frame

    @coro
    async def test_status_jobs_health(self):
        code, out, err = await self.cli("status")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"(?m)^control\s+idle$")
        self.assertRegex(out, r"(?m)^S_sim_QEP00981\s+idle; integration upwelling \d+ ms, "
                              r"downwelling \d+ ms; temperature -?\d+\.\d °C$")
        self.assertRegex(out, r"(?m)^S_sim_FLMT01234\s+idle; integration upwelling")
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
        self.assertRegex(out, r"(?m)^sim_QEP00981\s+idle, 0 errors, -?\d+\.\d °C$")
        self.assertRegex(out, r"(?m)^sim_FLMT01234\s+idle, 0 errors$")

    @coro
    async def test_status_watch_follows_changes(self):
        from piccolo_twisted.cli.main import run
        out = io.StringIO()
        watching = asyncio.ensure_future(run(["--server", self.base, "status", "--watch",
                                              "--updates", "1"], out=out, err=out))
        for _ in range(200):                  # the first screen, then the observations
            if "last fault" in out.getvalue() and self.service.control.status._watchers:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        await self.put("data_dir/current_run", "watched")
        self.assertEqual(await asyncio.wait_for(watching, 5), 0)
        screens = out.getvalue().split("\n-- ")
        self.assertEqual(len(screens), 2, out.getvalue())
        self.assertNotIn("run watched", screens[0])
        self.assertIn("run watched", screens[1])

    @coro
    async def test_record_fault_exits_3(self):
        real = pico.write_atomic

        def full(directory, name, data, clobber=False, fsync=None):
            if "s000001" in name:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(directory, name, data, clobber)
        self.patch(pico, "write_atomic", full)
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
        # the screen during a batch: no temperature read waits for a busy device
        await self.wait_for("control/current_sequence", lambda s: s >= 1)  # files written
        code, out, err = await self.cli("status")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, r"(?m)^current\s+run busy, batch 0, sequence \d+ of 20$")
        self.assertRegex(out, r"(?m)^S_sim_QEP00981\s+(recording|idle);.*; temperature (-|-?\d+\.\d °C)$")
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
