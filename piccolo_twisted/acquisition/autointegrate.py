"""Autointegration: the integration time that puts a spectrum's peak at a
target fraction of saturation. Pure functions and a small state machine;
numpy only, no reactor, no device.

Counts grow linearly with integration time (``peak = offset + rate * t``),
so two unsaturated probes give the line and one probe plus the dark-pixel
offset gives a first estimate: a good start converges in two or three
acquisitions. Saturated probes carry no rate information: the time is cut
by four and they are ignored.
"""

import numpy as np

TOLERANCE = 0.10          # accept a peak within +-10 % of the target
SATURATED = 0.97          # a peak above this fraction of saturation is clipped
MAX_STEPS = 8


def robust_peak(pixels, dark_pixels=()):
    """Highest level over the optical pixels, ignoring single hot pixels
    (the maximum of a 3-pixel running median)."""
    counts = np.asarray(pixels, dtype=float)
    mask = np.ones(counts.size, dtype=bool)
    if len(dark_pixels):
        mask[np.asarray(dark_pixels, dtype=int)] = False
    optical = counts[mask]
    if optical.size < 3:
        return float(optical.max()) if optical.size else 0.0
    stacked = np.vstack([optical[:-2], optical[1:-1], optical[2:]])
    return float(np.median(stacked, axis=0).max())


def dark_offset(pixels, dark_pixels=()):
    counts = np.asarray(pixels, dtype=float)
    if len(dark_pixels):
        return float(np.median(counts[np.asarray(dark_pixels, dtype=int)]))
    return float(np.percentile(counts, 1))


class AutoIntegration:
    """One channel on one device: feed it probes until ``done``.

    ``next_time`` is the integration time (ms) to probe next; ``state``
    ends as "s" (target reached, or the maximum time for weak light is
    impossible to beat) or "f"; ``result`` is the time to use.
    """

    def __init__(self, target_percent, saturation, t_min, t_max, t_start,
                 dark_pixels=()):
        self.target = target_percent / 100.0 * saturation
        self.saturation = saturation
        self.t_min, self.t_max = int(t_min), int(t_max)
        self.dark_pixels = list(dark_pixels)
        self.next_time = int(min(max(t_start, self.t_min), self.t_max))
        self.probes = []          # unsaturated (t, peak)
        self.steps = 0
        self.state = "n"
        self.result = None

    @property
    def done(self):
        return self.result is not None

    def _finish(self, state, t):
        self.state, self.result, self.next_time = state, int(t), None

    def give_up(self, t):
        """The probe failed (device gone): end as failed, keeping ``t``."""
        self._finish("f", t)

    def feed(self, t, pixels):
        """Take the probe at ``t`` ms; decide the next time or finish."""
        self.steps += 1
        peak = robust_peak(pixels, self.dark_pixels)
        if abs(peak - self.target) <= TOLERANCE * self.target:
            return self._finish("s", t)
        if peak >= SATURATED * self.saturation:
            if t <= self.t_min:
                return self._finish("f", self.t_min)
            nxt = max(self.t_min, t // 4)
        else:
            self.probes.append((t, peak, dark_offset(pixels, self.dark_pixels)))
            nxt = self._estimate()
            if nxt >= self.t_max and t >= self.t_max:
                # too little light: the longest time is the best there is
                return self._finish("f", self.t_max)
            if nxt <= self.t_min and t <= self.t_min:
                return self._finish("f", self.t_min)
        if self.steps >= MAX_STEPS:
            return self._finish("f", self._best())
        self.next_time = int(min(max(round(nxt), self.t_min), self.t_max))
        if self.next_time == t:
            # the estimate cannot move (a bound, or rounding): best effort
            return self._finish("f", t)

    def _estimate(self):
        pts = sorted({p[0]: p for p in self.probes}.values())
        if len(pts) >= 2:
            (t1, p1, _), (t2, p2, _) = pts[-2], pts[-1]
            rate = (p2 - p1) / (t2 - t1)
            offset = p2 - rate * t2
        else:
            t1, p1, offset = pts[-1]
            offset = min(offset, p1)
            rate = (p1 - offset) / t1
        if rate <= 0:
            return self.t_max
        return (self.target - offset) / rate

    def _best(self):
        if not self.probes:
            return self.t_min
        return min(self.probes, key=lambda p: abs(p[1] - self.target))[0]
