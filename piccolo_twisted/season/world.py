"""The seeded world: when clients ask for things and when faults strike.

Each stream (a kind of client request, a kind of fault) draws from its own
``random.Random`` seeded from the season's seed and the stream's name, so
switching a fault kind off does not change what the others do: a failing
seed can be narrowed down with ``--faults``.
"""

import heapq
import math
import random

DAY = 86400.0

#: fault kinds (``--faults``): name -> what it does
FAULTS = {
    "crash": "the process dies (torn down without a stop, at any moment, "
             "mid-batch and mid-commit too) and is rebuilt from disk after a while",
    "clock": "the wall clock jumps forwards and backwards (NTP, PUT "
             "/sysinfo/clock); a reboot may come up at 1970 or at the last "
             "saved time until NTP fixes it",
    "unplug": "a spectrometer is unplugged for a while, sometimes mid-batch",
    "power": "power switches fail (GPIO errors) for a while; spectrometers "
             "read slowly so that power changes after an abort answer busy",
    "disk-full": "the disk is full for a while (spectrum files and, where "
                 "the scheduler's store takes it, SQLite writes fail)",
    "slow-commit": "SQLite commits take seconds to minutes for a while",
}


class World:
    """A queue of timed events, fed by Poisson streams."""

    def __init__(self, seed):
        self.seed = seed
        self._queue = []
        self._seq = 0
        self._rngs = {}

    def rng(self, name):
        r = self._rngs.get(name)
        if r is None:
            r = self._rngs[name] = random.Random(f"{self.seed}:{name}")
        return r

    def at(self, t, action, *args):
        self._seq += 1
        heapq.heappush(self._queue, (t, self._seq, action, args))

    def stream(self, name, per_day, action, start):
        """``action()`` at the events of a Poisson process of ``per_day``."""
        rng = self.rng(name)

        def fire():
            action()
            schedule(self.now)

        def schedule(t):
            self.at(t + rng.expovariate(per_day / DAY), fire)
        self.now = start
        schedule(start)

    def next_time(self):
        return self._queue[0][0] if self._queue else math.inf

    def pop(self):
        t, _, action, args = heapq.heappop(self._queue)
        self.now = t
        return action, args


def log_uniform(rng, lo, hi):
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))
