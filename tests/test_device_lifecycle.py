"""Device lifecycle (issue 15.6): a device is closed under its lock, a
device that fails half-way through connecting is closed before any retry,
and device calls run in the device's own thread, never in the reactor's
pool that file I/O uses."""

import threading

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from piccolo_twisted.config import load_instrument_config
from piccolo_twisted.instrument import spectrometer as sp
from piccolo_twisted.instrument.device import DeviceError
from piccolo_twisted.instrument.simulator import Optics, SimulatedSpectrometer

from .test_instrument import CONFIG, sync_thread


class Recording(SimulatedSpectrometer):
    """The simulated device, noting each call and the thread it ran in."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []
        self.fail_settings = 0

    def open(self):
        self.calls.append(("open", self.is_open))
        if self.is_open:
            raise DeviceError("Device already opened.")
        return super().open()

    def close(self):
        self.calls.append(("close", threading.current_thread().name))
        super().close()

    def set_integration_time(self, ms):
        self.calls.append(("time", threading.current_thread().name))
        if self.fail_settings:
            self.fail_settings -= 1
            raise DeviceError("USB error while applying settings")
        super().set_integration_time(ms)


class LifecycleTests(unittest.SynchronousTestCase):

    def make(self, to_thread=sync_thread):
        self.clock = task.Clock()
        cfg = load_instrument_config(text=CONFIG)
        self.device = Recording("sim_QEP1", Optics(), time_scale=0.001)
        return sp.Spectrometer(cfg.spectrometers[0], ["upwelling"], self.device,
                               self.clock, to_thread=to_thread)

    def test_half_open_device_is_closed_before_the_retry(self):
        spec = self.make()
        self.device.fail_settings = 1
        self.successResultOf(spec.connect())
        self.assertEqual(spec.status.value, sp.DROPPED)
        self.clock.advance(sp.RECONNECT_INTERVAL)
        self.assertEqual(spec.status.value, sp.IDLE)
        kinds = [c[0] for c in self.device.calls]
        self.assertEqual(kinds[:4], ["open", "time", "close", "open"])
        self.assertNotIn(("open", True), self.device.calls)

    def test_close_waits_for_the_call_holding_the_device(self):
        spec = self.make()
        self.successResultOf(spec.connect())
        self.successResultOf(spec.lock.acquire())     # a call in progress
        spec.dropped(DeviceError("transfer error"))
        self.assertNotIn("close", [c[0] for c in self.device.calls])
        spec.lock.release()
        self.assertIn("close", [c[0] for c in self.device.calls])


class OwnThreadTests(unittest.TestCase):

    timeout = 10

    @defer.inlineCallbacks
    def test_device_calls_run_in_the_device_thread_while_file_io_is_stuck(self):
        """Every worker of the reactor's pool (file I/O) is blocked; the
        device still connects and acquires, in a thread of its own."""
        spec = LifecycleTests.make(self, to_thread=None)
        self.addCleanup(spec.stop_pool)
        pool = reactor.getThreadPool()
        release = threading.Event()
        self.addCleanup(release.set)
        blocked = [threads.deferToThread(release.wait, 5) for _ in range(pool.max)]
        self.assertEqual((yield spec.connect()), "ok")
        reading = yield spec.acquire(10)
        self.assertEqual(reading.integration_time, 10)
        names = {name for kind, name in self.device.calls if kind == "time"}
        self.assertEqual(len(names), 1, names)
        self.assertIn(f"piccolo-{spec.name}", names.pop())
        release.set()
        yield defer.gatherResults(blocked)
