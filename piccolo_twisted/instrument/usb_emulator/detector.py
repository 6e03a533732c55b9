"""A free-running detector behind an emulated device.

Integrations follow each other back to back from power-on; a new
integration time applies from the next integration to start (the one in
progress keeps the time it began with). Each completed integration is an
``Exposure``; its counts are computed from the light of its own time window
by the physical simulator (``simulator.SimulatedSpectrometer``: optics,
dark offset, shot noise, saturation), so a light or dark spectrum comes out
as the shutters made it.
"""

import math
import time
import zlib
from dataclasses import dataclass

from ..simulator import SimulatedSpectrometer


@dataclass
class Exposure:
    number: int          # running count since power-on
    start: float         # monotonic seconds
    end: float
    micros: int          # integration time it ran at
    crc: int = None      # CRC-32 of its counts (int64), once read out


class Detector:
    def __init__(self, serial, optics, sim_model, time_scale, micros,
                 full_scale=None):
        self.sim = SimulatedSpectrometer(serial, optics, time_scale=time_scale,
                                         model=sim_model)
        if full_scale is not None:
            # counts clip where the device's ADC does
            self.sim.spec = dict(self.sim.spec, saturation=full_scale)
        self.power_up(micros)

    def power_up(self, micros):
        self.count = 0
        self.start = time.monotonic()
        self.current = micros          # the integration in progress
        self.next = micros             # the time the next one starts with
        self.running = True
        self.epoch = self.start        # tick zero of the device clock

    def seconds(self, micros):
        return self.sim._seconds(micros / 1000.0)

    def set_micros(self, micros):
        self.advance(time.monotonic())
        self.next = int(micros)

    def advance(self, now, keep=None):
        """Move the timeline to ``now``; every integration completed on the
        way is handed to ``keep(exposure)`` (which returns False once it
        wants no more: the rest are skipped without looping over them)."""
        if not self.running:
            return
        while True:
            duration = self.seconds(self.current)
            end = self.start + duration
            if end > now:
                return
            exposure = Exposure(self.count, self.start, end, self.current)
            self.count += 1
            self.start = end
            self.current = self.next
            wants = keep(exposure) if keep is not None else False
            if not wants:
                # skip the integrations nobody will see, in one step
                duration = self.seconds(self.current)
                if duration > 0 and self.start + duration <= now:
                    n = math.floor((now - self.start) / duration)
                    self.count += n
                    self.start += n * duration

    def in_progress(self, now):
        """The integration running at ``now`` (after advancing to it)."""
        self.advance(now)
        return Exposure(self.count, self.start,
                        self.start + self.seconds(self.current), self.current)

    def finish(self, exposure):
        """Advance past an exposure that has been read out (OOI devices)."""
        self.advance(exposure.end + 1e-9)

    def stop(self):
        self.running = False

    def restart(self):
        if not self.running:
            self.running = True
            self.start = time.monotonic()
            self.current = self.next

    def counts(self, exposure, saturation=None):
        """The pixel counts of one exposure (numpy int64 array), clipped
        where the detector saturates (``saturation``, raw counts) if given."""
        import numpy as np
        pixels = self.sim._spectrum(exposure.start, exposure.end,
                                    exposure.micros / 1000.0)
        counts = np.asarray(pixels, dtype=np.int64)
        if saturation is not None:
            counts = np.minimum(counts, saturation)
        exposure.crc = zlib.crc32(counts.tobytes())
        return counts

    def ticks(self, when):
        """The device clock (microseconds since power-on) at ``when``."""
        return int((when - self.epoch) * 1e6)
