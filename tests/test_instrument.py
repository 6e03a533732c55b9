"""Shutters on mock GPIO with task.Clock; the simulator's physics; the
spectrometer front with a synchronous thread stand-in; instrument config."""

import os

from gpiozero.pins.mock import MockFactory
from twisted.internet import defer, task
from twisted.trial import unittest

from piccolo_twisted.config import ConfigError, load_instrument_config
from piccolo_twisted.instrument.device import acquire_clean
from piccolo_twisted.instrument.gpio import GPIO
from piccolo_twisted.instrument.shutter import Shutter, Shutters
from piccolo_twisted.instrument.simulator import Optics, SimulatedSpectrometer
from piccolo_twisted.instrument import spectrometer as sp

CONFIG = """
[channels]
[[shutter_1]]
direction = upwelling
[[shutter_2]]
direction = downwelling
reverse = True
[[shutter_3]]
direction = extra
open_pin = 12
close_pin = 13
[spectrometers]
[[sim_QEP1]]
min_integration_time = 10
max_integration_time = 5000
[[[calibration]]]
[[[[upwelling]]]]
wavelengthCalibrationCoefficientsPiccolo = 1.0, 2.0
[[sim_FLMT1]]
"""


def sync_thread(f, *a, **kw):
    return defer.maybeDeferred(f, *a, **kw)


class ConfigTests(unittest.SynchronousTestCase):

    def test_pins_reverse_and_override(self):
        cfg = load_instrument_config(text=CONFIG)
        pins = {c.name: (c.open_pin, c.close_pin) for c in cfg.channels}
        self.assertEqual(pins, {"upwelling": (17, 18), "downwelling": (22, 27),
                                "extra": (12, 13)})
        s = cfg.spectrometers[0]
        self.assertEqual((s.name, s.min_time, s.max_time), ("S_sim_QEP1", 10, 5000))
        self.assertEqual(s.calibration, {"upwelling": [1.0, 2.0]})
        self.assertTrue(s.simulated)

    def test_invalid_files_fail_with_one_line(self):
        bad = [
            ("[channels]\n[[shutter_1]]\ndirection = up\nreverse = maybe\n", "reverse"),
            ("[channels]\n[[shutter_1]]\nreverse = False\n", "direction"),
            ("[channels]\n[[shutter_1]]\ndirection = up\n[bogus]\n", "bogus"),
            ("[channels]\n[[shutter_9]]\ndirection = up\n", "shutter_9"),
            ("[channels]\n[[shutter_1]]\ndirection = up\n[spectrometers]\n[[x]]\n"
             "min_integration_time = 50\nmax_integration_time = 10\n", "min_integration_time"),
        ]
        for text, word in bad:
            e = self.assertRaises(ConfigError, load_instrument_config, text=text)
            self.assertIn(word, str(e))
            self.assertNotIn("\n", str(e))


class PinFactoryTests(unittest.SynchronousTestCase):

    def test_falls_back_to_mock_with_one_warning(self):
        from twisted.logger import globalLogPublisher
        from piccolo_twisted.instrument.gpio import choose_pin_factory
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for name in ("nosuchfactory", None):
            if name is None:
                self.patch(os, "environ", {k: v for k, v in os.environ.items()
                                           if k != "GPIOZERO_PIN_FACTORY"})
            else:
                self.patch(os, "environ", dict(os.environ, GPIOZERO_PIN_FACTORY=name))
            factory = choose_pin_factory()
            self.assertEqual(type(factory).__name__, "MockFactory")
        warnings = [e for e in events if "MockFactory" in str(e.get("log_format", ""))]
        self.assertEqual(len(warnings), 2)


class ShutterTests(unittest.SynchronousTestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.factory = MockFactory()
        self.gpio = GPIO(self.factory)
        self.addCleanup(self.gpio.close)
        cfg = load_instrument_config(text=CONFIG)
        self.shutters = Shutters([Shutter(c, self.gpio, self.clock) for c in cfg.channels])

    def pin(self, n):
        return self.factory.pin(n).state

    def test_open_pulse_5ms_on_open_pin(self):
        s = self.shutters["upwelling"]
        d = s.open()
        self.assertEqual((self.pin(17), self.pin(18)), (1, 0))
        self.clock.advance(0.004)
        self.assertNoResult(d)
        self.assertEqual(self.pin(17), 1)
        self.clock.advance(0.0011)
        self.successResultOf(d)
        self.assertEqual((self.pin(17), self.pin(18)), (0, 0))
        self.assertEqual(s.state, "open")

    def test_close_pulse_on_close_pin(self):
        s = self.shutters["upwelling"]
        d = s.close()
        self.assertEqual((self.pin(17), self.pin(18)), (0, 1))
        self.clock.advance(0.005)
        self.successResultOf(d)
        self.assertEqual(self.pin(18), 0)
        self.assertEqual(s.state, "closed")

    def test_reverse_swaps_pins(self):
        s = self.shutters["downwelling"]       # shutter_2 (27, 22), reversed
        s.open()
        self.assertEqual((self.pin(22), self.pin(27)), (1, 0))
        self.clock.advance(0.005)
        s.close()
        self.assertEqual((self.pin(22), self.pin(27)), (0, 1))

    def test_operations_queue(self):
        s = self.shutters["upwelling"]
        d1, d2 = s.open(), s.close()
        self.assertEqual((self.pin(17), self.pin(18)), (1, 0))
        self.clock.advance(0.005)
        self.successResultOf(d1)
        self.assertNoResult(d2)
        self.assertEqual((self.pin(17), self.pin(18)), (0, 1))
        self.clock.advance(0.005)
        self.successResultOf(d2)
        self.assertEqual(s.state, "closed")

    def test_only_opens_one_channel(self):
        self.shutters["upwelling"].open()
        self.clock.advance(0.005)
        d = self.shutters.only("downwelling")
        self.clock.pump([0.005] * 4)
        self.successResultOf(d)
        states = {c: s.state for c, s in self.shutters.by_channel.items()}
        self.assertEqual(states, {"upwelling": "closed", "downwelling": "open",
                                  "extra": "closed"})


class VirtualTime:
    """Stands in for the ``time`` module of the simulator and of
    ``acquire_clean``: time moves on when something sleeps, and by a
    microsecond each time it is read (code takes some time between two
    looks), never by the machine's speed or load."""

    def __init__(self, start=1000.0):
        self.now = start

    def monotonic(self):
        self.now += 1e-6
        return self.now

    def sleep(self, seconds):
        self.now += max(seconds, 0.0)


class SimulatorTests(unittest.SynchronousTestCase):
    """The simulator's physics on its own timeline (VirtualTime): what
    these tests measure is the simulated device's timing, not how soon a
    loaded machine schedules the thread (a clean read once took 80 ms of
    the machine's time under load)."""

    def setUp(self):
        from piccolo_twisted.instrument import device, simulator
        self.time = VirtualTime()
        self.patch(simulator, "time", self.time)
        self.patch(device, "time", self.time)

    def make(self, serial, lit=None):
        optics = Optics()
        if lit:
            optics.set_lit(lit, True, when=0.0)
        dev = SimulatedSpectrometer(serial, optics, time_scale=0.01)
        info = dev.open()
        return dev, info

    def clean(self, dev, ms):
        return acquire_clean(dev, ms, dev.spec["min_time"])

    def test_pixel_counts_per_model(self):
        for serial, pixels, sat in (("sim_QEP1", 1044, 200000), ("sim_FLMT1", 2048, 65535),
                                    ("dummy_USB2000", 2048, 65535), ("sim_X", 1024, 65535)):
            dev, info = self.make(serial, "upwelling")
            self.assertEqual((info.pixels, info.saturation), (pixels, sat))
            self.assertEqual(len(self.clean(dev, 20).pixels), pixels)

    def test_linear_in_time_below_saturation(self):
        import numpy as np
        dev, info = self.make("sim_QEP1", "upwelling")
        a = np.asarray(self.clean(dev, 20).pixels, float)
        b = np.asarray(self.clean(dev, 60).pixels, float)
        dark = info.dark_pixels
        optical = slice(300, 600)
        ratio = ((b[optical] - b[dark].mean()).sum()
                 / (a[optical] - a[dark].mean()).sum())
        self.assertLess(abs(ratio - 3.0), 0.1, ratio)

    def test_clips_at_saturation(self):
        dev, info = self.make("sim_FLMT1", "upwelling")
        r = self.clean(dev, 2000)
        self.assertEqual(max(r.pixels), 65535)
        self.assertGreater(r.pixels.count(65535), 50)

    def test_dark_much_less_than_light(self):
        import numpy as np
        dark_dev, _ = self.make("sim_QEP1")
        light_dev, info = self.make("sim_QEP1", "upwelling")
        dark = np.asarray(self.clean(dark_dev, 50).pixels, float)
        light = np.asarray(self.clean(light_dev, 50).pixels, float)
        optical = [i for i in range(info.pixels) if i not in info.dark_pixels]
        self.assertGreater(light[optical].max(), 10 * (dark[optical].max() - 1000))
        self.assertLess(dark.max(), 2500)

    def test_free_running_stale_spectrum(self):
        # a spectrum that began before the shutter opened is partly dark;
        # acquire_clean waits for one that began after
        optics = Optics()
        dev = SimulatedSpectrometer("sim_FLMT1", optics, time_scale=1.0)
        dev.open()
        dev.set_integration_time(200)
        dev.read()                       # now integrating 200 ms windows
        self.time.sleep(0.1)
        optics.set_lit("upwelling", True)
        half, started, ms = dev.read()   # began ~100 ms before the light
        full = self.clean(dev, 200)
        self.assertGreater(full.started, started)
        import numpy as np
        h, f = np.asarray(half, float), np.asarray(full.pixels, float)
        self.assertLess(h[500:1500].mean() - 1000, 0.8 * (f[500:1500].mean() - 1000))

    def test_clean_read_costs_one_idle_integration(self):
        optics = Optics()
        dev = SimulatedSpectrometer("sim_QEP1", optics, time_scale=1.0)
        dev.open()
        self.clean(dev, 50)
        self.time.sleep(0.05)
        t0 = self.time.monotonic()
        r = self.clean(dev, 50)
        elapsed = self.time.monotonic() - t0
        self.assertEqual(r.acquisitions, 2)
        self.assertLess(elapsed, 0.050 + 0.008 + 0.015)

    def test_unplugged_raises(self):
        from piccolo_twisted.instrument.device import DeviceError
        dev, _ = self.make("sim_QEP1")
        dev.unplug()
        self.assertRaises(DeviceError, dev.read)
        self.assertRaises(DeviceError, dev.open)
        dev.replug()
        dev.open()

    def test_tec_drifts_to_set_point(self):
        dev, info = self.make("sim_QEP1")
        self.assertTrue(info.has_tec)
        start = dev.temperature()
        dev.set_tec(True, -10.0)
        self.time.sleep(0.05)
        later = dev.temperature()
        self.assertLess(later, start)
        flame, finfo = self.make("sim_FLMT1")
        self.assertFalse(finfo.has_tec)


class SpectrometerFrontTests(unittest.SynchronousTestCase):

    def setUp(self):
        self.clock = task.Clock()
        cfg = load_instrument_config(text=CONFIG)
        self.optics = Optics()
        self.device = SimulatedSpectrometer("sim_QEP1", self.optics, time_scale=0.001)
        self.spec = sp.Spectrometer(cfg.spectrometers[0], ["upwelling", "downwelling"],
                                    self.device, self.clock, to_thread=sync_thread)

    def test_connect_applies_limits_and_status(self):
        seen = []
        self.spec.status.watch(seen.append)
        self.assertEqual(self.successResultOf(self.spec.connect()), "ok")
        self.assertEqual(seen, [sp.CONNECTING, sp.IDLE])
        # config bounds (10, 5000) inside the device's (8, 3600000)
        self.assertEqual((self.spec.min_time.value, self.spec.max_time.value), (10, 5000))
        self.assertTrue(self.spec.have_tec())

    def test_current_time_validation(self):
        from piccolo_twisted.errors import NotFoundError, PiccoloError
        self.successResultOf(self.spec.connect())
        self.spec.set_current_time("upwelling", 250)
        self.assertEqual(self.spec.current_time["upwelling"].value, 250)
        for bad in (5, 6000, "abc", 1.5, True, None, float("nan")):
            self.assertRaises(PiccoloError, self.spec.set_current_time, "upwelling", bad)
        self.assertRaises(NotFoundError, self.spec.set_current_time, "sideways", 100)
        self.assertEqual(self.spec.current_time["upwelling"].value, 250)
        self.spec.set_current_time("upwelling", "300")     # dashboard strings
        self.assertEqual(self.spec.current_time["upwelling"].value, 300)

    def test_min_max_bounds(self):
        from piccolo_twisted.errors import PiccoloError
        self.successResultOf(self.spec.connect())
        self.spec.set_current_time("upwelling", 4000)
        self.spec.set_max_time(3000)
        self.assertEqual(self.spec.current_time["upwelling"].value, 3000)
        self.assertRaises(PiccoloError, self.spec.set_min_time, 4000)
        self.assertRaises(PiccoloError, self.spec.set_min_time, 1)     # below device
        self.assertRaises(PiccoloError, self.spec.set_max_time, 5)

    def test_drop_and_reconnect_every_5_seconds(self):
        self.successResultOf(self.spec.connect())
        self.device.unplug()
        self.failureResultOf(self.spec.acquire(20))
        self.assertEqual(self.spec.status.value, sp.DROPPED)
        self.clock.advance(5)
        self.assertEqual(self.spec.status.value, sp.DROPPED)   # still gone
        self.device.replug()
        self.clock.advance(5)
        self.assertEqual(self.spec.status.value, sp.IDLE)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_refuses_to_connect_then_recovers(self):
        self.device.refuse_connects = 2
        result = self.successResultOf(self.spec.connect())
        self.assertIn("refused", result)
        self.assertEqual(self.spec.status.value, sp.DROPPED)
        self.clock.advance(5)
        self.assertEqual(self.spec.status.value, sp.DROPPED)
        self.clock.advance(5)
        self.assertEqual(self.spec.status.value, sp.IDLE)

    def test_disconnect_stops_reconnecting(self):
        self.device.unplug()
        self.spec.connect()
        self.successResultOf(self.spec.disconnect())
        self.device.replug()
        self.clock.advance(20)
        self.assertEqual(self.spec.status.value, sp.DISCONNECTED)

    def test_power_off_and_on_simulated(self):
        self.successResultOf(self.spec.connect())
        self.assertEqual(self.successResultOf(self.spec.power_off()), "ok")
        self.assertEqual(self.spec.status.value, sp.POWERED_OFF)
        self.assertIn("powered off", self.successResultOf(self.spec.connect()))
        d = self.spec.power_on()
        self.assertNoResult(d)
        self.clock.advance(sp.POWER_SETTLE)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(self.spec.status.value, sp.IDLE)

    def test_tec_settings(self):
        from piccolo_twisted.errors import PiccoloError
        self.successResultOf(self.spec.connect())
        self.successResultOf(defer.maybeDeferred(self.spec.set_target_temperature, -5))
        self.assertEqual(self.device._tec_target, -5.0)
        for bad in (100, "cold", float("inf")):
            self.assertRaises(PiccoloError, self.spec.set_target_temperature, bad)
        self.assertEqual(self.spec.target_temperature.value, -5.0)
        self.successResultOf(defer.maybeDeferred(self.spec.set_tec_enabled, False))
        self.assertFalse(self.device._tec_enabled)

    def test_power_on_all_10_seconds_apart(self):
        cfg = load_instrument_config(text=CONFIG)
        other = sp.Spectrometer(cfg.spectrometers[1], ["upwelling", "downwelling"],
                                SimulatedSpectrometer("sim_FLMT1", self.optics, time_scale=0.001),
                                self.clock, to_thread=sync_thread)
        group = sp.Spectrometers([self.spec, other], ["upwelling", "downwelling"], self.clock)
        self.successResultOf(group.connect_all())
        self.assertEqual(self.successResultOf(group.power_off_all()), "ok")
        d = group.power_on_all()
        self.assertEqual([s.status.value for s in group], [sp.DISCONNECTED, sp.POWERED_OFF])
        self.clock.advance(sp.POWER_SETTLE)
        self.assertEqual([s.status.value for s in group], [sp.IDLE, sp.POWERED_OFF])
        self.clock.advance(10 - sp.POWER_SETTLE)
        self.assertEqual(other.status.value, sp.DISCONNECTED)
        self.clock.advance(sp.POWER_SETTLE)
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual([s.status.value for s in group], [sp.IDLE, sp.IDLE])

