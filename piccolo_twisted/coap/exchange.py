"""Exchanges (RFC 7252 4): duplicate detection for the requests we get,
message IDs and retransmission for the messages we send.

:class:`Dedup` keeps, per peer, the answer to every request that must not
run twice, for EXCHANGE_LIFETIME (CON) or NON_LIFETIME (NON) seconds. Only
requests whose second run would do harm take an entry (``pause`` toggles,
``record_sequence`` starts a batch); a GET that only reads and a PUT that
only reads or sets a value are simply run again (``Site.safe``). An entry
is never evicted early, so a retransmission can never run a request
again; instead the entries are bounded:

- per host not verified (limits.Verifier): DEDUP_PER_HOST entries and
  DEDUP_BYTES_PER_HOST bytes in any EXCHANGE_LIFETIME -- enough for a
  piccolo3 script adding a season's jobs (300 at once): aiocoap returns
  no Echo value, so the deployed client is never verified; a verified
  host (it returned an Echo value) DEDUP_PER_VERIFIED /
  DEDUP_BYTES_PER_VERIFIED; beyond, *that host* is refused (5.03, "from
  this host", offering an Echo value to a host not verified);
- in all: DEDUP_MAX entries / DEDUP_BYTES, of which hosts not verified
  may hold DEDUP_OPEN / DEDUP_BYTES_OPEN. Filling the open part takes
  DEDUP_OPEN / DEDUP_PER_HOST = 32 addresses each at its budget (and as
  many with the bytes); a host that proves it receives what is sent to it
  (it returns the Echo value its refusal offers, limits.Verifier) is then
  admitted to the rest, which only hosts that receive can fill;
- ``abort``, ``pause`` and ``paused`` (urgent) have room of their own
  besides: DEDUP_URGENT entries, DEDUP_URGENT_PER_HOST per host.

:class:`MessageIds` numbers the messages we originate so that a blind
spoofer cannot predict the IDs sent to an address it does not receive.

:class:`Retransmitter` sends CON messages and retransmits them with
exponential back-off (RFC 7252 4.2) until acknowledged, reset, or given
up -- or until the address's credit (limits.Credit) cannot pay for the
next copy. A newer message for the same purpose (an observer's next
notification) replaces the content but not the retransmission state (RFC
7641 4.5.2): an observer that never acknowledges is given up after
MAX_RETRANSMIT retransmissions however often the value changes.
"""

import collections
import hashlib
import os
import random
from typing import NamedTuple, Optional

from .limits import Shares

ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4
EXCHANGE_LIFETIME = 247.0      # RFC 7252 4.8.2
NON_LIFETIME = 145.0

DEDUP_PER_HOST = 512           # entries of one host not verified in a lifetime
DEDUP_BYTES_PER_HOST = 128 << 10
DEDUP_PER_VERIFIED = 1024      # ... of a verified host
DEDUP_BYTES_PER_VERIFIED = 256 << 10
DEDUP_MAX = 24576              # entries in all ...
DEDUP_OPEN = 16384             # ... of which hosts not verified may hold
DEDUP_BYTES = 12 << 20         # bytes in all (estimated) ...
DEDUP_BYTES_OPEN = 8 << 20     # ... of which hosts not verified may hold
DEDUP_URGENT = 4096            # room of abort, pause, paused besides
DEDUP_URGENT_PER_HOST = 8
DEDUP_ENTRY = 200              # estimated bytes of an entry besides its answer
RECENT_MAX = 16384             # our message IDs remembered (late ACKs are not guesses)

# why Dedup.admit refused
HOST_FULL = "host"             # this host used its budget
FULL = "full"                  # the cache is full (for hosts not verified)


class Seen:
    """A request we have seen (key = (mid, (address, port))) and the answer
    every duplicate of it gets (None while it is still being worked on)."""

    __slots__ = ("key", "host", "expires", "answer", "cost", "pool", "verified")

    def __init__(self, key, host, expires, pool, verified):
        self.key = key
        self.host = host
        self.expires = expires
        self.answer = None
        self.cost = DEDUP_ENTRY
        self.pool = pool            # (count Shares, bytes Shares) it was taken from
        self.verified = verified    # the tier it was taken in


class Dedup:
    """Duplicate detection per peer, bounded per host and in all (see the
    module doc)."""

    def __init__(self, clock, cap=DEDUP_MAX, share=DEDUP_PER_VERIFIED, open_cap=DEDUP_OPEN,
                 open_share=DEDUP_PER_HOST, max_bytes=DEDUP_BYTES,
                 bytes_share=DEDUP_BYTES_PER_VERIFIED, open_bytes=DEDUP_BYTES_OPEN,
                 open_bytes_share=DEDUP_BYTES_PER_HOST, urgent=DEDUP_URGENT,
                 urgent_share=DEDUP_URGENT_PER_HOST):
        self.clock = clock
        self.entries = {}
        self.count = Shares(cap, share, open_cap, min(open_share, share))
        self.bytes = Shares(max_bytes, bytes_share, open_bytes,
                            min(open_bytes_share, bytes_share))
        self.urgent_count = Shares(urgent, urgent_share, urgent)
        self.urgent_bytes = Shares(urgent * 2 * DEDUP_ENTRY,
                                   urgent_share * 4 * DEDUP_ENTRY,
                                   urgent * 2 * DEDUP_ENTRY)
        # expiry order: one queue per lifetime, each in time order
        self.queues = {EXCHANGE_LIFETIME: collections.deque(),
                       NON_LIFETIME: collections.deque()}

    def get(self, key):
        seen = self.entries.get(key)
        if seen is not None and seen.expires < self.clock.seconds():
            return None
        return seen

    def admit(self, key, host, lifetime, urgent=False, verified=True):
        """A new entry for ``key`` (a Seen), or why not: HOST_FULL when
        ``host`` used its budget, FULL when the cache has no room for it
        (its tier, if not verified). The request is then refused, not run."""
        self.expire()
        pools = [(self.count, self.bytes)]
        if urgent:
            pools.insert(0, (self.urgent_count, self.urgent_bytes))
        why = None
        for count, size in pools:
            if not (count.host_fits(host, 1, verified)
                    and size.host_fits(host, DEDUP_ENTRY, verified)):
                why = why or HOST_FULL
                continue
            if not (count.fits(host, 1, verified) and size.fits(host, DEDUP_ENTRY, verified)):
                why = FULL
                continue
            seen = Seen(key, host, self.clock.seconds() + lifetime, (count, size), verified)
            self.entries[key] = seen
            count.take(host, 1, verified)
            size.take(host, seen.cost, verified)
            self.queues.setdefault(lifetime, collections.deque()).append(seen)
            return seen
        return why

    def answer(self, seen, data):
        """Remember ``data`` as what duplicates of ``seen`` get."""
        if seen is None or self.entries.get(seen.key) is not seen:
            return
        cost = DEDUP_ENTRY + len(data)
        seen.pool[1].take(seen.host, cost - seen.cost, seen.verified)
        seen.cost = cost
        seen.answer = data

    def expire(self):
        now = self.clock.seconds()
        for queue in self.queues.values():
            while queue and queue[0].expires < now:
                seen = queue.popleft()
                if self.entries.get(seen.key) is seen:
                    del self.entries[seen.key]
                    count, size = seen.pool
                    count.release(seen.host, 1, seen.verified)
                    size.release(seen.host, seen.cost, seen.verified)

    sweep = expire

    def size(self):
        return self.bytes.total + self.urgent_bytes.total

    def __len__(self):
        return len(self.entries)


class MessageIds:
    """Message IDs for the messages the server originates (separate
    responses, notifications, NON answers): for each endpoint a
    keyed hash of it plus a counter shared by all. An endpoint's IDs do not
    repeat before 65,536 messages have been sent (RFC 7252 4.4), and seeing
    the IDs sent to one's own address tells nothing of those sent to
    another: a blind spoofer cannot acknowledge what it did not receive."""

    def __init__(self, secret=None):
        self.secret = secret or os.urandom(16)
        self.counter = random.getrandbits(16)
        self.offsets = {}

    def next(self, remote):
        offset = self.offsets.get(remote)
        if offset is None:
            digest = hashlib.blake2b(f"{remote[0]}|{remote[1]}".encode(), key=self.secret,
                                     digest_size=2).digest()
            offset = int.from_bytes(digest, "big")
            if len(self.offsets) >= 16384:
                self.offsets.clear()
            self.offsets[remote] = offset
        self.counter = (self.counter + 1) & 0xFFFF
        return (offset + self.counter) & 0xFFFF


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
    """The CON messages in flight, by (message ID, endpoint); and the IDs
    of every message we sent in the last EXCHANGE_LIFETIME (``knows``), so
    a late or repeated ACK is told from a guess.

    ``write(data, remote) -> bool``: False when the datagram could not be
    paid for (limits.Credit); a retransmission that cannot be paid for
    gives the message up."""

    def __init__(self, clock, write):
        self.clock = clock
        self.write = write
        self.by_key = {}
        self.recent = collections.OrderedDict()    # (mid, remote) -> expiry

    @property
    def by_mid(self):
        return self.by_key

    def note(self, mid, remote):
        """``mid`` went to ``remote`` (any message we originate)."""
        key = (mid, remote)
        recent = self.recent
        recent.pop(key, None)
        recent[key] = self.clock.seconds() + EXCHANGE_LIFETIME
        if len(recent) > RECENT_MAX:
            recent.popitem(last=False)

    def knows(self, mid, remote):
        expiry = self.recent.get((mid, remote))
        return expiry is not None and expiry >= self.clock.seconds()

    def send(self, remote, mid, data, owner=None, on_fail=None):
        """Send a CON message; the Outgoing, or None when its first copy
        could not be paid for (nothing went out)."""
        out = Outgoing(remote, mid, data, owner, on_fail)
        return out if self._start(out) else None

    def _start(self, out):
        if not self.write(out.data, out.remote):
            return False
        self.by_key[(out.mid, out.remote)] = out
        self.note(out.mid, out.remote)
        out.timer = self.clock.callLater(out.timeout, self._fire, out)
        return True

    def replace(self, out, mid, data):
        """A newer message for the same purpose: it goes out at ``out``'s
        next retransmission (keeping its count and back-off), or as soon as
        ``out`` is acknowledged."""
        out.following = (mid, data)

    def _give_up(self, out):
        self.by_key.pop((out.mid, out.remote), None)
        if out.on_fail is not None:
            out.on_fail(out)

    def _fire(self, out):
        out.timer = None
        if self.by_key.get((out.mid, out.remote)) is not out:
            return
        if out.attempts >= MAX_RETRANSMIT:
            return self._give_up(out)
        mid, data = out.following or (out.mid, out.data)
        if not self.write(data, out.remote):
            return self._give_up(out)
        if out.following is not None:
            del self.by_key[(out.mid, out.remote)]
            out.mid, out.data = out.following
            out.following = None
            self.by_key[(out.mid, out.remote)] = out
            self.note(out.mid, out.remote)
        out.attempts += 1
        out.timeout *= 2
        out.timer = self.clock.callLater(out.timeout, self._fire, out)

    def acknowledge(self, mid, remote, reset=False) -> Optional[Acknowledged]:
        """An ACK or RST for ``mid`` from ``remote``; what it finished."""
        out = self.by_key.get((mid, remote))
        if out is None:
            return None
        self.cancel(out)
        if not reset and out.following is not None:
            # the peer is alive: the newer message goes out now, afresh
            mid, data = out.following
            fresh = Outgoing(out.remote, mid, data, out.owner, out.on_fail)
            if not self._start(fresh):          # cannot be paid for: given up
                if fresh.on_fail is not None:
                    fresh.on_fail(fresh)
                return Acknowledged(out, False, False)
            return Acknowledged(fresh, False, True)
        return Acknowledged(out, reset, False)

    def cancel(self, out):
        if self.by_key.get((out.mid, out.remote)) is out:
            del self.by_key[(out.mid, out.remote)]
        if out.timer is not None and out.timer.active():
            out.timer.cancel()
        out.timer = None

    def stop(self):
        for out in list(self.by_key.values()):
            self.cancel(out)
        self.by_key.clear()

    def __len__(self):
        return len(self.by_key)

    def values(self):
        return self.by_key.values()
