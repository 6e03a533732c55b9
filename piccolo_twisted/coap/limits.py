"""Limits: per-host shares of every bounded resource, and address
verification against reflection (RFC 7252 11.3, RFC 9175 2.4).

A bound on a shared pool is not fairness: one host (or a few, or a crowd
of spoofed addresses) fills it and everyone else is refused. So every pool
the CoAP layer keeps -- handler slots, the wait queue, blockwise bodies,
uploads, observations, held notifications, dedup entries -- is a
:class:`Shares`: a global cap *and* a share per host address (all its
ports together), and no host holds more than its share.
"""

import hashlib
import random
from collections import OrderedDict

AMPLIFICATION = 3              # unverified: response <= 3 x request (RFC 7252 11.3)
ECHO_EPOCH = 300.0             # an Echo value is good for 5-10 minutes
VERIFIED_FOR = 3600.0          # a verified host stays so this long after its last Echo
VERIFIED_MAX = 4096            # hosts remembered as verified


class Shares:
    """Usage of one pool by host: ``cap`` in all, ``share`` per host.

    ``fits(host, n)`` says whether ``n`` more units may be taken without
    passing either bound; ``take``/``release`` count them. ``largest()`` is
    the host holding most, for pools that make room by evicting (blockwise
    bodies, observations): the biggest holder gives way first.
    """

    __slots__ = ("cap", "share", "used", "total")

    def __init__(self, cap, share):
        self.cap = cap
        self.share = share
        self.used = {}
        self.total = 0

    def of(self, host):
        return self.used.get(host, 0)

    def fits(self, host, n=1):
        return (self.used.get(host, 0) + n <= self.share
                and self.total + n <= self.cap)

    def host_fits(self, host, n=1):
        return self.used.get(host, 0) + n <= self.share

    def take(self, host, n=1):
        self.used[host] = self.used.get(host, 0) + n
        self.total += n

    def release(self, host, n=1):
        left = self.used.get(host, 0) - n
        if left > 0:
            self.used[host] = left
        else:
            self.used.pop(host, None)
        self.total -= n

    def largest(self):
        """(host, units) of the biggest holder, or (None, 0)."""
        if not self.used:
            return None, 0
        host = max(self.used, key=self.used.__getitem__)
        return host, self.used[host]

    def fair(self):
        """What each host would hold if the cap were split evenly among
        the hosts holding something now and one more."""
        return max(1, self.cap // (len(self.used) + 1))

    def clear(self):
        self.used.clear()
        self.total = 0

    def __len__(self):
        return self.total


class Verifier:
    """Which hosts have shown that they receive what is sent to their
    address: only by returning an Echo value the server gave them
    (RFC 9175 2.4). A CON request proves nothing (a blind spoofer can send
    one), nor does an ACK (message IDs are easy to guess).

    Until verified, an answer may be at most AMPLIFICATION times the
    request that caused it; the server offers an Echo value in every
    answer it had to shrink.
    """

    def __init__(self, clock, secret=None):
        self.clock = clock
        self.secret = secret or random.getrandbits(128).to_bytes(16, "big")
        self.verified = OrderedDict()       # host -> until (oldest first)

    def _value(self, host, epoch):
        return hashlib.blake2b(f"{host}|{epoch}".encode(), key=self.secret,
                               digest_size=8).digest()

    def echo_for(self, host):
        """The Echo value to offer ``host`` now."""
        return self._value(host, int(self.clock.seconds() // ECHO_EPOCH))

    def check(self, host, echo):
        """True when ``host`` is verified, now or by the ``echo`` value its
        request carries (one we gave it in this or the previous epoch)."""
        now = self.clock.seconds()
        if echo is not None:
            epoch = int(now // ECHO_EPOCH)
            if echo == self._value(host, epoch) or echo == self._value(host, epoch - 1):
                self.verified.pop(host, None)
                self.verified[host] = now + VERIFIED_FOR
                while len(self.verified) > VERIFIED_MAX:
                    self.verified.popitem(last=False)
                return True
        until = self.verified.get(host)
        if until is None:
            return False
        if until < now:
            del self.verified[host]
            return False
        return True

    def is_verified(self, host):
        return self.check(host, None)

    def __contains__(self, host):
        return self.is_verified(host)

    def sweep(self):
        now = self.clock.seconds()
        for host in [h for h, until in self.verified.items() if until < now]:
            del self.verified[host]
