"""USB2000+ / Flame-S over the OOI (Ocean Optics Interface) protocol.

As the USB2000+ data sheet describes the device: commands are single bulk
transfers to EP1 OUT whose first byte is the command; answers to queries
come on EP1 IN; spectra on EP2 IN (high speed). Commands modelled:

- 0x01 initialize: default settings (integration time, trigger mode)
- 0x02 set integration time: 32-bit microseconds, LSB first; it applies
  from the next integration (the one in progress keeps its time)
- 0x03 lamp enable, 0x6A write FPGA register
- 0x0A trigger mode: 0 normal and 1 software integrate as before; the
  external modes (2-4) wait for a trigger input nothing drives here, so a
  spectrum request is never answered
- 0x05 query information: EEPROM slot n -> 17 bytes: 0x05, n, 15 bytes of
  ASCII, zero-terminated (slot 0 serial, 1-4 wavelength coefficients,
  6-13 nonlinearity coefficients, 14 nonlinearity order, 17 with the
  saturation level in data bytes 4-5, binary, LSB first). The detector
  saturates at that level (62,000 counts by default; 0 means not set: the
  ADC's full scale, 65,535); seabreeze reads it and scales every pixel by
  65535 / level, so that saturation reads 65,535 whatever the device
- 0x06 write information: slot n <- 15 bytes
- 0x09 request spectrum: the integration in progress when the request
  arrives is transmitted when it completes: 2048 pixels as 16-bit LSB-first
  words (4096 bytes) followed by the sync byte 0x69
- 0x6B read FPGA register -> 3 bytes: register, value LSB, value MSB
  (register 0x04: FPGA firmware version, major in the top nibble)
- 0xFE query status -> 16 bytes: pixels (2), integration time us (4),
  lamp, trigger mode, acquisition status, packets per spectrum, power
  down, packet count, reserved x2, USB speed (0x80 high), reserved

A command the device does not know, or one of the wrong length, gets no
answer at all: the host's read times out.
"""

import struct
import time

from .bus import EmulatedDevice
from .detector import Detector

SYNC = 0x69


class USB2000Plus(EmulatedDevice):
    product_id = 0x101E
    endpoints = ((0x01, 64), (0x02, 512), (0x81, 64), (0x82, 512), (0x86, 512))
    sim_model = "FLAME-S"
    firmware = 0x2104             # FPGA v2.1.4: a USB2000+
    pixels = 2048
    min_micros = 1000
    max_micros = 655350000
    default_micros = 100000
    #: where the detector saturates, in raw counts (EEPROM slot 17)
    default_saturation = 62000
    FULL_SCALE = 0xFFFF            # the 16-bit ADC
    FREE_RUNNING = (0, 1)
    LENGTHS = {0x01: 1, 0x02: 5, 0x03: 3, 0x05: 2, 0x06: 17, 0x09: 1,
               0x0A: 3, 0x6A: 4, 0x6B: 2, 0xFE: 1}

    def __init__(self, serial, optics, time_scale=1.0):
        super().__init__(serial)
        self.detector = Detector(serial, optics, self.sim_model, time_scale,
                                 self.default_micros)
        spec = self.detector.sim.spec
        self.eeprom = {0: serial}
        for i, c in enumerate(spec["coefficients"]):
            self.eeprom[1 + i] = f"{c:.7g}"
        nl = [0.9912, 2.01e-6, -1.23e-11, 4.1e-17, 0.0, 0.0, 0.0, 0.0]
        for i, c in enumerate(nl):
            self.eeprom[6 + i] = f"{c:.6g}"
        self.eeprom[14] = "3"             # order of the nonlinearity polynomial
        self.eeprom[17] = struct.pack("<HHH", 0, 0, self.default_saturation)  # binary slot
        self.registers = {}
        self.power_up()

    def power_up(self):
        self._reset_io()
        self.detector.power_up(self.default_micros)
        self.trigger_mode = 0
        self.lamp = 0
        self.registers = {0x04: self.firmware, 0x08: 0, 0x0C: 0}

    # -- commands ---------------------------------------------------------

    def handle_write(self, ep, data):
        if ep not in (0x01, 0x02) or not data:
            return
        command = data[0]
        if self.LENGTHS.get(command) != len(data):
            return                         # unknown or malformed: no answer
        getattr(self, f"cmd_{command:02x}")(data)

    def cmd_01(self, data):                # initialize
        self.detector.set_micros(self.default_micros)
        self.lamp = 0
        self._set_trigger_mode(0)

    def cmd_02(self, data):                # integration time, us
        (micros,) = struct.unpack_from("<I", data, 1)
        if self.min_micros <= micros <= self.max_micros:
            self.detector.set_micros(micros)

    def cmd_03(self, data):
        (self.lamp,) = struct.unpack_from("<H", data, 1)

    def cmd_0a(self, data):
        self._set_trigger_mode(struct.unpack_from("<H", data, 1)[0])

    def _set_trigger_mode(self, mode):
        """Normal (0) and software (1) modes integrate on their own; the
        external ones (2 synchronisation, 3 hardware, 4 single shot) wait
        for a trigger input, which nothing drives here: a spectrum request
        is then never answered."""
        self.detector.advance(time.monotonic())
        self.trigger_mode = mode
        if mode in self.FREE_RUNNING:
            self.detector.restart()
        else:
            self.detector.stop()

    def cmd_6a(self, data):
        register, value = struct.unpack_from("<BH", data, 1)
        if register != 0x04:               # the version is read-only
            self.registers[register] = value

    def cmd_6b(self, data):
        register = data[1]
        value = self.registers.get(register, 0)
        self.reply(0x81, struct.pack("<BH", register, value))

    def cmd_05(self, data):                # query information (EEPROM slot)
        slot = data[1]
        value = self.eeprom.get(slot, "")
        raw = value if isinstance(value, bytes) else value.encode("ascii")
        raw = (raw + bytes(15))[:15]
        self.reply(0x81, bytes([0x05, slot]) + raw)

    def cmd_06(self, data):                # write information
        slot = data[1]
        if slot == 17:                     # binary
            self.eeprom[slot] = bytes(data[2:17])
        elif slot != 0:                    # the serial number is protected
            self.eeprom[slot] = bytes(data[2:17]).split(b"\0", 1)[0].decode(
                "ascii", "replace")

    def saturation(self):
        """The raw level the detector saturates at, from its EEPROM."""
        raw = self.eeprom.get(17, b"")
        raw = raw if isinstance(raw, bytes) else raw.encode("ascii")
        level = struct.unpack_from("<H", raw + bytes(6), 4)[0]
        return level or self.FULL_SCALE

    def cmd_fe(self, data):                # query status
        status = struct.pack("<HIBBBBBBBBBB", self.pixels, self.detector.next,
                             self.lamp, self.trigger_mode, 0, 8, 0, 0, 0, 0,
                             0x80, 0)
        self.reply(0x81, status)

    def cmd_09(self, data):                # request spectrum
        if self.trigger_mode not in self.FREE_RUNNING:
            return                         # waits for a trigger that never comes
        exposure = self.detector.in_progress(time.monotonic())

        def transmit():
            counts = self.detector.counts(exposure, saturation=self.saturation())
            self.last_counts = counts
            self.detector.finish(exposure)
            self.sent.append(exposure)
            return self.encode(counts)
        self.reply_at(0x82, exposure.end, transmit)

    def encode(self, counts):
        import numpy as np
        words = np.clip(counts, 0, 0xFFFF).astype("<u2").tobytes()
        return words + bytes([SYNC])


class FlameS(USB2000Plus):
    """The Flame-S: the same device with FPGA firmware 3 (seabreeze tells
    them apart by that version)."""
    firmware = 0x3104
