"""The seabreeze driver against a stand-in Spectrometer (no hardware here):
limits, wavelength fit, TEC present or absent, errors become DeviceError."""

import numpy as np
from twisted.trial import unittest

from piccolo_twisted.instrument.device import DeviceError, acquire_clean
from piccolo_twisted.instrument.seabreeze_driver import SeabreezeDevice


class FakeTEC:
    def __init__(self):
        self.calls = []

    def read_temperature_degrees_celsius(self):
        return -9.5

    def set_temperature_setpoint_degrees_celsius(self, t):
        self.calls.append(("set", t))

    def enable_tec(self, on):
        self.calls.append(("enable", on))


class FakeSpectrometer:
    fail = False

    def __init__(self, tec=True):
        class F:
            pass
        self.f = F()
        if tec:
            self.f.thermo_electric = FakeTEC()
        self.model = "QE-PRO"
        self.max_intensity = 200000.0
        self.integration_time_micros_limits = (8000, 1600000000)
        self._dark_pixel_indices = np.array([0, 1, 2, 3])
        self.times = []
        self.closed = False

    @classmethod
    def from_serial_number(cls, serial):
        if serial == "missing":
            from seabreeze.spectrometers import SeaBreezeError
            raise SeaBreezeError("No device attached with serial number 'missing'.")
        return cls(tec=serial != "notec")

    def wavelengths(self):
        i = np.arange(1044, dtype=float)
        return 200.0 + 0.8 * i - 1e-5 * i ** 2

    def integration_time_micros(self, us):
        self.times.append(us)

    def intensities(self):
        if FakeSpectrometer.fail:
            from seabreeze.spectrometers import SeaBreezeError
            raise SeaBreezeError("Data transfer error (device unplugged?)")
        return np.full(1044, 1000.0)

    def close(self):
        self.closed = True


class SeabreezeDriverTests(unittest.SynchronousTestCase):

    def setUp(self):
        import seabreeze.spectrometers
        self.patch(seabreeze.spectrometers, "Spectrometer", FakeSpectrometer)
        FakeSpectrometer.fail = False

    def test_open_reads_facts(self):
        dev = SeabreezeDevice("QEP1")
        info = dev.open()
        self.assertEqual((info.min_time, info.max_time, info.saturation, info.pixels),
                         (8, 1600000, 200000, 1044))
        c = info.wavelength_coefficients
        self.assertAlmostEqual(c[0], 200.0, places=6)
        self.assertAlmostEqual(c[1], 0.8, places=6)
        self.assertEqual(info.dark_pixels, [0, 1, 2, 3])
        self.assertTrue(info.has_tec)
        dev.set_tec(True, -10)
        self.assertEqual(dev._tec.calls, [("set", -10.0), ("enable", True)])
        self.assertEqual(dev.temperature(), -9.5)

    def test_no_tec(self):
        dev = SeabreezeDevice("notec")
        self.assertFalse(dev.open().has_tec)
        self.assertRaises(DeviceError, dev.temperature)

    def test_clean_acquisition_two_reads(self):
        dev = SeabreezeDevice("QEP1")
        dev.open()
        reading = acquire_clean(dev, 100, 8)
        self.assertEqual(reading.acquisitions, 2)
        self.assertEqual(dev.spec.times, [100000, 8000])
        self.assertEqual(len(reading.pixels), 1044)

    def test_errors_become_device_errors(self):
        self.assertRaises(DeviceError, SeabreezeDevice("missing").open)
        dev = SeabreezeDevice("QEP1")
        dev.open()
        FakeSpectrometer.fail = True
        self.assertRaises(DeviceError, dev.read)
        dev.close()
        self.assertRaises(DeviceError, dev.read)
