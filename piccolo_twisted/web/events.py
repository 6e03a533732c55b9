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
per stream is bounded by the number of paths; one that reads nothing for
``STALL`` seconds is dropped.

The streams are shared out per host (``limits.Shares``): a host at its
limit replaces its own oldest stream (a reloaded page), and a newcomer
finding every place taken takes the oldest stream of the biggest holder,
which reconnects by itself. Opening a stream sends the whole state, so a
host may open only a few in a row (``OPEN_BURST``, then ``OPEN_RATE``);
beyond that it is answered 503 with a Retry-After, which the page obeys.
"""

import math

from collections import OrderedDict

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.internet.interfaces import IPushProducer
from twisted.web import resource, server
from zope.interface import implementer

from .bridge import encode
from .limits import HOSTS_REMEMBERED, Bucket, Shares, host_key

FLUSH_DELAY = 0.05       # s from the first change to its flush
MIN_INTERVAL = 0.25      # s between flushes
KEEPALIVE = 15.0         # s between comment lines on an idle stream
MAX_STREAMS = 32         # streams in all, shared out per host (limits.Shares)
MAX_STREAMS_PER_HOST = 8
OPEN_RATE = 0.5          # streams a host may open per second, after ...
OPEN_BURST = 8           # ... this many (each open sends the whole state)
STALL = 60.0             # s a stream may stay unread before it is dropped
RETRY_FULL = 10          # s a client refused for want of room is told to wait


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
        self._stall = None

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
        if self._stall is None and not self.closed:
            self._stall = self.hub.clock.callLater(STALL, self._stalled)

    def resumeProducing(self):
        self.paused = False
        self._unstall()
        while self.pending and not self.paused and not self.closed:
            _, data = self.pending.popitem(last=False)
            self.request.write(data)

    def stopProducing(self):
        self.close()

    def _unstall(self):
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None

    def _stalled(self):
        """Nothing read for STALL seconds: the client is gone or frozen."""
        self._stall = None
        self.close()
        channel = getattr(self.request, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def close(self, finish=False):
        if self.closed:
            return
        self.closed = True
        self._unstall()
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
        self.shares = Shares(MAX_STREAMS, MAX_STREAMS_PER_HOST, replace_own=True)
        self._opened = OrderedDict()    # host -> Bucket of stream openings
        self._watchers = {}             # path -> watcher callable
        self._dirty = OrderedDict()
        self._generation = {}           # path -> renders started
        self._flush_call = None
        self._last_flush = None
        self._keepalive = None

    # -- streams ------------------------------------------------------------

    def admit(self, host):
        """None when ``host`` may open a stream now (the stream it
        displaces, if any, is closed: it reconnects by itself), else
        (reason, seconds to wait)."""
        now = self.clock.seconds()
        bucket = self._opened.get(host)
        if bucket is None:
            bucket = self._opened[host] = Bucket(OPEN_RATE, OPEN_BURST, now)
            while len(self._opened) > HOSTS_REMEMBERED:
                self._opened.popitem(last=False)
        else:
            self._opened.move_to_end(host)
        tokens = bucket.level(now)
        if tokens < 1:
            wait = math.ceil((1 - tokens) / OPEN_RATE)
            return (f"too many live pages opened from {host} lately; "
                    f"try again in {wait} s", wait)
        admitted, evict = self.shares.admit(host)
        if not admitted:
            return (f"every live page place ({MAX_STREAMS}) is taken, a fair share "
                    f"each; try again shortly", RETRY_FULL)
        bucket.take(now)
        if evict is not None:
            evict.close(finish=True)
        return None

    def add(self, stream):
        if not self.streams:
            self._watch()
        self.streams.append(stream)
        self.shares.add(stream.host, stream)
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
        self.shares.remove(stream.host, stream)
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
        host = host_key(client_host(request))
        refusal = self.hub.admit(host)
        if refusal is not None:
            reason, wait = refusal
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"retry-after", b"%d" % wait)
            return reason.encode("utf-8")
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        stream = Stream(self.hub, request, host)
        request.registerProducer(stream, True)
        request.notifyFinish().addBoth(lambda _: stream.close())
        self.hub.add(stream)
        return server.NOT_DONE_YET

