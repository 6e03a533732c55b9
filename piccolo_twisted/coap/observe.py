"""Observe (RFC 7641): registrations, notifications and their end.

- At most MAX_OBSERVERS_PER_HOST observations per host and MAX_OBSERVERS
  in all. An observation is *proven* once its client acknowledged one of
  its confirmable notifications (their message IDs are unpredictable,
  exchange.MessageIds: a blind spoofer cannot acknowledge them).
- When all are taken, a registration from a host holding fewer than the
  biggest holder still gets in: an observation of a host holding more
  than the newcomer ends for it (a 5.03 notification with Max-Age tells
  that client) -- the oldest *unproven* one first. A proven observation
  ends only for a host holding less while its own host holds more than a
  fair share (the cap split among the hosts observing), so a crowd of
  spoofed addresses, each holding one unproven registration, cannot push
  out the proven observation of a client that is really there.
- While observations are scarce (half of them taken), a new unproven one
  gets a confirmable notification of the current value PROBE_DELAY after
  it registered: a client that is there acknowledges it (proven), a
  spoofed one does not and its observation ends with the retransmissions.
- Notifications are confirmable, one in flight per observer. A newer one
  replaces the content of the one in flight but not its retransmission
  state (RFC 7641 4.5.2): it goes out at the next retransmission, or at
  once when the previous one is acknowledged. When the retransmissions give
  up (RFC 7252 4.2, about 93 s) the observation ends (RFC 7641 4.5), and a
  RST or a GET with Observe=1 ends it too. Until the host is verified,
  notifications are paid from its credit (limits.Credit), and one its
  client acknowledges is paid back: when the credit runs out (nobody
  acknowledges), the observation ends.
- Liveness: an observer that has not acknowledged anything (nor
  re-registered) for OBSERVE_CONFIRM seconds -- 24 h, less when the slots
  are scarce -- gets a CON notification of the current value; if nobody
  acknowledges it, the observation ends.
- A notification is held while the observer is still fetching the later
  blocks of the previous one (by plain GETs that name no version:
  replacing that body would hand the client blocks of another body and
  end its observation, RFC 7641 4.2 -- aiocoap raises ResourceChanged).
  This holds whatever the block size: a body sent in small blocks to a host
  not yet verified is a transfer too. A hold ends when that transfer ends
  or idles NOTIFY_HOLD seconds, and after NOTIFY_HOLD_MAX at most. An
  observer has at most one hold, so holds are bounded by the observations.
  Nothing polls: a hold is one timer.
"""

import collections

from twisted.internet import defer
from twisted.logger import Logger

from .blockwise import etag_of, request_key
from .codec import GET
from .limits import Shares, host_of

MAX_OBSERVERS = 2048           # observations in all
MAX_OBSERVERS_PER_HOST = 256   # observations one host may hold
OBSERVE_CONFIRM = 24 * 3600.0  # RFC 7641 4.5: a CON notification at least this often
SCARCE_CONFIRM = 120.0         # ... when the observations are (nearly) all taken
SCARCE = 0.5                   # observations taken from which they count as scarce
PROBE_DELAY = 1.0              # seconds after registering that a scarce one is probed
VICTIM_SCAN = 64               # unproven observations looked at for one eviction
NOTIFY_HOLD = 2.0              # seconds an observer's transfer may idle before
                               # a newer notification replaces its body
NOTIFY_HOLD_MAX = 30.0         # seconds a notification is held at most
EVICTED_MAX_AGE = 60           # Max-Age of the 5.03 that ends an evicted observation


class Observer:
    """One observation: the client endpoint and token, what it observes,
    and the state of its notifications."""

    __slots__ = ("remote", "token", "target", "szx", "request_size", "confirmed",
                 "outgoing", "hold", "host", "proven", "probe")

    def __init__(self, remote, token, target, szx, request_size, now):
        self.remote = remote
        self.token = token
        self.target = target
        self.szx = szx                    # block size it asked for
        self.request_size = request_size  # its registration's size (3x limit)
        self.confirmed = now              # last registration or acknowledgement
        self.outgoing = None              # exchange.Outgoing of the CON in flight
        self.hold = None                  # Hold while a notification waits
        self.host = host_of(remote[0])    # whose share it counts against
        self.proven = False               # its client acknowledged a notification
        self.probe = None                 # timer of its early notification

    @property
    def address(self):
        return self.remote[0]

    @property
    def key(self):
        return (self.remote, self.token)


class Target:
    """One observed resource (with its path arguments) and its observers."""

    def __init__(self, observations, path, resource, args, observable):
        self.observations = observations
        self.path = path
        self.resource = resource
        self.args = args
        self.observable = observable
        self.observers = {}             # (remote, token) -> Observer
        observable.watch(self.changed)

    def changed(self, _value):
        self.observations.notify(self)

    def close(self):
        self.observable.unwatch(self.changed)


class Hold:
    """A notification waiting for the observer's block transfer."""

    __slots__ = ("observer", "transfer", "since", "timer")

    def __init__(self, observer, transfer, since):
        self.observer = observer
        self.transfer = transfer
        self.since = since
        self.timer = None


class Observations:
    """Every observation of one endpoint. ``endpoint`` provides
    ``render_target(target)`` (a result or a Deferred), ``notification(
    observer, result, seq)`` -> (mid, datagram) fitted to the observer's
    limits, or None when nothing fits what its address may still be sent,
    and ``ended(observer, max_age)`` to tell an evicted client."""

    log = Logger()

    def __init__(self, clock, endpoint, retransmitter, transfers,
                 cap=MAX_OBSERVERS, share=MAX_OBSERVERS_PER_HOST):
        self.clock = clock
        self.endpoint = endpoint
        self.retransmitter = retransmitter
        self.transfers = transfers
        self.targets = {}               # path tuple -> Target
        self.count = Shares(cap, share)
        self.by_host = {}               # host -> {observer: None}, oldest first
        self.unproven = collections.OrderedDict()   # observer -> None, oldest first
        self.seq = 2

    # -- registration -------------------------------------------------------

    def find(self, remote, token, path):
        target = self.targets.get(path)
        return None if target is None else target.observers.get((remote, token))

    def register(self, remote, token, path, handle, szx, request_size):
        """Register (or renew) an observation; False when there is no room
        (the GET is then answered without Observe, RFC 7641 4.1)."""
        now = self.clock.seconds()
        observer = self.find(remote, token, path)
        if observer is not None:
            observer.confirmed = now        # a renewal
            observer.request_size = request_size
            return True
        host = host_of(remote[0])
        if not self.count.host_fits(host):
            return False
        if not self.count.fits(host) and not self._make_room_for(host):
            return False
        target = self.targets.get(path)
        if target is None:
            resource, args, observable = handle
            target = self.targets[path] = Target(self, path, resource, args, observable)
        observer = Observer(remote, token, target, szx, request_size, now)
        target.observers[observer.key] = observer
        self.count.take(host)
        self.by_host.setdefault(host, {})[observer] = None
        self.unproven[observer] = None
        if self.count.total >= SCARCE * self.count.cap:
            observer.probe = self.clock.callLater(PROBE_DELAY, self._probe, observer)
        return True

    def _make_room_for(self, host):
        """All observations taken: one of a host holding more than ``host``
        ends for it (see the module doc); False when none may."""
        victim = self._victim(host)
        if victim is None:
            return False
        self.log.info("observation of /{path} by {remote} ended for another host "
                      "(fair share of the {cap} observations)",
                      path="/".join(victim.target.path), remote=victim.remote,
                      cap=self.count.cap)
        self.drop(victim)
        self.endpoint.ended(victim, EVICTED_MAX_AGE)
        return True

    def _victim(self, host):
        holds = self.count.of(host)
        # the oldest unproven observations first (spoofed registrations
        # are never proven): the first whose host holds more
        for i, observer in enumerate(self.unproven):
            if i >= VICTIM_SCAN:
                break
            if self.count.of(observer.host) > holds:
                return observer
        biggest, held = self.count.largest()
        if biggest is None or held <= holds:
            return None
        mine = self.by_host.get(biggest, {})
        for observer in mine:
            if not observer.proven:
                return observer
        # only proven ones: one goes when its host holds more than a fair
        # share and the newcomer clearly less
        if held > self.count.fair() and held > holds + 1:
            return next(iter(mine), None)
        return None

    def deregister(self, remote, token, path):
        observer = self.find(remote, token, path)
        if observer is not None:
            self.drop(observer)

    def drop(self, observer, keep_outgoing=False):
        target = observer.target
        if target.observers.pop(observer.key, None) is not observer:
            return
        host = observer.host
        self.count.release(host)
        mine = self.by_host.get(host)
        if mine is not None:
            mine.pop(observer, None)
            if not mine:
                del self.by_host[host]
        self.unproven.pop(observer, None)
        if observer.probe is not None and observer.probe.active():
            observer.probe.cancel()
        observer.probe = None
        self._release_hold(observer)
        if observer.outgoing is not None and not keep_outgoing:
            self.retransmitter.cancel(observer.outgoing)
        observer.outgoing = None
        if not target.observers:
            target.close()
            self.targets.pop(target.path, None)

    def is_current(self, observer):
        return observer.target.observers.get(observer.key) is observer

    def __len__(self):
        return self.count.total

    def hosts(self):
        return dict(self.count.used)

    # -- acknowledgements -----------------------------------------------------

    def acknowledged(self, observer, ack, trusted=True):
        """An ACK or RST of one of ``observer``'s notifications (``ack``: an
        exchange.Acknowledged); ``trusted``: no guessing from its address
        lately, so an ACK proves the client is there."""
        if not self.is_current(observer):
            return
        if ack.reset:
            self.log.debug("observer {remote} reset; dropped", remote=observer.remote)
            observer.outgoing = None
            self.drop(observer)
            return
        observer.confirmed = self.clock.seconds()
        if trusted and not observer.proven:
            observer.proven = True
            self.unproven.pop(observer, None)
        observer.outgoing = ack.outgoing if ack.sent_following else None

    def gave_up(self, outgoing):
        observer = outgoing.owner
        if observer is not None and self.is_current(observer):
            self.log.info("observer {remote} gone (no ACK); dropped", remote=observer.remote)
            observer.outgoing = None
            self.drop(observer)

    # -- notifications ------------------------------------------------------------

    def notify(self, target, observers=None):
        """The target's value changed: every observer (or those given) gets
        a notification."""
        if not target.observers:
            return
        self.seq = (self.seq + 1) & 0xFFFFFF
        seq = self.seq
        result = self.endpoint.render_target(target)
        if isinstance(result, defer.Deferred):
            result.addCallback(lambda r: self._notify_all(target, r, seq, observers))
            result.addErrback(lambda f: self.log.failure("notification failed", f))
        else:
            self._notify_all(target, result, seq, observers)

    def _notify_all(self, target, result, seq, observers):
        if observers is None:
            observers = list(target.observers.values())
        for observer in observers:
            if self.is_current(observer):
                self._notify(observer, result, seq)

    def transfer_key(self, observer):
        return request_key(observer.remote, observer.target.path, GET, b"", ())

    def _notify(self, observer, result, seq):
        code, body, cf = result
        if observer.hold is not None:
            return                      # the newest state follows when it ends
        # the client still fetching the later blocks of an earlier body (the
        # registration's answer or a notification): wait for it to finish
        transfer = self.transfers.in_progress(self.transfer_key(observer), NOTIFY_HOLD)
        if transfer is not None and transfer.etag != etag_of(body):
            self._hold(observer, transfer)
            return
        message = self.endpoint.notification(observer, result, seq)
        if message is None:
            # nothing fits what its address may still be sent: the end
            self.log.debug("observer {remote}: no credit for a notification; dropped",
                           remote=observer.remote)
            self.drop(observer)
            return
        mid, data = message
        if observer.outgoing is None:
            observer.outgoing = self.retransmitter.send(
                observer.remote, mid, data, owner=observer, on_fail=self.gave_up)
            if observer.outgoing is None:       # could not be paid for
                self.drop(observer)
                return
        else:
            self.retransmitter.replace(observer.outgoing, mid, data)
        if not 64 <= code < 96:
            # an error ends the observation (RFC 7641 3.2); the error
            # itself is still delivered (its exchange goes on)
            self.drop(observer, keep_outgoing=True)

    def _probe(self, observer):
        """An early CON notification of the current value: does anyone
        acknowledge it?"""
        observer.probe = None
        if (self.is_current(observer) and not observer.proven
                and observer.outgoing is None and observer.hold is None):
            self.notify(observer.target, [observer])

    # -- holds --------------------------------------------------------------------

    def _hold(self, observer, transfer):
        hold = observer.hold = Hold(observer, transfer, self.clock.seconds())
        transfer.waiters.append(lambda: self._release(hold))
        hold.timer = self.clock.callLater(NOTIFY_HOLD, self._check_hold, hold)

    def _check_hold(self, hold):
        hold.timer = None
        if hold.observer.hold is not hold:
            return
        now = self.clock.seconds()
        idle_until = hold.transfer.used + NOTIFY_HOLD
        if (not hold.transfer.done and idle_until > now
                and now - hold.since < NOTIFY_HOLD_MAX):
            hold.timer = self.clock.callLater(
                min(idle_until, hold.since + NOTIFY_HOLD_MAX) - now, self._check_hold, hold)
            return
        self._release(hold)

    def _release(self, hold):
        observer = hold.observer
        if observer.hold is not hold:
            return
        self._release_hold(observer)
        if self.is_current(observer):
            self.notify(observer.target, [observer])

    def _release_hold(self, observer):
        hold = observer.hold
        if hold is None:
            return
        observer.hold = None
        if hold.timer is not None and hold.timer.active():
            hold.timer.cancel()
        hold.timer = None

    def held(self):
        return sum(1 for t in self.targets.values() for o in t.observers.values()
                   if o.hold is not None)

    # -- liveness -----------------------------------------------------------------

    def confirm_interval(self):
        """OBSERVE_CONFIRM, shorter as the slots fill: from half full on it
        falls linearly to SCARCE_CONFIRM when all are taken."""
        fill = self.count.total / self.count.cap
        if fill <= SCARCE:
            return OBSERVE_CONFIRM
        f = min(1.0, (fill - SCARCE) / (1 - SCARCE))
        return OBSERVE_CONFIRM - f * (OBSERVE_CONFIRM - SCARCE_CONFIRM)

    def sweep(self):
        """Observers nobody has confirmed for the confirm interval get a
        CON notification (RFC 7641 4.5); unacknowledged, it ends them."""
        now = self.clock.seconds()
        interval = self.confirm_interval()
        for target in list(self.targets.values()):
            stale = [o for o in target.observers.values()
                     if o.outgoing is None and o.hold is None
                     and now - o.confirmed >= interval]
            if stale:
                self.notify(target, stale)

    def stop(self):
        for target in list(self.targets.values()):
            target.close()
            for observer in target.observers.values():
                self._release_hold(observer)
                if observer.probe is not None and observer.probe.active():
                    observer.probe.cancel()
                observer.probe = None
                observer.outgoing = None
            target.observers.clear()
        self.targets.clear()
        self.count.clear()
        self.by_host.clear()
        self.unproven.clear()
