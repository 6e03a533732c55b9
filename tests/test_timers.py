"""Timers survive wall-clock jumps (issue 15: a Pi without an RTC, NTP or
``PUT /sysinfo/clock`` moving the clock by an hour).

The jump is modelled where Twisted reads the wall clock: ``ReactorBase.seconds``
is ``time.time`` itself (bound at import, so patching the ``time`` module
would not reach it); the process test moves ``time.time`` before Twisted is
imported.
"""

import asyncio
import glob
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

from twisted.internet import task
from twisted.internet.base import ReactorBase
from twisted.trial import unittest

from piccolo_twisted.timers import monotonic_timers

from .helpers import as_deferred, asyncio_reactor
from .test_wire import coro

HOUR = 3600.0
HERE = os.path.dirname(os.path.abspath(__file__))


class WallClock:
    """Twisted's idea of the wall clock, moved by hand."""

    def __init__(self, test):
        self.offset = 0.0
        test.patch(ReactorBase, "seconds", staticmethod(self))

    def __call__(self):
        return time.time() + self.offset


class ReactorTimersMixin:
    """Runs against a fresh instance of one reactor class (never installed,
    never run as the process's reactor)."""

    def make(self):
        raise NotImplementedError

    def drive(self, r, done, limit):
        """What the reactor's main loop does: run due calls, sleep in the
        poller for timeout(), until done() or ``limit`` real seconds."""
        end = time.monotonic() + limit
        while not done() and time.monotonic() < end:
            r.runUntilCurrent()
            t = r.timeout()
            r.doIteration(max(0.0, min(end - time.monotonic(), 0.05 if t is None else t)))
        r.runUntilCurrent()

    def close(self, r):
        r.removeReader(r.waker)
        r.waker.connectionLost(None)

    def setUp(self):
        self.wall = WallClock(self)
        self.r = self.make()
        self.addCleanup(self.close, self.r)

    def test_model_wall_clock_reactor_stalls_and_rushes(self):
        """Without the switch, the reactor's timers follow the wall clock:
        an hour back stalls a pending call by an hour, an hour forward fires
        it at once. (If Twisted ever stops doing this, this test says so.)"""
        self.assertIs(ReactorBase.__dict__["seconds"].__func__, self.wall)
        fired = []
        self.r.callLater(10, fired.append, 1)
        self.wall.offset = -HOUR
        self.assertGreater(self.r.timeout(), HOUR)
        self.wall.offset = +HOUR
        self.r.runUntilCurrent()
        self.assertEqual(fired, [1])

    def test_jumps_do_not_move_deadlines(self):
        fired = []
        before = self.r.callLater(10, fired.append, "before")
        self.assertTrue(monotonic_timers(self.r))
        after = self.r.callLater(20, fired.append, "after")
        for offset in (-HOUR, +HOUR, -24 * HOUR):
            self.wall.offset = offset
            self.assertTrue(9.0 < self.r.timeout() <= 10.0, self.r.timeout())
            self.r.runUntilCurrent()
            self.assertEqual(fired, [])
        self.assertLess(abs(before.getTime() - time.monotonic() - 10), 1)
        self.assertLess(abs(after.getTime() - time.monotonic() - 20), 1)
        # a pending call keeps working after the switch: reset, delay, cancel
        before.reset(30)
        self.assertLess(abs(before.getTime() - time.monotonic() - 30), 1)
        before.delay(5)
        self.assertLess(abs(before.getTime() - time.monotonic() - 35), 1)
        before.cancel()
        after.cancel()
        self.assertEqual(self.r.getDelayedCalls(), [])
        self.assertFalse(monotonic_timers(self.r))       # already monotonic

    def test_pending_calls_keep_their_order(self):
        fired = []
        calls = [self.r.callLater(d, fired.append, d) for d in (0.09, 0.03, 0.06, 0.01)]
        self.r.runUntilCurrent()            # into the heap (not only _newTimedCalls)
        calls[3].cancel()                   # a cancelled call stays in the heap
        self.r.callLater(0.02, fired.append, 0.02)    # still in _newTimedCalls
        monotonic_timers(self.r)
        self.wall.offset = -HOUR
        started = time.monotonic()
        self.drive(self.r, lambda: len(fired) == 4, limit=2.0)
        self.assertEqual(fired, [0.02, 0.03, 0.06, 0.09])
        self.assertGreaterEqual(time.monotonic() - started, 0.08)

    def test_call_fires_on_time_across_a_backward_jump(self):
        fired = []
        self.r.callLater(0.1, lambda: fired.append(time.monotonic()))
        monotonic_timers(self.r)
        started = time.monotonic()
        self.wall.offset = -HOUR
        self.drive(self.r, lambda: fired, limit=2.0)
        self.assertTrue(fired, "the call stalled")
        self.assertGreaterEqual(fired[0] - started, 0.09)

    def test_call_not_early_across_a_forward_jump(self):
        fired = []
        self.r.callLater(0.1, lambda: fired.append(time.monotonic()))
        # any other timer wakes the reactor up (on asyncio only timers do)
        self.r.callLater(0.02, lambda: None)
        monotonic_timers(self.r)
        started = time.monotonic()
        self.wall.offset = +HOUR
        self.drive(self.r, lambda: fired, limit=2.0)
        self.assertTrue(fired)
        self.assertGreaterEqual(fired[0] - started, 0.09)


class EPollReactorTimers(ReactorTimersMixin, unittest.SynchronousTestCase):

    def make(self):
        from twisted.internet.epollreactor import EPollReactor
        return EPollReactor()

    def close(self, r):
        super().close(r)
        r._poller.close()


class PollReactorTimers(ReactorTimersMixin, unittest.SynchronousTestCase):

    def make(self):
        from twisted.internet.pollreactor import PollReactor
        return PollReactor()


class SelectReactorTimers(ReactorTimersMixin, unittest.SynchronousTestCase):

    def make(self):
        from twisted.internet.selectreactor import SelectReactor
        return SelectReactor()


class AsyncioReactorTimers(ReactorTimersMixin, unittest.SynchronousTestCase):
    """The asyncio reactor sleeps on the event loop's monotonic clock, but
    its DelayedCalls are still on ``seconds()`` = wall time: when its loop
    timer fires, runUntilCurrent finds nothing due and re-arms for an hour."""

    def make(self):
        from twisted.internet.asyncioreactor import AsyncioSelectorReactor
        self.loop = asyncio.new_event_loop()
        return AsyncioSelectorReactor(self.loop)

    def close(self, r):
        super().close(r)
        self.loop.close()

    def drive(self, r, done, limit):
        # its own loop, in a thread (this thread's loop may be running)
        async def wait():
            end = time.monotonic() + limit
            while not done() and time.monotonic() < end:
                await asyncio.sleep(0.01)
        t = threading.Thread(target=self.loop.run_until_complete, args=(wait(),))
        t.start()
        t.join()


class LeftAlone(unittest.SynchronousTestCase):

    def test_not_a_reactor(self):
        clock = task.Clock()
        clock.advance(5)
        self.assertFalse(monotonic_timers(clock))
        self.assertEqual(clock.seconds(), 5)


class TwistdServiceClocks(unittest.SynchronousTestCase):

    def test_timers_monotonic_dates_wall(self):
        """makeService (``twistd piccolo`` and piccolo.tac) switches the
        reactor's timers to the monotonic clock; the scheduler's dates stay
        on the wall clock."""
        from twisted.internet import reactor
        from piccolo_twisted import tap
        options = tap.Options()
        options.parseOptions(["--data-dir", os.path.abspath(self.mktemp()),
                              "--address", "::1", "--port", "0"])
        service = tap.makeService(options)
        self.assertLess(abs(reactor.seconds() - time.monotonic()), 1)
        self.assertGreater(abs(time.time() - time.monotonic()), HOUR)   # distinguishable
        self.assertLess(abs(service.scheduler.wall() - time.time()), 5)


# -- the server, as twistd runs it ---------------------------------------------

def free_port():
    import socket
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class ServerClockJumpTests(unittest.TestCase):
    """``twistd -n piccolo`` (default reactor) in a process whose wall clock
    is set by ``PUT /sysinfo/clock`` (tests/walljump/sitecustomize.py):
    a batch delay pending across a jump of an hour back, then two hours
    forward, still lasts its delay; the server answers throughout."""

    timeout = 60
    DELAY = 0.6

    def setUp(self):
        if not asyncio_reactor():
            raise unittest.SkipTest("needs --reactor=asyncio (aiocoap)")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.datadir = os.path.join(self.dir, "data")
        self.port = free_port()
        # the server looks its helper up on PATH before spawning it; the shim
        # runs `true` in its place, this stand-in never runs for `date`
        bindir = os.path.join(self.dir, "bin")
        os.makedirs(bindir)
        with open(os.path.join(bindir, "sudo"), "w") as f:
            f.write("#!/bin/sh\necho \"stand-in sudo: not for $*\" >&2\nexit 1\n")
        os.chmod(os.path.join(bindir, "sudo"), 0o755)
        env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", PICCOLO_TIME_SCALE="0.05",
                   PATH=bindir + os.pathsep + os.environ.get("PATH", os.defpath),
                   PYTHONPATH=os.pathsep.join(
                       [os.path.join(HERE, "walljump")]
                       + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.output = open(os.path.join(self.dir, "twistd.out"), "w+")
        self.addCleanup(self.output.close)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "piccolo", "--address", "::1", "--port", str(self.port), "--web", "0",
             "--data-dir", self.datadir],
            cwd=self.dir, env=env, stdout=self.output, stderr=subprocess.STDOUT)
        self.addCleanup(self.stop)
        return as_deferred(self._client())

    async def _client(self):
        import aiocoap
        self.ctx = await aiocoap.Context.create_client_context()

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return as_deferred(self.ctx.shutdown())

    def log(self):
        self.output.flush()
        self.output.seek(0)
        return self.output.read()

    async def request(self, method, path, payload=None):
        import aiocoap
        raw = b"" if payload is None else json.dumps(payload).encode()
        msg = aiocoap.Message(code=getattr(aiocoap, method),
                              uri=f"coap://[::1]:{self.port}/{path}", payload=raw)
        r = await asyncio.wait_for(self.ctx.request(msg).response, 5)
        if not r.code.is_successful():
            raise AssertionError(f"{method} {path}: {r.code} {r.payload!r}")
        return json.loads(r.payload) if r.payload else None

    async def wait_for(self, what, check, limit):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            value = what()
            if asyncio.iscoroutine(value):
                value = await value
            if check(value):
                return time.monotonic()
            await asyncio.sleep(0.02)
        self.fail(f"not within {limit} s; server output:\n{self.log()}")

    async def start(self):
        import aiocoap.error
        end = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                self.fail(f"twistd exited:\n{self.log()}")
            try:
                specs = await self.request("GET", "spectrometer/spectrometers")
                break
            except (aiocoap.error.Error, OSError, asyncio.TimeoutError):
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.05)
        for spec in specs:
            await self.wait_for(lambda: self.request("GET", f"spectrometer/{spec}/status"),
                                lambda s: s == 6, 20)

    async def batch_across_jump(self, run, hours):
        """A two-sequence batch; while it waits its delay after sequence 0,
        the wall clock is set ``hours`` from now."""
        started = time.monotonic()
        await self.request("PUT", "control/record_sequence",
                           {"run": run, "nsequence": 2, "auto": -1, "delay": self.DELAY})
        files = os.path.join(self.datadir, run, "*s000000*light*")
        # sequence 0 written: the delay's timer is pending
        await self.wait_for(lambda: glob.glob(files), bool, 10)
        when = datetime.now(timezone.utc) + timedelta(hours=hours)
        self.assertIsNone(await self.request("PUT", "sysinfo/clock", when.isoformat()))
        jumped = time.monotonic()
        # the jump came while the delay was pending (else re-run: contention)
        self.assertEqual(await self.request("GET", "control/status"), "waiting")
        self.assertEqual(await self.request("GET", "control/current_sequence"), 0)
        # not stalled by an hour back (limit), not cut short by a jump forward
        idle = await self.wait_for(lambda: self.request("GET", "control/status"),
                                   lambda s: s == "idle", self.DELAY + 5)
        self.assertGreaterEqual(idle - started, self.DELAY)
        self.assertTrue(glob.glob(os.path.join(self.datadir, run, "*s000001*light*")))
        return idle - jumped

    @coro
    async def test_batch_delay_across_clock_jumps(self):
        await self.start()
        await self.batch_across_jump("back", -1)
        await self.batch_across_jump("forward", +1)
        self.assertEqual(await self.request("GET", "control/fault"), "")
        log = self.log()
        self.assertEqual(log.count("walljump: wall clock set to"), 2, log)
        self.assertNotIn("walljump: refusing", log)
        self.assertNotIn("Traceback", log)
