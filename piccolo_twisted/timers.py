"""Timers on the monotonic clock, whatever reactor twistd gives us.

Twisted's reactors (epoll, poll, select and asyncio alike) take
``reactor.seconds`` -- ``time.time``, the wall clock -- as the time base of
``callLater``: a DelayedCall's deadline is ``seconds() + delay`` and
``runUntilCurrent``/``timeout()`` compare it with ``seconds()`` again. On a
Pi without an RTC the wall clock jumps when NTP syncs or when a client sets
it (``PUT /sysinfo/clock``): one hour back stalls every pending timer for an
hour (scheduler tick, shutter pulses, batch delays, CoAP retransmissions,
reconnects), one hour forward fires them all at once.

The server uses ``reactor.seconds`` only for intervals, never as a date (the
scheduler's dates come from its own wall clock, ``time.time``), so it can
count on ``time.monotonic`` instead.
"""

import time

from twisted.internet.base import ReactorBase


def monotonic_timers(reactor, monotonic=time.monotonic):
    """Make ``reactor``'s timers count ``monotonic`` seconds instead of
    wall-clock ones. DelayedCalls already pending keep their remaining
    delay. Returns True when the reactor was switched; anything that is not
    a Twisted reactor (``task.Clock``) or already counts monotonic time is
    left as it is.

    Call it before the reactor runs (twistd: in makeService). A LoopingCall
    already running keeps its interval; its phase moves once (it computes
    the next call modulo the interval from a start time on the old clock).

    Whether the reactor was switched is known by what its ``seconds`` is,
    never by comparing the two clocks' values: a Pi without an RTC boots at
    the epoch, where the wall clock reads about what the monotonic clock
    does -- until NTP steps it by fifty years."""
    if not isinstance(reactor, ReactorBase):
        return False
    if reactor.seconds is monotonic or getattr(reactor, "_monotonic_timers", False):
        return False
    shift = monotonic() - reactor.seconds()
    # every DelayedCall reads its own ``seconds`` (reset, delay, repr): re-base
    # deadline and clock together. Cancelled calls stay in the heap until
    # runUntilCurrent pops them: shift them too, one shift for all keeps the
    # heap ordered.
    for call in reactor._pendingTimedCalls + reactor._newTimedCalls:
        call.time += shift
        call.seconds = monotonic
    reactor.seconds = monotonic
    reactor._monotonic_timers = True
    return True
