"""The five faults issue 18 found where the parts meet, each as a test
that fails on the server before it (main at ba916b9) and passes now.
(The first, a job due at a restart, is over the wire in
test_scheduler_restart.py.)

They are written against what both versions have (the Scheduler's
constructor, resources, Control, the simulated instrument), so that on the
old server they fail on the fault itself, not on a missing name.
"""

import os
import time
from datetime import datetime, timedelta, timezone

from twisted.internet import defer, task
from twisted.trial import unittest

from piccolo_twisted import scheduler as sch
from piccolo_twisted.instrument.spectrometer import IDLE, POWERED_OFF

from .test_scheduler import FakeControl, sync_db

DAY0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def start(s):
    timer = getattr(s, "timer", None)         # the old scheduler ticked a TimerService
    (timer or s).startService()
    return s


def stop(s):
    timer = getattr(s, "timer", None)
    if (timer or s).running:
        (timer or s).stopService()


class Held:
    """A worker thread that runs when told."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, *a, **kw):
        d = defer.Deferred()
        self.calls.append((d, fn, a, kw))
        return d

    def run(self):
        while self.calls:
            d, fn, a, kw = self.calls.pop(0)
            try:
                result = fn(*a, **kw)
            except Exception:
                d.errback()
            else:
                d.callback(result)


class WindowCase(unittest.TestCase):
    """A scheduler whose quiet-time power window opens at 22:10."""

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), sch.DB_NAME)
        os.makedirs(os.path.dirname(self.path))
        self.clock = task.Clock()
        self.clock.advance(DAY0.timestamp())

    def wall(self):
        return self.clock.seconds()

    def scheduler(self, control, run_db=sync_db):
        s = sch.Scheduler(control, self.path, self.clock, run_db=run_db, wall=self.wall)
        s.open()
        self.addCleanup(s.close)
        start(s)
        self.addCleanup(stop, s)
        return s

    def window(self, s, run=lambda: None):
        res = s.resources()
        for key, value in (("quietStart", "22:00:00+0000"), ("quietEnd", "04:00:00+0000"),
                           ("powerDelay", 600), ("powerOffEnabled", True),
                           ("quietTimeEnabled", True)):
            d = res[key].put(value)
            run()
            if isinstance(d, defer.Deferred):
                self.successResultOf(d)

    def until(self, hour, minute=0, second=0, day=0, step=60.0):
        target = (DAY0.replace(hour=hour, minute=minute, second=second)
                  + timedelta(days=day)).timestamp()
        while self.clock.seconds() < target:
            self.clock.advance(min(step, target - self.clock.seconds()))


class FailedPowerOffTests(WindowCase):
    """Fault 2: a failed quiet-time power-off was never retried (the
    scheduler marked it applied before it had finished), and a "busy"
    answer counted as success: the spectrometers stayed on all night."""

    def test_failed_power_off_is_retried(self):
        control = FakeControl()
        spectrometers = control.instrument.spectrometers
        real = spectrometers.power_off_all
        failures = [RuntimeError("GPIO write failed")]

        def power_off_all():
            if failures:
                spectrometers.log.append("power_off failed")
                return defer.fail(failures.pop())
            return real()
        spectrometers.power_off_all = power_off_all
        s = self.scheduler(control)
        self.window(s)
        self.until(22, 10)
        self.clock.advance(30)
        self.assertEqual(control.power, ["power_off failed"])
        self.until(23)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(control.power, ["power_off failed", "power_off"])
        self.assertTrue(all(d.status.value == POWERED_OFF for d in spectrometers))

    def test_busy_is_not_success(self):
        control = FakeControl()
        spectrometers = control.instrument.spectrometers
        real = spectrometers.power_off_all
        busy = [1]

        def power_off_all():
            if busy:
                busy.pop()
                # what Spectrometers.power_off_all answers while a read still
                # runs (an abort abandoned it): nothing switched
                spectrometers.log.append("busy")
                return defer.succeed("S_a is busy|S_b is busy")
            return real()
        spectrometers.power_off_all = power_off_all
        s = self.scheduler(control)
        self.window(s)
        self.until(23)
        self.assertEqual(control.power, ["busy", "power_off"])
        self.assertTrue(all(d.status.value == POWERED_OFF for d in spectrometers))


class PowerOffDuringABatchTests(WindowCase):
    """Fault 3: the window checked ``busy`` before its durable write and
    switched off after the commit without looking again: a batch that
    started in between lost its spectrometers. Here the commit is slow, the
    batch is asked for meanwhile (the real Control, the simulated
    instrument, a real SQLite file): the spectrometers must never be
    powered off while a batch holds them."""

    def test_no_power_off_under_a_batch_that_started_during_the_commit(self):
        from gpiozero.pins.mock import MockFactory
        from piccolo_twisted.acquisition.control import Control
        from piccolo_twisted.config import bundled_instrument_config, load_instrument_config
        from piccolo_twisted.datadir import DataDir
        from piccolo_twisted.errors import BusyError
        from piccolo_twisted.instrument import build_instrument
        from piccolo_twisted.instrument.gpio import GPIO

        def now(fn, *a, **kw):
            return defer.maybeDeferred(fn, *a, **kw)
        config = load_instrument_config(bundled_instrument_config())
        instrument = build_instrument(config, self.clock, gpio=GPIO(MockFactory()),
                                      time_scale=0.001, to_thread=now)
        files = Held()
        datadir = DataDir(os.path.join(os.path.dirname(self.path), "data"), to_thread=files)
        datadir.prepare()
        files.run()
        control = Control(instrument, datadir, self.clock, to_thread=now)
        started = instrument.start()
        self.clock.advance(0.1)                 # the shutters' closing pulses
        self.successResultOf(started)
        for s in instrument.spectrometers:
            self.assertEqual(s.status.value, IDLE)
        under_batch = []
        for s in instrument.spectrometers:
            s.status.watch(lambda status, s=s: status == POWERED_OFF and control.busy
                           and under_batch.append(s.name))
        db = Held()
        s = self.scheduler(control, run_db=db)
        db.run()
        self.window(s, run=db.run)
        self.until(22, 10, 1, step=1.0)
        # the window's durable write is under way; a client asks for a batch
        self.assertTrue(db.calls)
        try:
            control.run_record(control.validate_record("night", 1, -1))
            batch = True
        except BusyError:
            batch = False                   # the instrument is the window's now
        self.assertEqual(control.busy, batch)
        # the commit is done while the batch (if any) still prepares its run
        db.run()
        self.assertEqual(under_batch, [])
        for _ in range(200):
            self.clock.advance(0.05)
            files.run()
            db.run()
        self.assertEqual(under_batch, [])
        self.assertFalse(control.busy)
        self.until(22, 30)
        db.run()
        # and the window did switch them off, once the instrument was free
        self.assertTrue(all(sp.status.value == POWERED_OFF
                            for sp in instrument.spectrometers))
        stopped = instrument.stop()
        self.clock.advance(0.1)
        self.successResultOf(stopped)


class EpochBootTests(unittest.SynchronousTestCase):
    """Fault 4: on a Pi that boots at the epoch (no RTC, no fake-hwclock)
    time.time() is about time.monotonic(), and the switch of the reactor's
    timers to the monotonic clock took that for "already monotonic": when
    NTP then stepped the clock by fifty years, every pending timer fired
    at once. And Scheduler(wall=None) took its dates from the reactor's
    clock, which counts monotonic time once switched."""

    def test_timers_switched_at_the_epoch(self):
        from twisted.internet.base import ReactorBase
        from twisted.internet.selectreactor import SelectReactor
        from piccolo_twisted.timers import monotonic_timers
        boot = [12.3]                        # seconds since power-on
        self.patch(ReactorBase, "seconds", staticmethod(lambda: boot[0] + 0.2))
        r = SelectReactor()
        self.addCleanup(lambda: (r.removeReader(r.waker), r.waker.connectionLost(None)))
        monotonic = lambda: boot[0]              # noqa: E731
        fired = []
        r.callLater(10, fired.append, 1)
        self.assertTrue(monotonic_timers(r, monotonic=monotonic))
        self.assertIs(r.seconds, monotonic)
        # NTP steps the wall clock to today: the timer keeps its delay
        self.patch(ReactorBase, "seconds", staticmethod(time.time))
        r.runUntilCurrent()
        self.assertEqual(fired, [])
        self.assertGreater(r.timeout(), 9.0)
        self.assertFalse(monotonic_timers(r, monotonic=monotonic))   # once

    def test_scheduler_dates_come_from_the_wall_clock(self):
        clock = task.Clock()
        clock.advance(1234.5)                    # a monotonic reactor's seconds()
        path = os.path.join(os.path.abspath(self.mktemp()), sch.DB_NAME)
        os.makedirs(os.path.dirname(path))
        s = sch.Scheduler(FakeControl(), path, clock, run_db=sync_db)
        self.assertLess(abs(s.wall() - time.time()), 5)


class HealthAfterABackwardJumpTests(unittest.SynchronousTestCase):
    """Fault 5: once the wall clock went back past the moment the health
    tally started, every file saved afterwards was ignored until restart."""

    def test_files_saved_after_the_clock_went_back_are_counted(self):
        from collections import namedtuple
        from piccolo_twisted.sysinfo import Health
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "run"))
        now = [datetime(2026, 11, 25, 15, 0).astimezone().timestamp()]
        listeners = []

        class Data:
            path = root
            save_listeners = listeners

        def save(name, ago=0):
            path = os.path.join(root, "run", name)
            with open(path, "w") as f:
                f.write("{}")
            os.utime(path, (now[0] - ago, now[0] - ago))
            for listener in listeners:
                listener("run", name, 2)
        Usage = namedtuple("Usage", "total used free")
        clock = task.Clock()
        health = Health(Data(), clock, to_thread=lambda fn, *a: defer.maybeDeferred(fn, *a),
                        disk_usage=lambda p: Usage(10**9, 0, 10**9),
                        clock_state=lambda: None, uptime=lambda: 1.0,
                        wall_time=lambda: now[0], max_age=0)
        save("b000000_s000000_light.pico", ago=1)
        self.assertEqual(self.successResultOf(health.refresh())["files_today"], 1)
        now[0] += 60
        save("b000001_s000000_light.pico")
        self.assertEqual(self.successResultOf(health.refresh())["files_today"], 2)
        # NTP (or PUT /sysinfo/clock) sets the clock back an hour
        now[0] -= 3600
        save("b000002_s000000_light.pico")
        now[0] += 1800
        save("b000003_s000000_light.pico")
        # the two files saved since are counted (the two "from the future",
        # saved before the jump, count again when their time comes)
        self.assertEqual(self.successResultOf(health.refresh())["files_today"], 2)
        now[0] += 3600
        self.assertEqual(self.successResultOf(health.refresh())["files_today"], 4)
