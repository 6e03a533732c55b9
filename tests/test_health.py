"""GET /sysinfo/health: fields computed with stand-ins for the disk, the
kernel's clock state and the wall clock, caching and meaningful
notifications on a task.Clock, and the resource over CoAP."""

import asyncio
import json
import os
from collections import namedtuple
from datetime import datetime, timezone

from twisted.internet import defer, task
from twisted.trial import unittest

from piccolo_twisted import sysinfo
from piccolo_twisted.instrument.spectrometer import CONNECTED, DROPPED, IDLE, RECORDING
from piccolo_twisted.observable import Observable
from piccolo_twisted.sysinfo import STA_UNSYNC, TIME_ERROR, Health

from .helpers import ServerTestCase
from .test_wire import coro

Usage = namedtuple("Usage", "total used free")
DAY = 86400
# a Wednesday, 15:00 local time
NOW = datetime(2026, 11, 25, 15, 0, 0).astimezone().timestamp()
MIDNIGHT = datetime(2026, 11, 25, 0, 0, 0).astimezone().timestamp()


def run_in_caller(fn, *args):
    return defer.maybeDeferred(fn, *args)


class FakeSpectrometer:
    def __init__(self, serial, tec, temperature=None):
        self.serial = serial
        self.name = "S_" + serial
        self.status = Observable(IDLE)
        self.last_error = None
        self._tec = tec
        self.temperature = temperature
        self.reads = 0

    def have_tec(self):
        return self._tec

    def current_temperature(self):
        self.reads += 1
        return defer.succeed(self.temperature)

    def last_temperature(self):
        """As the spectrometer keeps it: its own last reading, no device
        call; none while not connected (the set point stays)."""
        if self.status.value not in CONNECTED:
            return {"temperature": None, "age": None, "target": -10.0,
                    "enabled": True, "tolerance": 2.0, "stable": None}
        return {"temperature": self.temperature, "age": 3.0, "target": -10.0,
                "enabled": True, "tolerance": 2.0,
                "stable": abs(self.temperature - -10.0) <= 2.0}


class FakeControl:
    def __init__(self):
        self.status = Observable("idle")
        self.fault = Observable("")
        self.files_written = 0
        self.aborted = False


class HealthTests(unittest.SynchronousTestCase):

    def setUp(self):
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.disk = Usage(total=100 * 10**9, used=40 * 10**9, free=60 * 10**9)
        self.kernel = (0, 0x2001)          # TIME_OK, STA_PLL | STA_NANO: ntpd/chrony in sync
        self.now = NOW
        self.usage_calls = 0
        self.control = FakeControl()
        self.qep = FakeSpectrometer("QEP00981", tec=True, temperature=-9.96)
        self.flame = FakeSpectrometer("FLMT01234", tec=False)

    def disk_usage(self, path):
        self.usage_calls += 1
        self.assertEqual(path, self.root)
        return self.disk

    def health(self, **kw):
        return Health(self.root, self.clock, control=self.control,
                      spectrometers=[self.qep, self.flame], to_thread=run_in_caller,
                      disk_usage=self.disk_usage, clock_state=lambda: self.kernel,
                      uptime=lambda: 12345.6, wall_time=lambda: self.now, **kw)

    def spectrum(self, run, name, size, when):
        directory = os.path.join(self.root, run)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.truncate(size)             # sparse: sizes without the writing
        os.utime(path, (when, when))
        os.utime(directory, (when, when))

    def value(self, health):
        result = health.get()
        if isinstance(result, defer.Deferred):
            result = self.successResultOf(result)
        json.dumps(result, allow_nan=False)            # the wire needs JSON
        return result

    def test_fields(self):
        h = self.value(self.health())
        self.assertEqual(h["disk_free"], 60 * 10**9)
        self.assertEqual(h["disk_total"], 100 * 10**9)
        self.assertIsNone(h["days_left"])               # nothing recorded yet
        self.assertEqual(h["files_today"], 0)
        self.assertIs(h["clock_synchronised"], True)
        self.assertEqual(h["uptime"], 12345.6)
        self.assertIsNone(h["last_batch"])
        self.assertEqual(h["fault"], "")
        self.assertEqual(h["spectrometers"], {
            "QEP00981": {"name": "S_QEP00981", "status": "IDLE", "status_code": IDLE,
                         "errors": 0, "last_error": None, "temperature": -9.96,
                         "temperature_age": 3.0, "temperature_target": -10.0,
                         "temperature_stable": True},
            "FLMT01234": {"name": "S_FLMT01234", "status": "IDLE", "status_code": IDLE,
                          "errors": 0, "last_error": None}})

    def test_clock_state_from_the_kernel(self):
        for state, expected in [((0, 0x2001), True),
                                ((TIME_ERROR, STA_UNSYNC), False),   # a Pi without NTP
                                ((0, STA_UNSYNC), False),
                                ((TIME_ERROR, 0x2001), False),
                                (None, None)]:                       # not Linux
            self.kernel = state
            self.assertIs(self.value(self.health())["clock_synchronised"], expected, state)

    def test_kernel_clock_state_reads_adjtimex(self):
        state = sysinfo.kernel_clock_state()
        if state is None:
            raise unittest.SkipTest("no adjtimex here")
        result, status = state
        self.assertIn(result, range(0, 6))
        self.assertIsInstance(status, int)
        self.assertIn(sysinfo.clock_synchronised(state), (True, False))

    def test_files_today_and_days_left(self):
        # 2 days ago: 10 files of 1 MB; today before 15:00: 5 files of 1 MB
        for i in range(10):
            self.spectrum("old", f"b000000_s{i:06d}_light.pico", 10**6, NOW - 2 * DAY + i)
        for i in range(5):
            self.spectrum("new", f"b000000_s{i:06d}_light.pico", 10**6,
                          MIDNIGHT + 3600 + i)
        self.spectrum("new", "notes.txt", 10**8, NOW - 10)       # not a spectrum
        self.spectrum("ancient", "b000000_s000000_light.pico", 10**9, NOW - 30 * DAY)
        h = self.value(self.health())
        self.assertEqual(h["files_today"], 5)
        # 15 MB over the 2 days since the oldest recent file
        rate = 15 * 10**6 / ((2 * DAY) / DAY)
        self.assertAlmostEqual(h["days_left"], round(60 * 10**9 / rate, 1), places=1)

    def test_last_batch_is_a_completed_batch(self):
        health = self.health()
        self.assertIsNone(self.value(health)["last_batch"])
        control = self.control
        control.status.set("waiting")
        control.files_written = 4
        self.now += 60
        control.status.set("idle")
        self.clock.advance(10)
        self.assertEqual(self.value(health)["last_batch"],
                         datetime.fromtimestamp(NOW + 60, timezone.utc).isoformat())
        # an aborted batch and a failed one do not count
        for stop in ("abort", "fault"):
            control.status.set("upwelling light")
            control.files_written += 2
            self.now += 60
            if stop == "abort":
                control.aborted = True
            else:
                control.aborted = False
                control.fault.set("No space left on device")
            control.status.set("idle")
            self.clock.advance(10)
            h = self.value(health)
            self.assertEqual(h["last_batch"],
                             datetime.fromtimestamp(NOW + 60, timezone.utc).isoformat())
        self.assertEqual(h["fault"], "No space left on device")

    def test_cached_for_a_few_seconds(self):
        health = self.health(max_age=5.0)
        first = self.value(health)
        self.disk = self.disk._replace(free=1)
        self.clock.advance(4.9)
        self.assertIs(self.value(health), first)
        self.assertEqual(self.usage_calls, 1)
        self.clock.advance(0.2)
        self.assertEqual(self.value(health)["disk_free"], 1)
        self.assertEqual(self.usage_calls, 2)

    def test_probe_runs_in_the_worker(self):
        """The disk, file and clock work is what goes to the thread."""
        pending = []

        def to_thread(fn, *args):
            d = defer.Deferred()
            pending.append((d, fn, args))
            return d
        health = Health(self.root, self.clock, to_thread=to_thread,
                        disk_usage=self.disk_usage, clock_state=lambda: self.kernel)
        d1, d2 = health.get(), health.get()          # one computation for both
        self.assertEqual(self.usage_calls, 0)
        self.assertEqual(len(pending), 1)
        d, fn, args = pending[0]
        d.callback(fn(*args))
        self.assertEqual(self.successResultOf(d1), self.successResultOf(d2))

    def test_notifications_only_for_meaningful_changes(self):
        health = self.health(max_age=5.0)
        notes = []

        def watcher(_):
            notes.append(self.value(health))
        health.observable.watch(watcher)
        self.clock.advance(5)                         # first computation while observed
        self.assertEqual(len(notes), 1)

        def tick():
            self.clock.advance(5)
            return len(notes)
        # a few MB of a 100 GB disk, uptime, a hundredth of a degree: quiet
        self.disk = self.disk._replace(free=self.disk.free - 5 * 10**6)
        self.qep.temperature = -9.95
        self.assertEqual(tick(), 1)
        # half a percent of the disk: worth telling
        self.disk = self.disk._replace(free=self.disk.free - 600 * 10**6)
        self.assertEqual(tick(), 2)
        self.kernel = (TIME_ERROR, STA_UNSYNC)
        self.assertEqual(tick(), 3)
        self.assertIs(notes[-1]["clock_synchronised"], False)
        self.qep.status.set(DROPPED)
        self.qep.last_error = "USB device gone"
        self.assertEqual(tick(), 4)
        entry = notes[-1]["spectrometers"]["QEP00981"]
        self.assertEqual((entry["status"], entry["errors"], entry["last_error"]),
                         ("DROPPED", 1, "USB device gone"))
        self.control.fault.set("No space left on device")
        self.assertEqual(tick(), 5)
        self.assertEqual(tick(), 5)
        # the refresh stops with the last observer
        health.observable.unwatch(watcher)
        calls = self.usage_calls
        self.clock.advance(60)
        self.assertEqual(self.usage_calls, calls)

    def test_busy_spectrometer_shows_its_last_reading(self):
        """Health never waits for a device: it shows the reading the
        spectrometer took last (between integrations while recording)."""
        health = self.health(max_age=1.0)
        self.value(health)
        self.qep.status.set(RECORDING)
        self.qep.temperature = 25.0
        self.clock.advance(2)
        h = self.value(health)
        self.assertEqual(self.qep.reads, 0)           # never a device call
        entry = h["spectrometers"]["QEP00981"]
        self.assertEqual((entry["temperature"], entry["temperature_age"],
                          entry["temperature_stable"]), (25.0, 3.0, False))

    def test_no_temperature_while_not_connected(self):
        """A disconnected, powered-off or dropped spectrometer has no current
        temperature: null, not the last reading from before (health showed
        "disconnected, 14.5 °C", minutes old)."""
        from piccolo_twisted.instrument.spectrometer import DISCONNECTED, DROPPED, POWERED_OFF
        health = self.health(max_age=1.0)
        self.assertEqual(self.value(health)["spectrometers"]["QEP00981"]["temperature"], -9.96)
        for status in (DISCONNECTED, POWERED_OFF, DROPPED):
            self.qep.status.set(status)
            self.clock.advance(2)
            h = self.value(health)
            self.assertIsNone(h["spectrometers"]["QEP00981"]["temperature"], status)
        self.qep.status.set(IDLE)
        self.qep.temperature = 12.0
        self.clock.advance(2)
        self.assertEqual(self.value(health)["spectrometers"]["QEP00981"]["temperature"], 12.0)

    def test_other_fault_sources_when_present(self):
        class Scheduler:
            fault = Observable("scheduler database unreadable; running degraded")
        health = Health(self.root, self.clock, control=self.control, scheduler=Scheduler(),
                        to_thread=run_in_caller, disk_usage=self.disk_usage,
                        clock_state=lambda: self.kernel)
        self.assertEqual(self.value(health)["faults"],
                         {"scheduler": "scheduler database unreadable; running degraded"})
        self.assertEqual(self.value(self.health())["faults"], {})


class HealthWireTests(ServerTestCase):

    @coro
    async def test_health_over_coap(self):
        h = await self.get("sysinfo/health")
        for key in ("disk_free", "disk_total", "days_left", "files_today", "spectrometers",
                    "clock_synchronised", "uptime", "last_batch", "fault"):
            self.assertIn(key, h)
        st = os.statvfs(self.datadir)
        self.assertAlmostEqual(h["disk_total"], st.f_blocks * st.f_frsize, delta=1)
        self.assertEqual(set(h["spectrometers"]), {"sim_QEP00981", "sim_FLMT01234"})
        self.assertIn("temperature", h["spectrometers"]["sim_QEP00981"])
        self.assertNotIn("temperature", h["spectrometers"]["sim_FLMT01234"])
        self.assertEqual((h["files_today"], h["last_batch"], h["days_left"], h["fault"]),
                         (0, None, None, ""))
        self.assertIn("health", await self.well_known())

        # observed: a recorded dark sequence is news (files, last batch),
        # told by a notification, not found by asking again
        import aiocoap
        self.service.health.max_age = 0.1
        req = self.ctx.request(aiocoap.Message(code=aiocoap.GET, observe=0,
                                               uri=f"{self.base}/sysinfo/health"))
        first = await asyncio.wait_for(req.response, 5)
        self.assertIsNotNone(first.opt.observe)
        await self.put("control/record_dark", {"run": "healthy"})

        async def until_recorded():
            async for note in req.observation:
                value = json.loads(note.payload)
                if value["files_today"]:
                    return value
        note = await asyncio.wait_for(until_recorded(), 10)
        req.observation.cancel()
        self.assertEqual(note["files_today"], 1)
        self.assertIsNotNone(note["last_batch"])
        self.assertIsNotNone(note["days_left"])

    async def well_known(self):
        r = await self.request("GET", ".well-known/core")
        return r.payload.decode()


class FakeDataDir:
    def __init__(self, root):
        self.path = root
        self.save_listeners = []

    def saved(self, run, name, size):
        for listener in self.save_listeners:
            listener(run, name, size)


class HealthAtScaleTests(HealthTests):
    """A season of data on one disk: a refresh of the health value does not
    read the data directory again; files the server saves are counted as
    they are saved (attack on issue 13: 90-500 ms of a worker holding the
    GIL per refresh on 100,000 files and 5,000 runs)."""

    def health(self, **kw):
        self.datadir = FakeDataDir(self.root)
        return Health(self.datadir, self.clock, control=self.control,
                      spectrometers=[self.qep, self.flame], to_thread=run_in_caller,
                      disk_usage=self.disk_usage, clock_state=lambda: self.kernel,
                      uptime=lambda: 12345.6, wall_time=lambda: self.now, **kw)

    def test_refresh_reads_no_directory(self):
        for r in range(20):
            for i in range(5):
                self.spectrum(f"run{r:02d}", f"b000000_s{i:06d}_light.pico", 10**6,
                              MIDNIGHT + 3600 + r * 10 + i)
        health = self.health(max_age=5.0)
        self.assertEqual(self.value(health)["files_today"], 100)
        scans = []
        real = os.scandir

        def counting(path="."):
            scans.append(path)
            return real(path)
        self.patch(os, "scandir", counting)
        self.patch(os, "listdir", lambda *a: self.fail("listdir"))
        for n in range(1, 4):
            self.now += 10
            self.clock.advance(10)
            self.spectrum("run00", f"b000001_s{n:06d}_light.pico", 2 * 10**6, self.now)
            self.datadir.saved("run00", f"b000001_s{n:06d}_light.pico", 2 * 10**6)
            h = self.value(health)
            self.assertEqual(h["files_today"], 100 + n)
        # 106 MB since the first file of the day, over at least an hour
        span = max(self.now - (MIDNIGHT + 3600), 3600)
        rate = 106 * 10**6 * 86400.0 / span
        self.assertAlmostEqual(h["days_left"], round(60 * 10**9 / rate, 1), places=1)
        self.assertEqual(h["last_batch"], datetime.fromtimestamp(self.now, timezone.utc).isoformat())
        self.assertEqual(scans, [])
        # three days later the window has moved on
        self.now += 4 * DAY
        self.clock.advance(10)
        h = self.value(health)
        self.assertEqual((h["files_today"], h["days_left"]), (0, None))
        self.assertEqual(scans, [])

    def test_save_while_the_first_scan_runs_counted_once(self):
        pending = []

        def to_thread(fn, *args):
            d = defer.Deferred()
            pending.append((d, fn, args))
            return d
        self.datadir = FakeDataDir(self.root)
        health = Health(self.datadir, self.clock, to_thread=to_thread,
                        disk_usage=self.disk_usage, clock_state=lambda: self.kernel,
                        wall_time=lambda: self.now)
        self.spectrum("r", "b000000_s000000_light.pico", 10**6, self.now - 5)
        # saved before the first refresh: on disk, the scan finds it
        self.datadir.saved("r", "b000000_s000000_light.pico", 10**6)
        d = health.get()
        self.now += 1
        self.spectrum("r", "b000000_s000001_light.pico", 10**6, self.now)
        self.datadir.saved("r", "b000000_s000001_light.pico", 10**6)
        [(thread_d, fn, args)] = pending
        thread_d.callback(fn(*args))
        self.assertEqual(self.successResultOf(d)["files_today"], 2)
