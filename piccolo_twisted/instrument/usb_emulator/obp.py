"""QE Pro over OBP (the Ocean Binary Protocol), as its data sheet has it.

Framing, both ways (little-endian)::

    0  start bytes 0xC1 0xC0        22 checksum type (0 none, 1 MD5)
    2  protocol version 0x1100      23 immediate data length (0-16)
    4  flags                        24 immediate data (16 bytes)
    6  error number                 40 bytes remaining (payload + 20)
    8  message type (32 bits)       44 payload (when more than 16 bytes)
    12 regarding (32 bits)          .. checksum (16 bytes: MD5 or zeros)
    16 reserved (6 bytes)           .. footer 0xC5 0xC4 0xC3 0xC2

Flags: 0x01 response, 0x02 ACK, 0x04 ACK requested, 0x08 NACK, 0x10
hardware exception, 0x20 deprecated. A request the device cannot carry
out gets a NACK with an error number (1 bad protocol/framing, 2 unknown
message type, 3 bad checksum, 4 too large, 5 payload length wrong,
6 payload invalid, 8 unknown checksum type, 12 no such information);
a command that asked for an ACK gets one; a query gets its answer.

The spectrum path is the QE Pro's buffer: the detector free-runs and
every completed integration goes into an on-board FIFO holding up to
``buffer size`` spectra (settable up to 100000); when it is full, new
spectra are not stored. "Get buffered spectrum with metadata" takes the
oldest one out (waiting for the next integration to complete when the
buffer is empty); "clear buffers" empties it; "abort acquisition" stops
acquiring and "acquire into buffer" starts again. In the external
trigger modes (1-3) nothing is integrated: no trigger input is driven. Every buffered spectrum
carries the 32-byte metadata block: spectrum count (u32), tick count in
microseconds (u64, at the start of the integration), integration time in
microseconds (u32), reserved (u16), trigger mode (u8), reserved (13),
then 1044 pixels as u32.
"""

import hashlib
import struct
import time
from collections import deque

from .bus import EmulatedDevice
from .detector import Detector

HEADER = struct.Struct("<HHHHLL6sBB16sL")
FOOTER = struct.Struct("<16sL")
START = 0xC0C1
VERSION = 0x1100
END = 0xC2C3C4C5

RESPONSE, ACK, ACK_REQUESTED, NACK = 0x01, 0x02, 0x04, 0x08

E_PROTOCOL, E_UNKNOWN, E_CHECKSUM, E_TOO_LARGE, E_LENGTH, E_INVALID, \
    E_CHECKSUM_TYPE, E_NO_INFO = 1, 2, 3, 4, 5, 6, 8, 12

MAX_MESSAGE = 64 * 1024


class ObpError(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.code = code


def frame(msg_type, data=b"", flags=0, error=0, regarding=0):
    """One OBP message (no checksum)."""
    if len(data) <= 16:
        header = HEADER.pack(START, VERSION, flags, error, msg_type, regarding,
                             bytes(6), 0, len(data), data, 20)
        return header + FOOTER.pack(bytes(16), END)
    header = HEADER.pack(START, VERSION, flags, error, msg_type, regarding,
                         bytes(6), 0, 0, b"", 20 + len(data))
    return header + data + FOOTER.pack(bytes(16), END)


class QEPro(EmulatedDevice):
    product_id = 0x4004
    endpoints = ((0x01, 64), (0x81, 64))
    sim_model = "QE-PRO"
    pixels = 1044
    min_micros = 8000
    max_micros = 1600000000
    default_micros = 100000
    max_buffer = 100000
    default_buffer = 100
    firmware = (1, 6, 0)

    def __init__(self, serial, optics, time_scale=1.0):
        super().__init__(serial)
        self.detector = Detector(serial, optics, self.sim_model, time_scale,
                                 self.default_micros, full_scale=2 ** 18 - 1)
        spec = self.detector.sim.spec
        self.wavelength = [float(c) for c in spec["coefficients"]]
        self.nonlinearity = [0.9912, 2.01e-6, -1.23e-11, 4.1e-17,
                             0.0, 0.0, 0.0, 0.0]
        self.rx = bytearray()
        self.handlers = {
            # type: (payload length or None for any, handler)
            0x00000100: (0, self.get_serial),
            0x00000101: (0, self.get_serial_length),
            0x00000080: (0, lambda p: struct.pack("<B", 1)),
            0x00000090: (0, lambda p: struct.pack("<BBB", *self.firmware)),
            0x00100000: (0, self.abort),
            0x00100800: (0, self.get_buffer_size),          # older name
            0x00100820: (0, lambda p: struct.pack("<L", self.max_buffer)),
            0x00100822: (0, self.get_buffer_size),
            0x00100832: (4, self.set_buffer_size),
            0x00100830: (0, self.clear_buffer),
            0x00100900: (0, self.get_buffered_count),
            0x00100902: (0, self.start_buffering),
            0x00100908: (0, lambda p: struct.pack("<B", 0 if self.detector.running else 1)),
            0x00100928: (0, self.get_buffered_spectrum),
            0x00110000: (0, lambda p: struct.pack("<L", self.detector.next)),
            0x00110010: (4, self.set_integration_time),
            0x00110100: (0, lambda p: struct.pack("<B", self.trigger_mode)),
            0x00110110: (1, self.set_trigger_mode),
            0x00180100: (0, lambda p: struct.pack("<B", len(self.wavelength))),
            0x00180101: (1, self.get_wavelength_coefficient),
            0x00181100: (0, lambda p: struct.pack("<B", len(self.nonlinearity))),
            0x00181101: (1, self.get_nonlinearity_coefficient),
            0x00400000: (0, lambda p: struct.pack("<B", 3)),
            0x00400002: (0, self.read_temperatures),
            0x00420000: (0, lambda p: struct.pack("<B", int(self.tec_on))),
            0x00420001: (0, lambda p: struct.pack("<f", self.tec_setpoint)),
            0x00420003: (0, self.tec_stable),
            0x00420004: (0, lambda p: struct.pack("<f", self.temperature())),
            0x00420010: (1, self.enable_tec),
            0x00420011: (4, self.set_tec_setpoint),
        }
        self.power_up()

    def power_up(self):
        self._reset_io()
        self.rx = bytearray()
        self.detector.power_up(self.default_micros)
        self.buffer = deque()
        self.buffer_size = self.default_buffer
        self.trigger_mode = 0
        self.acquiring = True        # "abort" clears it, "acquire into buffer" sets it
        self.tec_on = False
        self.tec_setpoint = 20.0
        self._temp_at = (time.monotonic(), 22.0)

    # -- the buffer -------------------------------------------------------

    def _fill(self):
        def keep(exposure):
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(exposure)
            return len(self.buffer) < self.buffer_size
        self.detector.advance(time.monotonic(), keep)

    def retry_when(self, now):
        # a waiting spectrum request wakes when the running integration ends
        self._fill()
        if not self.detector.running:
            return now + 0.02
        return self.detector.start + self.detector.seconds(self.detector.current)

    # -- framing ----------------------------------------------------------

    def handle_write(self, ep, data):
        self.rx += data
        while len(self.rx) >= HEADER.size:
            head = HEADER.unpack_from(self.rx)
            start, remaining = head[0], head[10]
            if start != START:
                self.rx.clear()
                self.nack(0, 0, E_PROTOCOL)
                return
            if remaining < FOOTER.size or HEADER.size + remaining > MAX_MESSAGE:
                self.rx.clear()
                self.nack(head[4], head[5], E_TOO_LARGE)
                return
            total = HEADER.size + remaining
            if len(self.rx) < total:
                return                       # the rest comes in later transfers
            message = bytes(self.rx[:total])
            del self.rx[:total]
            self.handle_message(message)

    def handle_message(self, message):
        (_, version, flags, _, msg_type, regarding, _, checksum_type,
         immediate_length, immediate, _) = HEADER.unpack_from(message)
        body = message[HEADER.size:-FOOTER.size]
        checksum, footer = FOOTER.unpack_from(message, len(message) - FOOTER.size)
        try:
            if version != VERSION or footer != END:
                raise ObpError(E_PROTOCOL)
            if checksum_type == 1:
                if hashlib.md5(message[:-FOOTER.size]).digest() != checksum:
                    raise ObpError(E_CHECKSUM)
            elif checksum_type != 0:
                raise ObpError(E_CHECKSUM_TYPE)
            if immediate_length > 16 or (immediate_length and body):
                raise ObpError(E_LENGTH)
            payload = immediate[:immediate_length] if immediate_length else body
            if msg_type not in self.handlers:
                raise ObpError(E_UNKNOWN)
            length, handler = self.handlers[msg_type]
            if length is not None and len(payload) != length:
                raise ObpError(E_LENGTH)
            result = handler(payload)
        except ObpError as e:
            self.nack(msg_type, regarding, e.code)
            return
        if callable(result):                 # answered later
            self.reply_at(0x81, time.monotonic(), lambda: self._later(
                result, msg_type, regarding, flags))
        elif result is not None:
            answer = RESPONSE | (ACK if flags & ACK_REQUESTED else 0)
            self.reply(0x81, frame(msg_type, result, answer, regarding=regarding))
        elif flags & ACK_REQUESTED:
            self.reply(0x81, frame(msg_type, b"", RESPONSE | ACK, regarding=regarding))

    def _later(self, producer, msg_type, regarding, flags):
        data = producer()
        if data is None:
            return None
        answer = RESPONSE | (ACK if flags & ACK_REQUESTED else 0)
        return frame(msg_type, data, answer, regarding=regarding)

    def nack(self, msg_type, regarding, code):
        self.reply(0x81, frame(msg_type, b"", RESPONSE | NACK, error=code,
                               regarding=regarding))

    # -- messages ---------------------------------------------------------

    def get_serial(self, payload):
        return self.serial.encode("ascii")[:16]

    def get_serial_length(self, payload):
        return struct.pack("<B", len(self.serial.encode("ascii")[:16]))

    def set_integration_time(self, payload):
        (micros,) = struct.unpack("<L", payload)
        if not self.min_micros <= micros <= self.max_micros:
            raise ObpError(E_INVALID)
        self._fill()                 # what completed so far ran at the old time
        self.detector.set_micros(micros)

    def set_trigger_mode(self, payload):
        if payload[0] not in (0, 1, 2, 3):
            raise ObpError(E_INVALID)
        self._fill()
        self.trigger_mode = payload[0]
        self._run_or_wait()

    def _run_or_wait(self):
        """The detector free-runs while acquiring in normal trigger mode
        (0); the external modes (1 level, 2 synchronisation, 3 edge) wait
        for a trigger input, which nothing drives here."""
        if self.acquiring and self.trigger_mode == 0:
            self.detector.restart()
        else:
            self.detector.stop()

    def get_wavelength_coefficient(self, payload):
        i = payload[0]
        if i >= len(self.wavelength):
            raise ObpError(E_NO_INFO)
        return struct.pack("<f", self.wavelength[i])

    def get_nonlinearity_coefficient(self, payload):
        i = payload[0]
        if i >= len(self.nonlinearity):
            raise ObpError(E_NO_INFO)
        return struct.pack("<f", self.nonlinearity[i])

    def get_buffer_size(self, payload):
        return struct.pack("<L", self.buffer_size)

    def set_buffer_size(self, payload):
        (size,) = struct.unpack("<L", payload)
        if not 1 <= size <= self.max_buffer:
            raise ObpError(E_INVALID)
        self._fill()
        self.buffer_size = size
        while len(self.buffer) > size:
            self.buffer.pop()

    def clear_buffer(self, payload):
        self._fill()
        self.buffer.clear()

    def get_buffered_count(self, payload):
        self._fill()
        return struct.pack("<L", len(self.buffer))

    def abort(self, payload):
        self._fill()
        self.acquiring = False
        self._run_or_wait()

    def start_buffering(self, payload):
        self.acquiring = True
        self._run_or_wait()

    def get_buffered_spectrum(self, payload):
        def produce():
            self._fill()
            if not self.buffer:
                return None
            return self.encode(self.buffer.popleft())
        return produce

    def encode(self, exposure):
        import numpy as np
        counts = self.detector.counts(exposure)
        self.last_counts = counts
        self.sent.append(exposure)
        meta = struct.pack("<LQLHB13s", exposure.number & 0xFFFFFFFF,
                           self.detector.ticks(exposure.start), exposure.micros,
                           0, self.trigger_mode, bytes(13))
        return meta + np.clip(counts, 0, 0xFFFFFFFF).astype("<u4").tobytes()

    # -- temperatures and the TEC ----------------------------------------

    def temperature(self):
        t0, temp0 = self._temp_at
        target = self.tec_setpoint if self.tec_on else 22.0
        dt = (time.monotonic() - t0) / max(self.detector.sim.time_scale, 1e-6)
        return round(target + (temp0 - target) * 2.718281828 ** (-dt / 20.0), 2)

    def _retarget(self):
        self._temp_at = (time.monotonic(), self.temperature())

    def enable_tec(self, payload):
        self._retarget()
        self.tec_on = bool(payload[0])

    def set_tec_setpoint(self, payload):
        (target,) = struct.unpack("<f", payload)
        if not -60.0 <= target <= 40.0:
            raise ObpError(E_INVALID)
        self._retarget()
        self.tec_setpoint = target

    def tec_stable(self, payload):
        return struct.pack("<B", int(abs(self.temperature() - self.tec_setpoint) < 0.1))

    def read_temperatures(self, payload):
        return struct.pack("<fff", self.temperature(), 25.0, 24.0)
