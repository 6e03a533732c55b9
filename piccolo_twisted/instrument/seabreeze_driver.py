"""Blocking calls into seabreeze (>= 2); used from worker threads only.

Imported only when a real (not ``sim_``/``dummy_``) serial is configured:
seabreeze costs ~12 MiB of memory.
"""

from .device import DeviceError, DeviceInfo


class SeabreezeDevice:
    """An Ocean Optics spectrometer opened by serial number."""

    def __init__(self, serial):
        self.serial = serial
        self.spec = None
        self._tec = None

    def _call(self, fn, *args):
        """Every failure inside seabreeze (SeaBreezeError, USBError, a
        timeout, a backend error after an unplug) is a device failure."""
        if self.spec is None:
            raise DeviceError(f"{self.serial}: device not open")
        try:
            return fn(*args)
        except Exception as e:
            raise DeviceError(f"{self.serial}: {type(e).__name__}: {e}") from e

    def open(self):
        import numpy as np
        try:
            from seabreeze.spectrometers import Spectrometer
            spec = Spectrometer.from_serial_number(self.serial)
        except Exception as e:     # no backend, no such device, USB error
            raise DeviceError(f"{self.serial}: cannot open: {e}") from e
        self.spec = spec
        lo, hi = self._call(lambda: spec.integration_time_micros_limits)
        wl = np.asarray(self._call(spec.wavelengths), dtype=float)
        idx = np.arange(len(wl), dtype=float)
        coefficients = np.polynomial.polynomial.polyfit(idx, wl, 3).tolist()
        dark = []
        try:
            dark = [int(i) for i in getattr(spec, "_dark_pixel_indices", [])]
        except TypeError:
            pass
        nonlinearity = []
        features = getattr(spec, "f", None)
        nl = getattr(features, "nonlinearity_coefficients", None)
        if nl is not None:
            try:
                nonlinearity = [float(c) for c in nl.get_nonlinearity_coefficients()]
            except Exception:
                nonlinearity = []
        self._tec = getattr(features, "thermo_electric", None)
        return DeviceInfo(serial=self.serial, model=spec.model,
                          pixels=len(wl), saturation=int(spec.max_intensity),
                          min_time=max(1, -(-int(lo) // 1000)),
                          max_time=int(hi) // 1000,
                          wavelength_coefficients=coefficients,
                          dark_pixels=dark, nonlinearity=nonlinearity,
                          has_tec=self._tec is not None)

    def close(self):
        spec, self.spec = self.spec, None
        if spec is not None:
            try:
                spec.close()
            except Exception:
                pass

    def set_integration_time(self, ms):
        self._call(lambda: self.spec.integration_time_micros(int(ms * 1000)))

    def read(self):
        counts = self._call(lambda: self.spec.intensities())
        return [int(c) for c in counts], None, None

    def temperature(self):
        if self._tec is None:
            raise DeviceError(f"{self.serial}: no thermo-electric cooler")
        return float(self._call(self._tec.read_temperature_degrees_celsius))

    def set_tec(self, enabled, target):
        if self._tec is None:
            raise DeviceError(f"{self.serial}: no thermo-electric cooler")
        self._call(self._tec.set_temperature_setpoint_degrees_celsius, float(target))
        self._call(self._tec.enable_tec, bool(enabled))


def list_devices():
    """(model, serial) of every attached spectrometer; [] without backend."""
    from seabreeze.spectrometers import list_devices as _list
    return [(d.model, d.serial_number) for d in _list()]



