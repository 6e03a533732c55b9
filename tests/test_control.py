"""Control on task.Clock: batches, dark sequences, power, pause and abort at
every step, write failures, hardware locked during a procedure.

The outside of control is modelled, not control itself: the real
instrument objects (shutters on mock GPIO, spectrometer fronts with their
locks) around a device that behaves like a real one on the thread side --
a read blocks for the integration time (modelled as clock time before the
worker's result comes back), reports no timing, and counts light only while
a shutter is open -- and that records any use while it is still busy.
"""

import json
import os

from gpiozero.pins.mock import MockFactory
from twisted.internet import defer, task
from twisted.trial import unittest

from piccolo_twisted.acquisition import control as control_module
from piccolo_twisted.acquisition import pico
from piccolo_twisted.acquisition.control import Control
from piccolo_twisted.config import load_instrument_config
from piccolo_twisted.datadir import DataDir
from piccolo_twisted.errors import BusyError, PiccoloError
from piccolo_twisted.instrument import build_instrument
from piccolo_twisted.instrument import spectrometer as sp
from piccolo_twisted.instrument.device import DeviceInfo
from piccolo_twisted.instrument.gpio import GPIO

CONFIG = """
[channels]
[[shutter_1]]
direction = upwelling
[[shutter_2]]
direction = downwelling
[spectrometers]
[[sim_A]]
[[sim_B]]
"""
PIXELS = 16
DARK = 100
LIGHT_PER_MS = 50


class Optics:
    """What the shutters tell the device: which channel is lit."""

    def __init__(self):
        self.lit = {}
        self.history = []

    def set_lit(self, channel, lit, when=None):
        self.lit[channel] = lit
        self.history.append((channel, lit))


class Device:
    """Thread side of a spectrometer, as seabreeze speaks it: blocking
    calls, reads without timing information. ``cost`` is the device time the
    calls of one worker trip took; ``overlaps`` counts calls made while an
    earlier read was still integrating."""

    def __init__(self, serial, optics, clock):
        self.serial = serial
        self.optics = optics
        self.clock = clock
        self.next_ms = self.running_ms = 10
        self.cost = 0.0
        self.busy_until = 0.0
        self.overlaps = 0
        self.reads = 0
        self.opened = False

    def _use(self):
        if self.clock.seconds() < self.busy_until - 1e-9:
            self.overlaps += 1

    def open(self):
        self._use()
        self.opened = True
        return DeviceInfo(self.serial, "FAKE", PIXELS, 60000, 10, 60000,
                          [400.0, 0.5, 0.0, 0.0], dark_pixels=[0, 1])

    def close(self):
        self._use()
        self.opened = False

    def set_integration_time(self, ms):
        # a free-running detector: applies from the next integration
        self._use()
        self.next_ms = ms

    def read(self):
        """The integration in progress (it began at the time set before the
        previous read returned); the next one starts at once."""
        self._use()
        self.reads += 1
        ms = self.running_ms
        self.cost += ms / 1000.0
        self.running_ms = self.next_ms
        lit = any(self.optics.lit.values())
        level = DARK + (LIGHT_PER_MS * ms if lit else 0)
        return [DARK, DARK] + [min(level, 60000)] * (PIXELS - 2), None, None

    def temperature(self):
        return 20.0

    def set_tec(self, enabled, target):
        pass


class Bus:
    def __init__(self, clock):
        self.optics = Optics()
        self.clock = clock
        self.devices = {}

    def device(self, serial):
        self.devices[serial] = Device(serial, self.optics, self.clock)
        return self.devices[serial]


class DeviceThreads:
    """Stands in for the worker threads of the spectrometer fronts: the call
    runs at once, its result arrives when the device time it took has
    passed on the clock (a 10 s read answers 10 s later)."""

    def __init__(self, clock, bus):
        self.clock = clock
        self.bus = bus

    def __call__(self, fn, *args):
        for dev in self.bus.devices.values():
            dev.cost = 0.0
        try:
            result = fn(*args)
        except Exception:
            result = None
            failure = defer.fail()
        else:
            failure = None
        cost = max((dev.cost for dev in self.bus.devices.values()), default=0.0)
        for dev in self.bus.devices.values():
            if dev.cost:
                dev.busy_until = self.clock.seconds() + dev.cost
        d = defer.Deferred()
        if failure is not None:
            failure.addErrback(lambda f: self.clock.callLater(cost, d.errback, f))
        else:
            self.clock.callLater(cost, d.callback, result)
        return d


def sync_thread(fn, *args, **kwargs):
    return defer.execute(fn, *args, **kwargs)


class FakeScheduler:
    def __init__(self):
        self.added = []

    def add(self, kind, args, at_time, interval=None, end_time=None):
        self.added.append((kind, args, at_time, interval, end_time))
        # as the real one: fires with the job's id once it is stored
        return defer.succeed(len(self.added))


class ControlTestCase(unittest.TestCase):

    config_text = CONFIG

    def setUp(self):
        self.clock = task.Clock()
        self.bus = Bus(self.clock)
        config = load_instrument_config(text=self.config_text)
        self.config = config
        self.gpio = GPIO(MockFactory())
        self.addCleanup(self.gpio.close)
        self.instrument = build_instrument(config, self.clock, gpio=self.gpio, bus=self.bus,
                                           to_thread=DeviceThreads(self.clock, self.bus))
        self.datadir_path = self.mktemp()
        self.datadir = DataDir(self.datadir_path, to_thread=sync_thread)
        self.datadir.prepare()
        self.control = Control(self.instrument, self.datadir, self.clock,
                               to_thread=sync_thread)
        self.control.scheduler = self.scheduler = FakeScheduler()
        self.statuses = []
        self.control.status.watch(self.statuses.append)
        d = self.instrument.spectrometers.connect_all()
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(d), "ok")
        self.specs = list(self.instrument.spectrometers)

    def tearDown(self):
        # nothing may be left waiting on the clock once a procedure is over
        if self.control.busy:
            self.control.abort()
        self.clock.pump([0.01] * 100 + [60.0] * 60)
        self.assertFalse(self.control.busy)

    # -- helpers ----------------------------------------------------------

    def set_times(self, ms):
        for s in self.specs:
            for obs in s.current_time.values():
                obs.set(ms)

    def run_until_idle(self, step=0.01, limit=100000):
        for _ in range(limit):
            if not self.control.busy:
                return
            self.clock.advance(step)
        self.fail("the procedure did not end")

    def files(self, run="spectra"):
        path = os.path.join(self.datadir_path, run)
        out = {}
        for name in sorted(os.listdir(path)):
            with open(os.path.join(path, name)) as f:
                out[name] = json.load(f)["Spectra"]
        return out

    def shutters_closed(self):
        return all(s.state == "closed" and not s.open_pin.value for s in self.instrument.shutters)

    def assert_dark(self, spectra):
        for s in spectra:
            self.assertEqual(max(s["Pixels"]), DARK, s["Metadata"])

    def assert_light(self, spectra):
        for s in spectra:
            self.assertGreater(max(s["Pixels"]), DARK, s["Metadata"])


class DefaultsTests(ControlTestCase):

    def test_legacy_defaults(self):
        # piccolo3-server's PiccoloControl: 1 sequence, autointegration -1
        # (never), delay 0.0, target 80.0
        c = self.control
        self.assertEqual((c.num_sequences.value, c.autointegration.value, c.delay.value,
                          c.target.value, c.status.value, c.current_sequence.value),
                         (1, -1, 0.0, 80.0, "idle", -1))
        self.assertIs(type(c.target.value), float)
        self.assertIs(type(c.delay.value), float)

    def test_plain_record_does_not_autointegrate(self):
        # what the client's record_sequence() sends with no arguments
        self.set_times(123)
        self.control.record_sequence(run=None, nsequence=None, auto=None, delay=None,
                                     target=None, at_time=None, interval=None,
                                     end_time=None)
        self.run_until_idle()
        for s in self.specs:
            for channel in s.channels:
                self.assertEqual(s.current_time[channel].value, 123)
                self.assertEqual(s.auto_state[channel].value, "n")
        self.assertNotIn("autointegrate upwelling", self.statuses)
        self.assertEqual(sorted(self.files()), ["b000000_s000000_dark.pico",
                                                "b000000_s000000_light.pico"])


class RecordDarkTests(ControlTestCase):

    def test_record_dark(self):
        self.set_times(500)
        self.control.record_dark(run="night")
        self.assertEqual(self.datadir.current_run.value, "night")
        self.assertRaises(BusyError, self.control.record_dark)
        self.run_until_idle()
        files = self.files("night")
        self.assertEqual(list(files), ["b000000_s000000_dark.pico"])
        spectra = files["b000000_s000000_dark.pico"]
        self.assertEqual({(s["Metadata"]["SerialNumber"], s["Metadata"]["Direction"])
                          for s in spectra},
                         {(a, c) for a in ("sim_A", "sim_B")
                          for c in ("upwelling", "downwelling")})
        self.assertTrue(all(s["Metadata"]["Dark"] for s in spectra))
        self.assert_dark(spectra)
        self.assertEqual([h for h in self.bus.optics.history if h[1]], [])   # never opened
        self.assertEqual(self.control.status.value, "idle")
        self.assertEqual(self.control.fault.value, "")
        # a second dark sequence is the next batch
        self.control.record_dark()
        self.run_until_idle()
        self.assertIn("b000001_s000000_dark.pico", self.files("night"))

    def test_unsplit_dark(self):
        self.instrument.config.split = False
        self.control.record_dark()
        self.run_until_idle()
        self.assertEqual(list(self.files()), ["b000000_s000000.pico"])


class PowerTests(ControlTestCase):

    def test_power_off_and_on_now(self):
        self.assertIsNone(self.control.power_off())
        self.clock.advance(0.01)
        self.assertEqual([s.status.value for s in self.specs], [sp.POWERED_OFF] * 2)
        self.assertFalse(any(d.opened for d in self.bus.devices.values()))
        self.assertIsNone(self.control.power_on())
        # powered on one after the other, each connects after settling
        self.clock.advance(sp.POWER_SETTLE + 0.1)
        self.assertEqual(self.specs[0].status.value, sp.IDLE)
        self.assertEqual(self.specs[1].status.value, sp.POWERED_OFF)
        self.clock.advance(self.instrument.spectrometers.POWER_STAGGER)
        self.assertEqual([s.status.value for s in self.specs], [sp.IDLE, sp.DISCONNECTED])
        self.clock.advance(sp.POWER_SETTLE)
        self.assertEqual([s.status.value for s in self.specs], [sp.IDLE] * 2)
        self.assertEqual(self.scheduler.added, [])

    def test_power_refused_while_busy(self):
        self.set_times(1000)
        self.control.record_sequence(nsequence=2)
        self.assertRaises(BusyError, self.control.power_off)
        self.assertRaises(BusyError, self.control.power_on)
        self.run_until_idle()
        self.assertEqual([s.status.value for s in self.specs], [sp.IDLE] * 2)

    def test_scheduled_power(self):
        self.control.power_off(at_time="2026-11-26T21:00:00+0000")
        self.control.power_on(at_time="2026-11-27T05:00:00+0000")
        self.assertEqual(self.scheduler.added, [
            ("power_off", None, "2026-11-26T21:00:00+0000", 24 * 3600, None),
            ("power_on", None, "2026-11-27T05:00:00+0000", 24 * 3600, None)])
        self.clock.advance(10)
        self.assertEqual([s.status.value for s in self.specs], [sp.IDLE] * 2)

    def test_scheduled_power_without_scheduler(self):
        self.control.scheduler = None
        self.assertRaises(PiccoloError, self.control.power_on, at_time="2026-11-26T21:00:00")


class BatchTests(ControlTestCase):

    def test_unsplit_output(self):
        self.instrument.config.split = False
        self.set_times(200)
        self.control.record_sequence(run="u", nsequence=3, auto=-1)
        self.run_until_idle()
        files = self.files("u")
        self.assertEqual(list(files), ["b000000_s000000.pico", "b000000_s000001.pico",
                                       "b000000_s000002.pico", "b000000_s000003.pico"])
        first = files["b000000_s000000.pico"]
        self.assertEqual([s["Metadata"]["Dark"] for s in first], [True] * 4 + [False] * 4)
        self.assert_dark(first[:4])
        self.assert_light(first[4:])
        self.assert_light(files["b000000_s000001.pico"])
        self.assert_light(files["b000000_s000002.pico"])
        self.assertEqual(len(files["b000000_s000001.pico"]), 4)
        last = files["b000000_s000003.pico"]
        self.assertEqual([s["Metadata"]["Dark"] for s in last], [True] * 4)
        self.assert_dark(last)

    def test_autointegration_in_workers(self):
        calls = []

        def counting(fn, *args):
            calls.append(getattr(fn, "__qualname__", fn))
            return sync_thread(fn, *args)
        self.control.to_thread = counting
        self.control.record_sequence(nsequence=1, auto=0, target=50)
        self.run_until_idle()
        self.assertIn("AutoIntegration.feed", calls)
        for s in self.specs:
            for channel in s.channels:
                self.assertEqual(s.auto_state[channel].value, "s")
        light = self.files()["b000000_s000000_light.pico"]
        for s in light:
            level = max(s["Pixels"]) / 60000
            self.assertLess(abs(level - 0.5), 0.05)

    def test_write_failure_of_any_kind_ends_the_batch_with_a_fault(self):
        real = pico.write_atomic
        for error in (ValueError("bad value"), OSError(28, "No space left on device"),
                      RuntimeError("surprise")):
            def failing(directory, name, data, clobber=False, fsync=None, error=error):
                if "s000001" in name:
                    raise error
                return real(directory, name, data, clobber)
            self.patch(pico, "write_atomic", failing)
            self.control.record_sequence(run=f"w{type(error).__name__}", nsequence=5,
                                         auto=-1)
            self.run_until_idle()
            fault = self.control.fault.value
            self.assertIn("b000000_s000001_light.pico", fault)
            self.assertIn(str(error.args[-1]), fault)
            names = list(self.files(f"w{type(error).__name__}"))
            self.assertNotIn("b000000_s000004_light.pico", names)
            self.assertTrue(self.shutters_closed())
            if not isinstance(error, OSError):
                self.assertEqual(len(self.flushLoggedErrors(type(error))), 1)


    def test_storage_failing_at_once_or_later_ends_the_batch_with_a_fault(self):
        """The storage call itself raising (not only the write in its
        thread), or failing with a type nobody expects: a fault, never an
        unhandled error in a dropped Deferred."""
        real = self.datadir.save
        cases = (("sync", lambda *a: (_ for _ in ()).throw(TypeError("bad call"))),
                 ("later", lambda *a: defer.fail(KeyError("lost key"))))
        for label, broken in cases:
            calls = []

            def save(run, batch, sequence, *rest, broken=broken):
                calls.append(sequence)
                if sequence == 1:
                    return broken()
                return real(run, batch, sequence, *rest)
            self.patch(self.datadir, "save", save)
            self.control.record_sequence(run=label, nsequence=4, auto=-1)
            self.run_until_idle()
            fault = self.control.fault.value
            self.assertIn("sequence 1 of batch 0", fault)
            self.assertNotIn(3, calls)
            self.assertTrue(self.shutters_closed())
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class AbortAndPauseTests(ControlTestCase):

    def steps_of_a_batch(self):
        """Every status a 2-sequence batch with autointegration passes."""
        self.set_times(300)
        self.control.record_sequence(run="probe", nsequence=2, auto=1, delay=5.0)
        self.run_until_idle(step=0.01)
        return list(self.statuses)

    def start_and_reach(self, run, k):
        """Start the same batch; advance until its k-th status change."""
        self.set_times(300)
        self.statuses.clear()
        self.control.record_sequence(run=run, nsequence=2, auto=1, delay=5.0)
        for _ in range(100000):
            if len(self.statuses) > k or not self.control.busy:
                break
            self.clock.advance(0.01)
        self.assertTrue(self.control.busy, (run, k, self.statuses))

    def test_abort_at_every_step(self):
        steps = self.steps_of_a_batch()
        self.assertIn("autointegrate downwelling", steps)
        self.assertIn("downwelling dark", steps)
        self.assertIn("upwelling light", steps)
        self.assertIn("waiting", steps)
        for k in range(len(steps) - 1):
            run = f"abort{k}"
            self.start_and_reach(run, k)
            self.control.abort()
            # at most two shutter pulses (5 ms each) later: idle and dark,
            # whatever was running
            self.clock.pump([0.001] * 12)
            self.assertEqual(self.control.status.value, "idle", (k, steps[k]))
            self.assertFalse(self.control.busy)
            self.assertTrue(self.shutters_closed(), (k, steps[k]))
            self.assertRaises(PiccoloError, self.control.abort)
            # the abandoned reads end; files written are whole, none is partial
            self.clock.pump([0.1] * 600)
            self.assertEqual([s.status.value for s in self.specs], [sp.IDLE] * 2)
            for name, spectra in self.files(run).items():
                self.assertEqual(len(spectra), 4, name)
            self.assertFalse([n for n in os.listdir(os.path.join(self.datadir_path, run))
                              if n.startswith(".")])
        self.assertEqual(sum(d.overlaps for d in self.bus.devices.values()), 0)

    def test_pause_at_every_step(self):
        steps = self.steps_of_a_batch()
        expected = sorted(self.files("probe"))
        for k in range(len(steps) - 1):
            run = f"pause{k}"
            self.start_and_reach(run, k)
            self.control.pause()
            self.clock.pump([0.01] * 2000)  # the current step (up to a 5 s delay) ends...
            reads = sum(d.reads for d in self.bus.devices.values())
            self.clock.pump([1.0] * 1000)   # ...and nothing more happens
            self.assertEqual(sum(d.reads for d in self.bus.devices.values()), reads,
                             (k, steps[k]))
            if k == len(steps) - 2:
                # the batch's last channel: no step left to pause before
                self.assertEqual(self.control.status.value, "idle")
            else:
                self.assertEqual(self.control.status.value, "paused", (k, steps[k]))
                self.control.pause()
                self.run_until_idle(step=0.01)
            self.assertEqual(sorted(self.files(run)), expected, (k, steps[k]))
            self.assertEqual(self.control.fault.value, "")
        self.assertEqual(sum(d.overlaps for d in self.bus.devices.values()), 0)

    def test_abort_at_a_long_integration_time(self):
        self.set_times(40000)             # 40 s: the field report's case
        self.control.record_sequence(run="long", nsequence=3, auto=-1)
        for _ in range(1000):
            if self.control.status.value == "upwelling light":
                break
            self.clock.advance(0.5)
        self.assertEqual(self.control.status.value, "upwelling light")
        self.clock.advance(20)            # well inside the integration
        self.assertTrue(any(s.read_outstanding for s in self.specs))
        self.control.abort()
        self.clock.pump([0.001] * 12)
        self.assertEqual(self.control.status.value, "idle")
        self.assertTrue(self.shutters_closed())
        # the read runs on in its worker; the front keeps the device to itself
        self.assertTrue(all(s.read_outstanding for s in self.specs))
        self.assertEqual([s.status.value for s in self.specs], [sp.RECORDING] * 2)
        # a new procedure right away queues behind the read: no overlap
        self.set_times(100)
        self.control.record_dark(run="after")
        self.run_until_idle(step=0.5)
        self.assertEqual(sum(d.overlaps for d in self.bus.devices.values()), 0)
        self.assertFalse(any(s.read_outstanding for s in self.specs))
        self.assertEqual([s.status.value for s in self.specs], [sp.IDLE] * 2)
        self.assert_dark(self.files("after")["b000000_s000000_dark.pico"])
        # a sequence is saved when its light set is complete: nothing here
        self.assertEqual(list(self.files("long")), [])

    def test_abort_while_waiting_between_sequences(self):
        self.control.record_sequence(nsequence=3, auto=-1, delay=3600.0)
        for _ in range(1000):
            if self.control.status.value == "waiting" and self.control.current_sequence.value == 0:
                break
            self.clock.advance(0.01)
        self.clock.advance(1)
        self.assertEqual(self.control.status.value, "waiting")
        self.control.abort()
        self.clock.pump([0.001] * 12)
        self.assertEqual(self.control.status.value, "idle")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class HardwareBusyTests(ControlTestCase):

    def test_hardware_refused_during_every_procedure(self):
        shutter = self.control.guard_hardware(self.instrument.shutters.resources())
        spectro = self.control.guard_hardware(self.instrument.spectrometers.resources())
        actions = [shutter["upwelling/open_shutter"].put, shutter["downwelling/close_shutter"].put,
                   spectro["connect"].get, spectro["disconnect"].get, spectro["power_on"].get,
                   spectro["power_off"].get]
        for s in self.specs:
            actions += [spectro[f"{s.name}/{a}"].get
                        for a in ("connect", "disconnect", "power_on", "power_off")]
        self.set_times(300)
        for start in (lambda: self.control.record_sequence(nsequence=1),
                      lambda: self.control.record_dark(),
                      lambda: self.control.auto()):
            start()
            self.clock.advance(0.1)
            for action in actions:
                self.assertRaises(BusyError, action)
            # settings stay changeable, applying from the next acquisition
            spectro[f"{self.specs[0].name}/current_time"].put("upwelling", 400)
            self.assertEqual(self.specs[0].current_time["upwelling"].value, 400)
            self.run_until_idle()
            self.set_times(300)
        # channels in legacy (sorted) order (issue 21)
        self.assertEqual([h for h in self.bus.optics.history if h[1]],
                         [("downwelling", True), ("upwelling", True)] * 2)
        # idle again: the same requests act
        d = shutter["upwelling/open_shutter"].put()
        self.clock.advance(0.01)
        self.successResultOf(d)
        self.assertEqual(self.instrument.shutters["upwelling"].state, "open")



class StopProcessTests(unittest.TestCase):
    """SIGTERM to ``twistd -n piccolo`` while both spectrometers are in a
    10 s integration: the process is gone within 5 s, shutters closed, no
    partial file (the systemd unit kills it at 30 s)."""

    timeout = 60

    def test_sigterm_during_a_10_s_integration(self):
        import signal
        import sys
        import time
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sys.path.insert(0, os.path.join(here, "bench"))
        from run import Server
        datadir = os.path.abspath(self.mktemp())
        os.makedirs(datadir)
        server = Server(datadir=datadir, cpu_quota=False).start()
        self.addCleanup(server.stop)
        server.wait_connected()
        server.set_times(10000)
        server.call("PUT", "/control/record_sequence",
                    {"run": "long", "nsequence": 2, "auto": -1})
        deadline = time.monotonic() + 10
        while server.call("GET", "/control/status") != "downwelling dark":
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.02)
        time.sleep(0.3)                   # inside the clean 10 s integration
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)
        elapsed = time.monotonic() - t0
        self.assertLess(elapsed, 5.0)
        server.log.close()
        with open(os.path.join(datadir, "server.log")) as f:
            log = f.read()
        self.assertIn("acquisition stopped, every shutter closed", log)
        self.assertIn("piccolo stopped", log)
        self.assertEqual(os.listdir(os.path.join(datadir, "long")), [])
