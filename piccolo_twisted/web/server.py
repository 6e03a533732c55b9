"""The web page's HTTP server: twisted.web on the server's own reactor.

    /                 the page (HTML; its CSS and script under /static/)
    /static/<name>    the page's assets, all served from here (no CDN)
    /api, /api/<path> the components' resources (``bridge``)
    /events           live state as Server-Sent Events (``events``)
    /files/<run>/<f>  one spectrum file; /zip/<run> a whole run (``files``)
    /token            the token changing requests carry (``guard``)

Every response says what a browser may do with it: no framing by other
sites, scripts and styles from this server only, no content sniffing.
Connections are bounded per client address and in all, request bodies to
64 KiB.
"""

import hashlib
import io
import os
from importlib import resources as package_files

from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.python.threadpool import ThreadPool
from twisted.web import http, resource, server

from .bridge import MAX_BODY, Api, Tree
from .events import Events, Hub
from .files import Downloads
from .guard import Guard, Hosts

STATIC = ("app.js", "app.css", "favicon.svg")
TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8",
         ".html": b"text/html; charset=utf-8", ".svg": b"image/svg+xml"}
MAX_CONNECTIONS = 128
MAX_CONNECTIONS_PER_HOST = 32
WEB_THREADS = 2
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
     b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
     b"base-uri 'none'; form-action 'self'"),
)


def asset(name):
    return (package_files.files("piccolo_twisted.web") / "static" / name).read_bytes()


class WebCannotListen(CannotListenError):
    """The web page's port could not be bound (told apart from CoAP's)."""


class Request(server.Request):
    """A request whose body is capped: a longer body is read and dropped,
    and the request answered 413 (never a temporary file on disk)."""

    too_large = False

    def gotLength(self, length):
        if length is not None and length > MAX_BODY:
            self.too_large = True
        self.content = io.BytesIO()
        self._received = 0

    def handleContentChunk(self, data):
        self._received += len(data)
        if self._received > MAX_BODY:
            self.too_large = True
        if not self.too_large:
            self.content.write(data)

    def process(self):
        for name, value in SECURITY_HEADERS:
            self.setHeader(name, value)
        site = self.channel.site
        refusal = site.hosts.refusal(self) if site.hosts is not None else None
        if refusal is not None:
            # not this server's name (DNS rebinding): nothing is served
            self.site = site
            self.setResponseCode(421, b"Misdirected Request")
            self.setHeader(b"content-type", b"text/plain; charset=utf-8")
            self.setHeader(b"cache-control", b"no-store")
            body = refusal.encode("utf-8")
            self.setHeader(b"content-length", b"%d" % len(body))
            if self.method != b"HEAD":
                self.write(body)
            self.finish()
            return
        super().process()


class Site(server.Site):
    requestFactory = Request
    displayTracebacks = False
    noisy = False
    hosts = None        # guard.Hosts: the names this server answers to

    def log(self, request):
        """No access log line per request (the page makes many)."""


class Static(resource.Resource):
    """Bytes held in memory, with an ETag (the assets are a few KB)."""

    isLeaf = True

    def __init__(self, body, content_type, cache=b"no-cache"):
        super().__init__()
        self.body = body
        self.content_type = content_type
        self.cache = cache
        self.etag = b'"' + hashlib.sha256(body).hexdigest()[:20].encode("ascii") + b'"'

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        request.setHeader(b"cache-control", self.cache)
        request.setHeader(b"etag", self.etag)
        if request.getHeader(b"if-none-match") == self.etag:
            request.setResponseCode(http.NOT_MODIFIED)
            return b""
        request.setHeader(b"content-length", b"%d" % len(self.body))
        return self.body


class NotFound(resource.Resource):
    """A plain-text 404 (nothing of the request is echoed)."""

    isLeaf = True

    def render(self, request):
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"no such page"


NOT_FOUND = NotFound()


class Token(resource.Resource):
    """``/token``: the token of this server process, for scripts and for a
    page loaded before a restart."""

    isLeaf = True

    def __init__(self, guard):
        super().__init__()
        self.guard = guard

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=ascii")
        request.setHeader(b"cache-control", b"no-store")
        return self.guard.token.encode("ascii")


class WhoAmI(resource.Resource):
    """``/whoami``: the address this client is seen from and whether it
    may control (the page says "read only" before anyone clicks)."""

    isLeaf = True

    def __init__(self, access):
        super().__init__()
        self.access = access

    def render_GET(self, request):
        from ..access import client_address
        from ..api import EncodedJSON
        from .guard import client_host
        host = client_host(request)
        reason = self.access.refusal(host) if self.access is not None else None
        address = client_address(host)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return bytes(EncodedJSON.encode({"address": str(address) if address else host,
                                         "control": reason is None, "reason": reason}))


class Folder(resource.Resource):
    def __init__(self, children):
        super().__init__()
        for name, child in children.items():
            self.putChild(name.encode("ascii"), child)

    def getChild(self, name, request):
        return NOT_FOUND


class Root(resource.Resource):
    """``/`` is the page; everything else a named child."""

    def __init__(self, page, children):
        super().__init__()
        self.page = page
        for name, child in children.items():
            self.putChild(name.encode("ascii"), child)

    def getChild(self, name, request):
        if name == b"" and not request.postpath:
            return self.page
        if name == b"index.html" and not request.postpath:
            return self.page
        return NOT_FOUND


class LimitedFactory(policies.WrappingFactory):
    """At most MAX_CONNECTIONS_PER_HOST connections from one address and
    MAX_CONNECTIONS in all: one client cannot take every connection."""

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.per_host = {}

    def buildProtocol(self, addr):
        host = getattr(addr, "host", None)
        if (sum(self.per_host.values()) >= MAX_CONNECTIONS
                or self.per_host.get(host, 0) >= MAX_CONNECTIONS_PER_HOST):
            return None
        self.per_host[host] = self.per_host.get(host, 0) + 1
        protocol = super().buildProtocol(addr)
        protocol._counted_host = host
        return protocol

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        host = getattr(p, "_counted_host", None)
        left = self.per_host.get(host, 0) - 1
        if left > 0:
            self.per_host[host] = left
        else:
            self.per_host.pop(host, None)


class _Server(internet.TCPServer):
    def privilegedStartService(self):
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            raise WebCannotListen(e.interface, e.port, e.socketError) from None


class WebService(service.MultiService):
    """The web page: an HTTP server on the reactor, its hub of live
    state, and its own small thread pool for file work."""

    log = Logger()

    def __init__(self, components, datadir_root, address="::", port=8080,
                 access=None, clock=None, title="Piccolo", hosts=()):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.address = address
        self.port = port
        self.pool = None
        self.guard = Guard(access)
        self.tree = Tree(components)
        self.hub = Hub(self.tree, clock)
        page = asset("index.html").replace(
            b"{{token}}", self.guard.token.encode("ascii")).replace(
            b"{{title}}", title.encode("utf-8"))
        self.page = Static(page, TYPES[".html"], cache=b"no-store")
        static = {name: Static(asset(name), TYPES[os.path.splitext(name)[1]])
                  for name in STATIC}
        self.downloads = (Downloads(datadir_root, self.in_pool),
                          Downloads(datadir_root, self.in_pool, zipped=True))
        root = Root(self.page, {
            "static": Folder(static),
            "api": Api(self.tree, self.guard),
            "events": Events(self.hub),
            "files": self.downloads[0],
            "zip": self.downloads[1],
            "token": Token(self.guard),
            "whoami": WhoAmI(access),
            "favicon.ico": static["favicon.svg"],
        })
        self.site = Site(root, timeout=60)
        self.site.hosts = Hosts(hosts)
        self.factory = LimitedFactory(self.site)
        self.server = _Server(port, self.factory, interface=address)
        self.server.setServiceParent(self)

    def in_pool(self, fn, *args, **kwargs):
        from twisted.internet import reactor
        from twisted.internet import threads
        if self.pool is None:
            self.pool = ThreadPool(minthreads=0, maxthreads=WEB_THREADS, name="piccolo-web")
            self.pool.start()
        return threads.deferToThreadPool(reactor, self.pool, fn, *args, **kwargs)

    def downloads_active(self):
        """Downloads holding a slot now (files and zips)."""
        return sum(d.active_count() for d in self.downloads)

    def download_streams(self):
        for d in self.downloads:
            yield from d.streams

    @staticmethod
    def bound_failed(error):
        """Whether a start-up error is this page's port refusing to bind."""
        return isinstance(error, WebCannotListen)

    @property
    def listening_port(self):
        return self.server._port.getHost().port

    def startService(self):
        super().startService()
        self.log.info("piccolo web page on http://{host}:{port}/",
                      host=f"[{self.address}]" if ":" in self.address else self.address,
                      port=self.listening_port)

    @defer.inlineCallbacks
    def stopService(self):
        # no new connections, then end the live streams and open downloads
        yield super().stopService()
        self.hub.close_all()
        for protocol in list(self.factory.protocols):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.loseConnection()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
