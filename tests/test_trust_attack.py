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


class DriftingDetector:
    """A simulated QE Pro whose detector warms through its tolerance while
    it integrates: 5 °C before the integration, at its -10 °C set point
    after it (a reading taken after the integration alone calls it
    stable)."""

    def __new__(cls, optics):
        from piccolo_twisted.instrument.simulator import SimulatedSpectrometer

        class Drifting(SimulatedSpectrometer):
            integrated = False

            def read(self):
                result = super().read()
                self.integrated = True
                return result

            def temperature(self):
                self._check()
                return -10.0 if self.integrated else 5.0
        return Drifting("sim_QEP1", optics, time_scale=0.001)


class TemperatureBeforeAndAfterTests(unittest.SynchronousTestCase):
    """Finding 9: "stable" was judged by the reading after the integration
    only; a reading before it and one after decide (both within the
    tolerance), and both are in the metadata."""

    def test_detector_drifting_during_the_integration(self):
        from twisted.internet import task
        from piccolo_twisted.config import load_instrument_config
        from piccolo_twisted.instrument import spectrometer as sp
        from piccolo_twisted.instrument.simulator import Optics
        from .test_instrument import CONFIG, sync_thread
        cfg = load_instrument_config(text=CONFIG)
        device = DriftingDetector(Optics())
        spec = sp.Spectrometer(cfg.spectrometers[0], ["upwelling", "downwelling"],
                               device, task.Clock(), to_thread=sync_thread)
        self.successResultOf(spec.connect())
        device.integrated = False                   # (the connect's own reading)
        reading = self.successResultOf(spec.acquire(20))
        meta = spec.metadata("upwelling", reading)
        self.assertEqual((meta["TemperatureBefore"], meta["Temperature"],
                          meta["TemperatureSetPoint"]), (5.0, -10.0, -10.0))
        self.assertIs(meta["TemperatureStable"], False)
        # the detector stays at its set point: both readings, stable
        reading = self.successResultOf(spec.acquire(20))
        meta = spec.metadata("upwelling", reading)
        self.assertEqual((meta["TemperatureBefore"], meta["Temperature"]), (-10.0, -10.0))
        self.assertIs(meta["TemperatureStable"], True)


class DeviceFrontTests(unittest.SynchronousTestCase):
    """NITs of the attack, on the spectrometer front with the simulator:
    the idle temperature readings 10 s apart whoever took the last one
    (after a batch the next came ~18 s after the last acquisition), and a
    Flame (no cooler) answering TECenabled true."""

    def setUp(self):
        from twisted.internet import task
        from piccolo_twisted.config import load_instrument_config
        from piccolo_twisted.instrument import spectrometer as sp
        from piccolo_twisted.instrument.simulator import Optics, SimulatedSpectrometer
        from .test_instrument import CONFIG, sync_thread
        self.sp = sp
        cfg = load_instrument_config(text=CONFIG)
        self.clock = task.Clock()
        self.clock.advance(1000)
        optics = Optics()
        self.qep = sp.Spectrometer(cfg.spectrometers[0], ["upwelling"],
                                   SimulatedSpectrometer("sim_QEP1", optics, time_scale=0.001),
                                   self.clock, to_thread=sync_thread)
        self.flame = sp.Spectrometer(cfg.spectrometers[1], ["upwelling"],
                                     SimulatedSpectrometer("sim_FLMT1", optics,
                                                           time_scale=0.001),
                                     self.clock, to_thread=sync_thread)

    def test_idle_readings_every_interval_after_the_last(self):
        interval = self.sp.TEMPERATURE_INTERVAL
        times = []
        self.qep.temperature.watch(lambda v: times.append(v["time"]))
        self.successResultOf(self.qep.connect())
        self.assertEqual(times, [1000.0])                 # at connect
        self.clock.advance(3.0)
        self.successResultOf(self.qep.acquire(20))        # a batch's last spectrum
        self.assertEqual(times[-1], 1003.0)
        self.clock.advance(interval - 0.5)
        self.assertEqual(len(times), 2)                   # not yet due
        self.clock.advance(0.5)
        self.assertEqual(times[-1], 1003.0 + interval)    # due 10 s after the last
        self.clock.advance(interval)
        self.assertEqual(times[-1], 1003.0 + 2 * interval)
        self.successResultOf(self.qep.disconnect())
        self.clock.advance(5 * interval)
        self.assertEqual(times[-1], 1003.0 + 2 * interval)   # none while disconnected
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flame_without_cooler_reports_it_off(self):
        self.assertIs(self.flame.tec_enabled.value, True)      # fan = True by default
        self.successResultOf(self.flame.connect())
        self.assertIs(self.flame.have_tec(), False)
        resources = self.flame.resources()
        self.assertIs(resources["TECenabled"].get(), False)
        self.successResultOf(self.qep.connect())
        self.assertIs(self.qep.resources()["TECenabled"].get(), True)


class TemperatureWireTests(ServerTestCase):
    """Finding 7: the deployed processing tool (TeamPiccolo/piccolo3-utils,
    ``PiccoloProcessedData.add``, used by ``read_picco``) takes a
    spectrum's detector temperature and set point from
    ``TemperatureDetectorActual`` and ``TemperatureDetectorSet`` (°C) and
    nothing else; the files carry them. With PICCOLO3_UTILS and
    PICCOLO3_COMMON set to checkouts (and xarray installed) the real tool
    reads the batch. And a NIT: health's set point of a disconnected
    cooled spectrometer (it was null while last_temperature said -10)."""

    @coro
    async def test_processing_tool_keys(self):
        for s in ("S_sim_QEP00981", "S_sim_FLMT01234"):
            for channel in ("upwelling", "downwelling"):
                await self.put(f"spectrometer/{s}/current_time/{channel}", 20)
        await self.put("control/record_sequence", {"run": "proc", "nsequence": 2, "auto": -1})
        await self.wait_for("control/status", lambda s: s == "idle")
        files = self.load_run("proc")
        seen = []
        for doc in files.values():
            for s in doc["Spectra"]:
                meta = s["Metadata"]
                if meta["SerialNumber"] == "sim_QEP00981":
                    # what PiccoloProcessedData.add appends
                    self.assertIn("TemperatureDetectorActual", meta)
                    self.assertEqual(meta["TemperatureDetectorActual"], meta["Temperature"])
                    self.assertEqual(meta["TemperatureDetectorSet"], -10.0)
                    self.assertIsInstance(meta["TemperatureDetectorActual"], float)
                    seen.append(meta["Temperature"])
                else:
                    self.assertNotIn("TemperatureDetectorActual", meta)
        self.assertEqual(len(seen), 2 * 2 * 2)
        real = real_processing_tool()
        if real is not None:
            paths = sorted(os.path.join(self.run_dir("proc"), n) for n in files)
            data = real.read_picco(paths, include_saturated=True)
            ds = data["sim_QEP00981"]["upwelling"].data
            lights = [s["Metadata"]["Temperature"] for n in sorted(files) if "light" in n
                      for s in files[n]["Spectra"]
                      if s["Metadata"]["SerialNumber"] == "sim_QEP00981"
                      and s["Metadata"]["Direction"] == "upwelling"]
            self.assertEqual([float(t) for t in ds.temperature.values], lights)
            self.assertEqual([float(t) for t in ds.temperature_target.values],
                             [-10.0] * len(lights))

    @coro
    async def test_set_point_of_a_disconnected_spectrometer(self):
        await self.get("spectrometer/S_sim_QEP00981/disconnect")
        health = await self.get("sysinfo/health")
        entry = health["spectrometers"]["sim_QEP00981"]
        self.assertIsNone(entry["temperature"])
        self.assertEqual(entry["temperature_target"], -10.0)
        last = await self.get("spectrometer/S_sim_QEP00981/last_temperature")
        self.assertEqual((last["temperature"], last["target"]), (None, -10.0))


def real_processing_tool():
    """piccolo3.utils.PiccoloProcessedData from $PICCOLO3_UTILS (with
    piccolo3.common from $PICCOLO3_COMMON), or None."""
    utils, common = os.environ.get("PICCOLO3_UTILS"), os.environ.get("PICCOLO3_COMMON")
    if not (utils and common):
        return None
    try:
        import xarray  # noqa: F401
        import pytz  # noqa: F401
    except ImportError:
        return None
    import importlib.util
    import types
    from . import legacy_pico
    spectra = legacy_pico.real_parser()
    package = types.ModuleType("piccolo3")
    package.__path__ = []
    common_module = types.ModuleType("piccolo3.common")
    common_module.PiccoloSpectrum = spectra.PiccoloSpectrum
    common_module.PiccoloSpectraList = spectra.PiccoloSpectraList
    sys.modules.setdefault("piccolo3", package)
    sys.modules["piccolo3.common"] = common_module
    source = os.path.join(utils, "piccolo3", "utils", "PiccoloProcessedData.py")
    spec = importlib.util.spec_from_file_location("legacy_PiccoloProcessedData", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


USB = "FLMT04000"


class CountsScaleWireTests(ServerTestCase):
    """Finding 8: a USB2000+'s or Flame-S's pixels are raw x 65535 / its
    EEPROM saturation level (seabreeze's scaling), but neither the level
    nor the factor was in the metadata, and the nonlinearity coefficients
    -- the device's polynomial in raw counts -- were given for pixels in
    other units (2-3 % off at an EEPROM level of 40,000). Through the real
    pyseabreeze stack on the emulated USB2000+ with that level: the file
    says the factor and the raw level, the raw counts come back from the
    pixels, and the coefficients in the file correct the pixels as the
    device's own correct its raw counts."""

    server_text = f"[seabreeze]\nemulate = USB2000PLUS:{USB}\n"
    instrument_text = f"""
[channels]
  [[shutter_1]]
    direction = upwelling
  [[shutter_2]]
    direction = downwelling
[spectrometers]
  [[{USB}]]
"""

    def setUp(self):
        from piccolo_twisted.instrument.usb_emulator import ooi
        self.patch(ooi.USB2000Plus, "default_saturation", 40000)
        return super().setUp()

    @coro
    async def test_raw_counts_and_nonlinearity_from_the_file(self):
        import zlib
        from collections import deque
        import numpy as np
        from . import legacy_pico
        device = self.service.instrument.emulated[USB]
        self.assertEqual(device.saturation(), 40000)
        device.sent = deque(maxlen=4096)
        await self.put("control/record_sequence", {"run": "raw", "nsequence": 1, "auto": -1})
        await self.wait_for("control/status", lambda s: s == "idle", timeout=30)
        device_nl = [float(device.eeprom[i]) for i in range(6, 10)]
        checked = 0
        for name, doc in self.load_run("raw").items():
            for s in doc["Spectra"]:
                meta, pixels = s["Metadata"], np.asarray(s["Pixels"], dtype=float)
                scale = meta["CountsScale"]
                self.assertAlmostEqual(scale, 65535 / 40000, places=12)
                self.assertEqual((meta["SaturationLevel"], meta["SaturationLevelRaw"]),
                                 (65535, 40000))
                # back to the raw counts the device sent, from the file alone
                raw = np.rint(pixels / scale).astype(np.int64)
                crc = zlib.crc32(raw.tobytes())
                self.assertEqual([e.micros for e in device.sent if e.crc == crc],
                                 [meta["IntegrationTime"] * 1000], name)
                # the device's polynomial, as its EEPROM holds it
                self.assertEqual(meta["NonlinearityCorrectionCoefficientsRaw"], device_nl)
                # the file's coefficients on the pixels (the deployed
                # parser's formula, with a dark) = the device's on the raw
                # counts, in pixel units; the old coefficients were not
                dark = pixels[meta["DarkPixels"]].mean()
                x = pixels - dark
                corrected = dark + x / np.polynomial.polynomial.polyval(
                    x, meta["NonlinearityCorrectionCoefficients"])
                raw_x = raw - dark / scale
                want = scale * (dark / scale + raw_x / np.polynomial.polynomial.polyval(
                    raw_x, device_nl))
                self.assertLess(np.max(np.abs(corrected - want)), 1.0)
                wrong = dark + x / np.polynomial.polynomial.polyval(x, device_nl)
                if pixels.max() > 30000:
                    self.assertGreater(np.max(np.abs(wrong - want) / want), 0.01)
                    checked += 1
                legacy_pico.parse_spectrum(s)           # the deployed parser reads it
        self.assertGreater(checked, 0)


class StatusWatchTemperatureTests(ServerTestCase):
    """Finding 6: ``piccolo3 status --watch`` froze the temperature and
    its age (temperatures were left out of what it follows; "(3 s ago)"
    stayed on the screen while the detector moved). The watch follows
    every cooled detector's readings, redraws when the temperature shown
    (0.1 °C) or its stability changes, and says when a reading was taken
    rather than an age the screen would soon belie. (A NIT too: status
    said nothing of an unstable temperature; health did.)"""

    @coro
    async def test_watch_follows_the_detector(self):
        from piccolo_twisted.cli.main import run
        import io
        qep = "S_sim_QEP00981"
        out = io.StringIO()
        watching = asyncio.ensure_future(run(["--server", self.base, "status", "--watch",
                                              "--updates", "1"], out=out, err=out))
        spec = self.service.instrument.spectrometers.by_name[qep]
        # the first screen, then the observations (the readings' is the
        # last the watch registers), however long a loaded machine takes: a
        # 3 s poll fell through, and a reading before that registration was
        # never notified (the watch then waited its 10 s refresh)
        deadline = time.monotonic() + 30
        while not ("last fault" in out.getvalue() and spec.temperature._watchers) \
                and time.monotonic() < deadline and not watching.done():
            await asyncio.sleep(0.01)
        self.assertTrue(spec.temperature._watchers, out.getvalue())
        first = out.getvalue()
        self.assertRegex(first, rf"(?m)^{qep}\s+idle;.*; temperature -?\d+\.\d °C "
                                r"\(read \d\d:\d\d:\d\d\)")
        # the set point far above the detector: it warms towards it; a
        # reading now and then (as the server takes one every 10 s)
        await self.put(f"spectrometer/{qep}/target_temperature", 35.0)
        await asyncio.sleep(0.5)
        reading = await self.get(f"spectrometer/{qep}/current_temperature")
        self.assertEqual(await asyncio.wait_for(watching, 8), 0)
        screens = out.getvalue().split("\n-- ")
        self.assertEqual(len(screens), 2, out.getvalue())
        self.assertIn(f"temperature {reading:.1f} °C (read ", screens[1])
        self.assertIn("(set point 35 °C: not stable)", screens[1])


from .test_trust import PlotTests as _PlotTests  # noqa: E402


class PlotDarkFlagsTests(unittest.SynchronousTestCase):
    """Finding 5: ``piccolo3 plot --dark`` subtracted a dark without a word
    about its flags: an unstable (or saturated) dark of sequence 0 matched
    to later lights went unnamed, though it is in every difference. And a
    NIT: a Flame's pixels 0-5, before its electric dark block 6-20, were
    drawn as a detached stub left of the spectrum."""

    write, spectrum, plot = _PlotTests.write, _PlotTests.spectrum, _PlotTests.plot

    def test_dark_flags_named(self):
        import numpy as np
        tmp = self.mktemp()
        os.makedirs(tmp)
        self.write(tmp, "b000002_s000000_dark.pico", [self.spectrum(
            0, True, [5, 100, 1000, 100], TemperatureStable=False, Temperature=4.5,
            TemperatureSetPoint=-10.0)])
        light = self.write(tmp, "b000002_s000003_light.pico", [self.spectrum(
            3, False, [5, 600, 900, 700], TemperatureStable=True, Temperature=-10.1,
            TemperatureSetPoint=-10.0)])
        code, err, figures = self.plot("plot", "--dark", light, "-o", os.path.join(tmp, "p.png"))
        self.assertEqual(code, 0, err)
        [ax] = figures[0].axes
        self.assertEqual(list(ax.get_lines()[0].get_ydata()[1:]), [500.0, -100.0, 600.0])
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        self.assertIn("b2 s3 upwelling light (100 ms) − dark s0\n"
                      "  dark s0: TEMPERATURE UNSTABLE: 4.5 °C, set point -10 °C\n"
                      "  dark s0: 1 pixels SATURATED", legend)
        self.assertIn("detector temperature unstable", [t.get_text() for t in ax.texts]
                      + [ax.get_title(loc="right")])
        self.assertTrue(np.all(np.isfinite(ax.get_lines()[0].get_ydata()[1:])))

    def test_flame_pixels_before_the_dark_block_left_out(self):
        import numpy as np
        tmp = self.mktemp()
        os.makedirs(tmp)
        pixels = [300] * 6 + [100] * 15 + [500] * 9
        light = self.write(tmp, "b000002_s000001_light.pico", [self.spectrum(
            1, False, pixels, DarkPixels=list(range(6, 21)))])
        code, err, figures = self.plot("plot", light, "-o", os.path.join(tmp, "p.png"))
        self.assertEqual(code, 0, err)
        y = figures[0].axes[0].get_lines()[0].get_ydata()
        self.assertTrue(np.all(np.isnan(y[:21])), y[:21])
        self.assertEqual(list(y[21:]), [500.0] * 9)


class ClosingDarkTests(ServerTestCase):
    """A NIT of the attack: with auto 2 and nsequence 5 the closing dark is
    ``s000005_dark``, where docs/API.md said "the last sequence's number".
    The legacy server saved it as nsequence-1 always, writing over that
    sequence's autointegration dark (piccolo3-server's record_sequence:
    ``record_dark(..., sequence=nsequence-1)``, files written with
    clobber): the number is N-1 unless that sequence has a dark already,
    then N, and the docs say so."""

    @coro
    async def test_closing_dark_never_over_a_dark(self):
        for s in ("S_sim_QEP00981", "S_sim_FLMT01234"):
            for channel in ("upwelling", "downwelling"):
                await self.put(f"spectrometer/{s}/current_time/{channel}", 20)
        for run, n, auto, last in (("a2n5", 5, 2, 5), ("a2n4", 4, 2, 3), ("m1n3", 3, -1, 2)):
            await self.put("control/record_sequence",
                           {"run": run, "nsequence": n, "auto": auto, "target": 50})
            await self.wait_for("control/status", lambda s: s == "idle", timeout=40)
            darks = sorted(n for n in os.listdir(self.run_dir(run)) if n.endswith("_dark.pico"))
            self.assertEqual(darks[-1], f"b000000_s{last:06d}_dark.pico", (run, darks))
            if auto == 2:
                self.assertEqual(len(darks), len(range(0, n, 2)) + 1, darks)
