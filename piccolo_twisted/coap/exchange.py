"""Exchanges (RFC 7252 4): duplicate detection for the requests we get,
retransmission for the confirmable messages we send.

:class:`Dedup` keeps, per peer, the answer to every request that must not
run twice, for EXCHANGE_LIFETIME (CON) or NON_LIFETIME (NON) seconds. Its
memory is bounded by a share per host address and a global cap; a request
that finds no room is refused (5.03) before it runs -- an entry is never
evicted early, so a retransmission can never run a request again.

:class:`Retransmitter` sends CON messages and retransmits them with
exponential back-off (RFC 7252 4.2) until acknowledged, reset, or given
up. A newer message for the same purpose (an observer's next notification)
replaces the content but not the retransmission state (RFC 7641 4.5.2):
an observer that never acknowledges is given up after MAX_RETRANSMIT
retransmissions however often the value changes.
"""

import collections
import random
from typing import NamedTuple, Optional

from .limits import Shares

ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
EXCHANGE_LIFETIME = 247.0      # RFC 7252 4.8.2
NON_LIFETIME = 145.0

DEDUP_MAX = 16384              # entries in all
DEDUP_PER_HOST = 1024          # entries of one host address
DEDUP_BYTES = 4 << 20          # bytes in all (estimated)
DEDUP_BYTES_PER_HOST = 256 << 10
DEDUP_URGENT = 1024            # room beyond DEDUP_MAX kept for urgent requests
DEDUP_ENTRY = 200              # estimated bytes of an entry besides its answer


class Seen:
    """A request we have seen (key = (mid, (host, port))) and the answer
    every duplicate of it gets (None while it is still being worked on)."""

    __slots__ = ("key", "expires", "answer", "cost")

    def __init__(self, key, expires):
        self.key = key
        self.expires = expires
        self.answer = None
        self.cost = DEDUP_ENTRY


class Dedup:
    """Duplicate detection per peer, bounded per host and in all."""

    def __init__(self, clock, cap=DEDUP_MAX, share=DEDUP_PER_HOST,
                 max_bytes=DEDUP_BYTES, bytes_share=DEDUP_BYTES_PER_HOST,
                 urgent=DEDUP_URGENT):
        self.clock = clock
        self.entries = {}
        self.count = Shares(cap, share)
        self.bytes = Shares(max_bytes, bytes_share)
        self.urgent_room = urgent
        # expiry order: one queue per lifetime, each in time order
        self.queues = {EXCHANGE_LIFETIME: collections.deque(),
                       NON_LIFETIME: collections.deque()}

    def get(self, key):
        seen = self.entries.get(key)
        if seen is not None and seen.expires < self.clock.seconds():
            return None
        return seen

    def admit(self, key, lifetime, urgent=False):
        """A new entry for ``key``, or None when its host is over its share
        or the cache is full (the request is then refused, not run)."""
        self.expire()
        host = key[1][0]
        count, size = self.count, self.bytes
        if not (count.host_fits(host) and size.host_fits(host, DEDUP_ENTRY)):
            return None
        room = self.urgent_room if urgent else 0
        if (count.total + 1 > count.cap + room
                or size.total + DEDUP_ENTRY > size.cap + room * DEDUP_ENTRY):
            return None
        seen = Seen(key, self.clock.seconds() + lifetime)
        self.entries[key] = seen
        count.take(host)
        size.take(host, seen.cost)
        self.queues.setdefault(lifetime, collections.deque()).append(seen)
        return seen

    def answer(self, seen, data):
        """Remember ``data`` as what duplicates of ``seen`` get."""
        if seen is None or self.entries.get(seen.key) is not seen:
            return
        cost = DEDUP_ENTRY + len(data)
        self.bytes.take(seen.key[1][0], cost - seen.cost)
        seen.cost = cost
        seen.answer = data

    def expire(self):
        now = self.clock.seconds()
        for queue in self.queues.values():
            while queue and queue[0].expires < now:
                seen = queue.popleft()
                if self.entries.get(seen.key) is seen:
                    del self.entries[seen.key]
                    host = seen.key[1][0]
                    self.count.release(host)
                    self.bytes.release(host, seen.cost)

    sweep = expire

    def size(self):
        return self.bytes.total

    def __len__(self):
        return len(self.entries)


class Outgoing:
    """A CON message we sent and retransmit until it is acknowledged.

    ``mid``/``data`` are what went out last; ``following`` is a newer
    message (mid, data) that replaces it, sent at the next retransmission
    or at once when the current one is acknowledged."""

    __slots__ = ("remote", "mid", "data", "attempts", "timeout", "timer",
                 "following", "owner", "on_fail")

    def __init__(self, remote, mid, data, owner=None, on_fail=None):
        self.remote = remote
        self.mid = mid
        self.data = data
        self.attempts = 0
        self.timeout = random.uniform(ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR)
        self.timer = None
        self.following = None
        self.owner = owner
        self.on_fail = on_fail


class Acknowledged(NamedTuple):
    outgoing: Outgoing
    reset: bool
    sent_following: bool


class Retransmitter:
    """The CON messages in flight, by message ID."""

    def __init__(self, clock, write):
        self.clock = clock
        self.write = write
        self.by_mid = {}

    def send(self, remote, mid, data, owner=None, on_fail=None):
        out = Outgoing(remote, mid, data, owner, on_fail)
        self._start(out)
        return out

    def _start(self, out):
        self.by_mid[out.mid] = out
        out.timer = self.clock.callLater(out.timeout, self._fire, out)
        self.write(out.data, out.remote)

    def replace(self, out, mid, data):
        """A newer message for the same purpose: it goes out at ``out``'s
        next retransmission (keeping its count and back-off), or as soon as
        ``out`` is acknowledged."""
        out.following = (mid, data)

    def _fire(self, out):
        out.timer = None
        if self.by_mid.get(out.mid) is not out:
            return
        if out.attempts >= MAX_RETRANSMIT:
            del self.by_mid[out.mid]
            if out.on_fail is not None:
                out.on_fail(out)
            return
        if out.following is not None:
            del self.by_mid[out.mid]
            out.mid, out.data = out.following
            out.following = None
            self.by_mid[out.mid] = out
        out.attempts += 1
        out.timeout *= 2
        out.timer = self.clock.callLater(out.timeout, self._fire, out)
        self.write(out.data, out.remote)

    def acknowledge(self, mid, remote, reset=False) -> Optional[Acknowledged]:
        """An ACK or RST for ``mid`` from ``remote``; what it finished."""
        out = self.by_mid.get(mid)
        if out is None or out.remote != remote:
            return None
        self.cancel(out)
        if not reset and out.following is not None:
            # the peer is alive: the newer message goes out now, afresh
            mid, data = out.following
            fresh = Outgoing(out.remote, mid, data, out.owner, out.on_fail)
            self._start(fresh)
            return Acknowledged(fresh, False, True)
        return Acknowledged(out, reset, False)

    def cancel(self, out):
        if self.by_mid.get(out.mid) is out:
            del self.by_mid[out.mid]
        if out.timer is not None and out.timer.active():
            out.timer.cancel()
        out.timer = None

    def stop(self):
        for out in list(self.by_mid.values()):
            self.cancel(out)
        self.by_mid.clear()

    def __len__(self):
        return len(self.by_mid)

    def values(self):
        return self.by_mid.values()
