"""Blocking calls into seabreeze (>= 2); used from worker threads only.

Imported only when a real (not ``sim_``/``dummy_``) serial is configured:
seabreeze costs ~12 MiB of memory.

Every fact about a device comes from seabreeze's public API: model, limits,
saturation, wavelengths, ``f.spectrometer.get_electric_dark_pixel_indices()``,
``f.nonlinearity_coefficients``, ``f.thermo_electric`` (the backend decides
which features a model has: pyseabreeze's QE Pro has no TEC feature,
cseabreeze's has; ``has_tec`` says which).

Opening a device puts it in normal (free-running) trigger mode.

A spectrum is labelled with the integration time it was integrated at:

- a QE Pro under pyseabreeze reads its on-board buffer with the 32-byte
  metadata block (through seabreeze's OBP protocol object); before a
  clean acquisition the driver stops acquiring, clears the buffer, sets
  the time and starts again (OBP "abort", "clear buffers", "acquire into
  buffer"), so the first spectrum it then reads began after the request,
  and its label is the metadata's integration time;
- a device with a data-buffer feature but no metadata (cseabreeze's QE Pro)
  has its buffer cleared, then follows the two-read procedure below;
- a device without a buffer (USB2000+, Flame-S: a new integration time
  applies from the next integration; a spectrum request is answered with
  the integration in progress when it arrives) reads twice: the first read
  is the integration in progress at the request (stale), the second began
  after it. The idle time is set between the two reads, so the clean
  request must reach the device before the clean integration ends. The
  device's own facts prove it did: the stale integration was still running
  when the stale request was sent (at S), so the clean one ends after
  S + ms by the device's clock; a clean request whose USB write completed
  (the device has it) before S + ms was in time, whatever the host did
  before or after. Under pyseabreeze the driver sees when each write
  completes (it wraps the transport's ``write``); otherwise (cseabreeze) it
  judges by when the answer came: an answer sooner than ms + idle after
  the stale request cannot be the idle integration. When in doubt (a host
  stall of most of an integration) the spectrum is taken again at the
  requested time throughout.
"""

import struct
import threading
import time

from .device import DeviceError, DeviceInfo, Reading

# OBP (QE Pro data sheet): messages used outside seabreeze's feature classes
OBP_ABORT_ACQUISITION = 0x00100000
OBP_CLEAR_BUFFERS = 0x00100830
OBP_ACQUIRE_INTO_BUFFER = 0x00100902
OBP_GET_BUFFERED_SPECTRUM_META = 0x00100928
_OBP_HEADER = struct.Struct("<HHHHLL6sBB16sL")
_OBP_FOOTER = struct.Struct("<16sL")
_OBP_REQUEST_ACK, _OBP_NACK, _OBP_HW_EXCEPTION = 0x04, 0x08, 0x10

#: OOI "request spectrum": answered with the integration in progress
OOI_REQUEST_SPECTRUM = 0x09

#: models whose pyseabreeze spectrum read returns the OBP metadata block
_METADATA_MODELS = {"QEPRO"}

#: listing and opening, process-wide: seabreeze's device registry is shared
#: by every device's thread, and listing opens devices
_LOCK = threading.RLock()

#: shortest idle integration between acquisitions on devices read twice (ms);
#: also the margin by which a late clean answer is told from the idle one
IDLE_FLOOR_MS = 25

#: the part of nominal integration times a device is trusted to take at
#: least (its clock against the host's)
CLOCK_MARGIN = 0.999

#: most reads one clean acquisition may take before the device is declared
#: not to apply integration times
MAX_READS = 8


def obp_command(msg_type):
    """One OBP command without payload, asking for an acknowledgement."""
    header = _OBP_HEADER.pack(0xC0C1, 0x1100, _OBP_REQUEST_ACK, 0, msg_type, 0,
                              bytes(6), 0, 0, b"", _OBP_FOOTER.size)
    return header + _OBP_FOOTER.pack(bytes(16), 0xC2C3C4C5)


class _WriteClock:
    """Wraps a pyseabreeze transport's ``write``: when did the last write
    of each command byte complete (the device has received it)?"""

    def __init__(self, write):
        self.write = write
        self.completed = {}

    def __call__(self, data, *args, **kwargs):
        result = self.write(data, *args, **kwargs)
        if data:
            self.completed[bytes(data[:1])] = time.monotonic()
        return result

    def when(self, command):
        return self.completed.get(bytes([command]))


class SeabreezeDevice:
    """An Ocean Optics spectrometer opened by serial number."""

    def __init__(self, serial, time_scale=1.0):
        self.serial = serial
        #: device seconds per host second (emulated devices run faster)
        self.time_scale = time_scale
        self.spec = None
        self._tec = None
        self._buffer = None          # "metadata", "clear" or None
        self._running_micros = None  # what the device was last told
        self._writes = None          # _WriteClock of an OOI device under pyseabreeze

    def _call(self, fn, *args):
        """Every failure inside seabreeze (SeaBreezeError, USBError, a
        timeout, a backend error after an unplug) is a device failure."""
        if self.spec is None:
            raise DeviceError(f"{self.serial}: device not open")
        try:
            return fn(*args)
        except DeviceError:
            raise
        except Exception as e:
            raise DeviceError(f"{self.serial}: {type(e).__name__}: {e}") from e

    # -- open / close -----------------------------------------------------

    def open(self):
        """Open the device; a device that fails half-way is closed again,
        so that the next try does not find it "already opened"."""
        with _LOCK:
            return self._open()

    def _open(self):
        try:
            from seabreeze.spectrometers import Spectrometer
            devices = [d for d in _list_devices() if d.serial_number == self.serial]
        except Exception as e:     # no backend, USB error while listing
            raise DeviceError(f"{self.serial}: cannot open: {type(e).__name__}: {e}") from e
        if not devices:
            raise DeviceError(f"{self.serial}: cannot open: no such device attached")
        dev = devices[0]
        try:
            if dev.is_open:          # left open by an earlier, failed open
                dev.close()
            spec = Spectrometer(dev)
            self.spec = spec
            return self._facts(spec)
        except Exception as e:
            self.spec = None
            try:
                dev.close()
            except Exception:
                pass
            if isinstance(e, DeviceError):
                raise
            raise DeviceError(f"{self.serial}: cannot open: {type(e).__name__}: {e}") from e

    def _facts(self, spec):
        import numpy as np
        # normal (free-running) trigger mode: a device keeps its mode while
        # powered, and one left waiting for an external trigger by another
        # program would time out every acquisition (a model without trigger
        # modes refuses the call: nothing to reset)
        from seabreeze.spectrometers import SeaBreezeError
        try:
            spec.trigger_mode(0)
        except SeaBreezeError:
            pass
        lo, hi = spec.integration_time_micros_limits
        wl = np.asarray(spec.wavelengths(), dtype=float)
        idx = np.arange(len(wl), dtype=float)
        coefficients = np.polynomial.polynomial.polyfit(idx, wl, 3).tolist()
        dark = [int(i) for i in spec.f.spectrometer.get_electric_dark_pixel_indices()]
        nonlinearity = []
        nl = spec.f.nonlinearity_coefficients
        if nl is not None:
            try:
                nonlinearity = [float(c) for c in nl.get_nonlinearity_coefficients()]
            except Exception:
                nonlinearity = []
        self._tec = spec.f.thermo_electric
        self._buffer = None
        if spec.model in _METADATA_MODELS and self._obp(spec) is not None:
            self._buffer = "metadata"
        elif getattr(spec.f, "data_buffer", None) is not None:
            self._buffer = "clear"
        self._running_micros = None
        self._writes = self._write_clock(spec) if self._buffer is None else None
        return DeviceInfo(serial=self.serial, model=spec.model,
                          pixels=len(wl), saturation=int(round(spec.max_intensity)),
                          min_time=max(1, -(-int(lo) // 1000)),
                          max_time=_longest_ms(hi),
                          wavelength_coefficients=coefficients,
                          dark_pixels=dark, nonlinearity=nonlinearity,
                          has_tec=self._tec is not None,
                          counts_scale=self._counts_scale(spec))

    @staticmethod
    def _counts_scale(spec):
        """What ``intensities()`` reports per raw count: pyseabreeze scales
        a USB2000+'s or Flame-S's counts by 65535 / the saturation level in
        its EEPROM (slot 17) and keeps the factor on its spectrometer
        feature (1.0 on the others); cseabreeze does the same inside
        libseabreeze without telling: None (unknown)."""
        scale = getattr(spec.f.spectrometer, "_normalization_value", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
            return float(scale)
        return None

    @staticmethod
    def _write_clock(spec):
        """Time the writes of an OOI device's transport (pyseabreeze)."""
        try:
            from seabreeze.pyseabreeze.protocol import OOIProtocol
        except ImportError:
            return None
        protocol = getattr(spec.f.spectrometer, "protocol", None)
        transport = getattr(protocol, "transport", None)
        if not isinstance(protocol, OOIProtocol) or not callable(getattr(transport, "write", None)):
            return None
        write = transport.write
        if isinstance(write, _WriteClock):
            return write
        clock = _WriteClock(write)
        transport.write = clock
        return clock

    @staticmethod
    def _obp(spec):
        """pyseabreeze's OBP protocol object and raw USB access, if any."""
        raw = getattr(spec.f, "raw_usb_bus_access", None)
        protocol = getattr(spec.f.spectrometer, "protocol", None)
        if raw is None or protocol is None:
            return None
        try:
            from seabreeze.pyseabreeze.protocol import OBPProtocol
        except ImportError:
            return None
        return (protocol, raw) if isinstance(protocol, OBPProtocol) else None

    def close(self):
        spec, self.spec = self.spec, None
        if spec is not None:
            try:
                spec.close()
            except Exception:
                pass

    # -- acquisition ------------------------------------------------------

    def set_integration_time(self, ms):
        micros = int(round(ms * 1000))
        self._call(lambda: self.spec.integration_time_micros(micros))
        self._running_micros = micros

    def read(self):
        """One spectrum as seabreeze reports it, rounded to whole counts
        (never truncated): a USB2000+ or Flame-S reports raw counts scaled
        by 65535 / the saturation level in its EEPROM (pyseabreeze and
        cseabreeze alike), so that saturation is 65,535 on every device;
        a truncated 65,534.99 would hide a saturated pixel."""
        import numpy as np
        counts = self._call(lambda: self.spec.intensities())
        return np.rint(counts).astype(np.int64).tolist(), None, None

    def acquire(self, ms, idle_ms):
        """One spectrum at ``ms`` that began after this call (a Reading)."""
        not_before = time.monotonic()
        if self._buffer == "metadata":
            return self._acquire_metadata(ms, idle_ms, not_before)
        # idle at no less than IDLE_FLOOR_MS: the read that follows a new
        # integration time must find the idle integration still running, or
        # it waits for (and throws away) a whole one at ``ms``; a host easily
        # takes more than 1 ms between two USB commands
        idle_ms = max(idle_ms, min(ms, IDLE_FLOOR_MS))
        self.set_integration_time(ms)
        if self._buffer == "clear":
            self._call(self.spec.f.data_buffer.clear)
        # the integration in progress at the request is stale; the one
        # after it runs at ``ms``; the idle time is set for the one after
        # that, before asking for the clean one -- which must still be in
        # progress when asked for, or the answer is the idle integration
        if idle_ms == ms:
            self.read()
            pixels, _, _ = self.read()
            return Reading(pixels, ms, not_before, acquisitions=2)
        seconds = self.time_scale / 1000.0
        stale_asked = time.monotonic()
        self.read()
        self.set_integration_time(idle_ms)
        pixels, _, _ = self.read()
        answered = time.monotonic()
        writes = self._writes
        requested = writes.when(OOI_REQUEST_SPECTRUM) if writes is not None else None
        if requested is not None:
            # the clean request reached the device before stale_asked + ms,
            # when the clean integration was still running (it began after
            # stale_asked): the answer is the clean integration
            if requested - stale_asked < CLOCK_MARGIN * ms * seconds:
                return Reading(pixels, ms, not_before, acquisitions=2)
        elif answered - stale_asked < CLOCK_MARGIN * (ms + idle_ms) * seconds:
            # no write times: an answer sooner than ms + idle after the
            # stale request cannot be the idle integration
            return Reading(pixels, ms, not_before, acquisitions=2)
        # the host was too slow to be sure: integrate at ``ms`` throughout,
        # take the next complete one, and only then go back to idling
        self.set_integration_time(ms)
        self.read()
        pixels, _, _ = self.read()
        self.set_integration_time(idle_ms)
        return Reading(pixels, ms, not_before, acquisitions=5)

    def _obp_send(self, msg_type):
        protocol, raw = self._obp(self.spec)

        def exchange():
            raw.raw_usb_write(obp_command(msg_type), "primary_out")
            answer = raw.raw_usb_read("primary_in", 64)
            if len(answer) < _OBP_HEADER.size:
                raise DeviceError(f"{self.serial}: short OBP reply to 0x{msg_type:08x}")
            head = _OBP_HEADER.unpack_from(answer)
            if head[0] != 0xC0C1 or head[2] & (_OBP_NACK | _OBP_HW_EXCEPTION):
                raise DeviceError(f"{self.serial}: OBP 0x{msg_type:08x} refused "
                                  f"(error {head[3]})")
        self._call(exchange)

    def _acquire_metadata(self, ms, idle_ms, not_before):
        import numpy as np
        micros = int(round(ms * 1000))
        protocol, _ = self._obp(self.spec)
        # stop, empty the buffer, set the time, start: the next spectrum
        # in the buffer is integrated from now on at ``micros``
        self._obp_send(OBP_ABORT_ACQUISITION)
        self._obp_send(OBP_CLEAR_BUFFERS)
        self.set_integration_time(ms)
        self._obp_send(OBP_ACQUIRE_INTO_BUFFER)
        timeout = int(ms) + 1000
        for reads in range(1, MAX_READS + 1):
            data = self._call(protocol.query, OBP_GET_BUFFERED_SPECTRUM_META,
                              (), timeout)
            if len(data) < 32:
                raise DeviceError(f"{self.serial}: short spectrum ({len(data)} bytes)")
            taken = struct.unpack_from("<L", data, 12)[0]
            if reads == 1 and idle_ms != ms:
                # the spectrum after this one idles (from the next integration)
                self.set_integration_time(idle_ms)
            if taken != micros:
                continue
            counts = np.frombuffer(data, dtype="<u4", offset=32)
            label = taken // 1000 if taken % 1000 == 0 else taken / 1000.0
            return Reading(counts.astype("int64").tolist(), label,
                           not_before, acquisitions=reads)
        raise DeviceError(f"{self.serial}: no spectrum at {ms} ms after "
                          f"{MAX_READS} reads")

    # -- TEC --------------------------------------------------------------

    def temperature(self):
        if self._tec is None:
            raise DeviceError(f"{self.serial}: no thermo-electric cooler")
        return float(self._call(self._tec.read_temperature_degrees_celsius))

    def set_tec(self, enabled, target):
        if self._tec is None:
            raise DeviceError(f"{self.serial}: no thermo-electric cooler")
        self._call(self._tec.set_temperature_setpoint_degrees_celsius, float(target))
        self._call(self._tec.enable_tec, bool(enabled))


def _longest_ms(hi_micros):
    """The longest whole millisecond seabreeze sets: pyseabreeze takes
    ``t_min <= t < t_max`` (its maximum itself is refused, SeaBreezeError),
    so a limit on a millisecond boundary gives the one before it."""
    return (int(hi_micros) - 1) // 1000


def _list_devices():
    """seabreeze's devices. Listing opens every device that is not open to
    read its serial number; when that open fails half-way (pyseabreeze),
    the device stays open with no serial number and every later listing
    skips it: such devices are closed and the bus listed again. Callers
    hold ``_LOCK`` (no open of ours is half-way while we look)."""
    from seabreeze.spectrometers import list_devices
    try:
        devices = list_devices()
    except Exception as first:
        try:
            devices = list_devices()
        except Exception:
            raise first from None
    stale = [d for d in devices if d.is_open and d.serial_number in ("?", "")]
    if not stale:
        return devices
    for d in stale:
        try:
            d.close()
        except Exception:
            pass
    return list_devices()


def list_devices():
    """(model, serial) of every attached spectrometer; [] without backend."""
    with _LOCK:
        return [(d.model, d.serial_number) for d in _list_devices()]
