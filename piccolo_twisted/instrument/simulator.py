"""A simulated spectrometer with real physics, and the light it sees.

The detector free-runs: integrations follow each other back to back, a
read returns the next integration to complete, a new integration time
applies from the next integration, and each spectrum integrates the light
of its own time window (``Optics`` records when each channel's shutter was
open). Integration takes real time in the calling (worker) thread, scaled
by ``time_scale``. Faults can be injected for tests.

Time comes from ``time_source`` (an object with ``monotonic()`` and
``sleep()``, by default the ``time`` module): the season simulator runs
device calls in simulated time.
"""

import bisect
import math
import threading
import time

from .device import DeviceError, DeviceInfo

# Fraunhofer and telluric absorption lines: (nm, depth, width nm)
_LINES = [(393.4, 0.6, 1.5), (396.8, 0.55, 1.5), (430.8, 0.3, 1.0),
          (486.1, 0.35, 1.0), (517.3, 0.2, 1.0), (527.0, 0.15, 1.0),
          (589.3, 0.3, 0.8), (656.3, 0.4, 1.0), (687.0, 0.5, 2.5),
          (760.5, 0.8, 2.5), (822.0, 0.3, 4.0), (940.0, 0.7, 12.0)]

MODELS = {
    # model: pixels, dark pixel indices, saturation, min ms, max ms,
    #        wavelength coefficients, dark offset, TEC
    "QE-PRO": dict(pixels=1044, dark=list(range(0, 4)) + list(range(1040, 1044)),
                   saturation=200000, min_time=8, max_time=60 * 60 * 1000,
                   coefficients=[195.1, 0.7853, -1.2e-5, -1.1e-9],
                   offset=1600.0, tec=True),
    "FLAME-S": dict(pixels=2048, dark=list(range(6, 21)), saturation=65535,
                    min_time=1, max_time=65000,
                    coefficients=[339.6, 0.3761, -1.4e-5, -1.6e-9],
                    offset=1000.0, tec=False),
    "GENERIC": dict(pixels=1024, dark=list(range(0, 4)), saturation=65535,
                    min_time=3, max_time=10000,
                    coefficients=[300.0, 0.6, 0.0, 0.0], offset=800.0, tec=False),
}


def model_for(serial):
    body = serial.split("_", 1)[1] if "_" in serial else serial
    if body.startswith("QEP"):
        return "QE-PRO"
    if body.startswith(("FLMT", "USB2")):
        return "FLAME-S"
    return "GENERIC"


class Optics:
    """Which channel is lit when: written by shutters, read by simulators."""

    #: relative brightness of each channel's light (downwelling sees the sky)
    BRIGHTNESS = {"upwelling": 1.0, "downwelling": 3.0}

    def __init__(self, now=None):
        self._lock = threading.Lock()
        self._events = {}        # channel -> [(monotonic time, lit)]
        self._times = {}         # channel -> [monotonic time] (the same, for bisect)
        self._now = now if now is not None else time.monotonic

    def set_lit(self, channel, lit, when=None):
        when = self._now() if when is None else when
        with self._lock:
            events = self._events.setdefault(channel, [(0.0, False)])
            times = self._times.setdefault(channel, [0.0])
            events.append((when, bool(lit)))
            times.append(when)
            if len(events) > 256:
                del events[1:len(events) - 128]
                del times[1:len(times) - 128]

    def channels(self):
        with self._lock:
            return list(self._events)

    def light_fraction(self, channel, t0, t1):
        """Fraction of [t0, t1] during which ``channel`` was lit."""
        if t1 <= t0:
            return 0.0
        with self._lock:
            times = self._times.get(channel)
            if not times:
                return 0.0
            # from the last change at or before t0 to the last before t1
            first = max(bisect.bisect_right(times, t0) - 1, 0)
            last = bisect.bisect_left(times, t1, first)
            events = self._events[channel][first:last + 1]
        lit_time = 0.0
        for i, (t, lit) in enumerate(events):
            end = events[i + 1][0] if i + 1 < len(events) else math.inf
            if lit:
                lo, hi = max(t, t0), min(end, t1)
                if hi > lo:
                    lit_time += hi - lo
        return lit_time / (t1 - t0)

    def brightness(self, channel):
        if channel in self.BRIGHTNESS:
            return self.BRIGHTNESS[channel]
        return 1.0 + 0.5 * (sum(map(ord, channel)) % 5)


class SimulatedBus:
    """The simulated USB bus: devices by serial, and the fault switches."""

    def __init__(self, optics=None, time_scale=1.0, time_source=None):
        # the time module as it is now (tests put a virtual one in its place)
        time_source = time_source if time_source is not None else time
        self.optics = optics or Optics(now=time_source.monotonic)
        self.time_scale = time_scale
        self.time_source = time_source
        self.devices = {}

    def device(self, serial):
        if serial not in self.devices:
            self.devices[serial] = SimulatedSpectrometer(
                serial, self.optics, time_scale=self.time_scale,
                time_source=self.time_source)
        return self.devices[serial]


class SimulatedSpectrometer:
    """Thread-side device API (see ``device.py``), simulated."""

    def __init__(self, serial, optics, time_scale=1.0, seed=None, model=None,
                 time_source=None):
        self.serial = serial
        self._time = time_source if time_source is not None else time
        #: the clock ``started`` in a read's result is on (acquire_clean)
        self.monotonic = self._time.monotonic
        self.model = model or model_for(serial)
        self.spec = MODELS[self.model]
        self.optics = optics
        self.time_scale = time_scale
        self._rng_seed = seed if seed is not None else sum(map(ord, serial))
        self._shape = None
        self._shapes = {}
        self._rng = None
        #: channel -> wavelength calibration (ascending coefficients) of the
        #: light entering by that channel (the instrument config's
        #: ``wavelengthCalibrationCoefficientsPiccolo``); others follow the
        #: device's own calibration
        self.calibrations = {}
        self.is_open = False
        # fault injection (set from any thread)
        self.plugged = True
        self.fail_next_read = False
        self.refuse_connects = 0
        self.read_delay = 0.0
        # free-running timeline (monotonic seconds)
        self._start = None
        self._current_ms = self.spec["min_time"]
        self._next_ms = self.spec["min_time"]
        # thermo-electric cooler
        self._tec_enabled = False
        self._tec_target = 20.0
        self._temp_at = (self._time.monotonic(), 22.0)

    # -- faults -----------------------------------------------------------

    def unplug(self):
        self.plugged = False

    def replug(self):
        self.plugged = True

    def _check(self):
        if not self.plugged:
            self.is_open = False
            raise DeviceError(f"{self.serial}: device disconnected")
        if not self.is_open:
            raise DeviceError(f"{self.serial}: device not open")

    # -- device API -------------------------------------------------------

    def open(self):
        if not self.plugged:
            raise DeviceError(f"{self.serial}: no such device on the bus")
        if self.refuse_connects > 0:
            self.refuse_connects -= 1
            raise DeviceError(f"{self.serial}: device refused to open")
        self.is_open = True
        self._start = self._time.monotonic()
        self._current_ms = self._next_ms = self.spec["min_time"]
        s = self.spec
        return DeviceInfo(serial=self.serial, model=self.model,
                          pixels=s["pixels"], saturation=s["saturation"],
                          min_time=s["min_time"], max_time=s["max_time"],
                          wavelength_coefficients=list(s["coefficients"]),
                          dark_pixels=list(s["dark"]),
                          nonlinearity=[0.9912, 2.01e-6, -1.23e-11, 4.1e-17],
                          has_tec=s["tec"])

    def close(self):
        self.is_open = False

    def _prepare(self):
        if self._shape is not None:
            return
        import numpy as np
        self._peak = float(self._sky(self.spec["coefficients"]).max())
        self._shape = self._render(self.spec["coefficients"])
        self._rng = np.random.default_rng(self._rng_seed)

    def _sky(self, coefficients):
        """The light at the wavelength ``coefficients`` give each pixel:
        black body at 5778 K, times a detector response, times lines."""
        import numpy as np
        idx = np.arange(self.spec["pixels"], dtype=float)
        wl = np.polynomial.polynomial.polyval(idx, [float(c) for c in coefficients])
        h, k, cc = 6.626e-34, 1.381e-23, 2.998e8
        lam = np.clip(wl, 50.0, None) * 1e-9
        planck = 1.0 / (lam ** 5 * (np.exp(h * cc / (lam * k * 5778.0)) - 1.0))
        shape = planck * np.exp(-0.5 * ((wl - 620.0) / 230.0) ** 2)
        for centre, depth, width in _LINES:
            shape *= 1.0 - depth * np.exp(-0.5 * ((wl - centre) / width) ** 2)
        return shape

    def _render(self, coefficients):
        """The spectrum's shape when pixel ``i`` receives the wavelength
        ``coefficients`` give it: a line lands at the pixel whose
        calibrated wavelength is the line's, in every channel. Scaled as
        the device's own range is, dark pixels dark."""
        shape = self._sky(coefficients) / self._peak
        shape[self.spec["dark"]] = 0.0
        return shape

    def _shape_for(self, channel):
        coefficients = self.calibrations.get(channel)
        if coefficients is None:
            return self._shape
        key = tuple(coefficients)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = self._render(coefficients)
        return shape

    def wavelengths(self):
        import numpy as np
        c = self.spec["coefficients"]
        idx = np.arange(self.spec["pixels"], dtype=float)
        return c[0] + c[1] * idx + c[2] * idx ** 2 + c[3] * idx ** 3

    def set_integration_time(self, ms):
        """Applies from the next integration: those that began before this
        call keep the time they began with."""
        self._check()
        self._advance(self._time.monotonic())
        self._next_ms = int(ms)

    def _advance(self, now):
        """Move the timeline to the integration in progress at ``now``."""
        duration = self._seconds(self._current_ms)
        if self._start + duration <= now:
            # it finished: the following ones run at the pending time;
            # skip whole ones without looping per integration
            self._start += duration
            self._current_ms = self._next_ms
            duration = self._seconds(self._current_ms)
            if duration > 0 and self._start + duration <= now:
                self._start += math.floor((now - self._start) / duration) * duration
        return duration

    #: shortest real duration of an integration: a scaled-down 1 ms
    #: integration must still outlast the driver's Python between reads
    MIN_REAL = 0.003

    def _seconds(self, ms):
        return max(ms / 1000.0 * self.time_scale, min(ms / 1000.0, self.MIN_REAL))

    def read(self):
        """Block until the integration in progress completes; return it as
        (pixels, monotonic start, ms)."""
        self._check()
        duration = self._advance(self._time.monotonic())
        end = self._start + duration
        wait = end - self._time.monotonic() + self.read_delay
        if self.fail_next_read:
            self.fail_next_read = False
            self._time.sleep(max(wait, 0) / 2)
            self.plugged = False
            self._check()
        while wait > 0:
            self._time.sleep(min(wait, 0.05))
            if not self.plugged:
                self._check()
            wait = end - self._time.monotonic() + self.read_delay
        started, ms = self._start, self._current_ms
        self._start = end
        self._current_ms = self._next_ms
        return self._spectrum(started, end, ms), started, ms

    def _spectrum(self, t0, t1, ms):
        # numpy (11 MiB) is imported with the first spectrum, not at start
        import numpy as np
        self._prepare()
        s = self.spec
        # counts per ms at full light: saturates at ~120 ms for brightness 1
        rate = s["saturation"] / 120.0
        signal = np.zeros(s["pixels"])
        for channel in self.optics.channels():
            fraction = self.optics.light_fraction(channel, t0, t1)
            if fraction:
                light = fraction * self.optics.brightness(channel)
                signal += self._shape_for(channel) * (rate * light * ms)
        dark = s["offset"] + 0.02 * ms
        noise = self._rng.normal(0.0, 1.0, s["pixels"]) * np.sqrt(signal + 25.0)
        counts = np.clip(np.rint(signal + dark + noise), 0, s["saturation"])
        return counts.astype(np.int64).tolist()

    # -- TEC --------------------------------------------------------------

    def temperature(self):
        self._check()
        t0, temp0 = self._temp_at
        target = self._tec_target if self._tec_enabled else 22.0
        dt = (self._time.monotonic() - t0) / max(self.time_scale, 1e-6)
        return round(target + (temp0 - target) * math.exp(-dt / 20.0), 2)

    def set_tec(self, enabled, target):
        self._check()
        if not self.spec["tec"]:
            raise DeviceError(f"{self.serial}: no thermo-electric cooler")
        current = self.temperature()
        self._temp_at = (self._time.monotonic(), current)
        self._tec_enabled = bool(enabled)
        self._tec_target = float(target)
