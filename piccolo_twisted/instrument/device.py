"""What the thread side of a spectrometer looks like.

A *device* is a blocking object used only from worker threads: the seabreeze
driver and the simulator both implement it. ``acquire_clean`` is the one
acquisition procedure for both, run in a worker thread.
"""

import time
from dataclasses import dataclass, field


class DeviceError(Exception):
    """The device failed or vanished (USB error, timeout, unplugged)."""


@dataclass
class DeviceInfo:
    """Facts read once at connect time, handed to the reactor side."""
    serial: str
    model: str
    pixels: int
    saturation: int
    min_time: int                    # ms
    max_time: int                    # ms
    wavelength_coefficients: list
    dark_pixels: list = field(default_factory=list)
    nonlinearity: list = field(default_factory=list)   # raw counts, ascending
    has_tec: bool = False
    #: what the backend reports per raw ADC count (pixels = raw x this):
    #: pyseabreeze's 65535 / the EEPROM saturation level on a USB2000+ or
    #: Flame-S, 1.0 elsewhere; None where the backend does not tell
    counts_scale: float | None = 1.0


@dataclass
class Reading:
    """One spectrum as it left the device, with the conditions it had."""
    pixels: list
    integration_time: int            # ms
    started: float                   # time.monotonic() at integration start
    temperature: float | None = None # °C, read just after the integration
    temperature_before: float | None = None  # °C, read just before it began
    acquisitions: int = 1            # reads it took, stale ones included
    # the cooler's state at the acquisition (filled in by the front)
    tec_enabled: bool = False
    set_point: float | None = None   # °C


def acquire_clean(device, ms, idle_ms):
    """Read one spectrum at ``ms`` that began after this call (thread side).

    Detectors free-run: the integration in progress when we ask began
    earlier (before the shutter opened, or at another integration time) and
    is stale. Between acquisitions the device idles at its minimum
    integration time, so the stale read costs at most one ``idle_ms``; the
    idle time is re-armed while the clean integration runs, so it applies
    from the integration after it. Devices that report when an integration
    began (the simulator) are checked; others follow the same two reads.
    A device that knows a better way for its model (buffers, metadata: the
    seabreeze driver) has its own ``acquire(ms, idle_ms)``.
    """
    own = getattr(device, "acquire", None)
    if own is not None:
        return own(ms, idle_ms)
    # the device's own clock when it has one (a simulated device in
    # simulated time), else this thread's
    not_before = getattr(device, "monotonic", time.monotonic)()
    device.set_integration_time(ms)
    pending = ms           # the time the next integration to start will use
    reads = 0
    while True:
        pixels, started, duration = device.read()
        reads += 1
        if started is None:                      # real device: no timing info
            if reads == 1:
                device.set_integration_time(idle_ms)
                continue
            return Reading(pixels, ms, not_before, acquisitions=reads)
        if duration == ms and started >= not_before:
            if pending != idle_ms:
                device.set_integration_time(idle_ms)
            return Reading(pixels, ms, started, acquisitions=reads)
        if reads >= 8:
            raise DeviceError("no clean spectrum after 8 reads: the device does "
                              "not apply the integration time")
        # stale: the integration now running started with ``pending``
        if pending == ms:
            # it is the clean one; arm the idle time for the one after it
            pending = idle_ms
        else:
            pending = ms
        device.set_integration_time(pending)
