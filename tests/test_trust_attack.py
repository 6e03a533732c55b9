"""What the outside attack on issue 20 found ("Data a scientist can trust"),
each modelled from the outside: a full disk (the file writer's real
failure path, and a real 400 kB file system), hand changes with real
unlinks during a batch over CoAP, the cooler switched off while a batch
waits for it, the deployed processing tool's metadata keys, and the
USB2000+'s counts through the real pyseabreeze stack."""

import asyncio
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from twisted.trial import unittest

from piccolo_twisted.acquisition import pico

from .helpers import ServerTestCase
from .test_wire import coro

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = re.compile(r"^b(\d+)_s(\d+)(?:_(light|dark))?\.pico$")


def on_disk(directory):
    """What the run's files hold, read from them alone: {"files",
    "sequences", "saturated": {(spec serial, channel, type): [sequence,
    ...]}, "unstable": {...}}."""
    found = {"files": set(), "sequences": set(), "saturated": {}, "unstable": {}}
    for name in os.listdir(directory):
        m = NAME.match(name)
        if not m:
            continue
        found["files"].add(name)
        if m.group(3) != "dark":
            found["sequences"].add(int(m.group(2)))
        with open(os.path.join(directory, name)) as f:
            doc = json.load(f)
        for s in doc["Spectra"]:
            meta = s["Metadata"]
            where = (meta["SerialNumber"], meta["Direction"], meta["Type"])
            if sum(p >= meta["SaturationLevel"] for p in s["Pixels"]):
                found["saturated"].setdefault(where, []).append(meta["SequenceNumber"])
            if meta["TemperatureStable"] is False:
                found["unstable"].setdefault(where, []).append(meta["SequenceNumber"])
    return found


def ranges(sequences):
    out = []
    for s in sorted(sequences):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


class SummaryMatchesDisk:
    """Mixed into a test case: ``assertSummaryIsTheDisk``."""

    def assertSummaryIsTheDisk(self, summary, directory):
        disk = on_disk(directory)
        self.assertEqual(sorted(summary["files"]), sorted(disk["files"]))
        self.assertEqual(summary["sequences"], len(disk["sequences"]))
        for key, flagged, total in (("saturated", "saturated", "saturated_spectra"),
                                    ("temperature_unstable", "unstable",
                                     "temperature_unstable_spectra")):
            self.assertEqual(summary[total], sum(len(v) for v in disk[flagged].values()),
                             (key, summary[key], disk[flagged]))
            got = {(e["spectrometer"].removeprefix("S_"), e["channel"], e["type"]):
                   (e["sequences"], e["spectra"]) for e in summary[key]}
            want = {where: (ranges(seqs), len(seqs)) for where, seqs in disk[flagged].items()}
            self.assertEqual(got, want, key)


def disk_full_from(case, marker):
    """The disk fills up at the first file whose name holds ``marker``:
    from then on the real writer (pico.write_atomic) fails as a full disk
    does, in its fsync (delayed allocation: ext4 and vfat report ENOSPC
    there), and cleans up after itself. Returns the names that failed."""
    real = pico.write_atomic
    full = []

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def write(directory, name, data, clobber=False, fsync=os.fsync):
        if marker in name:
            full.append(name)
        return real(directory, name, data, clobber, no_space if full else fsync)
    case.patch(pico, "write_atomic", write)
    return full


class FullDiskTests(ServerTestCase, SummaryMatchesDisk):
    """Finding 1: after a full disk, /control/last_batch counted spectra
    that no file holds (``sequences: 6`` with 7 files, but 14 saturated
    and 17 temperature-unstable spectra against 12 and 14 in the files).
    The summary counts a spectrum when its file is durably written."""

    def disk_full_from(self, marker):
        return disk_full_from(self, marker)

    @coro
    async def test_summary_counts_what_is_on_disk(self):
        # every QE Pro spectrum is temperature-unstable, every downwelling
        # light saturated (100 ms, no autointegration): the file that
        # fails holds flagged spectra
        await self.put("spectrometer/S_sim_QEP00981/target_temperature", 35.0)
        full = self.disk_full_from("s000003_light")
        await self.put("control/record_sequence",
                       {"run": "full", "nsequence": 12, "auto": -1, "delay": 0})
        await self.wait_for("control/status", lambda s: s == "idle")
        self.assertTrue(full)
        summary = await self.get("control/last_batch")
        self.assertIn("No space left on device", await self.get("control/fault"))
        self.assertTrue(any("b000000_s000003_light.pico" in f for f in summary["faults"]),
                        summary["faults"])
        self.assertEqual(summary["sequences"], 3)
        self.assertGreater(summary["saturated_spectra"], 0)
        self.assertGreater(summary["temperature_unstable_spectra"], 0)
        self.assertSummaryIsTheDisk(summary, self.run_dir("full"))
        # no temporary file left behind by the failed writes
        self.assertEqual([n for n in os.listdir(self.run_dir("full")) if n.startswith(".")], [])


def can_mount_tmpfs():
    """Whether a user and mount namespace with a tmpfs can be made here."""
    if shutil.which("unshare") is None:
        return False
    d = tempfile.mkdtemp(prefix="piccolo-tmpfs-probe-")
    try:
        r = subprocess.run(["unshare", "-Urm", "sh", "-c",
                            'mount -t tmpfs -o size=64k tmpfs "$1"', "_", d],
                           capture_output=True, timeout=10)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        os.rmdir(d)


class SmallFileSystemTests(unittest.TestCase, SummaryMatchesDisk):
    """Finding 1 as the attacker found it: a 400 kB tmpfs as the data
    directory (the server in a mount namespace of its own, so no root is
    needed and nothing is left mounted), ``piccolo3 record -n 20`` over
    CoAP; the files are read back through the server's own file system."""

    timeout = 120

    def setUp(self):
        if not can_mount_tmpfs():
            raise unittest.SkipTest("no user and mount namespaces here (unshare -Urm)")

    def test_full_tmpfs(self):
        sys.path.insert(0, os.path.join(HERE, "bench"))
        try:
            from run import TWISTD, free_port
            import loadclient
        finally:
            sys.path.pop(0)
        d = os.path.abspath(self.mktemp())
        mnt = os.path.join(d, "mnt")
        os.makedirs(mnt)
        port = free_port()
        env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", PICCOLO_TIME_SCALE="0.05")
        argv = (["unshare", "-Urm", "sh", "-c",
                 'mount -t tmpfs -o size=400k tmpfs "$1" && shift && exec "$@"', "_", mnt]
                + TWISTD + ["-n", "--pidfile=", "piccolo", "--address", "::1",
                            "--port", str(port), "--web", "0", "--data-dir", mnt])
        with open(os.path.join(d, "server.log"), "wb") as log:
            server = subprocess.Popen(argv, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    code, body, _ = loadclient.fetch(
                        "::1", port, "/spectrometer/S_sim_QEP00981/status", timeout=0.3)
                    if code == 0x45 and json.loads(body) == 6:      # connected, idle
                        break
                except OSError:
                    pass
                self.assertIsNone(server.poll(), "the server ended early")
                self.assertLess(time.monotonic(), deadline, "the server never answered")
                time.sleep(0.1)
            cli = os.path.join(os.path.dirname(sys.executable), "piccolo3")
            record = subprocess.run(
                [cli, "--server", f"coap://[::1]:{port}", "record", "--run", "full",
                 "-n", "20", "--auto", "-1", "--delay", "0"],
                capture_output=True, text=True, timeout=60)
            self.assertEqual(record.returncode, 3, record.stderr)
            self.assertIn("No space left on device", record.stderr)
            code, body, _ = loadclient.fetch("::1", port, "/control/last_batch", timeout=5)
            summary = json.loads(body)
            # the files as the server's file system holds them
            files = os.path.join("/proc", str(server.pid), "root", mnt.lstrip("/"), "full")
            self.assertGreater(summary["saturated_spectra"], 0)
            self.assertLess(summary["sequences"], 20)
            self.assertSummaryIsTheDisk(summary, files)
            # what record printed is that summary (finding 3: on every ending)
            self.assertRegex(record.stdout, rf"(?m)^batch 0 of run full: "
                                            rf"{summary['sequences']} sequences?, "
                                            rf"{len(summary['files'])} files, ")
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


async def piccolo3(*argv):
    """One command in-process: (exit status, stdout, stderr)."""
    import io
    from piccolo_twisted.cli.main import run
    out, err = io.StringIO(), io.StringIO()
    code = await run(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


class RecordEndingTests(ServerTestCase):
    """Finding 3: ``piccolo3 record`` printed the summary and the
    saturation and temperature warnings only when the batch succeeded;
    a batch stopped by a full disk or aborted by another client holds
    flagged spectra too. They are printed on every ending, before the
    one-line error."""

    async def record(self, *argv):
        return await piccolo3("--server", self.base, "record", *argv)

    def assertSummaryPrinted(self, out, err, sequences):
        self.assertRegex(out, rf"(?m)^batch 0 of run \w+: {sequences} sequences?, \d+ files, ")
        self.assertRegex(out, r"(?m)^  saturated spectra: [1-9]\d*; "
                              r"temperature-unstable spectra: [1-9]\d*$")
        self.assertRegex(err, r"(?m)^warning: S_sim_FLMT01234 downwelling light, "
                              r"sequences? [\d, -]+: .* pixels saturated")
        self.assertRegex(err, r"(?m)^warning: S_sim_QEP00981 upwelling light, "
                              r"sequences? [\d, -]+: detector at .*temperature not stable$")
        # the error stays the last line
        self.assertTrue(err.strip().splitlines()[-1].startswith("piccolo3: record: "), err)

    @coro
    async def test_disk_full(self):
        await self.put("spectrometer/S_sim_QEP00981/target_temperature", 35.0)
        disk_full_from(self, "s000002_light")
        code, out, err = await self.record("--run", "full", "-n", "6", "--auto", "-1")
        self.assertEqual(code, 3, err)
        self.assertIn("No space left on device", err.strip().splitlines()[-1])
        self.assertSummaryPrinted(out, err, 2)

    @coro
    async def test_aborted_by_another_client(self):
        await self.put("spectrometer/S_sim_QEP00981/target_temperature", 35.0)
        recording = asyncio.ensure_future(self.record("--run", "ab", "-n", "50",
                                                      "--auto", "-1", "--delay", "0.1"))
        await self.wait_for("control/current_sequence", lambda s: s >= 2)
        await self.get("control/abort")
        code, out, err = await asyncio.wait_for(recording, 20)
        self.assertEqual(code, 4, err)
        self.assertIn("aborted (by another client)", err)
        summary = await self.get("control/last_batch")
        self.assertTrue(summary["aborted"])
        self.assertSummaryPrinted(out, err, summary["sequences"])
        self.assertRegex(out, r"(?m)^batch 0 of run ab: .* \(aborted\)$")


class WaitForTemperatureChangeTests(ServerTestCase):
    """Finding 4: switching the cooler off (PUT TECenabled false) or
    moving its set point did not end or re-judge ``wait_for_temperature``:
    the status stayed "waiting for temperature" until the next reading (or
    the wait's end, 10 minutes here). Either change wakes the wait at once.
    The readings between are made rare here (TEMPERATURE_POLL 600 s) so
    that nothing but the change can end the wait within the test; the
    detector cools in real time (time constant 20 s: away from -10 °C for
    most of a minute)."""

    time_scale = 1.0
    instrument_text = """
[channels]
  [[shutter_1]]
    direction = upwelling
[spectrometers]
  [[sim_QEP00981]]
    temperature_tolerance = 2.0
    wait_for_temperature = 10
"""

    def setUp(self):
        from piccolo_twisted.acquisition import control
        self.patch(control, "TEMPERATURE_POLL", 600.0)
        return super().setUp()

    async def start_waiting(self, run):
        await self.put("control/record_sequence", {"run": run, "nsequence": 1, "auto": -1})
        await self.wait_for("control/status", lambda s: s == "waiting for temperature")

    def spectra(self, run):
        return [s["Metadata"] for doc in self.load_run(run).values() for s in doc["Spectra"]]

    @coro
    async def test_cooler_switched_off(self):
        await self.start_waiting("off")
        await self.put("spectrometer/S_sim_QEP00981/TECenabled", False)
        await self.wait_for("control/status", lambda s: s == "idle", timeout=15)
        summary = await self.get("control/last_batch")
        self.assertEqual((summary["sequences"], summary["faults"]), (1, []))
        self.assertIsNotNone(summary["temperature_wait"])
        for meta in self.spectra("off"):
            self.assertIs(meta["TemperatureEnabled"], False)
            self.assertIs(meta["TemperatureStable"], True)

    @coro
    async def test_set_point_moved_to_the_detector(self):
        await self.start_waiting("moved")
        last = await self.get("spectrometer/S_sim_QEP00981/last_temperature")
        target = float(round(last["temperature"]))
        await self.put("spectrometer/S_sim_QEP00981/target_temperature", target)
        await self.wait_for("control/status", lambda s: s == "idle", timeout=15)
        summary = await self.get("control/last_batch")
        self.assertEqual((summary["sequences"], summary["faults"]), (1, []))
        for meta in self.spectra("moved"):
            self.assertEqual(meta["TemperatureSetPoint"], target)
            self.assertIs(meta["TemperatureStable"], True)

    @coro
    async def test_abort_during_the_wait_says_how_long(self):
        """(A NIT of the attack: temperature_wait was null after an abort
        during the wait.)"""
        await self.start_waiting("aborted")
        await asyncio.sleep(0.3)
        await self.get("control/abort")
        await self.wait_for("control/status", lambda s: s == "idle")
        summary = await self.get("control/last_batch")
        self.assertTrue(summary["aborted"])
        self.assertGreater(summary["temperature_wait"], 0.2)
        self.assertEqual(summary["files"], [])


class HandChangeDuringSaveWireTests(ServerTestCase):
    """Finding 2: a change by hand made while a save writes into the run
    was not seen by the next listing (/tmp/attack20/race3.py: unlink one
    of the run's files and make another during a batch, GET spectra_list
    at once: 8-24 of ~400 listings still named the removed file, and PUT
    spectra of it answered 4.00 "not a spectrum file"). Here every save of
    the batch is held in the file pool once its file is on disk -- the
    moment the attack hit by chance -- while the test unlinks a file,
    makes one, and asks over CoAP."""

    def populate(self, datadir):
        run = os.path.join(datadir, "hand")
        os.makedirs(run)
        for b in range(2):
            for s in range(6):
                with open(os.path.join(run, f"b{b:06d}_s{s:06d}_light.pico"), "w") as f:
                    f.write('{"Spectra": []}')

    def hold_saves(self):
        """``hold()`` arms a hold on the next file the server writes: it is
        on disk before the write returns to the pool, and stays so until
        ``release(name)``; ``next_landed()`` waits for it."""
        real = pico.write_atomic
        armed = threading.Event()
        landed, gates = [], {}
        lock = threading.Lock()

        def write(directory, name, data, clobber=False, fsync=os.fsync):
            result = real(directory, name, data, clobber, fsync)
            with lock:
                if not armed.is_set():
                    return result
                armed.clear()
                gate = gates[name] = threading.Event()
                landed.append(name)
            gate.wait(30)
            return result
        self.patch(pico, "write_atomic", write)
        self.addCleanup(lambda: [g.set() for g in list(gates.values())])

        async def next_landed():
            for _ in range(1000):
                with lock:
                    if landed:
                        return landed.pop(0)
                await asyncio.sleep(0.01)
            raise AssertionError("no save reached the disk")

        def release(name):
            gates[name].set()
        return armed.set, next_landed, release

    @coro
    async def test_unlink_and_make_during_saves(self):
        hold, next_landed, release = self.hold_saves()
        run = self.run_dir("hand")
        await self.put("control/record_sequence",
                       {"run": "hand", "nsequence": 30, "auto": -1, "delay": 0.02})
        made = []
        for i in range(8):
            hold()
            saving = await next_landed()
            self.assertIn(saving, os.listdir(run))              # on disk, not yet answered
            # an older file removed by hand, or the very file being saved
            # (a script cleaning up behind the batch)
            victim = saving if i == 3 else f"b{i % 2:06d}_s{i // 2:06d}_light.pico"
            os.unlink(os.path.join(run, victim))
            mine = f"b{8000000 + i}_s000000_light.pico"
            with open(os.path.join(run, mine), "w") as f:
                f.write('{"Spectra": []}')
            made.append(mine)
            # asked now, answered once the save has landed
            listing = asyncio.ensure_future(self.get("data_dir/runs/hand/spectra_list"))
            await asyncio.sleep(0.05)
            release(saving)
            listed = await listing
            self.assertNotIn(victim, listed)
            for name in made:
                self.assertIn(name, listed)
            if victim != saving:
                self.assertIn(saving, listed)
            r = await self.request("PUT", "data_dir/runs/hand/spectra", [victim])
            self.assertEqual(r.code.dotted, "4.00")
            self.assertIn(b"not in the spectra list", r.payload)
            self.assertEqual(json.loads(json.loads(
                await self.put_raw("data_dir/runs/hand/spectra", [mine]))), {"Spectra": []})
            self.assertEqual(await self.get("data_dir/runs/hand/current_batch"), 8000000 + i)
        await self.get("control/abort")
        await self.wait_for("control/status", lambda s: s == "idle")
        listed = await self.get("data_dir/runs/hand/spectra_list")
        self.assertEqual(sorted(listed), sorted(n for n in os.listdir(run) if n.endswith(".pico")))

    async def put_raw(self, path, payload):
        r = await self.request("PUT", path, payload)
        self.assertTrue(r.code.is_successful(), r)
        return r.payload
