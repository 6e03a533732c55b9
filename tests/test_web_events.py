"""The event hub on task.Clock: what a browser's stream receives, how
changes are coalesced, a slow reader, and that nothing is watched while
no page is open."""

from twisted.internet import defer, task
from twisted.trial import unittest

from piccolo_twisted.api import EncodedJSON, Resource
from piccolo_twisted.observable import Observable
from piccolo_twisted.web import events
from piccolo_twisted.web.bridge import Tree
from piccolo_twisted.web.events import Hub, Stream


class FakeRequest:
    def __init__(self):
        self.written = []
        self.finished = False

    def write(self, data):
        self.written.append(data)

    def unregisterProducer(self):
        pass

    def finish(self):
        self.finished = True

    def events(self):
        """[(path, JSON text)] written so far."""
        out = []
        for chunk in self.written:
            if chunk.startswith(b"data: "):
                path, value = chunk.decode().split("\n")[:2]
                out.append((path[6:], value[6:]))
        return out


class HubTests(unittest.SynchronousTestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.status = Observable("idle")
        self.times = {"up": Observable(100), "down": Observable(200)}
        self.slow = Observable(0)
        self.pending = []

        def slow_get():
            d = defer.Deferred()
            self.pending.append((d, self.slow.value))
            return d
        components = {"control": {
            "status": Resource(get=lambda: self.status.value, observe=self.status),
            "plain": Resource(get=lambda: 1),                     # not observable
            "big": Resource(get=lambda: EncodedJSON(b'{"a":1}'), observe=Observable(0)),
            "slow": Resource(get=slow_get, observe=self.slow),
            "time": Resource(get=lambda c: self.times[c].value, parse_path=True,
                             observe=lambda c: self.times[c], known=("up", "down")),
        }}
        self.hub = Hub(Tree(components), self.clock)

    def connect(self):
        request = FakeRequest()
        stream = Stream(self.hub, request, "::1")
        self.hub.add(stream)
        return stream, request

    def answer_slow(self):
        while self.pending:
            d, value = self.pending.pop(0)
            d.callback(value)

    def test_paths(self):
        self.assertEqual(list(self.hub.paths), ["control/big", "control/slow", "control/status",
                                                "control/time/up", "control/time/down"])

    def test_state_first_then_coalesced_changes(self):
        self.assertEqual(self.status._watchers, [])
        stream, request = self.connect()
        self.assertEqual(request.written[0], b"retry: 2000\n\n")
        self.clock.advance(0)
        self.answer_slow()
        self.assertEqual(sorted(request.events()), [
            ("control/big", '{"a":1}'), ("control/slow", "0"), ("control/status", '"idle"'),
            ("control/time/down", "200"), ("control/time/up", "100")])
        self.assertEqual(len(self.status._watchers), 1)
        request.written.clear()
        self.clock.advance(1)
        # a burst after a quiet while: one event with the latest value,
        # FLUSH_DELAY after the first change
        for value in ("waiting", "upwelling dark", "downwelling dark", "upwelling light"):
            self.status.set(value)
        self.times["up"].set(150)
        self.assertEqual(request.events(), [])
        self.clock.advance(events.FLUSH_DELAY)
        self.assertEqual(request.events(), [("control/status", '"upwelling light"'),
                                            ("control/time/up", "150")])
        # the next change waits for MIN_INTERVAL after that flush
        request.written.clear()
        self.status.set("downwelling light")
        self.clock.advance(events.FLUSH_DELAY)
        self.assertEqual(request.events(), [])
        self.clock.advance(events.MIN_INTERVAL - events.FLUSH_DELAY)
        self.assertEqual(request.events(), [("control/status", '"downwelling light"')])
        # a change back to the value the page has: nothing to send
        request.written.clear()
        self.status.set("x")
        self.status.set("downwelling light")
        self.clock.advance(1)
        self.assertEqual(request.events(), [])

    def test_slow_renders_arrive_in_order(self):
        stream, request = self.connect()
        self.clock.advance(0)
        self.answer_slow()
        request.written.clear()
        self.slow.set(1)
        self.clock.advance(1)
        self.slow.set(2)
        self.clock.advance(1)
        self.assertEqual(len(self.pending), 2)
        # the newer render answers first; the older one is dropped
        (d1, v1), (d2, v2) = self.pending
        d2.callback(v2)
        d1.callback(v1)
        self.pending.clear()
        self.assertEqual(request.events(), [("control/slow", "2")])

    def test_a_slow_reader_keeps_the_latest_of_each_path(self):
        stream, request = self.connect()
        self.clock.advance(0)
        self.answer_slow()
        request.written.clear()
        stream.pauseProducing()
        for i in range(50):
            self.status.set(f"s{i}")
            self.times["down"].set(i)
            self.clock.advance(events.MIN_INTERVAL)
        self.assertEqual(request.written, [])
        self.assertEqual(len(stream.pending), 2)
        stream.resumeProducing()
        self.assertEqual(request.events(), [("control/status", '"s49"'), ("control/time/down", "49")])

    def test_nothing_watched_without_a_page(self):
        s1, r1 = self.connect()
        s2, r2 = self.connect()
        self.clock.advance(0)
        self.answer_slow()
        self.assertEqual(len(self.status._watchers), 1)     # one watcher for all pages
        s1.close()
        self.assertEqual(len(self.status._watchers), 1)
        self.clock.advance(events.KEEPALIVE)
        self.assertIn(b": keepalive\n\n", r2.written)
        self.assertNotIn(b": keepalive\n\n", r1.written)
        s2.close()
        self.assertEqual(self.status._watchers, [])
        self.assertEqual(self.times["up"]._watchers, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.status.set("busy")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fair_shares(self):
        """Four hosts holding every place (8 each) keep no one out: a
        newcomer takes the oldest stream of the biggest holder, which is
        closed (its browser reconnects); a host at its own limit replaces
        its own oldest; nobody is taken below a fair share."""
        def open_from(host):
            refusal = self.hub.admit(host)
            if refusal is not None:
                return None
            request = FakeRequest()
            self.hub.add(Stream(self.hub, request, host))
            return request
        held = {}
        for a in range(4):
            for _ in range(events.MAX_STREAMS_PER_HOST):
                held.setdefault(a, []).append(open_from(f"127.0.2.{a + 1}"))
        self.assertEqual(len(self.hub.streams), events.MAX_STREAMS)
        self.assertTrue(all(r is not None and not r.finished for rs in held.values() for r in rs))
        mine = open_from("127.0.0.1")
        self.assertIsNotNone(mine)
        self.assertEqual(len(self.hub.streams), events.MAX_STREAMS)
        self.assertTrue(held[0][0].finished)        # the oldest of a biggest holder
        # the attackers come back again and again: each takes from another
        # attacker (the biggest), never the newcomer's single stream
        for round in range(3):
            for a in range(4):
                self.clock.advance(1 / events.OPEN_RATE)
                open_from(f"127.0.2.{a + 1}")
        self.assertFalse(mine.finished)
        self.assertEqual(self.hub.shares.holding("127.0.0.1"), 1)
        # a host at its own limit replaces its own oldest
        own = [s for s in self.hub.streams if s.host == "127.0.2.2"]
        self.assertEqual(len(own), events.MAX_STREAMS_PER_HOST)
        self.clock.advance(1 / events.OPEN_RATE)
        open_from("127.0.2.2")
        self.assertTrue(own[0].request.finished)
        self.assertEqual(len(self.hub.streams), events.MAX_STREAMS)
        self.hub.close_all()
        self.assertEqual(self.hub.streams, [])
        self.assertEqual(self.hub.shares.count, 0)
        self.assertEqual(self.status._watchers, [])

    def test_opening_rate_per_host(self):
        """Every opening sends the whole state: a host opening streams in
        a loop is told to wait (503, Retry-After), others are not."""
        for _ in range(events.OPEN_BURST):
            self.assertIsNone(self.hub.admit("127.0.3.1"))
        reason, wait = self.hub.admit("127.0.3.1")
        self.assertIn("too many live pages opened from 127.0.3.1", reason)
        self.assertEqual(wait, 2)
        self.assertIsNone(self.hub.admit("127.0.3.2"))
        self.clock.advance(wait)
        self.assertIsNone(self.hub.admit("127.0.3.1"))
        self.assertIsNotNone(self.hub.admit("127.0.3.1"))

    def test_a_stream_never_read_is_dropped(self):
        stream, request = self.connect()
        stream.pauseProducing()
        self.clock.advance(events.STALL - 1)
        stream.resumeProducing()            # read a little: still there
        stream.pauseProducing()
        self.clock.advance(events.STALL - 1)
        self.assertIn(stream, self.hub.streams)
        self.clock.advance(1)
        self.assertNotIn(stream, self.hub.streams)
        self.assertTrue(stream.closed)
