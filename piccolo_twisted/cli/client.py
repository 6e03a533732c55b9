"""A small asyncio CoAP client for the Piccolo API (aiocoap underneath).

Every failure becomes a :class:`CliError` with one line a person can act on.
Every answer is decoded with a depth limit and checked against its shape
in ``shape.CATALOGUE`` before a command sees it (``shape.BadAnswer``,
exit 2, when it does not fit).
"""

import asyncio
import json
import urllib.parse

import aiocoap
from aiocoap.optiontypes import BlockOption

from .errors import CliError, NotFound, Refused, Unreachable  # noqa: F401 (re-exported)
from .shape import answer_shape, check, loads

DEFAULT_SERVER = "coap://localhost"
TIMEOUT = 3.0           # seconds for an ordinary request
TRANSFER_TIMEOUT = 60.0  # ... for a spectrum file (blockwise, ~100 round trips)
MAX_MESSAGE = 1000      # bytes of an error answer shown


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

    async def _send(self, msg, timeout, ctx=None, **kw):
        return await self._answer((ctx or self.ctx).request(msg, **kw).response, timeout)

    async def _answer(self, response, timeout):
        """Await a request's response; a missing or failed answer is
        Unreachable, named by the server's address."""
        try:
            return await asyncio.wait_for(response, timeout)
        except asyncio.TimeoutError:
            raise Unreachable(f"{self.base}: no answer within {timeout:g} s "
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

    @staticmethod
    def decode(response, what, shape):
        """The answer's value, checked against ``shape``; an error code is
        Refused (NotFound for 4.04) with the server's first line."""
        if not response.code.is_successful():
            text = response.payload[:MAX_MESSAGE].decode("utf-8", "replace")
            message = _oneline(text) or str(response.code)
            if response.code == aiocoap.NOT_FOUND:
                raise NotFound(f"{what}: {message}")
            raise Refused(f"{what}: {message}")
        value = loads(response.payload, what) if response.payload else None
        return check(value, shape, what)

    async def get(self, path, timeout=None, shape=None):
        """GET ``path``; the answer checked against ``shape`` (default: the
        catalogue's shape for the path)."""
        msg = self.message(aiocoap.GET, path)
        return self.decode(await self._send(msg, timeout or self.timeout), f"GET /{path}",
                           shape or answer_shape("GET", path))

    async def put(self, path, payload=None, timeout=None, ctx=None, shape=None):
        """PUT ``payload`` (JSON) to ``path``; the answer checked as for get."""
        msg = self.message(aiocoap.PUT, path, payload)
        return self.decode(await self._send(msg, timeout or self.timeout, ctx),
                           f"PUT /{path}", shape or answer_shape("PUT", path))

    async def put_first_block(self, path, payload, ctx=None, timeout=None):
        """A PUT asking for its answer's first 1024-byte block only:
        ``(payload of block 0, more?, ETag or None, Size2 or None)``."""
        msg = self.message(aiocoap.PUT, path, payload)
        msg.opt.block2 = BlockOption.BlockwiseTuple(0, False, 6)
        response = await self._send(msg, timeout or self.timeout, ctx,
                                    handle_blockwise=False)
        if not response.code.is_successful():
            self.decode(response, f"PUT /{path}", None)
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
    (aiocoap keeps only the newest unread notification: Observe is lossy)."""

    def __init__(self, client, path):
        self.client = client
        self.path = path
        self.queue = asyncio.Queue()
        self.shape = answer_shape("GET", path)
        self.request = None
        self._pump = None

    async def start(self):
        msg = self.client.message(aiocoap.GET, self.path, observe=0)
        self.request = self.client.ctx.request(msg)
        notifications = self.request.observation.__aiter__()
        self._pump = asyncio.ensure_future(self._forward(notifications))
        response = await self.client._answer(self.request.response, self.client.timeout)
        return self.client.decode(response, f"GET /{self.path}", self.shape)

    async def _forward(self, notifications):
        try:
            while True:
                self.queue.put_nowait(await notifications.__anext__())
        except StopAsyncIteration:
            self.queue.put_nowait(CliError("the server ended the observation"))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.queue.put_nowait(e)

    async def next(self, timeout=None):
        """The next notified value; TimeoutError when none came in time."""
        item = await asyncio.wait_for(self.queue.get(), timeout)
        if isinstance(item, Exception):
            raise Unreachable(f"observing /{self.path} ended: {_oneline(item)}")
        return self.client.decode(item, f"GET /{self.path}", self.shape)

    def cancel(self):
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self.request is not None and not self.request.observation.cancelled:
            self.request.observation.cancel()


def _oneline(thing):
    text = str(thing).strip()
    return text.splitlines()[0][:MAX_MESSAGE] if text else type(thing).__name__
