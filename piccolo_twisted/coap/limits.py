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
that can prove itself (:class:`Proofs`) uses the rest.

Verification. A host is *verified* when it has shown that it receives the
datagrams sent to its address, in one of two ways:

- it returned an Echo value the server gave it (RFC 9175 2.4; libcoap's
  coap-client does);
- it answered a CoAP ping (an empty CON message, RFC 7252 4.3) whose
  message ID it could only know by receiving it: every CoAP endpoint
  answers a ping with a RST carrying that ID (aiocoap, node-coap, libcoap
  and Californium do), so the deployed clients prove themselves without
  knowing it. The ID is unpredictable (a keyed hash of the endpoint plus a
  counter, :class:`exchange.MessageIds`), one ping per host is pending at a
  time, a host is pinged at most once per PROOF_INTERVAL, and an ACK or RST
  from the host that matches nothing the server sent voids the ping in
  flight: a blind spoofer gets one guess of 16 bits per PROOF_INTERVAL,
  about 3.8 days on average per address.

Until verified, everything sent to an address -- answers, empty ACKs,
notifications, retransmissions, pings -- is paid from its :class:`Credit`:
AMPLIFICATION times the bytes received from it, less what was sent. No
answer to one request is more than AMPLIFICATION times that request.
"""

import hashlib
import random
from collections import OrderedDict

from ..hosts import host_of  # noqa: F401 (the unit of the shares)

AMPLIFICATION = 3              # unverified: sent <= 3 x received (RFC 7252 11.3)
ECHO_EPOCH = 300.0             # an Echo value is good for 5-10 minutes
VERIFIED_FOR = 3600.0          # a verified host stays so this long after its last proof
RENEW_BEFORE = 600.0           # an active verified host is pinged again this long before
VERIFIED_MAX = 4096            # hosts remembered as verified
CREDIT_HOSTS = 16384           # unverified addresses whose credit is remembered
CREDIT_MAX = 16384             # bytes of credit an address may save up
PROOF_WAIT = 1.5               # seconds a request waits for a ping's answer
                               # (its answer still piggybacked: < ACK_TIMEOUT)
PROOF_RETRY = 0.3              # the ping goes out again after this, once.
                               # libcoap 4.3 sends no RST for an empty message
                               # until its tick count passes 250 ms, the count
                               # starting at the whole second coap-client
                               # started in: one started early in a second
                               # ignores a ping in its first 250 ms or less.
                               # A repetition 0.3 s later is always answered.
PROOF_INTERVAL = 10.0          # a host's next ping at the earliest; a wrong guess voids this long
PROOFS_PENDING = 4096          # pings in flight, all hosts
PROOF_HOSTS = 65536            # hosts remembered as pinged or guessing (PROOF_INTERVAL)

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
    by returning an Echo value the server gave them (RFC 9175 2.4), or by
    answering a ping (:class:`Proofs`, which calls :meth:`verify`). A CON
    request proves nothing (a blind spoofer can send one), nor does an ACK
    of a guessable message ID.

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
        until = self.verified.get(host)
        if until is not None:
            if until >= self.clock.seconds():
                return True
            del self.verified[host]
        if echo is not None:
            epoch = int(self.clock.seconds() // ECHO_EPOCH)
            if echo == self._value(host, epoch) or echo == self._value(host, epoch - 1):
                self.verify(host)
                return True
        return False

    def is_verified(self, host):
        return self.check(host, None)

    def state(self, host):
        """(verified, due): ``due`` when the verification ends within
        RENEW_BEFORE (a host still active is then asked for a new proof,
        so that a client observing for days is never cut off)."""
        until = self.verified.get(host)
        if until is None:
            return False, False
        now = self.clock.seconds()
        if until < now:
            del self.verified[host]
            return False, False
        return True, until - now < RENEW_BEFORE

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


class Proof:
    """A ping in flight to prove one address."""

    __slots__ = ("remote", "mid", "data", "waiters", "retry", "expiry")

    def __init__(self, remote, mid, data):
        self.remote = remote
        self.mid = mid
        self.data = data
        self.waiters = []
        self.retry = None
        self.expiry = None


class Proofs:
    """Return-routability proofs by ping (see the module doc).

    ``send(datagram, remote) -> bool`` writes a datagram (False when the
    address's credit cannot pay for it); ``next_mid(remote)`` gives an
    unpredictable message ID for the endpoint. ``wait(remote, callback)``
    has ``callback(verified)`` called once the address is proven (True) or
    the ping went unanswered (False); it returns False when no ping can be
    in flight for the address (one failed less than PROOF_INTERVAL ago, a
    wrong guess voided it, or its credit cannot pay for the ping).
    """

    def __init__(self, clock, verifier, send, next_mid):
        self.clock = clock
        self.verifier = verifier
        self.send = send
        self.next_mid = next_mid
        self.pending = {}               # address -> Proof
        self.started = {}               # address -> when its last ping went out (time order)
        self.void = {}                  # address -> when a wrong guess came (time order)

    @staticmethod
    def _purge(table, now):
        while table:
            address = next(iter(table))
            if table[address] + PROOF_INTERVAL > now:
                return
            del table[address]

    def _remember(self, table, address, now):
        self._purge(table, now)
        table.pop(address, None)
        if len(table) >= PROOF_HOSTS:
            return False
        table[address] = now
        return True

    def trusted(self, address):
        """False while a wrong guess from ``address`` is recent: its ACKs
        prove nothing then (an observer's liveness included)."""
        when = self.void.get(address)
        return when is None or when + PROOF_INTERVAL <= self.clock.seconds()

    def available(self, address):
        """Whether :meth:`wait` could have a ping in flight for ``address``."""
        if address in self.pending:
            return True
        now = self.clock.seconds()
        started = self.started.get(address)
        return ((started is None or started + PROOF_INTERVAL <= now)
                and self.trusted(address) and len(self.pending) < PROOFS_PENDING)

    def wait(self, remote, callback):
        address = remote[0]
        proof = self.pending.get(address)
        if proof is None:
            proof = self._start(remote)
            if proof is None:
                return False
        proof.waiters.append(callback)
        return True

    def start(self, remote):
        """A ping for ``remote``'s address if none is in flight and one may
        go out now (nobody waits for it: the host's next requests profit).
        True when one went out."""
        return remote[0] not in self.pending and self._start(remote) is not None

    def _start(self, remote):
        address = remote[0]
        if not self.available(address):
            return None
        now = self.clock.seconds()
        mid = self.next_mid(remote)
        data = bytes((0x40, 0, mid >> 8, mid & 0xFF))       # CON, empty
        if not self._remember(self.started, address, now):
            return None
        if not self.send(data, remote):
            return None
        proof = self.pending[address] = Proof(remote, mid, data)
        proof.retry = self.clock.callLater(PROOF_RETRY, self._again, proof)
        proof.expiry = self.clock.callLater(PROOF_WAIT, self._finish, proof, False)
        return proof

    def _again(self, proof):
        proof.retry = None
        if self.pending.get(proof.remote[0]) is proof:
            self.send(proof.data, proof.remote)

    def _finish(self, proof, verified):
        address = proof.remote[0]
        if self.pending.get(address) is not proof:
            return
        del self.pending[address]
        for timer in (proof.retry, proof.expiry):
            if timer is not None and timer.active():
                timer.cancel()
        proof.retry = proof.expiry = None
        if verified:
            self.verifier.verify(address)
        waiters, proof.waiters = proof.waiters, []
        for callback in waiters:
            callback(verified)

    def answered(self, remote, mid):
        """An ACK or RST from ``remote``: True when it answers the ping in
        flight to it (the address is then verified)."""
        proof = self.pending.get(remote[0])
        if proof is None or proof.mid != mid or proof.remote != remote:
            return False
        self._finish(proof, True)
        return True

    def guessed(self, remote):
        """An ACK or RST from ``remote`` that matches nothing the server
        sent: a guess. The ping in flight to the address fails, and for
        PROOF_INTERVAL its ACKs prove nothing."""
        address = remote[0]
        self._remember(self.void, address, self.clock.seconds())
        proof = self.pending.get(address)
        if proof is not None:
            self._finish(proof, False)

    def stop(self):
        for proof in list(self.pending.values()):
            for timer in (proof.retry, proof.expiry):
                if timer is not None and timer.active():
                    timer.cancel()
        self.pending.clear()
