"""The web page's HTTP server: twisted.web on the server's own reactor.

    /                 the page (HTML; its CSS and script under /static/)
    /static/<name>    the page's assets, all served from here (no CDN)
    /api, /api/<path> the components' resources (``bridge``)
    /events           live state as Server-Sent Events (``events``)
    /files/<run>/<f>  one spectrum file; /zip/<run> a whole run (``files``)
    /token            the token changing requests carry (``guard``)

Every response says what a browser may do with it: no framing by other
sites, scripts and styles from this server only, no content sniffing.
Connections, live streams and downloads are shared out per client host
(``limits``), requests paced per host and in all, a request must arrive
whole within 10 s, request bodies are capped at 64 KiB.
"""

import hashlib
import io
import os
from importlib import resources as package_files

from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.web import http, resource, server

from .bridge import MAX_BODY, Api, Tree
from .events import Events, Hub
from .files import Downloads
from .guard import Guard, Hosts
from .limits import Pace, Shares, host_key

STATIC = ("app.js", "app.css", "favicon.svg")
TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8",
         ".html": b"text/html; charset=utf-8", ".svg": b"image/svg+xml"}
MAX_CONNECTIONS = 128
MAX_CONNECTIONS_PER_HOST = 16
REQUEST_DEADLINE = 10.0     # s for a whole request once a connection waits for one
IDLE_TIMEOUT = 60           # s without a byte (twisted.web's own timer)
REQUEST_RATE = 30           # requests/s per host after a burst of ...
REQUEST_BURST = 60
TOTAL_REQUEST_RATE = 150    # requests/s of everyone together after ...
TOTAL_REQUEST_BURST = 300
WEB_THREADS = 1           # one: a Pi reads one SD card; each more thread kept its own heap
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
    and the request answered 413 (never a temporary file on disk). It is
    handled when the pace of its host and of everyone allows (``Pace``);
    until then its connection reads nothing more."""

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
        site = self.channel.site
        wait = site.pace.delay(getattr(self.channel, "share_host", None))
        if wait > 0:
            site.waiting[self] = site.reactor.callLater(wait, self._paced, site)
            return
        self._process()

    def _paced(self, site):
        site.waiting.pop(self, None)
        if self._disconnected or self.channel is None:
            return          # the client left while it waited
        self._process()

    def _process(self):
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


class Channel(http.HTTPChannel):
    """One connection. A request must arrive whole -- head and body --
    within REQUEST_DEADLINE of the moment the connection waits for it (its
    opening, or the end of the previous answer): a client that sends a
    header line now and then (slowloris) is cut off then, whatever the
    idle timer (which every byte resets) says."""

    share_host = None
    deadline = None
    _deadline_call = None

    def connectionMade(self):
        super().connectionMade()
        self._arm()

    def _arm(self):
        self._disarm()
        if self.deadline:
            self._deadline_call = self.callLater(self.deadline, self._too_slow)

    def _disarm(self):
        if self._deadline_call is not None:
            if self._deadline_call.active():
                self._deadline_call.cancel()
            self._deadline_call = None

    def allContentReceived(self):
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request):
        if self.persistent:
            self._arm()         # before the next pipelined request is parsed
        super().requestDone(request)

    def _too_slow(self):
        self._deadline_call = None
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason):
        self._disarm()
        super().connectionLost(reason)
        site = getattr(self, "site", None)
        if site is not None:
            site.release(self)


class Site(server.Site):
    """The page's HTTP site: connections shared out per host, requests
    paced, every name but this server's refused (``guard.Hosts``)."""

    protocol = Channel
    requestFactory = Request
    displayTracebacks = False
    noisy = False

    def __init__(self, root, clock, hosts=None, timeout=IDLE_TIMEOUT):
        super().__init__(root, timeout=timeout, reactor=clock)
        self.hosts = hosts
        self.connections = Shares(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_HOST)
        self.channels = set()
        self.pace = Pace(clock, REQUEST_RATE, REQUEST_BURST, TOTAL_REQUEST_RATE,
                         TOTAL_REQUEST_BURST)
        self.waiting = {}       # request -> its delayed call, while it waits its turn

    def buildProtocol(self, addr):
        host = host_key(getattr(addr, "host", None))
        admitted, evict = self.connections.admit(host)
        if not admitted:
            return None         # closed at once
        if evict is not None:
            # the biggest holder's oldest connection makes room
            self.connections.remove(evict.share_host, evict)
            self.channels.discard(evict)
            if evict.transport is not None:
                evict.transport.abortConnection()
        channel = super().buildProtocol(addr)
        channel.share_host = host
        channel.deadline = REQUEST_DEADLINE
        self.connections.add(host, channel)
        self.channels.add(channel)
        return channel

    def release(self, channel):
        self.connections.remove(channel.share_host, channel)
        self.channels.discard(channel)

    def stop(self):
        """Cancel the requests waiting their turn; close every connection."""
        for call in self.waiting.values():
            if call.active():
                call.cancel()
        self.waiting.clear()
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.loseConnection()

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
        self.downloads = (Downloads(datadir_root, self.in_pool, clock=clock),
                          Downloads(datadir_root, self.in_pool, zipped=True, clock=clock))
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
        self.site = Site(root, clock, hosts=Hosts(hosts))
        self.server = _Server(port, self.site, interface=address)
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
        self.site.stop()
        if self.pool is not None:
            self.pool.stop()
            self.pool = None
