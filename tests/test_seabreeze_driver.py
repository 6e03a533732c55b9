"""The seabreeze driver through seabreeze itself (pyseabreeze, pyusb) on the
emulated USB bus: facts as seabreeze reports them, spectra labelled with
the time they were integrated at (the emulator's own record of what it
transmitted is the ground truth), faults, and the half-open device."""

import os
import threading
import time

from twisted.trial import unittest

from piccolo_twisted.instrument import usb_emulator
from piccolo_twisted.instrument.device import DeviceError, acquire_clean
from piccolo_twisted.instrument.seabreeze_driver import SeabreezeDevice
from piccolo_twisted.instrument.simulator import Optics

LONG = os.environ.get("PICCOLO_LONG") == "1"
SCALE = 0.05
_serials = iter(range(1000, 100000))


class EmulatedCase(unittest.SynchronousTestCase):
    """Fresh emulated devices for every test (new serials, new addresses)."""

    def plug(self, model, prefix, time_scale=SCALE):
        serial = f"{prefix}{next(_serials)}"
        device = usb_emulator.add_device(model, serial, self.optics, time_scale=time_scale)
        self.addCleanup(usb_emulator.remove_device, device)
        return device

    def open(self, emulated):
        dev = SeabreezeDevice(emulated.serial, time_scale=emulated.detector.sim.time_scale)
        info = dev.open()
        self.addCleanup(dev.close)
        return dev, info

    def setUp(self):
        self.optics = Optics()
        # pyseabreeze waits 100 ms after initialising an OOI device; the
        # emulated device runs at SCALE, so does that wait
        from seabreeze.pyseabreeze import protocol
        self.patch(protocol, "time", ScaledTime)


class ScaledTime:
    def sleep(self, seconds):
        time.sleep(seconds * SCALE)

    def __getattr__(self, name):
        return getattr(time, name)


ScaledTime = ScaledTime()


class FactsTests(EmulatedCase):

    def test_qepro_facts(self):
        q = self.plug("QEPRO", "QEP")
        dev, info = self.open(q)
        self.assertEqual((info.model, info.pixels, info.min_time, info.max_time,
                          info.saturation),
                         ("QEPRO", 1044, 8, 1599999, 2 ** 18 - 1))
        # seabreeze's dark pixels for the QE Pro (not the old private
        # attribute, which gave [] on every real device)
        self.assertEqual(info.dark_pixels, [0, 1, 2, 3, 1040, 1041, 1042, 1043])
        for got, want in zip(info.wavelength_coefficients, q.wavelength):
            self.assertLess(abs(got - want), abs(want) * 1e-5)
        # pyseabreeze offers neither TEC nor nonlinearity for the QE Pro
        self.assertFalse(info.has_tec)
        self.assertEqual(info.nonlinearity, [])
        self.assertRaises(DeviceError, dev.temperature)

    def test_tec_where_the_backend_offers_it(self):
        """A backend with a TEC feature for the QE Pro (cseabreeze has one;
        here pyseabreeze's own OBP TEC class, added to the device's
        features) is driven over OBP: has_tec, set point, enable, read."""
        from seabreeze.pyseabreeze import devices
        from seabreeze.pyseabreeze.features.thermoelectric import ThermoElectricFeatureOBP
        original = devices.SeaBreezeDevice.features

        def with_tec(dev):
            features = original.fget(dev)
            if dev.model == "QEPRO" and not features.get("thermo_electric"):
                protocol = dev._transport.protocol
                features["thermo_electric"] = [ThermoElectricFeatureOBP(protocol, 0)]
            return features
        self.patch(devices.SeaBreezeDevice, "features", property(with_tec))
        q = self.plug("QEPRO", "QEP")
        dev, info = self.open(q)
        self.assertTrue(info.has_tec)
        dev.set_tec(True, -10.0)
        self.assertEqual((q.tec_on, q.tec_setpoint), (True, -10.0))
        # the emulated detector cools as time passes (0.01 degC steps); the
        # value read over OBP (a float32) lies between the emulator's own
        # readings just before and just after. (trial's assertAlmostEqual
        # ignores ``delta``: it compared 7 decimal places with a moving
        # temperature, and failed whenever a 0.01 step fell in between.)
        before = q.temperature()
        read = dev.temperature()
        after = q.temperature()
        self.assertLess(after, before + 1e-4)           # cooling, not heating
        self.assertGreaterEqual(read, after - 1e-4)
        self.assertLessEqual(read, before + 1e-4)
        dev.set_tec(False, 5.0)
        self.assertEqual((q.tec_on, q.tec_setpoint), (False, 5.0))

    def test_usb2000plus_facts(self):
        u = self.plug("USB2000PLUS", "USB2+")
        dev, info = self.open(u)
        self.assertEqual((info.model, info.pixels, info.min_time, info.max_time,
                          info.saturation), ("USB2000PLUS", 2048, 1, 655349, 65535))
        self.assertEqual(info.dark_pixels, list(range(6, 21)))
        # order 3 in EEPROM slot 14: four coefficients from slots 6..9
        self.assertEqual(info.nonlinearity, [float(u.eeprom[i]) for i in range(6, 10)])
        for i, got in enumerate(info.wavelength_coefficients):
            want = float(u.eeprom[1 + i])
            self.assertLess(abs(got - want), abs(want) * 1e-6)
        self.assertFalse(info.has_tec)

    def test_flame_s_is_told_apart_by_firmware(self):
        f = self.plug("FLAMES", "FLMS")
        dev, info = self.open(f)
        self.assertEqual((info.model, info.pixels), ("FLAMES", 2048))


class LimitsTests(EmulatedCase):
    """The limits the driver reports are times seabreeze will set: pyseabreeze
    takes ``t_min <= t < t_max`` (microseconds), so the longest whole
    millisecond is one below its maximum. A max_time at the maximum itself
    is refused by seabreeze (SeaBreezeError) and drops the device -- which
    autointegration in weak light reaches."""

    def check_longest(self, model, prefix):
        # 1600 s and 655 s integrations, run 10^5 times faster
        emulated = self.plug(model, prefix, time_scale=1e-5)
        dev, info = self.open(emulated)
        reading = acquire_clean(dev, info.max_time, info.min_time)
        self.assertEqual(reading.integration_time, info.max_time)
        self.assertIn(info.max_time * 1000, [e.micros for e in emulated.sent])
        # and nothing longer: the limit is the device's, less than 1 ms off
        self.assertRaises(DeviceError, dev.set_integration_time, info.max_time + 1)
        return info

    def test_qepro_longest_time(self):
        info = self.check_longest("QEPRO", "QEP")
        self.assertEqual(info.max_time, 1599999)

    def test_usb2000plus_longest_time(self):
        info = self.check_longest("USB2000PLUS", "USB2+")
        self.assertEqual(info.max_time, 655349)


class TriggerModeTests(EmulatedCase):
    """``Spectrometer.trigger_mode()`` through pyseabreeze: in a mode that
    waits for an external trigger the device integrates nothing (no
    trigger cable here), so reads time out once what was buffered is
    read; back in normal mode it free-runs again."""

    def spectrometer(self, emulated):
        from seabreeze.spectrometers import Spectrometer
        spec = Spectrometer.from_serial_number(emulated.serial)
        self.addCleanup(spec.close)
        # reads time out after the integration time plus pyusb's default
        spec._dev._transport._device.pyusb_device.default_timeout = 300
        return spec

    def check(self, model, mode):
        import usb.core
        emulated = self.plug(model, "TRG")
        spec = self.spectrometer(emulated)
        spec.integration_time_micros(spec.integration_time_micros_limits[0])
        spec.intensities()
        spec.trigger_mode(mode)
        timed_out = False
        for _ in range(150):            # a QE Pro buffers up to 100 at first
            try:
                spec.intensities()
            except usb.core.USBTimeoutError:
                timed_out = True
                break
        self.assertTrue(timed_out, f"{model} integrates in trigger mode {mode}")
        spec.trigger_mode(0)
        spec.intensities()
        spec.intensities()              # free-running again

    def test_driver_opens_a_device_left_in_an_external_mode(self):
        """A QE Pro keeps its trigger mode while powered (another program
        left it waiting for an external trigger): the driver puts it back
        in normal mode when it opens it, or every acquisition times out."""
        q = self.plug("QEPRO", "TRG")
        spec = self.spectrometer(q)
        spec.trigger_mode(3)
        spec.close()
        dev, info = self.open(q)
        reading = acquire_clean(dev, 20, info.min_time)
        self.assertEqual((reading.integration_time, q.sent[-1].micros), (20, 20000))

    def test_qepro_external_trigger(self):
        self.check("QEPRO", 3)          # EDGE

    def test_usb2000plus_external_trigger(self):
        self.check("USB2000PLUS", 3)    # HARDWARE


class LabellingTests(EmulatedCase):
    """After every change of integration time the spectrum returned is one
    the device integrated at that time, begun after the request."""

    def check_labels(self, emulated, times):
        dev, info = self.open(emulated)
        idle = info.min_time
        dev.set_integration_time(idle)
        time.sleep(0.05)            # let the device free-run (and buffer)
        for ms in times:
            reading = acquire_clean(dev, ms, idle)
            sent = emulated.sent[-1]
            self.assertEqual(sent.micros, reading.integration_time * 1000,
                             f"{ms} ms: counts integrated at {sent.micros} us "
                             f"labelled {reading.integration_time} ms")
            self.assertEqual(reading.integration_time, ms)
            self.assertGreaterEqual(sent.start, reading.started - 1e-6)
            self.assertEqual(len(reading.pixels), info.pixels)
            time.sleep(0.02)

    def test_qepro(self):
        self.check_labels(self.plug("QEPRO", "QEP"), [60, 8, 150, 150, 40])

    def test_usb2000plus(self):
        self.check_labels(self.plug("USB2000PLUS", "USB2+"), [60, 1, 150, 150, 40])

    def test_usb2000plus_host_stalled_between_reads(self):
        """The host stalls (GIL, load) after the stale read for longer than
        the clean integration: the device has moved on to the idle time;
        the driver notices and still returns a spectrum integrated at
        the time it asked for."""
        u = self.plug("USB2000PLUS", "USB2+")
        dev, info = self.open(u)
        set_time = dev.set_integration_time
        stalls = []

        def stalling(ms):
            set_time(ms)
            if ms != 200 and not stalls:             # going back to idle
                stalls.append(ms)
                time.sleep(0.2 * SCALE * 1.5)       # 1.5 x the 200 ms integration
        dev.set_integration_time = stalling
        reading = acquire_clean(dev, 200, info.min_time)
        self.assertEqual(len(stalls), 1)
        self.assertEqual(u.sent[-1].micros, 200000)
        self.assertEqual(reading.integration_time, 200)

    def test_usb2000plus_host_stalled_before_the_clean_request(self):
        """The host stalls after the driver's check and before the clean
        spectrum's request reaches the device (a thread switch, the GIL):
        the integration at the requested time is over by then. Seen under
        load in the wire test: a dark labelled 25 ms integrated at 10 ms."""
        u = self.plug("USB2000PLUS", "USB2+")
        dev, info = self.open(u)
        read = dev.read
        reads = []

        def late(*args):
            reads.append(1)
            if len(reads) == 2:                     # the clean request
                time.sleep(0.4 * SCALE * 1.5)       # 1.5 x the 400 ms integration
            return read(*args)
        dev.read = late
        reading = acquire_clean(dev, 400, info.min_time)
        self.assertGreaterEqual(len(reads), 2)
        self.assertEqual(reading.integration_time, 400)
        self.assertEqual(u.sent[-1].micros, 400000,
                         "a spectrum labelled 400 ms integrated at "
                         f"{u.sent[-1].micros} us")

    def test_usb2000plus_late_answers_lose_no_integration(self):
        """Answers reach the host late (1.2 x the idle integration after
        the device sent them: a loaded Pi): judged by when the answer came,
        every clean spectrum could have been the idle one and was taken
        again, two more integrations each time (issue 20: 425 ms of
        overhead at 200 ms). When the request reached the device proves it
        was in time: no integration is thrown away, every label right."""
        scale = 0.2
        u = self.plug("USB2000PLUS", "LATE", time_scale=scale)
        dev, info = self.open(u)
        idle = max(info.min_time, 25)
        u.answer_delay = 1.2 * idle / 1000.0 * scale
        for _ in range(4):
            reading = acquire_clean(dev, 1000, info.min_time)
            self.assertEqual((reading.integration_time, u.sent[-1].micros), (1000, 1000000))
            self.assertGreaterEqual(u.sent[-1].start, reading.started - 1e-6)
            self.assertEqual(reading.acquisitions, 2, "an integration was thrown away")

    def test_naive_two_reads_mislabel_a_qepro(self):
        """Why the QE Pro needs its own procedure: set the long time, read,
        set the idle time, read again -- the reads come out of the
        device's buffer and were integrated at the idle time."""
        q = self.plug("QEPRO", "QEP")
        dev, info = self.open(q)
        dev.set_integration_time(info.min_time)
        while True:                 # what it buffered before runs out
            dev.read()
            if q.sent[-1].micros == 8000:
                break
        time.sleep(0.05)            # more are buffered at the idle time:
        with q.cond:                # 0.05 s is 125 of them here, at least
            q._fill()
            self.assertEqual({e.micros for e in q.buffer}, {8000})
            self.assertGreaterEqual(len(q.buffer), 2)
        dev.set_integration_time(100)
        dev.read()
        dev.set_integration_time(info.min_time)
        dev.read()
        self.assertNotEqual(q.sent[-1].micros, 100000)

    def test_light_brighter_than_dark(self):
        q = self.plug("QEPRO", "QEP")
        dev, info = self.open(q)
        dark = acquire_clean(dev, 50, info.min_time)
        self.optics.set_lit("upwelling", True)
        light = acquire_clean(dev, 50, info.min_time)
        self.optics.set_lit("upwelling", False)
        self.assertGreater(sum(light.pixels), sum(dark.pixels) * 1.5)


class FaultTests(EmulatedCase):

    # USB2000+ reads while listing: FPGA version, status, slot 17, serial;
    # the 6th read is the status query of the open that follows the listing
    FAIL_WHILE_LISTING, FAIL_WHILE_OPENING = 2, 6

    def test_open_failing_half_way_is_closed(self):
        """A transfer error while seabreeze opens the device (while listing
        it, or while opening it after) leaves it open in seabreeze; the
        driver closes it, so the next try opens it."""
        for n in (self.FAIL_WHILE_LISTING, self.FAIL_WHILE_OPENING):
            u = self.plug("USB2000PLUS", "USB2+")
            u.fail_in_reads = n
            dev = SeabreezeDevice(u.serial)
            if n == self.FAIL_WHILE_OPENING:
                self.assertRaises(DeviceError, dev.open)
            # (a listing that fails is retried within the same open)
            info = dev.open()
            self.assertIsNone(u.fail_in_reads)          # the fault happened
            self.assertEqual(info.model, "USB2000PLUS")
            dev.close()

    def test_half_open_hazard_is_real(self):
        """Without the driver's clean-up, seabreeze itself refuses the
        retry: the device is "already opened", or listed without serial."""
        from seabreeze.spectrometers import SeaBreezeError, Spectrometer
        for n, message in ((self.FAIL_WHILE_OPENING, "already opened"),
                           (self.FAIL_WHILE_LISTING, "No device attached")):
            u = self.plug("USB2000PLUS", "USB2+")
            u.fail_in_reads = n
            try:
                Spectrometer.from_serial_number(u.serial)
            except Exception as e:
                first = e
            self.assertIn("Input/Output", str(first))
            e = self.assertRaises(SeaBreezeError, Spectrometer.from_serial_number,
                                  u.serial)
            self.assertIn(message, str(e))
            del first, e
            from piccolo_twisted.instrument.seabreeze_driver import list_devices
            self.assertIn(("USB2000PLUS", u.serial), list_devices())
            from seabreeze.spectrometers import list_devices as sb_list
            for d in sb_list():
                if d.serial_number == u.serial and d.is_open:
                    d.close()

    def test_transfer_error_mid_read(self):
        q = self.plug("QEPRO", "QEP")
        dev, info = self.open(q)
        q.fail_next_read = True
        self.assertRaises(DeviceError, acquire_clean, dev, 20, info.min_time)
        dev.close()
        info = dev.open()
        self.assertEqual(acquire_clean(dev, 20, info.min_time).integration_time, 20)

    def test_unplug_mid_read_and_come_back(self):
        for model, prefix in (("QEPRO", "QEP"), ("USB2000PLUS", "USB2+")):
            emulated = self.plug(model, prefix)
            dev, info = self.open(emulated)
            timer = threading.Timer(0.02, emulated.unplug)
            timer.start()
            self.addCleanup(timer.cancel)
            # 2 s of device time is 100 ms here: the unplug lands mid-read
            e = self.assertRaises(DeviceError, acquire_clean, dev, 2000, info.min_time)
            self.assertIn("No such device", str(e))
            dev.close()
            e = self.assertRaises(DeviceError, dev.open)
            self.assertIn("no such device attached", str(e))
            emulated.replug()
            info = dev.open()
            self.assertEqual(acquire_clean(dev, 30, info.min_time).integration_time, 30)
            dev.close()

    def test_timeout_mid_read(self):
        if not LONG:
            raise unittest.SkipTest("a USB timeout takes ~1 s: PICCOLO_LONG=1")
        u = self.plug("USB2000PLUS", "USB2+")
        dev, info = self.open(u)
        u.stall_next_read = True
        e = self.assertRaises(DeviceError, dev.read)
        self.assertIn("timed out", str(e))


class CountsTests(EmulatedCase):
    """Counts as the device gives them (issue 20). A USB2000+ or Flame-S
    saturates at the level in its EEPROM slot 17 (62,000 raw counts here);
    seabreeze scales every pixel by 65535 / that level, so that saturation
    reads 65,535, the ``max_intensity`` it reports. The driver records what
    seabreeze reports, rounded (truncating made 65,534.999... of a
    saturated pixel 65,534, below the saturation level), and the
    saturation level in the same units. The emulator's own record of the
    raw counts it sent is the ground truth."""

    def check(self, model, prefix):
        import numpy as np
        u = self.plug(model, prefix)
        self.assertEqual(u.saturation(), 62000)        # read from the EEPROM slot
        dev, info = self.open(u)
        self.optics.set_lit("downwelling", True)        # bright: saturates at 200 ms
        reading = acquire_clean(dev, 200, info.min_time)
        self.optics.set_lit("downwelling", False)
        raw = np.asarray(u.last_counts, dtype=float)
        self.assertEqual(u.sent[-1].micros, 200000)
        self.assertEqual(raw.max(), 62000)              # the detector saturated
        want = np.rint(raw * 65535.0 / 62000.0).astype(np.int64)
        pixels = np.asarray(reading.pixels)
        self.assertEqual(pixels.dtype.kind, "i")
        self.assertEqual(pixels.tolist(), want.tolist())
        # pixels and SaturationLevel agree: every saturated pixel reads the
        # level, and the count of those at or above it is the device's
        self.assertEqual(info.saturation, 65535)
        self.assertEqual(int(pixels.max()), info.saturation)
        from piccolo_twisted.instrument.spectrometer import saturated_pixels
        self.assertEqual(saturated_pixels(reading.pixels, info.saturation),
                         int((raw >= 62000).sum()))
        self.assertGreater(int((raw >= 62000).sum()), 0)
        self.assertLess(int((raw >= 62000).sum()), len(raw))

    def test_usb2000plus(self):
        self.check("USB2000PLUS", "CNT")

    def test_flame_s(self):
        self.check("FLAMES", "CNTF")

    def test_qepro_raw_counts(self):
        """A QE Pro's buffered spectra are raw 32-bit counts; its saturation
        level is the 18-bit ADC's full scale, which the counts reach."""
        import numpy as np
        q = self.plug("QEPRO", "CNTQ")
        dev, info = self.open(q)
        self.optics.set_lit("downwelling", True)
        reading = acquire_clean(dev, 400, info.min_time)
        self.optics.set_lit("downwelling", False)
        self.assertEqual(reading.pixels, np.asarray(q.last_counts).tolist())
        self.assertEqual(info.saturation, 2 ** 18 - 1)
        self.assertEqual(max(reading.pixels), info.saturation)
