"""``/events``: the server's observable state as a Server-Sent Events stream.

One :class:`Hub` watches every observable resource the components declare
(the same Observables the CoAP site notifies from) while at least one
browser is connected, and nothing otherwise. A change marks its path;
marked paths are rendered once -- by the resource's own GET handler, as a
CoAP notification is -- and the same bytes go to every stream:

    data: control/status
    data: "upwelling light"

(the path, a newline, the JSON value). Changes are coalesced: a flush runs
at most every ``MIN_INTERVAL`` seconds and sends the latest value of each
changed path, so a fast batch costs the page a few updates a second, not
one per spectrum. A browser that reads slowly is a paused producer: its
stream keeps only the latest value of each path until it drains, so memory
per stream is bounded by the number of paths.
"""

from collections import OrderedDict

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from zope.interface import implementer

from .bridge import encode

FLUSH_DELAY = 0.05       # s from the first change to its flush
MIN_INTERVAL = 0.25      # s between flushes
KEEPALIVE = 15.0         # s between comment lines on an idle stream
MAX_STREAMS = 32
MAX_STREAMS_PER_HOST = 8


def event(path, body):
    """One SSE event: the path, then the JSON value (``null`` if empty)."""
    return b"data: " + path.encode("utf-8") + b"\ndata: " + (body or b"null") + b"\n\n"


@implementer(IPushProducer)
class Stream:
    """One browser's event stream (a push producer: the transport pauses
    it while its buffer is full)."""

    def __init__(self, hub, request, host):
        self.hub = hub
        self.request = request
        self.host = host
        self.paused = False
        self.closed = False
        self.pending = OrderedDict()    # path -> event bytes, while paused

    def send(self, path, data):
        if self.closed:
            return
        if self.paused:
            self.pending[path] = data
            self.pending.move_to_end(path)
        else:
            self.request.write(data)

    def comment(self):
        if not self.paused and not self.closed:
            self.request.write(b": keepalive\n\n")

    # IPushProducer
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        while self.pending and not self.paused and not self.closed:
            _, data = self.pending.popitem(last=False)
            self.request.write(data)

    def stopProducing(self):
        self.close()

    def close(self, finish=False):
        if self.closed:
            return
        self.closed = True
        self.pending.clear()
        self.hub.remove(self)
        if finish and not self.request.finished:
            try:
                self.request.unregisterProducer()
                self.request.finish()
            except Exception:
                pass


class Hub:
    """Watches the observable resources for the streams and fans their
    changes out."""

    log = Logger()

    def __init__(self, tree, clock):
        self.tree = tree
        self.clock = clock
        self.streams = []
        self.paths = OrderedDict()      # path -> (leaf, args, observable)
        for leaf in tree.leaves:
            for path, observable, args in leaf.observables():
                self.paths[path] = (leaf, args, observable)
        self.latest = {}                # path -> event bytes (while watching)
        self._watchers = {}             # path -> watcher callable
        self._dirty = OrderedDict()
        self._generation = {}           # path -> renders started
        self._flush_call = None
        self._last_flush = None
        self._keepalive = None

    # -- streams ------------------------------------------------------------

    def refusal(self, host):
        if len(self.streams) >= MAX_STREAMS:
            return f"too many live pages open ({MAX_STREAMS}); close one"
        if sum(1 for s in self.streams if s.host == host) >= MAX_STREAMS_PER_HOST:
            return (f"too many live pages open from {host} "
                    f"({MAX_STREAMS_PER_HOST}); close one")
        return None

    def add(self, stream):
        if not self.streams:
            self._watch()
        self.streams.append(stream)
        stream.request.write(b"retry: 2000\n\n")
        # the current state first, every path
        for path in self.paths:
            data = self.latest.get(path)
            if data is not None:
                stream.send(path, data)
            else:
                self._dirty[path] = None
        self._schedule(at_once=True)

    def remove(self, stream):
        try:
            self.streams.remove(stream)
        except ValueError:
            return
        if not self.streams:
            self._unwatch()

    def close_all(self):
        for stream in list(self.streams):
            stream.close(finish=True)
        self._unwatch()

    # -- watching -------------------------------------------------------------

    def _watch(self):
        for path, (_, _, observable) in self.paths.items():
            def changed(_value, path=path):
                self._dirty[path] = None
                self._schedule()
            self._watchers[path] = changed
            observable.watch(changed)
        self._keepalive = task.LoopingCall(self._comment)
        self._keepalive.clock = self.clock
        self._keepalive.start(KEEPALIVE, now=False)

    def _unwatch(self):
        for path, watcher in self._watchers.items():
            self.paths[path][2].unwatch(watcher)
        self._watchers.clear()
        self.latest.clear()
        self._dirty.clear()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._keepalive is not None and self._keepalive.running:
            self._keepalive.stop()
        self._keepalive = None

    def _comment(self):
        for stream in list(self.streams):
            stream.comment()

    # -- flushing -------------------------------------------------------------

    def _schedule(self, at_once=False):
        if self._flush_call is not None and self._flush_call.active():
            if not at_once:
                return
            self._flush_call.cancel()
        now = self.clock.seconds()
        delay = 0 if at_once else FLUSH_DELAY
        if self._last_flush is not None and not at_once:
            delay = max(delay, self._last_flush + MIN_INTERVAL - now)
        self._flush_call = self.clock.callLater(delay, self._flush)

    def _flush(self):
        self._flush_call = None
        self._last_flush = self.clock.seconds()
        dirty, self._dirty = list(self._dirty), OrderedDict()
        for path in dirty:
            self._render(path)

    def _render(self, path):
        leaf, args, _ = self.paths[path]
        generation = self._generation.get(path, 0) + 1
        self._generation[path] = generation
        d = defer.maybeDeferred(leaf.spec.get, *args)

        def rendered(value):
            if self._generation.get(path) != generation or not self.streams:
                return      # a newer render is on its way, or nobody listens
            data = event(path, encode(value))
            if self.latest.get(path) == data:
                return
            self.latest[path] = data
            for stream in list(self.streams):
                stream.send(path, data)

        def failed(f):
            # a value that cannot be read now (a device busy) is left out;
            # the next change tries again
            self.log.debug("{path}: not sent to the web page: {e}", path=path,
                           e=f.getErrorMessage())
        d.addCallbacks(rendered, failed)
        d.addErrback(lambda f: self.log.failure("sending {path} failed", f, path=path))


class Events(resource.Resource):
    """``GET /events``: one stream per request."""

    isLeaf = True

    def __init__(self, hub):
        super().__init__()
        self.hub = hub

    def render_GET(self, request):
        from .guard import client_host
        host = client_host(request)
        refusal = self.hub.refusal(host)
        if refusal is not None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"retry-after", b"10")
            return refusal.encode("utf-8")
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        stream = Stream(self.hub, request, host)
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: stream.close())
        self.hub.add(stream)
        return server.NOT_DONE_YET

