"""The CoAP server endpoint: one request's way from datagram to answer.

The parts live in their own modules, each with small named records:

- ``codec``     the wire format: strict decoding, encoding of answers;
- ``exchange``  duplicate detection per peer, retransmission of our CONs;
- ``blockwise`` Block2 bodies in transfer, Block1 uploads;
- ``observe``   registrations, notifications, their end;
- ``limits``    per-host shares of every pool, address verification.

This module ties them together (DESIGN.md's txThings table, #3-#14): every
request gets an answer (failures 5.00, refusals 4.00), malformed
datagrams are dropped (a CON one gets a RST), unknown critical options get
4.02, a slow handler gets an empty ACK and a separate response, and the
empty ACK carries no token; NON requests get NON answers.

The order of checks for a request, in one place (:meth:`ServerCoap.request`):
verification (Echo) -> duplicate? -> admitted to the dedup cache (per-host
budget) -> options -> later Block2 block from a kept body -> Block1 ->
access policy -> handler slot (per-host share) -> handler -> answer fitted
to the 3x limit -> remembered for duplicates.
"""

import collections

from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from . import _tx
from .blockwise import (MAX_SZX, Transfers, Uploads, body_size, etag_of, is_lazy,
                        request_key)
from .codec import (ACK, CON, ECHO, EMPTY, GET, KNOWN_OPTIONS, NON, PROXY_SCHEME,
                    PROXY_URI, RST, SIZE1, Block, FormatError, Reply, TooManyOptions,
                    decode, empty, encode, read_uint)
from .exchange import EXCHANGE_LIFETIME, NON_LIFETIME, Dedup, Retransmitter
from .limits import AMPLIFICATION, Shares, Verifier
from .observe import Observations

# the names the first version exported (tests, tools)
from .blockwise import BLOCK_CACHE_BYTES, BLOCK_ENTRY, BLOCK_LIFETIME, BlockCache  # noqa: F401
from .codec import MAX_OPTIONS, _extended  # noqa: F401
from .exchange import ACK_TIMEOUT, DEDUP_BYTES, DEDUP_MAX, MAX_RETRANSMIT  # noqa: F401
from .limits import VERIFIED_MAX  # noqa: F401
from .observe import MAX_OBSERVERS, MAX_OBSERVERS_PER_HOST, OBSERVE_CONFIRM  # noqa: F401

Message = _tx.Message
ECHO_OPTION = ECHO
MAX_OBSERVERS_PER_PEER = MAX_OBSERVERS_PER_HOST
ACK_DELAY = 0.5                # a slower handler gets an empty ACK first
MAX_BODY = 64 * 1024           # largest Block1 request body accepted
HOUSEKEEPING = 10.0            # seconds between sweeps
MAX_PENDING = 256              # handlers running, all hosts
MAX_PENDING_PER_HOST = 32      # ... of one host address
MAX_URGENT = 64                # urgent handlers running beyond those (abort, status, settings)
MAX_URGENT_PER_HOST = 8
BUSY_MAX_AGE = 2               # seconds a 5.03 "busy" asks a client to wait
DEDUP_MAX_AGE = 30             # ... when its host has used its dedup budget
MAX_QUEUED_BYTES = 512 * 1024  # requests waiting for a busy host's handlers
QUEUED_PER_HOST = 128 * 1024
QUEUED_ENTRY = 2048            # estimated bytes of one waiting request
QUEUE_WAIT = 1.5               # seconds a request may wait (< ACK_TIMEOUT)

DedupCache = Dedup



def cut_text(text, room):
    """A diagnostic (UTF-8 bytes) cut to at most ``room`` bytes, never
    inside a word: whole words, or nothing."""
    if len(text) <= room:
        return text
    cut = text[:room + 1]
    space = cut.rfind(b" ")
    if space < 0:
        return b""
    return cut[:space].rstrip(b" ([:,;")

class Request:
    """One request on its way through the layer."""

    __slots__ = ("msg", "remote", "path", "verified", "limit", "seen", "separate",
                 "answered", "block_key", "observe", "urgent")

    def __init__(self, msg, remote, path, verified):
        self.msg = msg
        self.remote = remote
        self.path = path
        self.verified = verified
        # RFC 9175 2.4 / RFC 7252 11.3: until the host is verified, an
        # answer is at most 3x the request (CON or NON)
        self.limit = None if verified else AMPLIFICATION * msg.size
        self.seen = None            # exchange.Seen for a deduplicated request
        self.separate = False       # an empty ACK went out: answer as CON
        self.answered = False
        self.block_key = None
        self.observe = None
        self.urgent = False

    @property
    def host(self):
        return self.remote[0]


class Waiting:
    """A request waiting for one of its host's handler slots."""

    __slots__ = ("start", "give_up", "cost", "timer")

    def __init__(self, start, give_up, cost):
        self.start = start
        self.give_up = give_up
        self.cost = cost
        self.timer = None


class ServerCoap(_tx.Coap, protocol.DatagramProtocol):
    """A CoAP server endpoint serving a ``coap.site.Site``.

    ``access``: an optional policy with ``refusal(host) -> Optional[str]``;
    a request that changes anything (PUT/POST/DELETE, or a GET of a
    resource whose GET acts) from a host it refuses is answered 4.03 with
    the reason."""

    log = Logger()

    def __init__(self, site, clock=None, max_body=MAX_BODY, access=None):
        if clock is None:
            from twisted.internet import reactor as clock
        _tx.Coap.__init__(self, site)
        self.site = site
        self.clock = clock
        self.max_body = max_body
        self.access = access
        self.dedup = Dedup(clock)
        self.transfers = Transfers(clock)
        self.uploads = Uploads(clock)
        self.retransmitter = Retransmitter(clock, self._write)
        self.verifier = Verifier(clock)
        self.observations = Observations(clock, self, self.retransmitter, self.transfers)
        self.slots = Shares(MAX_PENDING, MAX_PENDING_PER_HOST)
        self.urgent_slots = Shares(MAX_URGENT, MAX_URGENT_PER_HOST)
        self.queued = {}            # host -> deque of Waiting
        self.queue = Shares(MAX_QUEUED_BYTES, QUEUED_PER_HOST)
        self.stats = collections.Counter()
        self._housekeeping = None

    # views the first version had (tests and the manhole read them)
    block2 = property(lambda self: self.transfers)
    exchanges = property(lambda self: self.retransmitter.by_mid)
    targets = property(lambda self: self.observations.targets)
    verified = property(lambda self: self.verifier)
    pending = property(lambda self: self.slots.used)
    pending_total = property(lambda self: self.slots.total)
    queued_bytes = property(lambda self: self.queue.total)
    _host_observers = property(lambda self: self.observations.hosts())
    obs_seq = property(lambda self: self.observations.seq)

    def observer_count(self):
        return len(self.observations)

    # -- lifecycle -------------------------------------------------------

    def startProtocol(self):
        self._housekeeping = task.LoopingCall(self.sweep)
        self._housekeeping.clock = self.clock
        self._housekeeping.start(HOUSEKEEPING, now=False)

    def stopProtocol(self):
        if self._housekeeping is not None and self._housekeeping.running:
            self._housekeeping.stop()
        # a notification held for a block transfer (RFC 7641 4.2) must not
        # go out, nor start retransmitting, once stopped
        self.observations.stop()
        self.retransmitter.stop()
        for queue in self.queued.values():
            for waiting in queue:
                if waiting.timer is not None and waiting.timer.active():
                    waiting.timer.cancel()
        self.queued.clear()
        self.queue.clear()

    def sweep(self):
        """Periodic clean-up: dedup entries past their lifetime, idle
        transfers and uploads, liveness of observations."""
        self.dedup.expire()
        self.transfers.sweep()
        self.uploads.sweep()
        self.verifier.sweep()
        self.observations.sweep()

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
                self._write(empty(RST, int.from_bytes(data[2:4], "big")), remote)
            return
        try:
            self.handle_message(msg, remote)
        except Exception:
            self.log.failure("unexpected error handling a datagram from {remote}",
                             remote=remote)

    def _too_many_options(self, msg, remote):
        """4.02 for a request with too many options, none of them looked at
        (no dedup entry, no state): a few bytes, never more than came in."""
        if msg.mtype in (CON, NON) and 1 <= msg.code < 32:
            mtype = ACK if msg.mtype == CON else NON
            mid = msg.mid if msg.mtype == CON else self.nextMessageID()
            self._write(encode(mtype, _tx.BAD_OPTION, mid, msg.token), remote)
        elif msg.mtype == CON:
            self._write(empty(RST, msg.mid), remote)

    def handle_message(self, msg, remote):
        mtype, code = msg.mtype, msg.code
        if mtype == CON or mtype == NON:
            if 1 <= code < 32:
                self.request(msg, remote)
            elif mtype == CON:
                # CoAP ping, or a response/reserved code we never asked for
                self._write(empty(RST, msg.mid), remote)
        elif code == EMPTY or 64 <= code < 192:
            # ACK or RST for something we sent (#12: requests here ignored)
            ack = self.retransmitter.acknowledge(msg.mid, remote, reset=(mtype == RST))
            if ack is not None and ack.outgoing.owner is not None:
                self.observations.acknowledged(ack.outgoing.owner, ack)

    # backwards-compatible name
    handleMessage = handle_message

    # -- one request -----------------------------------------------------------

    def request(self, msg, remote):
        path = msg.path()
        req = Request(msg, remote, path, self.verifier.check(remote[0], msg.first(ECHO)))
        if not self._served_from_transfer(req) and self._admitted(req):
            self._handle_safely(req)

    def _served_from_transfer(self, req):
        """A later block (Block2 > 0) of a body we keep: served from it, no
        handler and no dedup entry (it has no effect). As aiocoap and
        coap-client send them, a PUT's later block requests may omit the
        payload: they continue the client's latest transfer there."""
        msg = req.msg
        block2 = msg.block(_tx.BLOCK2)
        if (block2 is None or block2.num == 0 or block2.szx == 7 or req.path is None
                or msg.bad_option is not None or msg.block(_tx.BLOCK1) is not None):
            return False
        req.block_key = request_key(req.remote, req.path, msg.code, msg.payload,
                                    msg.options.get(_tx.URI_QUERY, ()))
        transfer = self.transfers.get(req.block_key, not msg.payload)
        if transfer is None:
            return False
        self._send_body(req, transfer.code, transfer.body, transfer.content_format,
                        transfer=transfer)
        return True

    def _admitted(self, req):
        """Duplicate detection (RFC 7252 4.5): a request that may act is
        answered from the dedup cache when seen before, and is run only
        with a dedup entry (its host within its budget). A GET without
        effects is simply answered again."""
        msg = req.msg
        if req.path is not None and self.site.safe(msg.code, req.path):
            return True
        key = (msg.mid, req.remote)
        seen = self.dedup.get(key)
        if seen is not None:
            self.stats["duplicates"] += 1
            if seen.answer is not None:
                self._write(seen.answer, req.remote)
            return False
        urgent = req.path is not None and self.site.urgent(req.path)
        lifetime = EXCHANGE_LIFETIME if msg.mtype == CON else NON_LIFETIME
        req.seen = self.dedup.admit(key, lifetime, urgent)
        if req.seen is None:
            self.stats["dedup_refused"] += 1
            self._reply(req, _tx.SERVICE_UNAVAILABLE,
                        "too many requests from this host in the last minutes; "
                        "try again later", max_age=DEDUP_MAX_AGE)
            return False
        return True

    def _handle_safely(self, req):
        """Every request is answered: an exception anywhere in the request
        path is logged with its traceback and answered 5.00 (and the
        answer is what a retransmission gets)."""
        try:
            self._handle(req)
        except Exception:
            self._internal_error(req)

    def _internal_error(self, req, failure=None):
        self.stats["errors"] += 1
        self.log.failure("unexpected error handling a request from {remote}",
                         failure, remote=req.remote)
        if req.answered:
            return                      # the answer went out before the error
        try:
            self._reply(req, _tx.INTERNAL_SERVER_ERROR,
                        "internal server error (see the server log)")
        except Exception:
            self.log.failure("cannot send 5.00 to {remote}", remote=req.remote)

    def _handle(self, req):
        msg, path = req.msg, req.path
        if msg.bad_option is not None:
            return self._reply(req, _tx.BAD_OPTION,
                               f"critical option {msg.bad_option} malformed or repeated")
        for number in msg.options:
            if number & 1 and number not in KNOWN_OPTIONS:
                return self._reply(req, _tx.BAD_OPTION, f"unknown critical option {number}")
            if number == PROXY_URI or number == PROXY_SCHEME:
                return self._reply(req, _tx.PROXYING_NOT_SUPPORTED,
                                   "proxying is not supported")
        if path is None:
            return self._reply(req, _tx.BAD_REQUEST, "Uri-Path is not UTF-8")
        refusal = self._refused(req)
        if refusal is not None:
            return self._reply(req, _tx.FORBIDDEN, refusal)
        block1 = msg.block(_tx.BLOCK1)
        if block1 is not None and block1.szx == 7:
            # RFC 7959 2.2: reserved, 4.00 even on a lone final block 0
            return self._reply(req, _tx.BAD_REQUEST, "Block1 size exponent 7 is reserved")
        payload = msg.payload
        if block1 is not None and (block1.num or block1.more):
            payload = self._collect_block1(req, block1)
            if payload is None:
                return
        block2 = msg.block(_tx.BLOCK2)
        if block2 is not None and block2.szx == 7:
            return self._reply(req, _tx.BAD_REQUEST, "Block2 size exponent 7 is reserved")
        req.block_key = request_key(req.remote, path, msg.code, payload,
                                    msg.options.get(_tx.URI_QUERY, ()))
        if block2 is not None and block2.num > 0 and msg.code != GET and not payload:
            return self._reply(req, _tx.REQUEST_ENTITY_INCOMPLETE,
                               "this transfer is no longer kept; request block 0 again")
        observe = msg.observe() if msg.code == GET else None
        if observe == 0 and msg.mtype == NON and not req.verified:
            observe = None          # no notifications to an unverified NON client
        req.observe = observe
        req.urgent = self.site.urgent(path)
        self._run(req, lambda: self.site.handle(msg.code, path, payload,
                                                observe is not None))

    def _refused(self, req):
        """The access policy's reason to refuse a request that changes
        something, or None."""
        if self.access is None or not self.site.may_change(req.msg.code, req.path):
            return None
        return self.access.refusal(req.host)

    # -- handler slots -------------------------------------------------------------

    def _run(self, req, handle, deliver=None):
        """Run the handler if a slot is free for the host (urgent requests
        have their own pool); a host at its share waits a moment for one of
        its own to finish; otherwise 5.03. ``deliver`` takes the result
        (default: answer the request with it)."""
        host = req.host
        pool = self.urgent_slots if req.urgent else self.slots
        if pool.fits(host):
            return self._call(req, handle, pool, deliver)
        cost = req.msg.size + QUEUED_ENTRY
        if not req.urgent and not pool.host_fits(host) and self._queue_room(host, cost):
            # the host's handlers are all busy (a crowd behind one address,
            # e.g. 200 clients fetching a file at once): the request waits
            # a moment for one of them to finish rather than fail at once
            # (aiocoap gives up on a 5.03)
            return self._wait_for_slot(req, handle, cost, deliver)
        self._busy(req)

    def _busy(self, req):
        self.stats["busy"] += 1
        self._reply(req, _tx.SERVICE_UNAVAILABLE, "server busy; try again",
                    max_age=BUSY_MAX_AGE)

    def _queue_room(self, host, cost):
        """Room in the wait queue: a host may use what nobody else needs;
        one within its share makes room by turning away the newest waiting
        requests of the biggest holder beyond its share (5.03)."""
        queue = self.queue
        while queue.total + cost > queue.cap:
            if not queue.host_fits(host, cost):
                return False
            biggest, held = queue.largest()
            if biggest is None or held <= queue.share:
                return False
            waiting = self.queued[biggest][-1]
            waiting.timer.cancel()
            waiting.give_up()
        return True

    def _call(self, req, handle, pool, deliver=None):
        result = handle()
        if isinstance(result, defer.Deferred):
            pool.take(req.host)
            self._await(self._holding_slot(req.host, pool, result), req, deliver)
        elif deliver is not None:
            deliver(result)
        else:
            self._respond(req, result)

    def _wait_for_slot(self, req, handle, cost, deliver=None):
        """Queue a request until one of its host's running handlers finishes
        (its slot passes on), for QUEUE_WAIT seconds at most (less than a
        client waits before it retransmits); then 5.03 after all."""
        host = req.host
        queue = self.queued.setdefault(host, collections.deque())

        def start():
            self._await(self._holding_slot(host, self.slots, defer.maybeDeferred(handle)),
                        req, deliver)

        def give_up():
            queue.remove(waiting)
            if not queue:
                del self.queued[host]
            self.queue.release(host, cost)
            self._busy(req)
        waiting = Waiting(start, give_up, cost)
        queue.append(waiting)
        self.queue.take(host, cost)
        waiting.timer = self.clock.callLater(QUEUE_WAIT, give_up)

    def _holding_slot(self, host, pool, d):
        """``d`` holds one of ``host``'s slots until it fires; the slot then
        goes to the host's next waiting request, if any."""
        def finished(passthrough):
            queue = self.queued.get(host) if pool is self.slots else None
            if queue:
                waiting = queue.popleft()
                if not queue:
                    del self.queued[host]
                self.queue.release(host, waiting.cost)
                waiting.timer.cancel()
                # from the reactor: a long queue of quick handlers must not
                # run nested in one another's callbacks
                self.clock.callLater(0, waiting.start)
            else:
                pool.release(host)
            return passthrough
        return d.addBoth(finished)

    # -- Block1 ----------------------------------------------------------------------

    def _collect_block1(self, req, block1):
        """Reassemble a Block1 body; return it when complete, else None."""
        msg = req.msg
        size = 16 << block1.szx
        key = (req.remote, req.path)
        if block1.num == 0:
            upload = self.uploads.start(key)
            if upload is None:
                # an upload under way is never dropped for another host's
                # new one: that one comes back later
                self.stats["busy"] += 1
                self._reply(req, _tx.SERVICE_UNAVAILABLE,
                            "too many uploads in progress; try again", max_age=BUSY_MAX_AGE)
                return None
        else:
            upload = self.uploads.get(key)
            if upload is None or len(upload.data) != block1.num * size:
                self.uploads.remove(key)
                self._reply(req, _tx.REQUEST_ENTITY_INCOMPLETE,
                            "block received out of order; restart at block 0")
                return None
        if block1.more and len(msg.payload) != size:
            self.uploads.remove(key)
            self._reply(req, _tx.BAD_REQUEST,
                        "a non-final block must be exactly one block long")
            return None
        upload.data += msg.payload
        upload.used = self.clock.seconds()
        size1 = msg.first(SIZE1)
        if len(upload.data) > self.max_body or (
                size1 is not None and read_uint(size1) > self.max_body):
            self.uploads.remove(key)
            self._reply(req, _tx.REQUEST_ENTITY_TOO_LARGE,
                        f"request body over {self.max_body} bytes", size1=self.max_body)
            return None
        if block1.more:
            szx = min(block1.szx, MAX_SZX)
            self._send(req, Reply(_tx.CONTINUE, block1=Block(block1.num, True, szx)))
            return None
        self.uploads.remove(key)
        return bytes(upload.data)

    # -- answering ---------------------------------------------------------------

    def _await(self, d, req, deliver=None):
        """A handler's Deferred: past ACK_DELAY a CON request gets an empty
        ACK, and the answer follows as a separate (CON) response."""
        deliver = deliver or (lambda result: self._respond(req, result))
        timer = None
        if req.msg.mtype == CON:
            timer = self.clock.callLater(ACK_DELAY, self._empty_ack, req)

        def done(result):
            if timer is not None and timer.active():
                timer.cancel()
            deliver(result)

        def failed(f):
            if timer is not None and timer.active():
                timer.cancel()
            self._internal_error(req, f)
        d.addCallback(done).addErrback(failed)

    def _empty_ack(self, req):
        req.separate = True
        ack = empty(ACK, req.msg.mid)
        self.dedup.answer(req.seen, ack)
        self._write(ack, req.remote)

    def _respond(self, req, result):
        code, body, cf, handle = result
        observe = None
        if req.observe is not None and handle is not None:
            msg = req.msg
            if req.observe == 0 and 64 <= code < 96:
                # over the limits the GET is answered without Observe, which
                # tells the client it is not registered (RFC 7641 4.1)
                block2 = msg.block(_tx.BLOCK2)
                szx = min(block2.szx, MAX_SZX) if block2 is not None else MAX_SZX
                if self.observations.register(req.remote, msg.token, req.path, handle,
                                              szx, msg.size):
                    observe = self.observations.seq
            else:
                self.observations.deregister(req.remote, msg.token, req.path)
        block1 = req.msg.block(_tx.BLOCK1)
        if block1 is not None and block1.num:
            block1 = Block(block1.num, False, min(block1.szx, MAX_SZX))
        else:
            block1 = None
        self._send_body(req, code, body, cf, observe=observe, block1=block1)

    def _reply(self, req, code, text, size1=None, max_age=None):
        """An answer with a plain-text diagnostic (never blockwise): over
        the 3x limit the text is cut short."""
        self._send(req, Reply(code, text.encode("utf-8"), 0 if text else None,
                              size1=size1, max_age=max_age), text=True)

    def _send_body(self, req, code, body, cf, observe=None, block1=None, transfer=None):
        """An answer carrying ``body``: whole, or the Block2 block asked
        for (1024 bytes, or smaller: what the client asked for, and what
        fits the 3x limit -- RFC 7959 2.4 lets the server answer with
        smaller blocks, the block number scaling with them)."""
        msg = req.msg
        block2 = msg.block(_tx.BLOCK2)
        szx, num = MAX_SZX, 0
        if block2 is not None:
            szx, num = min(block2.szx, MAX_SZX), block2.num
        total = body_size(body)
        if total <= (16 << szx) and not num and transfer is None and not is_lazy(body):
            reply = Reply(code, body, cf, observe=observe, block1=block1)
            data = self._encode(req, reply)
            if req.limit is None or len(data) <= req.limit:
                return self._send(req, reply, data=data)
        if transfer is None:
            if req.block_key is None:
                req.block_key = request_key(req.remote, req.path or (), msg.code,
                                            msg.payload, ())
            transfer = self.transfers.put(req.block_key, body, cf, code)
        szx, num, echo = self._fit_block(req, transfer, szx, num, observe, block1)
        size = 16 << szx
        start = num * size
        if start >= total and start:
            return self._reply(req, _tx.BAD_OPTION, "Block2 number beyond the end of the body")
        more = start + size < total
        if not more and transfer.key in self.transfers.entries:
            self.transfers.finished(transfer)

        def send(chunk):
            self._send(req, Reply(code, chunk, cf, etag=transfer.etag, observe=observe,
                                  block2=Block(num, more, szx),
                                  size2=total if num == 0 else None,
                                  block1=block1, echo=echo))
        if not is_lazy(body):
            return send(body[start:start + size])
        # a file: this block is read from it by offset (in the file pool,
        # holding one of the host's slots meanwhile)
        self._run(req, lambda: body.read(start, min(size, total - start)), send)

    def _fit_block(self, req, transfer, szx, num, observe, block1):
        """The largest block size (and so block number) whose answer fits
        the request's limit (RFC 7959 2.4: the server may answer with
        smaller blocks, the number scaling with them); a shrunk answer
        offers an Echo value (RFC 9175) where it still fits."""
        if req.limit is None:
            return szx, num, None

        def fits(s, echo):
            n = num << (szx - s)
            size = 16 << s
            payload = max(0, min(size, transfer.size - n * size))
            reply = Reply(transfer.code, b"", transfer.content_format, etag=transfer.etag,
                          observe=observe, block2=Block(n, True, s),
                          size2=transfer.size if n == 0 else None, block1=block1,
                          echo=echo)
            return self._length(req, reply) + 1 + payload <= req.limit
        plain = next((s for s in range(szx, -1, -1) if fits(s, None)), 0)
        if plain == szx:
            return szx, num, None
        echo = self.verifier.echo_for(req.host)
        offered = next((s for s in range(plain, -1, -1) if fits(s, echo)), None)
        if offered is None:
            return plain, num << (szx - plain), None
        return offered, num << (szx - offered), echo

    def _length(self, req, reply):
        return len(reply.encode(ACK, 0, req.msg.token))

    def _encode(self, req, reply):
        """``reply`` as the datagram answering ``req`` (piggybacked in the
        ACK, or a separate CON, or NON)."""
        msg = req.msg
        if msg.mtype == CON and not req.separate:
            req_mid = msg.mid
            mtype = ACK
        else:
            mtype, req_mid = (CON if msg.mtype == CON else NON), self.nextMessageID()
        return reply.encode(mtype, req_mid, msg.token)

    def _send(self, req, reply, text=False, data=None):
        """Fit ``reply`` to the request's limit, send it, and remember it
        for duplicates."""
        msg = req.msg
        if data is None:
            data = self._encode(req, reply)
        if req.limit is not None and len(data) > req.limit:
            reply = self._shrunk(req, reply, text)
            if reply is None:
                self.log.debug("request from {remote}: no answer fits 3x",
                               remote=req.remote)
                return
            data = self._encode(req, reply)
        req.answered = True
        if data[0] >> 4 & 3 == CON:
            self.retransmitter.send(req.remote, int.from_bytes(data[2:4], "big"), data)
            self.dedup.answer(req.seen, empty(ACK, msg.mid))
        else:
            self.dedup.answer(req.seen, data)
            self._write(data, req.remote)

    def _shrunk(self, req, reply, text):
        """An answer over the 3x limit that cannot be made of smaller
        blocks: its diagnostic text cut short, or 4.01 with an Echo option
        (RFC 9175 2.4) the client repeats to be verified."""
        limit = req.limit
        echo = self.verifier.echo_for(req.host)
        if text and reply.code >= 128:
            bare = reply._replace(payload=b"", content_format=None)
            room = limit - self._length(req, bare) - 2      # payload marker, format
            if room >= 0:
                cut = cut_text(reply.payload, room)
                return reply._replace(payload=cut, content_format=0 if cut else None)
        unauthorized = Reply(_tx.UNAUTHORIZED, echo=echo)
        if self._length(req, unauthorized) <= limit:
            return unauthorized
        return None

    # -- what the observe layer asks of its endpoint -----------------------------

    def render_target(self, target):
        return self.site.render_target(target.resource, target.args)

    def notification(self, observer, result, seq):
        """(mid, datagram) of a CON notification for ``observer``: its
        first block when the body spans several, within 3x its
        registration until its host is verified."""
        code, body, cf = result
        observe = seq if 64 <= code < 96 else None
        limit = (None if self.verifier.is_verified(observer.host)
                 else AMPLIFICATION * observer.request_size)
        mid = self.nextMessageID()
        token = observer.token
        szx = observer.szx
        reply = Reply(code, body, cf, observe=observe)
        if len(body) > (16 << szx) or (limit is not None
                                       and len(reply.encode(CON, mid, token)) > limit):
            key = request_key(observer.remote, observer.target.path, GET, b"", ())
            etag = self.transfers.put(key, body, cf, code).etag if len(body) > 16 else etag_of(body)
            echo = None
            while True:
                size = 16 << szx
                reply = Reply(code, body[:size], cf, etag=etag, observe=observe,
                              block2=Block(0, len(body) > size, szx), size2=len(body),
                              echo=echo)
                if limit is None or len(reply.encode(CON, mid, token)) <= limit:
                    break
                if echo is None:
                    echo = self.verifier.echo_for(observer.host)
                    continue
                if szx == 0:
                    return None
                szx -= 1
        return mid, reply.encode(CON, mid, token)

    def ended(self, observer, max_age):
        """Tell a client its observation ended for lack of room (RFC 7641
        3.2: an error notification ends it)."""
        data = Reply(_tx.SERVICE_UNAVAILABLE, max_age=max_age).encode(
            NON, self.nextMessageID(), observer.token)
        self._write(data, observer.remote)

    def notify(self, target, observers=None):
        self.observations.notify(target, observers)

    # -- output ------------------------------------------------------------------------

    def _write(self, data, remote):
        try:
            self.transport.write(data, remote)
        except Exception as e:      # unreachable peer, family mismatch, ...
            self.log.debug("cannot send to {remote}: {e}", remote=remote, e=e)
