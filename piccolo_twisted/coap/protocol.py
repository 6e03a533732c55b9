"""The CoAP message layer: a ``txthings.coap.Coap`` subclass for servers.

txThings' own message handling keeps a 247 s timer and a response per
received datagram, hangs when a handler fails, ignores Observe cancels and
mis-handles several corner cases (DESIGN.md #3-#14). This subclass keeps
txThings' ``Message``/``Options`` types and its resource tree, and replaces
the receive path:

- strict decoding: a malformed datagram is dropped (RST for a CON),
  unknown critical options get 4.02, and nothing raises into the reactor;
- duplicate detection (a duplicate of a GET without effects is simply
  answered again, RFC 7252 4.5; every other request is answered from the
  cache and never run twice) in two generations of plain dicts, rotated on the
  clock and bounded in size: no timer per message;
- Block2 at up to 1024 bytes with an ETag, bodies cached briefly per peer
  and path; Block1 reassembly with 2.31 Continue and a size limit (4.13);
- Observe: registration, deregistration (Observe=1, RST, retransmission
  give-up), CON notifications with at most one in flight per observer;
- separate responses when a handler takes longer than ``ACK_DELAY``; the
  empty ACK carries no token, NON requests get no ACK (#10).

Everything timed goes through the injected clock, so unit tests use
``task.Clock``.
"""

import collections
import hashlib
import random
import struct
import zlib

from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from . import _tx

CON, NON, ACK, RST = _tx.CON, _tx.NON, _tx.ACK, _tx.RST
EMPTY = _tx.EMPTY
FORBIDDEN = _tx.FORBIDDEN      # 4.03: [access] control_from refused the host
Message = _tx.Message

KNOWN_OPTIONS = frozenset(_tx.options)
ACK_TIMEOUT = _tx.ACK_TIMEOUT
ACK_RANDOM_FACTOR = _tx.ACK_RANDOM_FACTOR
MAX_RETRANSMIT = _tx.MAX_RETRANSMIT
EXCHANGE_LIFETIME = _tx.EXCHANGE_LIFETIME
MAX_SZX = 6                    # 1024-byte blocks
ACK_DELAY = 0.5                # a slower handler gets an empty ACK first
MAX_BODY = 64 * 1024           # largest Block1 request body accepted
MAX_OPTIONS = 64               # options per message; more -> 4.02, unparsed
DEDUP_MAX = 16384              # entries per dedup generation
DEDUP_BYTES = 1024 * 1024      # bytes in all dedup generations (estimated)
DEDUP_ENTRY = 320              # estimated bytes of one dedup entry's key
BLOCK_CACHE_MAX = 64           # Block1 reassemblies in progress
BLOCK1_PER_HOST = 8            # of those, from one host address
BLOCK_CACHE_BYTES = 4 * 1024 * 1024  # Block2 bodies kept for follow-ups
BLOCK_ENTRY = 400              # estimated bytes of one Block2 cache entry
BLOCK_FRESH_PER_HOST = 1024    # not-yet-continued Block2 bodies per host
BLOCK_LIFETIME = 60.0          # seconds a Block1/Block2 transfer may idle
NOTIFY_HOLD = 2.0              # seconds a multi-block notification's transfer
                               # may idle before a newer one replaces it
NOTIFY_RECHECK = 0.05          # seconds between checks while one is held
HOUSEKEEPING = 10.0            # seconds between sweeps
MAX_OBSERVERS = 2048           # observations in all
MAX_OBSERVERS_PER_HOST = 256   # observations one host address may hold
MAX_OBSERVERS_PER_PEER = MAX_OBSERVERS_PER_HOST  # (old name)
OBSERVE_CONFIRM = 24 * 3600.0  # RFC 7641 4.5: a CON notification at least this often
AMPLIFICATION = 3              # unverified NON: response <= 3 x request (RFC 7252 11.3)
VERIFIED_MAX = 4096            # hosts remembered as having done a CON exchange
ECHO = 252                     # RFC 9175 Echo option
MAX_PENDING = 256              # requests whose handler is still running
MAX_PENDING_PER_HOST = 64      # of those, from one host address
BUSY_MAX_AGE = 2               # seconds a 5.03 "busy" asks a client to wait
MAX_QUEUED_BYTES = 512 * 1024  # requests waiting for a busy host's handlers
QUEUED_ENTRY = 2048            # estimated bytes of one waiting request
QUEUE_WAIT = 1.5               # seconds a request may wait for them (< ACK_TIMEOUT)

_LENGTH_LIMITS = {_tx.OBSERVE: 3, _tx.CONTENT_FORMAT: 2, _tx.ACCEPT: 2,
                  _tx.BLOCK1: 3, _tx.BLOCK2: 3, _tx.SIZE1: 4, _tx.SIZE2: 4,
                  _tx.URI_PORT: 2, _tx.MAX_AGE: 4}
_REPEATABLE = frozenset((_tx.IF_MATCH, _tx.ETAG, _tx.LOCATION_PATH, _tx.URI_PATH,
                         _tx.URI_QUERY, _tx.LOCATION_QUERY))


class FormatError(ValueError):
    """The datagram is not a well-formed CoAP message."""


class TooManyOptions(FormatError):
    """More than MAX_OPTIONS options: the message is not parsed further."""

    def __init__(self, msg):
        super().__init__(f"more than {MAX_OPTIONS} options")
        self.msg = msg


def _extended(value, data, pos):
    if value < 13:
        return value, pos
    if value == 13:
        if pos + 1 > len(data):
            raise FormatError("truncated option header")
        return data[pos] + 13, pos + 1
    if value == 14:
        if pos + 2 > len(data):
            raise FormatError("truncated option header")
        return ((data[pos] << 8) | data[pos + 1]) + 269, pos + 2
    raise FormatError("reserved option nibble 15")


def decode(data):
    """Parse one datagram strictly into a txThings Message."""
    n = len(data)
    if n < 4:
        raise FormatError("shorter than a header")
    b0, code, mid = struct.unpack_from("!BBH", data)
    if b0 >> 6 != 1:
        raise FormatError("version is not 1")
    tkl = b0 & 0x0F
    if tkl > 8:
        raise FormatError("token length over 8")
    if n < 4 + tkl:
        raise FormatError("truncated token")
    if code == EMPTY and (tkl or n > 4):
        raise FormatError("empty message with content")
    msg = Message(mtype=(b0 >> 4) & 3, mid=mid, code=code,
                  token=data[4:4 + tkl])
    pos = 4 + tkl
    number = 0
    count = 0
    formats = _tx.option_formats
    while pos < n:
        byte = data[pos]
        if byte != 0xFF:
            count += 1
            if count > MAX_OPTIONS:
                raise TooManyOptions(msg)
        pos += 1
        if byte == 0xFF:
            if pos == n:
                raise FormatError("payload marker without payload")
            msg.payload = data[pos:]
            break
        delta, pos = _extended(byte >> 4, data, pos)
        length, pos = _extended(byte & 0x0F, data, pos)
        number += delta
        if pos + length > n:
            raise FormatError("truncated option value")
        value = data[pos:pos + length]
        pos += length
        if (length > _LENGTH_LIMITS.get(number, 1034)
                or (number not in _REPEATABLE and number in msg.opt._options)):
            # RFC 7252 5.4.3: a value of the wrong length, or a repeat of a
            # non-repeatable option, is treated like an unknown option:
            # ignored when elective, 4.02 when critical
            if number & 1:
                msg.bad_option = number
            continue
        option = formats.get(number, _tx.OpaqueOption)(number)
        option.decode(value)
        msg.opt.addOption(option)
    return msg


def empty(mtype, mid):
    """An empty ACK or RST: four bytes, no token (#10)."""
    return struct.pack("!BBH", 0x40 | (mtype << 4), 0, mid)


class DedupCache:
    """Recently seen (mid, peer) keys and the response sent for each.

    Two generations of dicts: lookups search both, and the current one
    becomes the previous one every ``lifetime`` seconds, or when it holds
    ``max_entries`` or half of ``max_bytes`` (keys estimated at
    DEDUP_ENTRY bytes each, plus the responses' lengths). A key therefore
    lives at least ``lifetime`` seconds unless a flood arrives in that time;
    memory is bounded by ``max_bytes`` (and twice ``max_entries``) and no
    timer is needed per message.
    """

    MISSING = object()

    def __init__(self, clock, lifetime=EXCHANGE_LIFETIME, max_entries=DEDUP_MAX,
                 max_bytes=DEDUP_BYTES):
        self.clock = clock
        self.lifetime = lifetime
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.current = {}
        self.previous = {}
        self.current_bytes = 0
        self.previous_bytes = 0
        self.rotated_at = clock.seconds()

    def get(self, key):
        value = self.current.get(key, self.MISSING)
        if value is self.MISSING:
            value = self.previous.get(key, self.MISSING)
        return value

    def add(self, key, value=None):
        if (len(self.current) >= self.max_entries
                or self.current_bytes >= self.max_bytes // 2):
            self.rotate()
        self.current[key] = value
        self.current_bytes += DEDUP_ENTRY + (len(value) if value else 0)

    def update(self, key, value):
        if key in self.current:
            old = self.current[key]
            self.current[key] = value
            self.current_bytes += len(value) - (len(old) if old else 0)
        elif key in self.previous:
            old = self.previous[key]
            self.previous[key] = value
            self.previous_bytes += len(value) - (len(old) if old else 0)

    def rotate(self):
        self.previous = self.current
        self.previous_bytes = self.current_bytes
        self.current = {}
        self.current_bytes = 0
        self.rotated_at = self.clock.seconds()

    def sweep(self):
        if self.clock.seconds() - self.rotated_at >= self.lifetime:
            self.rotate()

    def size(self):
        """Estimated bytes held."""
        return self.current_bytes + self.previous_bytes

    def __len__(self):
        return len(self.current) + len(self.previous)


class BlockCache:
    """Bodies of Block2 transfers in progress, for their later blocks.

    An entry is keyed by the request: peer, path, method and a digest of
    what was asked for (payload and query), and remembered per (peer, path,
    method) too, so a follow-up block request that carries no payload
    (aiocoap and libcoap's coap-client send a PUT's payload with block 0
    only) continues the body of that peer's latest request there.

    Bounded in bytes (``max_bytes``: every distinct body once -- identical
    bodies, such as one file fetched by 200 clients, are shared -- plus
    BLOCK_ENTRY per entry). Entries whose transfer has continued past
    block 0 are active: they are never evicted to make room, only when idle
    for ``lifetime`` seconds, or once their last block was sent (then they
    go first). To make room, bodies only ever sent as block 0
    go first, oldest first; one host keeps at most ``fresh_per_host`` of
    those. When active transfers alone fill the budget a new body is not
    kept (its later blocks are rendered again, or refused with 4.08 when the
    request cannot be run again).
    """

    def __init__(self, clock, max_bytes=BLOCK_CACHE_BYTES, lifetime=BLOCK_LIFETIME,
                 fresh_per_host=BLOCK_FRESH_PER_HOST):
        self.clock = clock
        self.max_bytes = max_bytes
        self.lifetime = lifetime
        self.fresh_per_host = fresh_per_host
        self.entries = {}        # key -> [body, cf, etag, code, seen, bodykey, key]
        self.latest = {}         # (remote, path, method) -> key
        self.fresh = {}          # key -> None, oldest first (insertion order)
        self.fresh_hosts = {}    # host -> {key: None}, oldest first
        self.bodies = {}         # (len, crc) -> [body, references]
        self.bytes = 0

    @staticmethod
    def request_key(remote, path, method, payload, query):
        digest = hashlib.blake2b(payload, digest_size=16)
        for q in query:
            digest.update(b"\xff" + q)
        return (remote, path, method, digest.digest())

    def get(self, key, follow_up_without_payload=False):
        """The entry for ``key`` (a block > 0 was asked for), marked active;
        or, for a follow-up that carries no payload, the peer's latest
        entry for that path and method."""
        entry = self.entries.get(key)
        if entry is None and follow_up_without_payload:
            latest = self.latest.get(key[:3])
            if latest is not None:
                key = latest
                entry = self.entries.get(key)
        if entry is None:
            return None
        entry[4] = self.clock.seconds()
        if key in self.fresh:
            self._unfresh(key)
        return entry

    def put(self, key, body, cf, code):
        """Keep ``body`` for ``key`` (its block 0 is being sent); return its
        ETag."""
        etag_value = zlib.crc32(body)
        etag = struct.pack("!I", etag_value)
        self.remove(key)
        bodykey = (len(body), etag_value)
        shared = self.bodies.get(bodykey)
        if shared is not None and shared[0] == body:
            shared[1] += 1
            body = shared[0]
        elif shared is None:
            self.bodies[bodykey] = [body, 1]
            self.bytes += len(body)
        else:
            bodykey = None           # a crc collision: not shared
            self.bytes += len(body)
        self.entries[key] = [body, cf, etag, code, self.clock.seconds(), bodykey, key,
                             False]
        self.bytes += BLOCK_ENTRY
        self.latest[key[:3]] = key
        self.fresh[key] = None
        host = self.fresh_hosts.setdefault(key[0][0], {})
        host[key] = None
        if len(host) > self.fresh_per_host:
            self.remove(next(iter(host)))
        while self.bytes > self.max_bytes and self.fresh:
            self.remove(next(iter(self.fresh)))
        return etag

    def finished(self, entry):
        """The last block of ``entry`` (from ``get``) was sent: the transfer
        is complete, and its body goes first to make room (kept meanwhile
        for a repeated last block)."""
        key = entry[6]
        entry[7] = True
        if self.entries.get(key) is entry and key not in self.fresh:
            self.fresh[key] = None
            self.fresh_hosts.setdefault(key[0][0], {})[key] = None

    def _unfresh(self, key):
        del self.fresh[key]
        host = self.fresh_hosts.get(key[0][0])
        if host is not None:
            host.pop(key, None)
            if not host:
                del self.fresh_hosts[key[0][0]]

    def remove(self, key):
        entry = self.entries.pop(key, None)
        if entry is None:
            return
        if key in self.fresh:
            self._unfresh(key)
        if self.latest.get(key[:3]) == key:
            del self.latest[key[:3]]
        self.bytes -= BLOCK_ENTRY
        bodykey = entry[5]
        if bodykey is None:
            self.bytes -= len(entry[0])
            return
        shared = self.bodies[bodykey]
        shared[1] -= 1
        if not shared[1]:
            del self.bodies[bodykey]
            self.bytes -= len(entry[0])

    def in_progress(self, key, idle):
        """True while the transfer kept for ``key`` has not sent its last
        block and was last active less than ``idle`` seconds ago."""
        entry = self.entries.get(key)
        return (entry is not None and not entry[7]
                and self.clock.seconds() - entry[4] < idle)

    def sweep(self):
        now = self.clock.seconds()
        for key in [k for k, e in self.entries.items() if now - e[4] > self.lifetime]:
            self.remove(key)

    def __len__(self):
        return len(self.entries)


class Observer:
    __slots__ = ("remote", "token", "target", "szx", "pending", "confirmed", "held")

    def __init__(self, remote, token, target, szx, now):
        self.remote = remote
        self.token = token
        self.target = target
        self.szx = szx
        self.pending = None          # mid of the CON notification in flight
        self.confirmed = now         # last registration or acknowledgement
        self.held = None             # DelayedCall: a newer state waits for
                                     # the transfer of the previous one


class Target:
    """One observed resource (with its path arguments) and its observers."""

    def __init__(self, proto, path, resource, args, observable):
        self.proto = proto
        self.path = path
        self.resource = resource
        self.args = args
        self.observable = observable
        self.observers = {}
        observable.watch(self.changed)

    def changed(self, _value):
        self.proto.notify(self)

    def close(self):
        self.observable.unwatch(self.changed)


class Exchange:
    """A CON message we sent and retransmit until it is acknowledged."""

    __slots__ = ("data", "remote", "timer", "count", "timeout", "observer")

    def __init__(self, data, remote, observer=None):
        self.data = data
        self.remote = remote
        self.observer = observer
        self.count = 0
        self.timeout = random.uniform(ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR)
        self.timer = None


class ServerCoap(_tx.Coap, protocol.DatagramProtocol):
    """A CoAP server endpoint serving a ``coap.site.Site``."""

    log = Logger()

    def __init__(self, site, clock=None, max_body=MAX_BODY, access=None):
        if clock is None:
            from twisted.internet import reactor as clock
        _tx.Coap.__init__(self, site)
        self.site = site
        self.access = access    # [access] control_from: refusal(host) or None
        self.clock = clock
        self.max_body = max_body
        self.dedup = DedupCache(clock)
        self.block1 = {}        # (remote, path) -> [bytearray, last_seen]
        self.block2 = BlockCache(clock)
        self.targets = {}       # path tuple -> Target
        self._host_observers = {}  # host address -> number of observations
        self.exchanges = {}     # mid -> Exchange
        self.verified = {}      # hosts that did a CON exchange, oldest first
        self._echo_secret = random.getrandbits(128).to_bytes(16, "big")
        self.pending = {}       # host -> requests whose handler is running
        self.pending_total = 0
        self.queued = {}        # host -> (Deferred, cost) waiting for a slot
        self.queued_bytes = 0
        self.obs_seq = 2
        self.stats = {"received": 0, "malformed": 0, "duplicates": 0,
                      "too_many_options": 0, "errors": 0}
        self._housekeeping = None

    # -- lifecycle -------------------------------------------------------

    def startProtocol(self):
        self._housekeeping = task.LoopingCall(self.sweep)
        self._housekeeping.clock = self.clock
        self._housekeeping.start(HOUSEKEEPING, now=False)

    def stopProtocol(self):
        if self._housekeeping is not None and self._housekeeping.running:
            self._housekeeping.stop()
        for exchange in self.exchanges.values():
            if exchange.timer is not None and exchange.timer.active():
                exchange.timer.cancel()
        self.exchanges.clear()
        for target in self.targets.values():
            target.close()
            for observer in target.observers.values():
                # a notification held for a block transfer (RFC 7641 4.2)
                # must not go out, nor start retransmitting, once stopped
                if observer.held is not None and observer.held.active():
                    observer.held.cancel()
                observer.held = None
            target.observers.clear()
        self.targets.clear()
        self._host_observers.clear()

    def sweep(self):
        """Periodic clean-up of dedup generations, idle transfers and
        observations nobody has confirmed for OBSERVE_CONFIRM seconds."""
        self.dedup.sweep()
        self.block2.sweep()
        now = self.clock.seconds()
        for key in [k for k, v in self.block1.items() if now - v[1] > BLOCK_LIFETIME]:
            del self.block1[key]
        for target in list(self.targets.values()):
            stale = [o for o in target.observers.values()
                     if o.pending is None and now - o.confirmed >= OBSERVE_CONFIRM]
            if stale:
                # RFC 7641 4.5: a confirmable notification at least every
                # 24 h; an observer that does not acknowledge it is dropped
                # when the retransmissions give up
                self.notify(target, stale)

    # -- receiving -------------------------------------------------------

    def datagramReceived(self, data, remote):
        self.stats["received"] += 1
        try:
            msg = decode(data)
        except TooManyOptions as e:
            self.stats["too_many_options"] += 1
            self._too_many_options(e.msg, remote)
            return
        except FormatError as e:
            self.stats["malformed"] += 1
            self.log.debug("malformed datagram from {remote}: {why}",
                           remote=remote, why=e)
            if len(data) >= 4 and data[0] >> 6 == 1 and (data[0] >> 4) & 3 == CON:
                self._write(empty(RST, struct.unpack_from("!H", data, 2)[0]), remote)
            return
        msg.size = len(data)
        try:
            self.handleMessage(msg, remote)
        except Exception:
            self.log.failure("unexpected error handling a datagram from {remote}",
                             remote=remote)

    def _too_many_options(self, msg, remote):
        """4.02 for a request with too many options, none of them looked at
        (no dedup entry, no state): a few bytes, never more than came in."""
        if msg.mtype in (CON, NON) and 1 <= msg.code < 32:
            mtype = ACK if msg.mtype == CON else NON
            mid = msg.mid if msg.mtype == CON else self.nextMessageID()
            self._write(Message(mtype=mtype, mid=mid, code=_tx.BAD_OPTION,
                                token=msg.token).encode(), remote)
        elif msg.mtype == CON:
            self._write(empty(RST, msg.mid), remote)

    def handleMessage(self, msg, remote):
        mtype, code = msg.mtype, msg.code
        if mtype == CON or mtype == NON:
            if 1 <= code < 32:
                if mtype == CON:
                    self._verify(remote[0])
                try:
                    path = tuple(s.decode("utf-8") for s in msg.opt.uri_path)
                except UnicodeDecodeError:
                    path = None
                if code == _tx.GET and path is not None and self.site.safe_get(path):
                    # a GET without effects is idempotent: RFC 7252 4.5 lets
                    # a duplicate be processed again, so such GETs (most of
                    # the traffic) cost the dedup cache nothing
                    return self._handle_safely(msg, remote, None, path)
                key = (msg.mid, remote)
                cached = self.dedup.get(key)
                if cached is not DedupCache.MISSING:
                    self.stats["duplicates"] += 1
                    if cached is not None:
                        self._write(cached, remote)
                    return
                self.dedup.add(key)
                self._handle_safely(msg, remote, key, path)
            elif code == EMPTY or mtype == CON:
                # CoAP ping, or a response/reserved code we never asked for
                if mtype == CON:
                    self._write(empty(RST, msg.mid), remote)
        elif code == EMPTY or 64 <= code < 192:
            # ACK or RST for something we sent (#12: requests here ignored)
            exchange = self.exchanges.get(msg.mid)
            if exchange is not None and exchange.remote == remote:
                self._verify(remote[0])
                self._finish_exchange(msg.mid, reset=(mtype == RST))

    def _handle_safely(self, msg, remote, key, path):
        """Every request is answered: an exception anywhere in the request
        path is logged with its traceback and answered 5.00 (and the
        answer is what a retransmission gets)."""
        try:
            self.handleRequest(msg, remote, key, path)
        except Exception:
            self._internal_error(msg, remote, key)

    def _internal_error(self, msg, remote, key, failure=None, separate=False):
        self.stats["errors"] += 1
        self.log.failure("unexpected error handling a request from {remote}",
                         failure, remote=remote)
        if getattr(msg, "answered", False):
            return                      # the answer went out before the error
        try:
            self._send_response(msg, remote, key, _tx.INTERNAL_SERVER_ERROR,
                                b"internal server error (see the server log)", 0,
                                blockwise=False, separate=separate)
        except Exception:
            self.log.failure("cannot send 5.00 to {remote}", remote=remote)

    def handleRequest(self, msg, remote, key, path):
        bad = getattr(msg, "bad_option", None)
        if bad is not None:
            return self._reply(msg, remote, key, _tx.BAD_OPTION,
                               f"critical option {bad} malformed or repeated")
        for number in msg.opt._options:
            if number & 1 and number not in KNOWN_OPTIONS:
                return self._reply(msg, remote, key, _tx.BAD_OPTION,
                                   f"unknown critical option {number}")
            if number in (_tx.PROXY_URI, _tx.PROXY_SCHEME):
                return self._reply(msg, remote, key, _tx.PROXYING_NOT_SUPPORTED,
                                   "proxying is not supported")
        if path is None:
            return self._reply(msg, remote, key, _tx.BAD_REQUEST,
                               "Uri-Path is not UTF-8")
        if self.access is not None and self.site.may_change(msg.code, path):
            reason = self.access.refusal(remote[0])
            if reason is not None:
                return self._reply(msg, remote, key, FORBIDDEN, reason)
        block1 = msg.opt.block1
        if block1 is not None and block1.size_exponent == 7:
            # RFC 7959 2.2: reserved, 4.00 even on a lone final block 0
            return self._reply(msg, remote, key, _tx.BAD_REQUEST,
                               "Block1 size exponent 7 is reserved")
        if block1 is not None and (block1.block_number or block1.more):
            payload = self._collect_block1(msg, remote, key, path, block1)
            if payload is None:
                return
            msg.payload = payload
        block2 = msg.opt.block2
        if block2 is not None and block2.size_exponent == 7:
            return self._reply(msg, remote, key, _tx.BAD_REQUEST,
                               "Block2 size exponent 7 is reserved")
        msg.block_key = self.block2.request_key(remote, path, msg.code, msg.payload,
                                                msg.opt.uri_query)
        if block2 is not None and block2.block_number > 0:
            # later blocks come from the body cached at block 0: the same
            # request, or (a follow-up without payload, as aiocoap and
            # coap-client send a PUT's) this peer's latest one there
            cached = self.block2.get(msg.block_key, not msg.payload)
            if cached is not None:
                body, cf, etag, code = cached[:4]
                size = 16 << min(block2.size_exponent, MAX_SZX)
                if (block2.block_number + 1) * size >= len(body):
                    self.block2.finished(cached)
                return self._send_response(msg, remote, key, code, body, cf,
                                           etag=etag)
            if msg.code != _tx.GET and not msg.payload:
                return self._reply(msg, remote, key, _tx.REQUEST_ENTITY_INCOMPLETE,
                                   "this transfer is no longer cached; "
                                   "request block 0 again")
        observe = msg.opt.observe if msg.code == _tx.GET else None
        if observe == 0 and msg.mtype == NON and not self._verified(remote, msg):
            observe = None          # no notifications to an unverified address
        host = remote[0]
        cost = getattr(msg, "size", 0) + QUEUED_ENTRY
        if (self.pending_total >= MAX_PENDING
                or (self.pending.get(host, 0) >= MAX_PENDING_PER_HOST
                    and self.queued_bytes + cost > MAX_QUEUED_BYTES)):
            # overload: the work queued behind running handlers (and its
            # memory) stays bounded; the client is told to come back
            self.stats["busy"] = self.stats.get("busy", 0) + 1
            return self._reply(msg, remote, key, _tx.SERVICE_UNAVAILABLE,
                               "server busy; try again", max_age=BUSY_MAX_AGE)

        def handle():
            return self.site.handle(msg.code, path, msg.payload, observe is not None)
        if self.pending.get(host, 0) >= MAX_PENDING_PER_HOST:
            # the host's handlers are all busy (a crowd behind one address,
            # e.g. 200 clients fetching a file at once): the request waits
            # a moment for one of them to finish rather than fail at once
            # (aiocoap gives up on a 5.03)
            return self._wait_for_slot(host, cost, handle, msg, remote, key, path,
                                       observe)
        result = handle()
        if isinstance(result, defer.Deferred):
            self.pending[host] = self.pending.get(host, 0) + 1
            self.pending_total += 1
            self._await(self._counted(host, result), msg, remote, key, path, observe)
        else:
            self._respond(result, msg, remote, key, path, observe)

    def _wait_for_slot(self, host, cost, handle, msg, remote, key, path, observe):
        """Queue a request until one of ``host``'s running handlers finishes
        (its slot passes on), for QUEUE_WAIT seconds at most (less than a
        client waits before it retransmits); then 5.03 after all. The
        queue is bounded in bytes (MAX_QUEUED_BYTES, all hosts)."""
        entry = [defer.Deferred(), cost, None]
        queue = self.queued.setdefault(host, collections.deque())
        queue.append(entry)
        self.queued_bytes += cost

        def give_up():
            queue.remove(entry)
            if not queue:
                del self.queued[host]
            self.queued_bytes -= cost
            self.stats["busy"] = self.stats.get("busy", 0) + 1
            self._reply(msg, remote, key, _tx.SERVICE_UNAVAILABLE,
                        "server busy; try again", max_age=BUSY_MAX_AGE)

        def start(_):
            self._await(self._counted(host, defer.maybeDeferred(handle)),
                        msg, remote, key, path, observe)
        entry[2] = self.clock.callLater(QUEUE_WAIT, give_up)
        entry[0].addCallback(start)

    def _counted(self, host, d):
        """``d`` holds one of ``host``'s handler slots until it fires; the
        slot then goes to the host's next waiting request, if any."""
        def finished(passthrough):
            queue = self.queued.get(host)
            if queue:
                slot, cost, timer = queue.popleft()
                if not queue:
                    del self.queued[host]
                self.queued_bytes -= cost
                timer.cancel()
                # from the reactor: a long queue of quick handlers must not
                # run nested in one another's callbacks
                self.clock.callLater(0, slot.callback, None)
                return passthrough
            self.pending_total -= 1
            left = self.pending[host] - 1
            if left:
                self.pending[host] = left
            else:
                del self.pending[host]
            return passthrough
        return d.addBoth(finished)

    def _collect_block1(self, msg, remote, key, path, block1):
        """Reassemble a Block1 body; return it when complete, else None."""
        size = 16 << block1.size_exponent
        bkey = (remote, path)
        now = self.clock.seconds()
        if block1.block_number == 0:
            if bkey not in self.block1:
                host = remote[0]
                mine = [k for k in self.block1 if k[0][0] == host]
                if len(mine) >= BLOCK1_PER_HOST:
                    del self.block1[mine[0]]        # this host's oldest upload
                elif len(self.block1) >= BLOCK_CACHE_MAX:
                    # an upload under way is never dropped for another
                    # host's new one: that one comes back later
                    self.stats["busy"] = self.stats.get("busy", 0) + 1
                    self._reply(msg, remote, key, _tx.SERVICE_UNAVAILABLE,
                                "too many uploads in progress; try again",
                                max_age=BUSY_MAX_AGE)
                    return None
            entry = self.block1[bkey] = [bytearray(), now]
        else:
            entry = self.block1.get(bkey)
            if entry is None or len(entry[0]) != block1.block_number * size:
                self.block1.pop(bkey, None)
                self._reply(msg, remote, key, _tx.REQUEST_ENTITY_INCOMPLETE,
                            "block received out of order; restart at block 0")
                return None
        if block1.more and len(msg.payload) != size:
            self.block1.pop(bkey, None)
            self._reply(msg, remote, key, _tx.BAD_REQUEST,
                        "a non-final block must be exactly one block long")
            return None
        entry[0] += msg.payload
        entry[1] = now
        size1 = msg.opt.getOption(_tx.SIZE1)
        if len(entry[0]) > self.max_body or (
                size1 is not None and size1[0].value > self.max_body):
            self.block1.pop(bkey, None)
            self._reply(msg, remote, key, _tx.REQUEST_ENTITY_TOO_LARGE,
                        f"request body over {self.max_body} bytes",
                        size1=self.max_body)
            return None
        if block1.more:
            szx = min(block1.size_exponent, MAX_SZX)
            self._send_response(msg, remote, key, _tx.CONTINUE, b"", None,
                                block1=(block1.block_number, True, szx))
            return None
        del self.block1[bkey]
        return bytes(entry[0])

    # -- amplification (RFC 7252 11.3, RFC 9175) -------------------------

    def _verify(self, host):
        verified = self.verified
        if host in verified:
            return
        if len(verified) >= VERIFIED_MAX:
            del verified[next(iter(verified))]
        verified[host] = None

    def _echo_value(self, host, epoch):
        return hashlib.blake2b(f"{host}|{epoch}".encode(), key=self._echo_secret,
                               digest_size=8).digest()

    def _verified(self, remote, msg):
        """True when ``remote``'s host did a CON exchange, or ``msg`` echoes
        an Echo value we gave that host (RFC 9175) in the last minutes."""
        host = remote[0]
        if host in self.verified:
            return True
        echo = msg.opt.getOption(ECHO)
        if echo:
            epoch = int(self.clock.seconds() // 300)
            if echo[0].value in (self._echo_value(host, epoch),
                                 self._echo_value(host, epoch - 1)):
                self._verify(host)
                return True
        return False

    def _limited(self, msg, remote):
        """The largest response for a NON request from a host not (yet)
        verified: AMPLIFICATION times the request; None when unlimited."""
        if msg.mtype != NON or self._verified(remote, msg):
            return None
        return AMPLIFICATION * getattr(msg, "size", len(msg.encode()))

    # -- responding ------------------------------------------------------

    def _await(self, d, msg, remote, key, path, observe):
        state = {"acked": False}

        def empty_ack():
            state["acked"] = True
            ack = empty(ACK, msg.mid)
            self.dedup.update(key, ack)
            self._write(ack, remote)

        timer = None
        if msg.mtype == CON:
            timer = self.clock.callLater(ACK_DELAY, empty_ack)

        def done(result):
            if timer is not None and timer.active():
                timer.cancel()
            self._respond(result, msg, remote, key, path, observe,
                          separate=state["acked"])

        def failed(f):
            if timer is not None and timer.active():
                timer.cancel()
            self._internal_error(msg, remote, key, f, separate=state["acked"])

        d.addCallback(done).addErrback(failed)

    def _respond(self, result, msg, remote, key, path, observe, separate=False):
        code, body, cf, handle = result
        extra = {}
        if observe is not None and handle is not None:
            okey = (remote, msg.token)
            if observe == 0 and 64 <= code < 96:
                # over the limits the GET is answered without Observe, which
                # tells the client it is not registered (RFC 7641 4.1)
                if self._may_observe(okey, remote, path):
                    self._register(okey, path, handle, msg, remote)
                    extra["observe"] = self.obs_seq
            else:
                self._deregister(okey, path)
        if msg.opt.block1 is not None and msg.opt.block1.block_number:
            b1 = msg.opt.block1
            extra["block1"] = (b1.block_number, False, min(b1.size_exponent, MAX_SZX))
        self._send_response(msg, remote, key, code, body, cf,
                            separate=separate, path=path, **extra)

    def _reply(self, msg, remote, key, code, text, size1=None, max_age=None):
        self._send_response(msg, remote, key, code, text.encode("utf-8"), 0,
                            size1=size1, blockwise=False, max_age=max_age)

    def _send_response(self, msg, remote, key, code, body, cf, etag=None,
                       observe=None, block1=None, size1=None, separate=False,
                       blockwise=True, path=None, max_age=None):
        szx = MAX_SZX
        block2 = msg.opt.block2 if blockwise else None
        number = 0
        if block2 is not None:
            szx = min(block2.size_exponent, MAX_SZX)
            number = block2.block_number
        limit = self._limited(msg, remote)
        while True:
            data, etag = self._encode_response(msg, remote, key, code, body, cf, etag,
                                               observe, block1, size1, separate,
                                               blockwise, path, szx, number, max_age)
            if data is None:
                return              # answered otherwise (4.02)
            if limit is None or len(data) <= limit:
                break
            if blockwise and szx > 0:
                # RFC 7959 2.4: the server may answer with smaller blocks
                # (the block number scales with the size)
                number <<= 1
                szx -= 1
                continue
            data = self._shrunk_response(msg, remote, code, limit)
            if data is None:
                self.log.debug("NON request from {remote}: no answer fits 3x", remote=remote)
                return
            break
        msg.answered = True
        if (data[0] >> 4) & 3 == CON:
            self._send_con(data, remote, struct.unpack_from("!H", data, 2)[0])
            self.dedup.update(key, empty(ACK, msg.mid))
        else:
            self.dedup.update(key, data)
            self._write(data, remote)

    def _shrunk_response(self, msg, remote, code, limit):
        """For an unverified NON request whose smallest answer would still
        exceed the limit: an error without its diagnostic text, or 4.01
        with an Echo option (RFC 9175) the client repeats to be verified."""
        mid = self.nextMessageID()
        if code >= 128:
            data = Message(mtype=NON, mid=mid, code=code, token=msg.token).encode()
            if len(data) <= limit:
                return data
        response = Message(mtype=NON, mid=mid, code=_tx.UNAUTHORIZED, token=msg.token)
        epoch = int(self.clock.seconds() // 300)
        response.opt.addOption(_tx.OpaqueOption(ECHO, self._echo_value(remote[0], epoch)))
        data = response.encode()
        return data if len(data) <= limit else None

    def _encode_response(self, msg, remote, key, code, body, cf, etag, observe,
                         block1, size1, separate, blockwise, path, szx, number,
                         max_age=None):
        blocks = None
        size = 16 << szx
        total = len(body)
        if blockwise and (total > size or number):
            if etag is None:
                etag = self.block2.put(getattr(msg, "block_key", None)
                                       or self.block2.request_key(remote, path, msg.code,
                                                                  msg.payload, ()),
                                       body, cf, code)
            start = number * size
            if start >= len(body) and start:
                self._reply(msg, remote, key, _tx.BAD_OPTION,
                            "Block2 number beyond the end of the body")
                return None, etag
            blocks = (number, start + size < len(body), szx)
            body = body[start:start + size]
        if msg.mtype == CON and not separate:
            mtype, mid = ACK, msg.mid
        elif msg.mtype == CON:
            mtype, mid = CON, self.nextMessageID()
        else:
            mtype, mid = NON, self.nextMessageID()
        response = Message(mtype=mtype, mid=mid, code=code, payload=body,
                           token=msg.token)
        opt = response.opt
        if cf is not None:
            opt.content_format = cf
        if observe is not None:
            opt.observe = observe
        if etag is not None and blocks is not None:
            opt.etag = etag
        if blocks is not None:
            opt.block2 = blocks
            if number == 0:
                opt.addOption(_tx.UintOption(_tx.SIZE2, total))
        if block1 is not None:
            opt.block1 = block1
        if size1 is not None:
            opt.addOption(_tx.UintOption(_tx.SIZE1, size1))
        if max_age is not None:
            opt.addOption(_tx.UintOption(_tx.MAX_AGE, max_age))
        return response.encode(), etag

    def _write(self, data, remote):
        try:
            self.transport.write(data, remote)
        except Exception as e:      # unreachable peer, family mismatch, ...
            self.log.debug("cannot send to {remote}: {e}", remote=remote, e=e)

    # -- confirmable messages we send ------------------------------------

    def _send_con(self, data, remote, mid, observer=None):
        exchange = Exchange(data, remote, observer)
        self.exchanges[mid] = exchange
        exchange.timer = self.clock.callLater(exchange.timeout, self._retransmit, mid)
        self._write(data, remote)
        return exchange

    def _retransmit(self, mid):
        exchange = self.exchanges.get(mid)
        if exchange is None:
            return
        if exchange.count >= MAX_RETRANSMIT:
            del self.exchanges[mid]
            if exchange.observer is not None:
                self.log.info("observer {remote} gone (no ACK); dropped",
                              remote=exchange.remote)
                self._drop_observer(exchange.observer)
            return
        exchange.count += 1
        exchange.timeout *= 2
        exchange.timer = self.clock.callLater(exchange.timeout, self._retransmit, mid)
        self._write(exchange.data, exchange.remote)

    def _finish_exchange(self, mid, reset):
        exchange = self.exchanges.pop(mid)
        if exchange.timer is not None and exchange.timer.active():
            exchange.timer.cancel()
        observer = exchange.observer
        if observer is not None:
            if observer.pending == mid:
                observer.pending = None
            if reset:
                self.log.debug("observer {remote} reset; dropped",
                               remote=exchange.remote)
                self._drop_observer(observer)
            else:
                observer.confirmed = self.clock.seconds()

    # -- observe ---------------------------------------------------------

    def _may_observe(self, okey, remote, path):
        target = self.targets.get(path)
        if target is not None and okey in target.observers:
            return True                 # a renewal
        return (self._host_observers.get(remote[0], 0) < MAX_OBSERVERS_PER_HOST
                and self.observer_count() < MAX_OBSERVERS)

    def _register(self, okey, path, handle, msg, remote):
        target = self.targets.get(path)
        if target is None:
            resource, args, observable = handle
            target = self.targets[path] = Target(self, path, resource, args, observable)
        block2 = msg.opt.block2
        szx = min(block2.size_exponent, MAX_SZX) if block2 is not None else MAX_SZX
        now = self.clock.seconds()
        observer = target.observers.get(okey)
        if observer is None:
            target.observers[okey] = Observer(remote, msg.token, target, szx, now)
            host = remote[0]
            self._host_observers[host] = self._host_observers.get(host, 0) + 1
        else:
            observer.confirmed = now    # re-registration
        return target

    def _deregister(self, okey, path):
        target = self.targets.get(path)
        if target is not None and okey in target.observers:
            self._drop_observer(target.observers[okey])

    def _drop_observer(self, observer):
        target = observer.target
        if target.observers.pop((observer.remote, observer.token), None) is None:
            return
        self._forget_observer(observer.remote[0])
        if observer.held is not None and observer.held.active():
            observer.held.cancel()
        observer.held = None
        if observer.pending is not None:
            exchange = self.exchanges.pop(observer.pending, None)
            if exchange is not None and exchange.timer.active():
                exchange.timer.cancel()
        if not target.observers:
            target.close()
            self.targets.pop(target.path, None)

    def _forget_observer(self, host):
        left = self._host_observers.get(host, 1) - 1
        if left > 0:
            self._host_observers[host] = left
        else:
            self._host_observers.pop(host, None)

    def observer_count(self):
        return sum(self._host_observers.values())

    def _hold(self, target, observer):
        if observer.held is not None:
            return
        key = self.block2.request_key(observer.remote, target.path, _tx.GET, b"", ())

        def check():
            observer.held = None
            if target.observers.get((observer.remote, observer.token)) is not observer:
                return              # dropped meanwhile
            if self.block2.in_progress(key, NOTIFY_HOLD):
                observer.held = self.clock.callLater(NOTIFY_RECHECK, check)
                return
            self.notify(target, [observer])
        observer.held = self.clock.callLater(NOTIFY_RECHECK, check)

    def notify(self, target, observers=None):
        """The target's value changed: send every observer (or those given)
        a notification."""
        if not target.observers:
            return
        self.obs_seq = (self.obs_seq + 1) & 0xFFFFFF
        result = self.site.render_target(target.resource, target.args)
        if isinstance(result, defer.Deferred):
            result.addCallback(lambda r: self._notify_all(target, r, observers))
            result.addErrback(lambda f: self.log.failure("notification failed", f))
        else:
            self._notify_all(target, result, observers)

    def _notify_all(self, target, result, observers=None):
        code, body, cf = result
        seq = self.obs_seq
        if observers is None:
            observers = list(target.observers.values())
        for observer in observers:
            if target.observers.get((observer.remote, observer.token)) is not observer:
                continue                # dropped meanwhile
            size = 16 << observer.szx
            blocks = None
            payload = body
            etag = None
            if len(body) > size:
                key = self.block2.request_key(observer.remote, target.path, _tx.GET,
                                              b"", ())
                if observer.held is not None or (
                        self.block2.in_progress(key, NOTIFY_HOLD)
                        and self.block2.entries[key][0] != body):
                    # The observer is still fetching the later blocks of the
                    # previous notification (by plain GETs that name no
                    # version): replacing that body now would hand it blocks
                    # of another one (aiocoap ends the observation with
                    # ResourceChanged). The newest state follows once that
                    # transfer is done or idle (RFC 7641 4.2: intermediate
                    # states may be skipped).
                    self._hold(target, observer)
                    continue
                etag = self.block2.put(key, body, cf, code)
                blocks = (0, True, observer.szx)
                payload = body[:size]
            mid = self.nextMessageID()
            msg = Message(mtype=CON, mid=mid, code=code, payload=payload,
                          token=observer.token)
            if cf is not None:
                msg.opt.content_format = cf
            if 64 <= code < 96:
                msg.opt.observe = seq
            if blocks is not None:
                msg.opt.etag = etag
                msg.opt.block2 = blocks
            data = msg.encode()
            retries = 0
            if observer.pending is not None:
                # RFC 7641 4.5.2: the new notification replaces the one in
                # flight and inherits its retransmission count
                old = self.exchanges.pop(observer.pending, None)
                if old is not None:
                    retries = old.count
                    if old.timer.active():
                        old.timer.cancel()
            exchange = self._send_con(data, observer.remote, mid, observer)
            exchange.count = retries
            observer.pending = mid
            if not 64 <= code < 96:
                # an error ends the observation (RFC 7641 3.2); the error
                # itself is still delivered (its exchange is not cancelled)
                observer.pending = None
                self._drop_observer(observer)
