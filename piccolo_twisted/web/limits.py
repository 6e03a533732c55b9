"""How the web page shares itself out among its clients.

A bound on a shared pool is not fairness: every pool here (connections,
live streams, downloads) is shared out per client host, and a newcomer
finding a pool full takes its place from the biggest holder -- so a few
addresses holding everything cannot keep anyone else out, and a host
keeps at least its fair share however many others crowd in. Requests are
paced per host and in all (``Pace``), so a flood of requests, pipelined
or not, costs the reactor a bounded share of its time.

A host is an IPv4 address, or an IPv6 /64 (one machine easily holds a
whole /64; an attacker cannot multiply itself by taking more addresses of
its own network).
"""

import ipaddress
from collections import OrderedDict

from ..access import client_address

HOSTS_REMEMBERED = 4096     # hosts whose pacing is remembered at most


def host_key(host):
    """The share a client address counts against: its IPv4 address, its
    IPv6 /64, or the text as it is when it is no address."""
    address = client_address(host)
    if address is None:
        return str(host)
    if address.version == 6 and not address.is_loopback:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class Shares:
    """A pool of ``total`` places shared out per host: at most
    ``per_host`` each; when the pool is full, a newcomer takes the oldest
    place of the biggest holder, if that holder has more than the
    newcomer would (else it is refused: everyone has a fair share).

    ``replace_own``: a host at its own limit takes its own oldest place
    (a page reloaded while its old stream lingers) instead of a refusal.
    """

    def __init__(self, total, per_host, replace_own=False):
        self.total = total
        self.per_host = per_host
        self.replace_own = replace_own
        self.held = {}          # host -> OrderedDict(item -> None), oldest first
        self.count = 0

    def holding(self, host):
        return len(self.held.get(host, ()))

    def admit(self, host):
        """(admitted, evict): whether ``host`` may take a place, and the
        item to end first to make room for it (or None)."""
        mine = self.holding(host)
        if mine >= self.per_host:
            if self.replace_own and mine:
                return True, next(iter(self.held[host]))
            return False, None
        if self.count < self.total:
            return True, None
        biggest = max(self.held, key=lambda h: len(self.held[h]))
        if len(self.held[biggest]) > mine + 1:
            return True, next(iter(self.held[biggest]))
        return False, None

    def add(self, host, item):
        self.held.setdefault(host, OrderedDict())[item] = None
        self.count += 1

    def remove(self, host, item):
        items = self.held.get(host)
        if items is None or item not in items:
            return False
        del items[item]
        self.count -= 1
        if not items:
            del self.held[host]
        return True


class Bucket:
    """A token bucket that lends: ``reserve`` takes a token now and says
    how long to wait before using it (0 while the burst lasts)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate, burst, now):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now):
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def reserve(self, now):
        self._refill(now)
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def full(self, now):
        return self.level(now) >= self.burst

    def level(self, now):
        """The tokens there are now."""
        self._refill(now)
        return self.tokens

    def take(self, now):
        """A token if there is one (True), else nothing taken (False)."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Pace:
    """Requests paced per host (``rate``/s after a ``burst``) and in all
    (``total_rate``/s after ``total_burst``): ``delay(host)`` is how long
    this request waits before it is handled. A host's requests wait
    behind its own; everyone's behind the total, which bounds what the
    web page can take of the reactor however many hosts send."""

    def __init__(self, clock, rate, burst, total_rate, total_burst):
        self.clock = clock
        self.rate, self.burst = rate, burst
        self.hosts = OrderedDict()      # host -> Bucket, least recently used first
        self.total = Bucket(total_rate, total_burst, clock.seconds())

    def delay(self, host):
        now = self.clock.seconds()
        bucket = self.hosts.get(host)
        if bucket is None:
            bucket = self.hosts[host] = Bucket(self.rate, self.burst, now)
            self._forget(now)
        else:
            self.hosts.move_to_end(host)
        return max(bucket.reserve(now), self.total.reserve(now))

    def _forget(self, now):
        # a host whose bucket is full again is the same as a new one
        while len(self.hosts) > HOSTS_REMEMBERED:
            host, bucket = next(iter(self.hosts.items()))
            if not bucket.full(now) and len(self.hosts) <= 2 * HOSTS_REMEMBERED:
                break
            del self.hosts[host]
