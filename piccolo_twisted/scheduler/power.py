"""The power window: switching the spectrometers off during quiet time.

A small state machine over the instrument's lease. The window is
``[quietStart + powerDelay, quietEnd - powerDelay)`` while quietTimeEnabled
and powerOffEnabled are both true (a quiet time shorter than twice the
delay leaves the spectrometers on). There are two things to do:

- **off**: inside the window, unless this process has switched them off
  already (at the window's start, when the flags are set or the window
  moved over now, after a restart inside it -- a restart may have powered
  the switches; not again when an operator switched them on meanwhile);
- **on**: outside the window, when the window had switched them off (the
  durable ``switched_off`` flag: also after a restart, a clock jump, the
  flags cleared or the window moved away).

Either takes the lease first (a running batch is waited for; nothing
checks "busy" and acts later), decides again with the lease held, and
then: off writes ``switched_off`` (never off without the record that
brings them on again), switches, and checks that every switchable
spectrometer is powered off; on switches, checks that none is, and clears
the flag. A change that fails, or is answered anything but done ("busy":
a read still running), leaves the state as it was: it is tried again
``RETRY`` seconds later, until it succeeds; the fault says why meanwhile.
"""

import json

from twisted.internet import defer
from twisted.logger import Logger

from ..errors import PiccoloError
from .calendar import iso, power_window, quiet_window
from .database import SET_STATE


def switchable(spectrometers):
    """The spectrometers a power change acts on: those with a power switch
    (simulated ones have a simulated switch)."""
    return [s for s in spectrometers
            if getattr(s, "power_pin", None) is not None
            or getattr(getattr(s, "config", None), "simulated", False)]


def all_switched(spectrometers, off):
    """Is every switchable spectrometer powered off (``off``), or none?"""
    from ..instrument.spectrometer import POWERED_OFF
    return all((s.status.value == POWERED_OFF) == off for s in switchable(spectrometers))


class PowerWindow:
    log = Logger()

    #: seconds before a failed power change is tried again
    RETRY = 60.0

    def __init__(self, store, spectrometers, lease, clock, wall, settings, changed):
        self.store = store
        self.spectrometers = spectrometers
        self.lease = lease
        self.clock = clock
        self.wall = wall
        self.settings = settings
        self.changed = changed            # something was done: plan again
        self._switched_here = False       # this process switched them off
        self._busy = None                 # the lease asked for, or a change under way
        self._retry_at = None             # clock time
        self._refused = None
        self.stopped = True

    def window(self, now):
        """``(off_from, on_at)`` of the window containing ``now`` or the
        next one, or None when there is none (flags, too short)."""
        s = self.settings
        if not (s["quietTimeEnabled"].value and s["powerOffEnabled"].value):
            return None
        delay = s["powerDelay"].value
        window = power_window(now, s["quietStart"].value, s["quietEnd"].value, delay)
        if window is None:
            start, end = quiet_window(now, s["quietStart"].value, s["quietEnd"].value)
            if start <= now < end and self._refused != start:
                self._refused = start
                self.log.warn("quiet time {start} to {end} is too short for a power "
                              "delay of {delay} s: spectrometers stay on",
                              start=iso(start), end=iso(end), delay=delay)
        return window

    def should_be_off(self, now):
        w = self.window(now)
        return w is not None and w[0] <= now < w[1]

    def _todo(self, now):
        """"off", "on" or None."""
        w = self.window(now)
        if w is not None and w[0] <= now < w[1]:
            return None if self._switched_here else "off"
        return "on" if self.store.switched_off else None

    def evaluate(self, now):
        if self.stopped or self._busy is not None or self._retry_in() is not None:
            return
        if self._todo(now) is None:
            return
        take = self._busy = self.lease.take("the power window")
        take.addCallback(self._granted)
        take.addErrback(lambda f: f.trap(defer.CancelledError))

    def _granted(self, token):
        # decided again with the lease held: the window may have moved on
        todo = self._todo(self.wall()) if not self.stopped else None
        if todo is None:
            self._busy = None
            token.release()
            return
        action = todo
        # busy until the change is over (it may be over at once)
        self._busy = token

        def over(result):
            self._busy = None
            token.release()
            self.changed()
            return result
        d = defer.Deferred.fromCoroutine(
            self._off() if action == "off" else self._on())
        d.addBoth(over)
        d.addErrback(lambda f: self.log.failure("the power window failed", f))

    async def _off(self):
        if not self.store.switched_off:
            try:
                await self.store.write([(SET_STATE, ("switched_off", "true"))],
                                       lambda: setattr(self.store, "switched_off", True))
            except PiccoloError as e:
                self._failed("quiet time power-off", f"not switched off: {e}")
                return
        self.log.info("quiet time: powering spectrometers off")
        try:
            result = await defer.maybeDeferred(self.spectrometers.power_off_all)
        except Exception as e:
            self._failed("quiet time power-off", e, failure=True)
            return
        if not all_switched(self.spectrometers, off=True):
            self._failed("quiet time power-off", result)
            return
        self._switched_here = True
        self._succeeded()

    async def _on(self):
        self.log.info("quiet time over: powering spectrometers on")
        try:
            result = await defer.maybeDeferred(self.spectrometers.power_on_all)
        except Exception as e:
            self._failed("quiet time power-on", e, failure=True)
            return
        if not all_switched(self.spectrometers, off=False):
            self._failed("quiet time power-on", result)
            return
        self._switched_here = False
        self.store.progress([(SET_STATE, ("switched_off", json.dumps(False)))],
                            lambda: setattr(self.store, "switched_off", False))
        self._succeeded()

    def _succeeded(self):
        self._retry_at = None
        self.store.set_fault("power", "")

    def _failed(self, what, why, failure=False):
        self._retry_at = self.clock.seconds() + self.RETRY
        if failure:
            self.log.failure("{what} failed (tried again in {delay:g} s)",
                             what=what, delay=self.RETRY)
        else:
            self.log.warn("{what} not done ({why}); tried again in {delay:g} s",
                          what=what, why=why, delay=self.RETRY)
        self.store.set_fault("power", f"{what} failed: {why}")

    def next_event(self, now):
        """The next wall time the window may want something done."""
        t = float("inf")
        w = self.window(now)
        if w is not None:
            for boundary in w:
                if boundary > now:
                    t = min(t, boundary)
        s = self.settings
        if s["quietTimeEnabled"].value and s["powerOffEnabled"].value:
            # the end of the quiet window now: after it, the next window
            t = min(t, quiet_window(now, s["quietStart"].value, s["quietEnd"].value)[1])
        wait = self._retry_in()
        if wait is not None:
            t = min(t, now + wait)
        return t

    def _retry_in(self):
        """Seconds until a failed change is tried again, or None."""
        if self._retry_at is None:
            return None
        wait = self._retry_at - self.clock.seconds()
        if wait <= 0:
            self._retry_at = None           # due: the next look tries
            return None
        return wait

    def stop(self):
        self.stopped = True
        busy = self._busy
        if isinstance(busy, defer.Deferred) and not busy.called:
            self._busy = None
            busy.cancel()           # a place in the lease's queue
