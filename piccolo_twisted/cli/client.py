"""A small asyncio CoAP client for the Piccolo API (aiocoap underneath).

Every failure becomes a :class:`CliError` with one line a person can act on.
Every answer is assembled here from its blocks, never beyond the limit
``shape.CATALOGUE`` gives its resource, at a pace (``Pace``: a slow server
is told from a gone one), then decoded with a depth limit and checked
against its shape before a command sees it (``shape.BadAnswer``, exit 2,
when it does not fit).
"""

import asyncio
import json
import time
import urllib.parse

import aiocoap
from aiocoap.optiontypes import BlockOption

from .errors import CliError, NotFound, Refused, Unreachable  # noqa: F401 (re-exported)
from .shape import BadAnswer, answer_limit, answer_shape, check, loads
from .terminal import number

DEFAULT_SERVER = "coap://localhost"
TIMEOUT = 3.0           # seconds for an answer, or its first block
BLOCK_TIMEOUT = 10.0    # ... at least, for a later block (a lost datagram is sent again)
MIN_RATE = 4096         # bytes/s an answer keeps up after its first TIMEOUT seconds
RESTARTS = 2            # times an answer that changed during its transfer is asked again
MAX_MESSAGE = 1000      # bytes of an error answer shown
MAX_QUEUED = 256        # notifications kept unread (a server may flood them)


def size_words(n):
    return f"{n} bytes" if n < 10000 else f"{number(n / 1000.0, '.0f')} kB"


class TooSlow(Unreachable):
    """The server answers, but too slowly to wait for."""


class _Changed(Exception):
    """The answer's ETag changed between two of its blocks."""


class Pace:
    """How long an answer (or a series of them: a fetch worker's) may keep
    us waiting: ``timeout`` seconds, plus one for every ``rate`` bytes
    received. Only the time spent waiting for the server counts (not our
    own reading and writing of files). A server that answers, but a block
    now and then, ends with a line saying so, not a transfer of hours; an
    honest answer of a megabyte has minutes on a link of 4 kB/s."""

    def __init__(self, timeout, rate=MIN_RATE, clock=time.monotonic):
        self.timeout, self.rate, self.clock = timeout, rate, clock
        self.waited = 0.0
        self.received = 0
        self.credit = 0
        self.answers = 0

    def left(self):
        """Seconds of waiting left for what has been received so far."""
        return self.timeout + self.credit / self.rate - self.waited

    def add(self, response):
        """A response received: its bytes, and as many as a full block
        (the block size it says, 1024 without one) for the time it took:
        a small answer over a link of 250 ms is not slow, 16-byte blocks
        now and then are."""
        n = len(response.payload)
        block = response.opt.block2
        self.received += n
        self.credit += max(n, block.size if block is not None else 1024)
        self.answers += 1

    async def wait(self, awaitable, timeout):
        started = self.clock()
        try:
            return await asyncio.wait_for(awaitable, timeout)
        finally:
            self.waited += self.clock() - started

    def too_slow(self, base):
        return TooSlow(f"{base}: the server answers too slowly ({size_words(self.received)} "
                       f"in {number(self.waited, '.0f')} s of waiting, under "
                       f"{size_words(self.rate)}/s after the first "
                       f"{number(self.timeout, 'g')} s): stopped")


def split_server(url):
    """``coap://host[:port]`` -> (scheme, netloc) checked; path ignored."""
    if "://" not in url:
        url = "coap://" + url
    try:
        parts = urllib.parse.urlsplit(url)
        hostname, port = parts.hostname, parts.port
    except ValueError as e:             # "[::1", a port out of range or not a number
        raise CliError(f"not a coap:// server address: {url} ({e})") from None
    if parts.scheme not in ("coap",) or not hostname:
        raise CliError(f"not a coap:// server address: {url}")
    if parts.username is not None or parts.password is not None:
        raise CliError(f"not a coap:// server address: {url} (no user name in a CoAP URL)")
    if port == 0:
        raise CliError(f"not a coap:// server address: {url} (port 0)")
    return f"{parts.scheme}://{parts.netloc}"


class Client:
    def __init__(self, server=DEFAULT_SERVER, timeout=TIMEOUT):
        self.base = split_server(server)
        self.timeout = timeout
        self.ctx = None
        self._extra = []

    async def __aenter__(self):
        self.ctx = await aiocoap.Context.create_client_context()
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        contexts, self._extra = self._extra, []
        if self.ctx is not None:
            contexts.append(self.ctx)
            self.ctx = None
        for ctx in contexts:
            await ctx.shutdown()

    async def endpoint(self):
        """Another client context (its own UDP port): the server caches a
        blockwise body per (peer, path), so parallel transfers of one path
        need separate endpoints."""
        ctx = await aiocoap.Context.create_client_context()
        self._extra.append(ctx)
        return ctx

    def message(self, code, path, payload=None, **options):
        raw = b"" if payload is None else json.dumps(payload).encode("utf-8")
        msg = aiocoap.Message(code=code, payload=raw, **options)
        try:
            msg.set_request_uri(self.base)
        except (aiocoap.error.Error, ValueError) as e:
            raise CliError(f"not a coap:// server address: {self.base} ({_oneline(e)})") \
                from None
        msg.opt.uri_path = tuple(p for p in path.split("/") if p) \
            if isinstance(path, str) else tuple(path)
        return msg

    async def _answer(self, response, timeout, pace=None):
        """Await a request's response; a missing or failed answer is
        Unreachable, named by the server's address."""
        try:
            if pace is not None:
                return await pace.wait(response, timeout)
            return await asyncio.wait_for(response, timeout)
        except asyncio.TimeoutError:
            raise Unreachable(f"{self.base}: no answer within {number(timeout, 'g')} s "
                              f"(is the server running?)") from None
        except aiocoap.error.ResolutionError:
            raise Unreachable(f"{self.base}: unknown host name (is the address "
                              f"right?)") from None
        except aiocoap.error.NetworkError:
            raise Unreachable(f"{self.base}: cannot reach the server "
                              f"(is it running, is the address right?)") from None
        except aiocoap.error.Error as e:
            raise Unreachable(f"{self.base}: {_oneline(e)}") from None
        except OSError as e:
            raise Unreachable(f"{self.base}: {e.strerror or e}") from None

    async def _block(self, ctx, msg, pace, what, offset):
        """One request of a (perhaps blockwise) answer, bounded by ``pace``:
        the answer's first block within the timeout, a later one within
        BLOCK_TIMEOUT, all of them at MIN_RATE after the first seconds."""
        patience = self.timeout if offset == 0 else max(self.timeout, BLOCK_TIMEOUT)
        left = pace.left()
        if left <= 0:
            raise pace.too_slow(self.base)
        request = ctx.request(msg, handle_blockwise=False).response
        if pace.answers == 0:                   # is anybody there at all?
            return await self._answer(request, patience, pace)
        try:
            return await self._answer(request, min(patience, left), pace)
        except Unreachable as e:
            if pace.left() <= 0:
                raise pace.too_slow(self.base) from None
            if offset == 0:
                raise
            reason = str(e).split(": ", 1)[-1]
            raise Unreachable(f"{self.base}: {what}: the answer broke off after "
                              f"{size_words(offset)} ({reason})") from None

    async def exchange(self, msg, what, limit, pace=None, ctx=None):
        """``(response, body)``: ``msg`` sent and its answer's blocks
        (RFC 7959 Block2) assembled here, never more than ``limit`` bytes
        (refused as soon as Size2 or the blocks go beyond it), each block
        where the last one ended, all of one ETag; an answer that changed
        during its transfer is asked for again (RESTARTS times). aiocoap's
        own assembly has no limit, and copies the body for every block."""
        ctx = ctx or self.ctx
        pace = pace or Pace(self.timeout)
        for _ in range(RESTARTS + 1):
            first = await self._block(ctx, msg, pace, what, 0)
            try:
                return await self._assemble(ctx, msg, first, pace, what, limit)
            except _Changed:
                continue
        raise CliError(f"{what}: the answer kept changing while it was sent "
                       f"({RESTARTS + 1} tries); try again")

    async def complete(self, template, first, what, limit, pace=None, ctx=None):
        """``(response, body)`` of an answer whose first block is ``first``
        (a notification), the rest asked for with ``template``."""
        pace = pace or Pace(self.timeout)
        try:
            return await self._assemble(ctx or self.ctx, template, first, pace, what, limit)
        except _Changed:
            return await self.exchange(template, what, limit, pace, ctx)

    async def _assemble(self, ctx, template, first, pace, what, limit):
        pace.add(first)
        if not first.code.is_successful():
            return first, first.payload[:MAX_MESSAGE]       # an error: its first line
        size2 = first.opt.size2
        if size2 is not None and size2 > limit:
            raise _too_large(what, f"{size2} bytes", limit)
        body = bytearray()
        response, payload, block = first, first.payload, first.opt.block2
        while True:
            if block is not None and (block.size_exponent > 6 or block.start != len(body)):
                raise BadAnswer(f"{what}: malformed answer from the server: block "
                                f"{block.block_number} of {block.size} bytes where byte "
                                f"{len(body)} was due")
            body += payload
            if len(body) > limit:
                raise _too_large(what, f"more than {limit} bytes", limit)
            if block is None or not block.more:
                return response, bytes(body)
            if len(payload) != block.size:
                raise BadAnswer(f"{what}: malformed answer from the server: a block of "
                                f"{len(payload)} bytes, not {block.size}, before the last")
            follow = template.copy(
                mid=None, token=None, remote=first.remote, observe=None,
                block2=BlockOption.BlockwiseTuple(len(body) // block.size, False,
                                                  block.size_exponent))
            response = await self._block(ctx, follow, pace, what, len(body))
            pace.add(response)
            if not response.code.is_successful():
                return response, response.payload[:MAX_MESSAGE]
            if response.opt.etag != first.opt.etag:
                raise _Changed()
            payload, block = response.payload, response.opt.block2
            if block is None:
                raise BadAnswer(f"{what}: malformed answer from the server: a later "
                                f"block without its Block2 option")

    @staticmethod
    def decode(response, body, what, shape):
        """The answer's value, checked against ``shape``; an error code is
        Refused (NotFound for 4.04) with the server's first line."""
        if not response.code.is_successful():
            text = body[:MAX_MESSAGE].decode("utf-8", "replace")
            message = _oneline(text) or str(response.code)
            if response.code == aiocoap.NOT_FOUND:
                raise NotFound(f"{what}: {message}")
            raise Refused(f"{what}: {message}")
        value = loads(body, what) if body else None
        return check(value, shape, what)

    async def request(self, method, path, payload=None, shape=None, pace=None, ctx=None):
        msg = self.message(aiocoap.GET if method == "GET" else aiocoap.PUT, path, payload)
        what = f"{method} /{path}"
        response, body = await self.exchange(msg, what, answer_limit(method, path), pace, ctx)
        return self.decode(response, body, what, shape or answer_shape(method, path))

    async def get(self, path, shape=None, pace=None):
        """GET ``path``; the answer checked against ``shape`` (default: the
        catalogue's shape for the path)."""
        return await self.request("GET", path, shape=shape, pace=pace)

    async def put(self, path, payload=None, ctx=None, shape=None, pace=None):
        """PUT ``payload`` (JSON) to ``path``; the answer checked as for get."""
        return await self.request("PUT", path, payload, shape, pace, ctx)

    async def put_first_block(self, path, payload, ctx=None, pace=None):
        """A PUT asking for its answer's first 1024-byte block only:
        ``(payload of block 0, more?, ETag or None, Size2 or None)``."""
        msg = self.message(aiocoap.PUT, path, payload)
        msg.opt.block2 = BlockOption.BlockwiseTuple(0, False, 6)
        what = f"PUT /{path}"
        pace = pace or Pace(self.timeout)
        response = await self._block(ctx or self.ctx, msg, pace, what, 0)
        pace.add(response)
        if not response.code.is_successful():
            self.decode(response, response.payload, what, None)
        block = response.opt.block2
        return (response.payload, bool(block and block.more), response.opt.etag,
                response.opt.size2)

    def observe(self, path):
        """An :class:`Observation` of ``path`` (start it with ``await``)."""
        return Observation(self, path)


class Observation:
    """Values of an observed resource, in order, through a queue. The
    notifications are followed from the moment of the request, so the
    latest one is never lost between the registration and the first read
    (aiocoap keeps only the newest unread notification: Observe is lossy).
    A notification longer than a block is completed here, as any answer
    (``Client.exchange``: its limit, its pace)."""

    def __init__(self, client, path):
        self.client = client
        self.path = path
        self.what = f"GET /{path}"
        self.queue = asyncio.Queue()
        self.shape = answer_shape("GET", path)
        self.limit = answer_limit("GET", path)
        self.request = None
        self._pump = None

    async def start(self):
        msg = self.client.message(aiocoap.GET, self.path, observe=0)
        self.request = self.client.ctx.request(msg, handle_blockwise=False)
        notifications = self.request.observation.__aiter__()
        self._pump = asyncio.ensure_future(self._forward(notifications))
        response = await self.client._answer(self.request.response, self.client.timeout)
        return await self._value(response)

    async def _forward(self, notifications):
        try:
            while True:
                note = await notifications.__anext__()
                if self.queue.qsize() >= MAX_QUEUED:
                    self.queue.get_nowait()     # a flood: the oldest goes
                self.queue.put_nowait(note)
        except StopAsyncIteration:
            self.queue.put_nowait(CliError("the server ended the observation"))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.queue.put_nowait(e)

    async def _value(self, response):
        template = self.client.message(aiocoap.GET, self.path)
        response, body = await self.client.complete(template, response, self.what, self.limit)
        return self.client.decode(response, body, self.what, self.shape)

    async def next(self, timeout=None):
        """The next notified value; TimeoutError when none came in time."""
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, Exception):
            raise Unreachable(f"observing /{self.path} ended: {_oneline(item)}")
        return await self._value(item)

    def cancel(self):
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self.request is not None and not self.request.observation.cancelled:
            self.request.observation.cancel()


def _too_large(what, size, limit):
    return BadAnswer(f"{what}: malformed answer from the server: {size} long, at most "
                     f"{limit} bytes for this resource")


def _oneline(thing):
    text = str(thing).strip()
    return text.splitlines()[0][:MAX_MESSAGE] if text else type(thing).__name__
