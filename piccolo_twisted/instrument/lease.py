"""One owner of the spectrometers at a time.

A batch (or a dark sequence, an autointegration), a power change, a
hardware request of a client: each takes the lease before it touches the
spectrometers and gives it back when it is done. Whoever holds the lease
owns the devices until it releases it; nobody looks at a "busy" flag and
acts later, when the flag may no longer be true.

- ``try_take(holder)``: the lease now, or BusyError (a client's request is
  answered at once, "piccolo system is busy").
- ``take(holder)``: a Deferred firing with the lease when it is the
  holder's turn, first come first served (the scheduler's jobs and power
  window wait for a running batch). Cancelling it gives up the place.

The lease is also held from start-up until every spectrometer has been
tried once: nothing scheduled runs on an instrument still connecting.
"""

from collections import deque

from twisted.internet import defer
from twisted.logger import Logger

from ..errors import BusyError
from ..observable import Observable


class Token:
    """The lease, held. ``release()`` once (again is harmless)."""

    __slots__ = ("lease", "holder", "released")

    def __init__(self, lease, holder):
        self.lease = lease
        self.holder = holder
        self.released = False

    def release(self):
        if not self.released:
            self.released = True
            self.lease._released(self)

    def __repr__(self):
        return f"<lease held by {self.holder}{' (released)' if self.released else ''}>"


class Lease:
    log = Logger()

    def __init__(self):
        self._token = None
        self._waiting = deque()          # (holder, Deferred)
        #: who holds it (a string), None when free
        self.holder = Observable(None)

    @property
    def held(self):
        return self._token is not None

    def try_take(self, holder):
        """The lease now, or BusyError if anyone holds it or waits for it."""
        if self._token is not None or self._waiting:
            raise BusyError()
        return self._grant(holder)

    def take(self, holder):
        """A Deferred firing with the lease when it is ``holder``'s turn."""
        if self._token is None and not self._waiting:
            return defer.succeed(self._grant(holder))

        def cancel(d):
            try:
                self._waiting.remove((holder, d))
            except ValueError:
                pass
        d = defer.Deferred(cancel)
        self._waiting.append((holder, d))
        return d

    def _grant(self, holder):
        token = self._token = Token(self, holder)
        self.holder.set(holder)
        return token

    def _released(self, token):
        if token is not self._token:
            self.log.error("lease released by {holder}, which did not hold it",
                           holder=token.holder)
            return
        self._token = None
        if self._waiting:
            holder, d = self._waiting.popleft()
            d.callback(self._grant(holder))
        else:
            self.holder.set(None)

    def run(self, holder, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` holding the lease taken now (BusyError if
        it cannot be), released when its result (a Deferred or not) is in."""
        token = self.try_take(holder)
        try:
            d = defer.maybeDeferred(fn, *args, **kwargs)
        except BaseException:
            token.release()
            raise

        def release(result):
            token.release()
            return result
        return d.addBoth(release)
