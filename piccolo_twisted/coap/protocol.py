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

import random
import struct
import zlib

from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from . import _tx

CON, NON, ACK, RST = _tx.CON, _tx.NON, _tx.ACK, _tx.RST
EMPTY = _tx.EMPTY
Message = _tx.Message

KNOWN_OPTIONS = frozenset(_tx.options)
ACK_TIMEOUT = _tx.ACK_TIMEOUT
ACK_RANDOM_FACTOR = _tx.ACK_RANDOM_FACTOR
MAX_RETRANSMIT = _tx.MAX_RETRANSMIT
EXCHANGE_LIFETIME = _tx.EXCHANGE_LIFETIME
MAX_SZX = 6                    # 1024-byte blocks
ACK_DELAY = 0.5                # a slower handler gets an empty ACK first
MAX_BODY = 64 * 1024           # largest Block1 request body accepted
DEDUP_MAX = 16384              # entries per dedup generation
BLOCK_CACHE_MAX = 64           # Block2 bodies kept for follow-up requests
BLOCK_LIFETIME = 60.0          # seconds a Block1/Block2 transfer may idle
HOUSEKEEPING = 10.0            # seconds between sweeps
MAX_OBSERVERS = 2048           # observations in all
MAX_OBSERVERS_PER_PEER = 256   # observations one endpoint may hold

_LENGTH_LIMITS = {_tx.OBSERVE: 3, _tx.CONTENT_FORMAT: 2, _tx.ACCEPT: 2,
                  _tx.BLOCK1: 3, _tx.BLOCK2: 3, _tx.SIZE1: 4, _tx.SIZE2: 4,
                  _tx.URI_PORT: 2, _tx.MAX_AGE: 4}


class FormatError(ValueError):
    """The datagram is not a well-formed CoAP message."""


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
    formats = _tx.option_formats
    while pos < n:
        byte = data[pos]
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
        if length > _LENGTH_LIMITS.get(number, 1034):
            raise FormatError(f"option {number} too long")
        option = formats.get(number, _tx.OpaqueOption)(number)
        option.decode(data[pos:pos + length])
        pos += length
        msg.opt.addOption(option)
    return msg


def empty(mtype, mid):
    """An empty ACK or RST: four bytes, no token (#10)."""
    return struct.pack("!BBH", 0x40 | (mtype << 4), 0, mid)


class DedupCache:
    """Recently seen (mid, peer) keys and the response sent for each.

    Two generations of dicts: lookups search both, and the current one
    becomes the previous one every ``lifetime`` seconds or when it holds
    ``max_entries``. A key therefore lives at least ``lifetime`` seconds
    unless more than ``max_entries`` requests arrive in that time; memory is
    bounded by twice ``max_entries`` and no timer is needed per message.
    """

    MISSING = object()

    def __init__(self, clock, lifetime=EXCHANGE_LIFETIME, max_entries=DEDUP_MAX):
        self.clock = clock
        self.lifetime = lifetime
        self.max_entries = max_entries
        self.current = {}
        self.previous = {}
        self.rotated_at = clock.seconds()

    def get(self, key):
        value = self.current.get(key, self.MISSING)
        if value is self.MISSING:
            value = self.previous.get(key, self.MISSING)
        return value

    def add(self, key, value=None):
        if len(self.current) >= self.max_entries:
            self.rotate()
        self.current[key] = value

    def update(self, key, value):
        if key in self.current:
            self.current[key] = value
        elif key in self.previous:
            self.previous[key] = value

    def rotate(self):
        self.previous = self.current
        self.current = {}
        self.rotated_at = self.clock.seconds()

    def sweep(self):
        if self.clock.seconds() - self.rotated_at >= self.lifetime:
            self.rotate()

    def __len__(self):
        return len(self.current) + len(self.previous)


class Observer:
    __slots__ = ("remote", "token", "target", "szx", "pending")

    def __init__(self, remote, token, target, szx):
        self.remote = remote
        self.token = token
        self.target = target
        self.szx = szx
        self.pending = None          # mid of the CON notification in flight


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

    def __init__(self, site, clock=None, max_body=MAX_BODY):
        if clock is None:
            from twisted.internet import reactor as clock
        _tx.Coap.__init__(self, site)
        self.site = site
        self.clock = clock
        self.max_body = max_body
        self.dedup = DedupCache(clock)
        self.block1 = {}        # (remote, path) -> [bytearray, last_seen]
        self.block2 = {}        # (remote, path) -> (body, cf, etag, code, seen)
        self.targets = {}       # path tuple -> Target
        self._peer_observers = {}  # remote -> number of observations
        self.exchanges = {}     # mid -> Exchange
        self.obs_seq = 2
        self.stats = {"received": 0, "malformed": 0, "duplicates": 0}
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
        self.targets.clear()
        self._peer_observers.clear()

    def sweep(self):
        """Periodic clean-up of dedup generations and idle transfers."""
        self.dedup.sweep()
        now = self.clock.seconds()
        for table, index in ((self.block1, 1), (self.block2, 4)):
            for key in [k for k, v in table.items()
                        if now - v[index] > BLOCK_LIFETIME]:
                del table[key]

    # -- receiving -------------------------------------------------------

    def datagramReceived(self, data, remote):
        self.stats["received"] += 1
        try:
            msg = decode(data)
        except FormatError as e:
            self.stats["malformed"] += 1
            self.log.debug("malformed datagram from {remote}: {why}",
                           remote=remote, why=e)
            if len(data) >= 4 and data[0] >> 6 == 1 and (data[0] >> 4) & 3 == CON:
                self._write(empty(RST, struct.unpack_from("!H", data, 2)[0]), remote)
            return
        try:
            self.handleMessage(msg, remote)
        except Exception:
            self.log.failure("unexpected error handling a datagram from {remote}",
                             remote=remote)

    def handleMessage(self, msg, remote):
        mtype, code = msg.mtype, msg.code
        if mtype == CON or mtype == NON:
            if 1 <= code < 32:
                try:
                    path = tuple(s.decode("utf-8") for s in msg.opt.uri_path)
                except UnicodeDecodeError:
                    path = None
                if code == _tx.GET and path is not None and self.site.safe_get(path):
                    # a GET without effects is idempotent: RFC 7252 4.5 lets
                    # a duplicate be processed again, so such GETs (most of
                    # the traffic) cost the dedup cache nothing
                    return self.handleRequest(msg, remote, None, path)
                key = (msg.mid, remote)
                cached = self.dedup.get(key)
                if cached is not DedupCache.MISSING:
                    self.stats["duplicates"] += 1
                    if cached is not None:
                        self._write(cached, remote)
                    return
                self.dedup.add(key)
                self.handleRequest(msg, remote, key, path)
            elif code == EMPTY or mtype == CON:
                # CoAP ping, or a response/reserved code we never asked for
                if mtype == CON:
                    self._write(empty(RST, msg.mid), remote)
        elif code == EMPTY or 64 <= code < 192:
            # ACK or RST for something we sent (#12: requests here ignored)
            exchange = self.exchanges.get(msg.mid)
            if exchange is not None and exchange.remote == remote:
                self._finish_exchange(msg.mid, reset=(mtype == RST))

    def handleRequest(self, msg, remote, key, path):
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
        block1 = msg.opt.block1
        if block1 is not None and (block1.block_number or block1.more):
            payload = self._collect_block1(msg, remote, key, path, block1)
            if payload is None:
                return
            msg.payload = payload
        block2 = msg.opt.block2
        if block2 is not None and block2.size_exponent == 7:
            return self._reply(msg, remote, key, _tx.BAD_REQUEST,
                               "Block2 size exponent 7 is reserved")
        if block2 is not None and block2.block_number > 0:
            # later blocks come from the body cached at block 0 (a PUT's
            # follow-up block requests carry no payload to run it again)
            cached = self.block2.get((remote, path))
            if cached is not None:
                body, cf, etag, code, _ = cached
                self.block2[(remote, path)] = (body, cf, etag, code,
                                              self.clock.seconds())
                return self._send_response(msg, remote, key, code, body, cf,
                                           etag=etag)
        observe = msg.opt.observe if msg.code == _tx.GET else None
        result = self.site.handle(msg.code, path, msg.payload, observe is not None)
        if isinstance(result, defer.Deferred):
            self._await(result, msg, remote, key, path, observe)
        else:
            self._respond(result, msg, remote, key, path, observe)

    def _collect_block1(self, msg, remote, key, path, block1):
        """Reassemble a Block1 body; return it when complete, else None."""
        if block1.size_exponent == 7:
            self._reply(msg, remote, key, _tx.BAD_REQUEST,
                        "Block1 size exponent 7 is reserved")
            return None
        size = 16 << block1.size_exponent
        bkey = (remote, path)
        now = self.clock.seconds()
        if block1.block_number == 0:
            if len(self.block1) >= BLOCK_CACHE_MAX:
                self.block1.pop(next(iter(self.block1)))
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
            self.log.failure("response could not be sent", f)

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

    def _reply(self, msg, remote, key, code, text, size1=None):
        self._send_response(msg, remote, key, code, text.encode("utf-8"), 0,
                            size1=size1, blockwise=False)

    def _cache_body(self, remote, path, body, cf, code):
        """Keep a body sent in blocks so later blocks come from it (whatever
        its code, and though a PUT's follow-ups carry no payload); return
        its ETag."""
        etag = struct.pack("!I", zlib.crc32(body))
        if len(self.block2) >= BLOCK_CACHE_MAX:
            self.block2.pop(next(iter(self.block2)))
        self.block2[(remote, path)] = (body, cf, etag, code, self.clock.seconds())
        return etag

    def _send_response(self, msg, remote, key, code, body, cf, etag=None,
                       observe=None, block1=None, size1=None, separate=False,
                       blockwise=True, path=None):
        szx = MAX_SZX
        block2 = msg.opt.block2 if blockwise else None
        number = 0
        if block2 is not None:
            szx = min(block2.size_exponent, MAX_SZX)
            number = block2.block_number
        blocks = None
        size = 16 << szx
        total = len(body)
        if blockwise and (total > size or number):
            if etag is None:
                etag = self._cache_body(remote, path, body, cf, code)
            start = number * size
            if start >= len(body) and start:
                return self._reply(msg, remote, key, _tx.BAD_OPTION,
                                   "Block2 number beyond the end of the body")
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
        data = response.encode()
        if mtype == CON:
            self._send_con(data, remote, mid)
            self.dedup.update(key, empty(ACK, msg.mid))
        else:
            self.dedup.update(key, data)
            self._write(data, remote)

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

    # -- observe ---------------------------------------------------------

    def _may_observe(self, okey, remote, path):
        target = self.targets.get(path)
        if target is not None and okey in target.observers:
            return True                 # a renewal
        return (self._peer_observers.get(remote, 0) < MAX_OBSERVERS_PER_PEER
                and self.observer_count() < MAX_OBSERVERS)

    def _register(self, okey, path, handle, msg, remote):
        target = self.targets.get(path)
        if target is None:
            resource, args, observable = handle
            target = self.targets[path] = Target(self, path, resource, args, observable)
        block2 = msg.opt.block2
        szx = min(block2.size_exponent, MAX_SZX) if block2 is not None else MAX_SZX
        if okey not in target.observers:
            target.observers[okey] = Observer(remote, msg.token, target, szx)
            self._peer_observers[remote] = self._peer_observers.get(remote, 0) + 1
        return target

    def _deregister(self, okey, path):
        target = self.targets.get(path)
        if target is not None and okey in target.observers:
            self._drop_observer(target.observers[okey])

    def _drop_observer(self, observer):
        target = observer.target
        if target.observers.pop((observer.remote, observer.token), None) is None:
            return
        self._forget_observer(observer.remote)
        if observer.pending is not None:
            exchange = self.exchanges.pop(observer.pending, None)
            if exchange is not None and exchange.timer.active():
                exchange.timer.cancel()
        if not target.observers:
            target.close()
            self.targets.pop(target.path, None)

    def _forget_observer(self, remote):
        left = self._peer_observers.get(remote, 1) - 1
        if left > 0:
            self._peer_observers[remote] = left
        else:
            self._peer_observers.pop(remote, None)

    def observer_count(self):
        return sum(self._peer_observers.values())

    def notify(self, target):
        """The target's value changed: send every observer a notification."""
        if not target.observers:
            return
        self.obs_seq = (self.obs_seq + 1) & 0xFFFFFF
        result = self.site.render_target(target.resource, target.args)
        if isinstance(result, defer.Deferred):
            result.addCallback(lambda r: self._notify_all(target, r))
            result.addErrback(lambda f: self.log.failure("notification failed", f))
        else:
            self._notify_all(target, result)

    def _notify_all(self, target, result):
        code, body, cf = result
        seq = self.obs_seq
        for observer in list(target.observers.values()):
            size = 16 << observer.szx
            blocks = None
            payload = body
            etag = None
            if len(body) > size:
                etag = self._cache_body(observer.remote, target.path, body, cf, code)
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
