"""The CoAP server endpoint: one request's way from datagram to answer.

The parts live in their own modules, each with small named records:

- ``codec``     the wire format: strict decoding, encoding of answers;
- ``exchange``  duplicate detection per peer, message IDs, retransmission
                of our CONs;
- ``blockwise`` Block2 bodies in transfer, Block1 uploads;
- ``observe``   registrations, notifications, their end;
- ``limits``    per-host shares of every pool, verification (by Echo only)
                and the credit of addresses not verified.

This module ties them together (DESIGN.md's txThings table, #3-#14): every
request gets an answer (failures 5.00, refusals 4.00), malformed
datagrams are dropped (a CON one gets a RST), unknown critical options get
4.02, a slow handler gets an empty ACK and a separate response, and the
empty ACK carries no token; NON requests get NON answers.

The order of checks for a request, in one place (:meth:`ServerCoap.request`):
verification (an Echo value returned now, or before) -> later Block2
block from a kept body -> duplicate? -> admitted to the dedup cache
(per-host budget; a host not verified that finds the open part full is
refused with an Echo value to return) -> options -> Block1 -> access
policy -> handler slot (per-host share; urgent requests have a pool of
their own) -> handler -> answer fitted to what the address may be sent
(smaller blocks, offering an Echo value) -> remembered for duplicates.

Everything written to an address not verified is paid from its credit
(:meth:`ServerCoap._write`): 3x what came from it, in total.
"""

import collections

from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from . import _tx
from .blockwise import (MAX_SZX, Transfers, Uploads, body_size, etag_of, is_lazy,
                        request_key)
from .codec import (ACK, CON, ECHO, EMPTY, GET, KNOWN_OPTIONS, NON, PROXY_SCHEME,
                    PROXY_URI, REQUEST_TAG, RST, SIZE1, Block, FormatError, Reply,
                    TooManyOptions, decode, empty, encode, read_uint)
from .exchange import (EXCHANGE_LIFETIME, FULL, HOST_FULL, NON_LIFETIME, Dedup,
                       MessageIds, Retransmitter, Seen)
from .limits import AMPLIFICATION, Credit, Guesses, Shares, Verifier, host_of
from .observe import Observations

# the names the first version exported (tests, tools)
from .blockwise import BLOCK_CACHE_BYTES, BLOCK_ENTRY, BLOCK_LIFETIME, BlockCache  # noqa: F401
from .codec import MAX_OPTIONS, _extended  # noqa: F401
from .exchange import (ACK_TIMEOUT, DEDUP_BYTES, DEDUP_MAX, DEDUP_PER_HOST,  # noqa: F401
                       MAX_RETRANSMIT)
from .limits import VERIFIED_MAX  # noqa: F401
from .observe import MAX_OBSERVERS, MAX_OBSERVERS_PER_HOST, OBSERVE_CONFIRM  # noqa: F401

Message = _tx.Message
ECHO_OPTION = ECHO
MAX_OBSERVERS_PER_PEER = MAX_OBSERVERS_PER_HOST
ACK_DELAY = 0.5                # a slower handler gets an empty ACK first
MAX_BODY = 64 * 1024           # largest Block1 request body accepted
HOUSEKEEPING = 10.0            # seconds between sweeps
MAX_PENDING = 512              # handlers running, all hosts ...
OPEN_PENDING = 384             # ... of which hosts not verified may hold
MAX_PENDING_PER_HOST = 32      # ... of one host
MAX_URGENT = 1024              # urgent handlers running besides (abort, status, settings)
OPEN_URGENT = 768
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

    __slots__ = ("msg", "remote", "path", "verified", "seen", "separate",
                 "answered", "block_key", "observe", "urgent", "host", "spent",
                 "credit", "arrived")

    def __init__(self, msg, remote, path, verified, credit):
        self.msg = msg
        self.remote = remote
        self.path = path
        self.verified = verified    # the address is verified (may become so meanwhile)
        self.host = host_of(remote[0])  # whose shares it counts against
        self.spent = 0              # bytes sent for it (the 3x limit)
        self.credit = credit        # limits.Credit: what the address may still be sent
        self.arrived = None         # when it came (the empty ACK's deadline)
        self.seen = None            # exchange.Seen for a deduplicated request
        self.separate = False       # an empty ACK went out: answer as CON
        self.answered = False
        self.block_key = None
        self.observe = None
        self.urgent = False

    @property
    def address(self):
        return self.remote[0]

    @property
    def limit(self):
        """RFC 9175 2.4 / RFC 7252 11.3: until the address is verified, an
        answer (with all that went out for the request before it) is at
        most 3x the request, CON or NON. None: no limit."""
        if self.verified:
            return None
        return min(AMPLIFICATION * self.msg.size - self.spent,
                   self.credit.remaining(self.remote[0]))


class Waiting:
    """A request waiting for one of its host's handler slots."""

    __slots__ = ("start", "give_up", "cost", "timer")

    def __init__(self, start, give_up, cost):
        self.start = start          # start(verified tier of the slot it gets)
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
        self.mids = MessageIds()
        self.retransmitter = Retransmitter(clock, self._write)
        self.verifier = Verifier(clock)
        self.credit = Credit()
        self.guesses = Guesses(clock)
        self.observations = Observations(clock, self, self.retransmitter, self.transfers)
        self.slots = Shares(MAX_PENDING, MAX_PENDING_PER_HOST, OPEN_PENDING)
        self.urgent_slots = Shares(MAX_URGENT, MAX_URGENT_PER_HOST, OPEN_URGENT)
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
        verified = self.verifier.is_verified(remote[0])
        if not verified:
            # what may be sent to an address not verified: 3x what came from it
            self.credit.received(remote[0], len(data))
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
            self.handle_message(msg, remote, verified)
        except Exception:
            self.log.failure("unexpected error handling a datagram from {remote}",
                             remote=remote)

    def _too_many_options(self, msg, remote):
        """4.02 for a request with too many options, none of them looked at
        (no dedup entry, no state): a few bytes, never more than came in."""
        if msg.mtype in (CON, NON) and 1 <= msg.code < 32:
            mtype = ACK if msg.mtype == CON else NON
            mid = msg.mid if msg.mtype == CON else self._own_mid(remote)
            self._write(encode(mtype, _tx.BAD_OPTION, mid, msg.token), remote)
        elif msg.mtype == CON:
            self._write(empty(RST, msg.mid), remote)

    def handle_message(self, msg, remote, verified=None):
        mtype, code = msg.mtype, msg.code
        if mtype == CON or mtype == NON:
            if 1 <= code < 32:
                self.request(msg, remote, verified)
            elif mtype == CON:
                # CoAP ping, or a response/reserved code we never asked for
                self._write(empty(RST, msg.mid), remote)
        elif code == EMPTY or 64 <= code < 192:
            # ACK or RST for something we sent (#12: requests here ignored)
            trusted = self.guesses.trusted(remote[0])
            out = self.retransmitter.by_key.get((msg.mid, remote))
            if (out is not None and out.owner is not None and mtype == ACK
                    and trusted and not verified):
                # an observer took its notification: paid back (see limits),
                # before a newer notification waiting for this ACK goes out
                self.credit.refund(remote[0], len(out.data))
            ack = self.retransmitter.acknowledge(msg.mid, remote, reset=(mtype == RST))
            if ack is None:
                if not self.retransmitter.knows(msg.mid, remote):
                    # matches nothing we sent: a guess (the address's
                    # ACKs prove no observation for a while)
                    self.stats["guesses"] += 1
                    self.guesses.guessed(remote[0])
                return
            if ack.outgoing.owner is not None:
                self.observations.acknowledged(ack.outgoing.owner, ack, trusted)

    # backwards-compatible name
    handleMessage = handle_message

    # -- one request -----------------------------------------------------------

    def request(self, msg, remote, verified=None):
        path = msg.path()
        if not verified:
            verified = self.verifier.check(remote[0], msg.first(ECHO))
        req = Request(msg, remote, path, verified, self.credit)
        req.arrived = self.clock.seconds()
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
        transfer = self.transfers.get(req.block_key, not msg.payload, msg.token)
        if transfer is None:
            return False
        self._send_body(req, transfer.code, transfer.body, transfer.content_format,
                        transfer=transfer)
        return True

    def _admitted(self, req):
        """Duplicate detection (RFC 7252 4.5): a request whose second run
        would do harm is answered from the dedup cache when seen before,
        and is run only with a dedup entry (its host within its budget). A
        request without effects, or one that sets a value, is simply run
        again (``Site.safe``)."""
        msg = req.msg
        if req.path is not None and self.site.safe(msg.code, req.path):
            return True
        block1 = msg.block(_tx.BLOCK1)
        if block1 is not None and block1.more:
            # a Block1 block before the last only adds to the upload (its
            # repetition is answered 2.31 again): the last one runs
            return True
        key = (msg.mid, req.remote)
        seen = self.dedup.get(key)
        if seen is not None:
            self.stats["duplicates"] += 1
            if seen.answer is not None:
                self._write(seen.answer, req.remote)
            return False
        return self._admit(req, key)

    def _admit(self, req, key):
        msg = req.msg
        urgent = req.path is not None and self.site.urgent(req.path)
        lifetime = EXCHANGE_LIFETIME if msg.mtype == CON else NON_LIFETIME
        result = self.dedup.admit(key, req.host, lifetime, urgent, req.verified)
        if isinstance(result, Seen):
            req.seen = result
            if req.separate:
                self.dedup.answer(result, empty(ACK, msg.mid))
            return True
        self.stats["dedup_refused"] += 1
        if result == HOST_FULL:
            text = ("too many requests from this host in the last minutes; "
                    "try again later")
        else:
            text = "busy: too many requests from other hosts; try again later"
        # a host not verified may hold more (its bigger budget, the rest of
        # the cache) once it returns the Echo value offered here
        self._reply(req, _tx.SERVICE_UNAVAILABLE, text, max_age=DEDUP_MAX_AGE,
                    echo=not req.verified)
        return False

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
        size1 = msg.first(SIZE1)
        if size1 is not None and read_uint(size1) > self.max_body:
            # RFC 7959 4: a body announced too large is refused before it comes
            return self._reply(req, _tx.REQUEST_ENTITY_TOO_LARGE,
                               f"request body over {self.max_body} bytes", size1=self.max_body)
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
        return self.access.refusal(req.address)

    # -- handler slots -------------------------------------------------------------

    def _run(self, req, handle, deliver=None):
        """Run the handler if a slot is free for the host. Urgent requests
        (abort, pause, the state and settings) have a pool of their own and
        may use the common one too, so they are refused only when their own
        host has both shares full. A host at its share waits a moment for
        one of its own to finish; otherwise 5.03 (to an address not
        verified that found the open part of the pools full, with an Echo
        value: returned, it admits the host to the rest). ``deliver`` takes the result
        (default: answer the request with it)."""
        host, verified = req.host, req.verified
        pools = (self.urgent_slots, self.slots) if req.urgent else (self.slots,)
        for pool in pools:
            if pool.fits(host, 1, verified):
                return self._call(req, handle, pool, deliver)
        slots = self.slots
        cost = req.msg.size + QUEUED_ENTRY
        if not slots.host_fits(host):
            if self._queue_room(host, cost):
                # the host's handlers are all busy (a crowd behind one
                # address, e.g. 200 clients fetching a file at once): the
                # request waits a moment for one of them to finish rather
                # than fail at once (aiocoap gives up on a 5.03)
                return self._wait_for_slot(req, handle, cost, deliver)
            return self._busy(req, mine=True)
        self._busy(req, echo=not verified)

    def _busy(self, req, mine=False, echo=False):
        self.stats["busy"] += 1
        self._reply(req, _tx.SERVICE_UNAVAILABLE,
                    "too many requests from this host in progress; try again" if mine
                    else "server busy; try again", max_age=BUSY_MAX_AGE, echo=echo)

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
            pool.take(req.host, 1, req.verified)
            self._await(self._holding_slot(req.host, pool, result, req.verified),
                        req, deliver)
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

        def start(verified):
            self._await(self._holding_slot(host, self.slots, defer.maybeDeferred(handle),
                                           verified),
                        req, deliver)

        def give_up():
            queue.remove(waiting)
            if not queue:
                del self.queued[host]
            self.queue.release(host, cost)
            self._busy(req, mine=True)
        waiting = Waiting(start, give_up, cost)
        queue.append(waiting)
        self.queue.take(host, cost)
        waiting.timer = self.clock.callLater(QUEUE_WAIT, give_up)

    def _holding_slot(self, host, pool, d, verified):
        """``d`` holds one of ``host``'s slots (taken in the ``verified``
        tier) until it fires; the slot then goes to the host's next waiting
        request, if any."""
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
                self.clock.callLater(0, waiting.start, verified)
            else:
                pool.release(host, 1, verified)
            return passthrough
        return d.addBoth(finished)

    # -- Block1 ----------------------------------------------------------------------

    def _collect_block1(self, req, block1):
        """Reassemble a Block1 body; return it when complete, else None."""
        msg = req.msg
        size = 16 << block1.szx
        # two uploads to one path from one endpoint are told apart by their
        # Request-Tag (RFC 9175 3); not by token: aiocoap takes a new one
        # for every block
        key = (req.remote, req.path, msg.first(REQUEST_TAG))
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
            if (upload is not None and block1.more and upload.last is not None
                    and block1.num <= upload.last
                    and len(upload.data) >= (block1.num + 1) * size):
                # a block again (its 2.31 was lost, or a late copy): nothing
                # to add
                szx = min(block1.szx, MAX_SZX)
                self._send(req, Reply(_tx.CONTINUE, block1=Block(block1.num, True, szx)))
                return None
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
        upload.last = block1.num
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
        if req.msg.mtype == CON and not req.separate:
            # ACK_DELAY after it came (it may have waited for a slot)
            delay = ACK_DELAY - (self.clock.seconds() - req.arrived)
            timer = self.clock.callLater(max(0.0, delay), self._empty_ack, req)

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
        if req.separate or req.answered:
            return
        req.separate = True
        ack = empty(ACK, req.msg.mid)
        self.dedup.answer(req.seen, ack)
        req.spent += len(ack)
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
                    # (paid from its address's credit until it is verified)
                    observe = self.observations.seq
            else:
                self.observations.deregister(req.remote, msg.token, req.path)
        block1 = req.msg.block(_tx.BLOCK1)
        if block1 is not None and block1.num:
            block1 = Block(block1.num, False, min(block1.szx, MAX_SZX))
        else:
            block1 = None
        self._send_body(req, code, body, cf, observe=observe, block1=block1)

    def _reply(self, req, code, text, size1=None, max_age=None, echo=False):
        """An answer with a plain-text diagnostic (never blockwise): over
        the 3x limit the text is cut short. ``echo``: it offers an Echo
        value (RFC 9175 2.4)."""
        self._send(req, Reply(code, text.encode("utf-8"), 0 if text else None,
                              size1=size1, max_age=max_age,
                              echo=self.verifier.echo_for(req.address) if echo else None),
                   text=True)

    def _send_body(self, req, code, body, cf, observe=None, block1=None, transfer=None):
        """An answer carrying ``body``: whole, or the Block2 block asked
        for (1024 bytes, or smaller: what the client asked for, and what
        fits the 3x limit -- RFC 7959 2.4 lets the server answer with
        smaller blocks, the block number scaling with them). To an address
        not verified a block made smaller offers an Echo value: a client
        that returns it (coap-client) is verified from its next request,
        and one that does not (aiocoap) goes on in small blocks."""
        msg = req.msg
        block2 = msg.block(_tx.BLOCK2)
        szx, num = MAX_SZX, 0
        if block2 is not None:
            szx, num = min(block2.szx, MAX_SZX), block2.num
        if not req.verified and self.verifier.is_verified(req.address):
            req.verified = True
        total = body_size(body)
        if total <= (16 << szx) and not num and transfer is None and not is_lazy(body):
            reply = Reply(code, body, cf, observe=observe, block1=block1)
            data = self._encode(req, reply)
            limit = req.limit
            if limit is None or len(data) <= limit:
                return self._send(req, reply, data=data)
        if transfer is None:
            if req.block_key is None:
                req.block_key = request_key(req.remote, req.path or (), msg.code,
                                            msg.payload, ())
            transfer = self.transfers.put(req.block_key, body, cf, code, msg.token)
        szx, num, echo = self._fit_block(req, total, code, cf, szx, num, observe, block1)
        size = 16 << szx
        start = num * size
        if start >= total and start:
            return self._reply(req, _tx.BAD_OPTION, "Block2 number beyond the end of the body")
        more = start + size < total
        if not more and transfer.key in self.transfers.entries:
            self.transfers.finished(transfer)

        def send(chunk):
            if chunk is None:
                # a file changed since its transfer began (jsontext.FileChanged)
                self.transfers.remove(transfer.key)
                return self._reply(req, _tx.REQUEST_ENTITY_INCOMPLETE,
                                   "the file changed during its transfer; "
                                   "fetch it again from block 0")
            self._send(req, Reply(code, chunk, cf, etag=transfer.etag, observe=observe,
                                  block2=Block(num, more, szx),
                                  size2=total if num == 0 else None,
                                  block1=block1, echo=echo))
        if not is_lazy(body):
            return send(body[start:start + size])
        # a file: this block is read from it by offset (in the file pool,
        # holding one of the host's slots meanwhile)
        self._run(req, lambda: _read_block(body, start, min(size, total - start)), send)

    def _fit_block(self, req, total, code, cf, szx, num, observe, block1):
        """The largest block size (and so block number) whose answer fits
        the request's limit (RFC 7959 2.4: the server may answer with
        smaller blocks, the number scaling with them); a shrunk answer
        offers an Echo value (RFC 9175) where it still fits."""
        limit = req.limit
        if limit is None:
            return szx, num, None

        def fits(s, echo):
            n = num << (szx - s)
            size = 16 << s
            payload = max(0, min(size, total - n * size))
            reply = Reply(code, b"", cf, etag=b"0000", observe=observe,
                          block2=Block(n, True, s), size2=total if n == 0 else None,
                          block1=block1, echo=echo)
            return self._length(req, reply) + 1 + payload <= limit
        plain = next((s for s in range(szx, -1, -1) if fits(s, None)), 0)
        if plain == szx:
            return szx, num, None
        echo = self.verifier.echo_for(req.address)
        offered = next((s for s in range(plain, -1, -1) if fits(s, echo)), None)
        if offered is None:
            return plain, num << (szx - plain), None
        return offered, num << (szx - offered), echo

    def _length(self, req, reply):
        return len(reply.encode(ACK, 0, req.msg.token))

    def _own_mid(self, remote):
        """A message ID for a message we originate to ``remote``."""
        return self.mids.next(remote)

    def _encode(self, req, reply):
        """``reply`` as the datagram answering ``req`` (piggybacked in the
        ACK, or a separate CON, or NON)."""
        msg = req.msg
        if msg.mtype == CON and not req.separate:
            req_mid = msg.mid
            mtype = ACK
        else:
            mtype, req_mid = (CON if msg.mtype == CON else NON), self._own_mid(req.remote)
        return reply.encode(mtype, req_mid, msg.token)

    def _send(self, req, reply, text=False, data=None):
        """Fit ``reply`` to the request's limit, send it, and remember it
        for duplicates."""
        msg = req.msg
        if data is None:
            data = self._encode(req, reply)
        if not req.verified and self.verifier.is_verified(req.address):
            req.verified = True
        limit = req.limit
        if limit is not None and len(data) > limit:
            reply = self._shrunk(req, reply, text, limit, data[:4])
            if reply is None:
                self.log.debug("request from {remote}: no answer fits 3x",
                               remote=req.remote)
                return
            data = reply.encode(data[0] >> 4 & 3, int.from_bytes(data[2:4], "big"),
                                msg.token)
        req.answered = True
        req.spent += len(data)
        mtype = data[0] >> 4 & 3
        if mtype == CON:
            self.retransmitter.send(req.remote, int.from_bytes(data[2:4], "big"), data)
            self.dedup.answer(req.seen, empty(ACK, msg.mid))
        else:
            self.dedup.answer(req.seen, data)
            if mtype == NON:
                self.retransmitter.note(int.from_bytes(data[2:4], "big"), req.remote)
            self._write(data, req.remote, req.verified)

    def _shrunk(self, req, reply, text, limit, header):
        """An answer over the 3x limit that cannot be made of smaller
        blocks: its diagnostic text cut short, or 4.01 with an Echo option
        (RFC 9175 2.4) the client repeats to be verified, or at least its
        bare code (the header and token of the request's own size: 3x
        always has room for it, so every request is answered)."""
        echo = self.verifier.echo_for(req.address)
        if text and reply.code >= 128:
            bare = reply._replace(payload=b"", content_format=None)
            # the payload marker and a Content-Format option of 0 (one byte)
            room = limit - self._length(req, bare) - 2
            if room >= 0:
                cut = cut_text(reply.payload, room)
                return reply._replace(payload=cut, content_format=0 if cut else None)
            bare = Reply(reply.code)
            if self._length(req, bare) <= limit:
                return bare
        unauthorized = Reply(_tx.UNAUTHORIZED, echo=echo)
        if self._length(req, unauthorized) <= limit:
            return unauthorized
        bare = Reply(reply.code if reply.code >= 128 else _tx.UNAUTHORIZED)
        if self._length(req, bare) <= limit:
            return bare
        return None

    # -- what the observe layer asks of its endpoint -----------------------------

    def render_target(self, target):
        return self.site.render_target(target.resource, target.args)

    def notification(self, observer, result, seq):
        """(mid, datagram) of a CON notification for ``observer``: its
        first block when the body spans several; until its address is
        verified, within 3x its registration and within what the address
        may still be sent (None when nothing fits)."""
        code, body, cf = result
        observe = seq if 64 <= code < 96 else None
        address = observer.address
        limit = (None if self.verifier.is_verified(address)
                 else min(AMPLIFICATION * observer.request_size,
                          self.credit.remaining(address)))
        mid = self._own_mid(observer.remote)
        token = observer.token
        szx = observer.szx
        data = Reply(code, body, cf, observe=observe).encode(CON, mid, token)
        if len(body) <= (16 << szx) and (limit is None or len(data) <= limit):
            return mid, data
        etag = etag_of(body)

        def first_block(s, echo):
            size = 16 << s
            return Reply(code, body[:size], cf, etag=etag, observe=observe,
                         block2=Block(0, len(body) > size, s), size2=len(body),
                         echo=echo).encode(CON, mid, token)
        # the largest block that fits; made smaller, it offers an Echo
        # value where that still fits (as _fit_block)
        fitting = [s for s in range(szx, -1, -1)
                   if limit is None or len(first_block(s, None)) <= limit]
        if not fitting:
            return None
        plain = fitting[0]
        data = first_block(plain, None)
        if plain != szx:
            echo = self.verifier.echo_for(address)
            offered = next((s for s in fitting if len(first_block(s, echo)) <= limit), None)
            if offered is not None:
                plain, data = offered, first_block(offered, echo)
        size = 16 << plain
        if len(body) > size:
            # kept for the client's requests of the later blocks
            self.transfers.put(self.observations.transfer_key(observer), body, cf, code)
        return mid, data

    def ended(self, observer, max_age):
        """Tell a client its observation ended for lack of room (RFC 7641
        3.2: an error notification ends it)."""
        mid = self._own_mid(observer.remote)
        data = Reply(_tx.SERVICE_UNAVAILABLE, max_age=max_age).encode(
            NON, mid, observer.token)
        if self._write(data, observer.remote):
            self.retransmitter.note(mid, observer.remote)

    def notify(self, target, observers=None):
        self.observations.notify(target, observers)

    # -- output ------------------------------------------------------------------------

    def _write(self, data, remote, verified=False):
        """Send a datagram; to an address not verified only when its credit
        pays for it (False: not sent). ``verified``: known to be so."""
        if (not verified and not self.verifier.is_verified(remote[0])
                and not self.credit.spend(remote[0], len(data))):
            self.stats["unpaid"] += 1
            return False
        try:
            self.transport.write(data, remote)
        except Exception as e:      # unreachable peer, family mismatch, ...
            self.log.debug("cannot send to {remote}: {e}", remote=remote, e=e)
        return True


def _read_block(body, start, length):
    """One block of a lazy body (a file): the bytes, a Deferred of them, or
    None when the file is no longer the one whose transfer began."""
    try:
        result = body.read(start, length)
    except OSError:
        return None
    if isinstance(result, defer.Deferred):
        result.addErrback(lambda f: f.trap(OSError) and None)
    return result
