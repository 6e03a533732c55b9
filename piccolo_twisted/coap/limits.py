"""Limits: per-host shares of every bounded resource, and what a host must
show before it is sent more than it sends (RFC 7252 11.3, RFC 9175 2.4).

A bound on a shared pool is not fairness: one host (or a few, or a crowd
of spoofed addresses) fills it and everyone else is refused. So every pool
the CoAP layer keeps -- handler slots, the wait queue, blockwise bodies,
uploads, observations, dedup entries -- is a :class:`Shares`: a global cap
*and* a share per host, and no host holds more than its share. A host is
an IPv4 address, or an IPv6 /64 (one machine's addresses usually differ
only in their last 64 bits, and a spoofer has 2^64 of them): see
:func:`piccolo_twisted.hosts.host_of`.

A pool whose entries cannot be taken back (a dedup entry must live its
lifetime, a running handler runs on) is exhaustible by enough spoofed
addresses, whatever its cap. Such pools have a second, smaller cap for
hosts that have not shown that they receive what is sent to their address
(``open_cap``): a crowd of blind spoofers fills that part only, and a host
that proves itself (returns an Echo value, below) uses the rest.

Verification (RFC 9175 2.4). A host is *verified* only when it returns
an Echo value the server gave it (libcoap's coap-client does): a value a
blind spoofer never sees. Nothing else verifies: not a CON request (a
spoofer sends one), not an ACK, and not an answered CoAP ping -- every
CoAP endpoint answers a ping with a RST (RFC 7252 4.3), so a ping proves
that *someone* at the address speaks CoAP, not that it sent the request.
(A spoofer naming a CoAP device's address had it verified that way, and
reflected full blocks at it: 41.7x.) A verified host stays so for
VERIFIED_FOR seconds after its last Echo, and an Echo value is good for
one or two ECHO_EPOCHs.

Clients that ignore Echo (aiocoap, which the deployed piccolo3 client
uses) are never verified and keep working within the limits: answers
in small blocks (RFC 7959 2.4), each at most 3x its request, and the
address's credit.

Until verified, everything sent to an address -- answers, empty ACKs,
notifications, retransmissions -- is paid from its :class:`Credit`:
AMPLIFICATION times the bytes received from it, less what was sent. No
answer to one request is more than AMPLIFICATION times that request.
One thing pays back: an ACK (not a RST) of an observer's CON
notification, from the observer's own endpoint and matching the
notification's unpredictable message ID, refunds that notification (one
copy). It proves the endpoint received it and took it for its own
observation: an endpoint that did not register rejects a notification
with a RST (RFC 7252 5.3.2, RFC 7641 3.6), which ends the observation.
So an aiocoap client observing for months is never cut off for credit,
while a spoofed registration in a CoAP endpoint's name ends at its first
notification, within 3x. Its ACKs verify nothing: full-size answers to
other requests still need an Echo value.
"""

import hashlib
import random
from collections import OrderedDict

from ..hosts import host_of  # noqa: F401 (the unit of the shares)

AMPLIFICATION = 3              # unverified: sent <= 3 x received (RFC 7252 11.3)
ECHO_EPOCH = 300.0             # an Echo value is good for 5-10 minutes
VERIFIED_FOR = 3600.0          # a verified host stays so this long after its last proof
VERIFIED_MAX = 4096            # hosts remembered as verified
CREDIT_HOSTS = 16384           # unverified addresses whose credit is remembered
CREDIT_MAX = 16384             # bytes of credit an address may save up
GUESS_VOID = 10.0              # an ACK/RST that matches nothing we sent voids
                               # the address's ACKs this long (observe.py)
GUESS_HOSTS = 65536            # addresses remembered as guessing


class Shares:
    """Usage of one pool by host: ``cap`` in all, ``share`` per host, and
    for hosts not verified (when they take with ``verified=False``; the
    caller passes the same flag back to :meth:`release`) at most
    ``open_cap`` in all and ``open_share`` each.

    ``fits(host, n)`` says whether ``n`` more units may be taken without
    passing either bound; ``take``/``release`` count them. ``largest()`` is
    the host holding most, for pools that make room by evicting: the
    biggest holder gives way first.
    """

    __slots__ = ("cap", "share", "open_cap", "open_share", "used", "total", "open_total")

    def __init__(self, cap, share, open_cap=None, open_share=None):
        self.cap = cap
        self.share = share
        self.open_cap = cap if open_cap is None else open_cap
        self.open_share = share if open_share is None else open_share
        self.used = {}
        self.total = 0
        self.open_total = 0

    def of(self, host):
        return self.used.get(host, 0)

    def fits(self, host, n=1, verified=True):
        return (self.used.get(host, 0) + n <= (self.share if verified else self.open_share)
                and self.total + n <= self.cap
                and (verified or self.open_total + n <= self.open_cap))

    def host_fits(self, host, n=1, verified=True):
        return self.used.get(host, 0) + n <= (self.share if verified else self.open_share)

    def full_for(self, verified):
        """True when the pool as a whole (not a host's share) is what
        refuses ``n=1`` more."""
        return self.total + 1 > self.cap or (not verified
                                             and self.open_total + 1 > self.open_cap)

    def take(self, host, n=1, verified=True):
        self.used[host] = self.used.get(host, 0) + n
        self.total += n
        if not verified:
            self.open_total += n

    def release(self, host, n=1, verified=True):
        left = self.used.get(host, 0) - n
        if left > 0:
            self.used[host] = left
        else:
            self.used.pop(host, None)
        self.total -= n
        if not verified:
            self.open_total -= n

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
        self.open_total = 0

    def __len__(self):
        return self.total


class Verifier:
    """Which addresses have shown that they receive what is sent to them:
    by returning an Echo value the server gave them (RFC 9175 2.4), and
    only so. A CON request proves nothing (a blind spoofer can send one),
    nor does an ACK, nor an answered ping (any CoAP endpoint answers one,
    including one whose address a spoofer names).

    Until verified, an answer may be at most AMPLIFICATION times the
    request that caused it, and all that is sent to the address is paid
    from its :class:`Credit`; the server offers an Echo value in every
    answer it had to shrink.
    """

    def __init__(self, clock, secret=None):
        self.clock = clock
        self.secret = secret or random.getrandbits(128).to_bytes(16, "big")
        self.verified = OrderedDict()       # address -> until (oldest first)

    def _value(self, host, epoch):
        return hashlib.blake2b(f"{host}|{epoch}".encode(), key=self.secret,
                               digest_size=8).digest()

    def echo_for(self, host):
        """The Echo value to offer ``host`` now."""
        return self._value(host, int(self.clock.seconds() // ECHO_EPOCH))

    def verify(self, host):
        """``host`` has just shown that it receives what is sent to it."""
        self.verified.pop(host, None)
        self.verified[host] = self.clock.seconds() + VERIFIED_FOR
        while len(self.verified) > VERIFIED_MAX:
            self.verified.popitem(last=False)

    def check(self, host, echo):
        """True when ``host`` is verified, now or by the ``echo`` value its
        request carries (one we gave it in this or the previous epoch)."""
        if echo is not None:
            epoch = int(self.clock.seconds() // ECHO_EPOCH)
            if echo == self._value(host, epoch) or echo == self._value(host, epoch - 1):
                self.verify(host)       # (again: VERIFIED_FOR from its last Echo)
                return True
        until = self.verified.get(host)
        if until is not None:
            if until >= self.clock.seconds():
                return True
            del self.verified[host]
        return False

    def is_verified(self, host):
        return self.check(host, None)

    def __contains__(self, host):
        return self.is_verified(host)

    def sweep(self):
        now = self.clock.seconds()
        for host in [h for h, until in self.verified.items() if until < now]:
            del self.verified[host]


class Credit:
    """What may still be sent to each unverified address: AMPLIFICATION
    times the bytes received from it, less the bytes sent to it (saved up
    to CREDIT_MAX). Everything sent to an unverified address is paid from
    it, so in total an address never gets more than AMPLIFICATION times
    what came from it. The least recently active addresses are forgotten
    beyond CREDIT_HOSTS (a forgotten address starts again at nothing)."""

    def __init__(self, hosts=CREDIT_HOSTS, most=CREDIT_MAX):
        self.balance = {}               # address -> bytes (least recent first)
        self.hosts = hosts
        self.most = most

    def received(self, address, size):
        balance = self.balance.pop(address, 0) + AMPLIFICATION * size
        self.balance[address] = min(balance, self.most)
        if len(self.balance) > self.hosts:
            del self.balance[next(iter(self.balance))]

    def refund(self, address, size):
        """``size`` bytes sent to ``address`` are paid back (an observer
        acknowledged the notification: see ServerCoap.handle_message)."""
        balance = self.balance.pop(address, 0) + size
        self.balance[address] = min(balance, self.most)
        if len(self.balance) > self.hosts:
            del self.balance[next(iter(self.balance))]

    def remaining(self, address):
        return self.balance.get(address, 0)

    def spend(self, address, size):
        """Pay ``size`` bytes; False (nothing paid) when there is not enough."""
        balance = self.balance.get(address, 0)
        if balance < size:
            return False
        self.balance[address] = balance - size
        return True

    def __len__(self):
        return len(self.balance)


class Guesses:
    """Addresses that lately sent an ACK or RST matching nothing the
    server sent: a blind spoofer guessing the (unpredictable,
    exchange.MessageIds) message ID of a CON notification, to pass for an
    observer that is there. For GUESS_VOID seconds after a guess the
    address's ACKs prove nothing (:meth:`trusted`), so a guesser gets one
    try of 16 bits per GUESS_VOID. At most GUESS_HOSTS addresses are
    remembered (the oldest forgotten first)."""

    def __init__(self, clock, hosts=GUESS_HOSTS):
        self.clock = clock
        self.hosts = hosts
        self.when = OrderedDict()       # address -> when it last guessed (time order)

    def guessed(self, address):
        now = self.clock.seconds()
        self._purge(now)
        self.when.pop(address, None)
        self.when[address] = now
        while len(self.when) > self.hosts:
            self.when.popitem(last=False)

    def trusted(self, address):
        """False while a wrong guess from ``address`` is recent."""
        when = self.when.get(address)
        return when is None or when + GUESS_VOID <= self.clock.seconds()

    def _purge(self, now):
        while self.when:
            address, when = next(iter(self.when.items()))
            if when + GUESS_VOID > now:
                return
            del self.when[address]

    def __len__(self):
        return len(self.when)
