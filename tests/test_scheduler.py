"""The scheduler on task.Clock: jobs, fast-forward, quiet time, power window,
persistence; schedule arithmetic as pure functions."""

import os
from datetime import datetime, timedelta, timezone

from twisted.internet import defer, task
from twisted.trial import unittest

from piccolo_twisted.errors import PiccoloError
from piccolo_twisted.observable import Observable
from piccolo_twisted import scheduler as sch

try:
    from piccolo_twisted.instrument.lease import Lease
except ImportError:                 # main before issue 18: no lease
    class Lease:
        pass

T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def at(dt):
    return dt.isoformat()


class FakeSpectrometer:
    """What the power window looks at: a status, and a (simulated) switch."""

    def __init__(self, name):
        from piccolo_twisted.instrument.spectrometer import IDLE
        self.name = name
        self.status = Observable(IDLE)
        self.power_pin = None

        class Config:
            simulated = True
        self.config = Config()


class FakeSpectrometers:
    def __init__(self, log):
        self.log = log
        self.devices = [FakeSpectrometer("S_a"), FakeSpectrometer("S_b")]

    def __iter__(self):
        return iter(self.devices)

    def _set(self, off):
        from piccolo_twisted.instrument.spectrometer import IDLE, POWERED_OFF
        for s in self.devices:
            s.status.set(POWERED_OFF if off else IDLE)

    def power_off_all(self):
        self.log.append("power_off")
        self._set(True)
        return defer.succeed("ok")

    def power_on_all(self):
        self.log.append("power_on")
        self._set(False)
        return defer.succeed("ok")


class FakeControl:
    """Control as the scheduler sees it: batches that hold the instrument's
    lease (``busy = True`` holds it as a running batch would)."""

    def __init__(self):
        self.runs = []
        self.power = []
        self._batch = None

        class Instrument:
            pass
        self.instrument = Instrument()
        self.instrument.lease = Lease()
        self.instrument.spectrometers = FakeSpectrometers(self.power)

    @property
    def busy(self):
        return self._batch is not None

    @busy.setter
    def busy(self, value):
        if value and self._batch is None:
            self._batch = self.instrument.lease.try_take("batch")
        elif not value and self._batch is not None:
            self._batch.release()
            self._batch = None

    def start_record(self, job, lease=None):
        token = lease or self.instrument.lease.try_take("batch")
        token.release()
        self.run_record(job)
        return defer.succeed(Done(job.get("run")))

    def run_record(self, job):
        self.runs.append(job)

    def start_dark(self, run, lease=None):
        if lease is not None:
            lease.release()
        self.runs.append(("dark", run))
        return defer.succeed(Done(run))


class Done:
    ok = True
    reason = None
    batch = 0

    def __init__(self, run):
        self.run = run


def sync_db(fn, *a):
    """The scheduler's database calls, run at once in the test's thread."""
    return defer.maybeDeferred(fn, *a)


JOB = {"run": "r", "nsequence": 2, "auto": 0, "delay": 0.0, "target": 80}


class PureTests(unittest.SynchronousTestCase):

    def test_quiet_window_across_midnight(self):
        ts = lambda h, m=0, d=1: datetime(2026, 6, d, h, m, tzinfo=timezone.utc).timestamp()
        s, e = sch.quiet_window(ts(23), "22:00:00+0000", "04:00:00+0000")
        self.assertEqual((s, e), (ts(22), ts(4, d=2)))
        s, e = sch.quiet_window(ts(2), "22:00:00+0000", "04:00:00+0000")
        may31 = datetime(2026, 5, 31, 22, tzinfo=timezone.utc).timestamp()
        self.assertEqual((s, e), (may31, ts(4)))
        self.assertTrue(sch.in_quiet(ts(3, 59), "22:00:00+0000", "04:00:00+0000"))
        self.assertFalse(sch.in_quiet(ts(4), "22:00:00+0000", "04:00:00+0000"))
        self.assertFalse(sch.in_quiet(ts(12), "22:00:00+0000", "04:00:00+0000"))
        s, e = sch.quiet_window(ts(12), "22:00:00+0000", "04:00:00+0000")
        self.assertEqual(s, ts(22))

    def test_quiet_window_with_offset(self):
        # 22:00 at UTC+2 is 20:00 UTC
        ts = datetime(2026, 6, 1, 20, 30, tzinfo=timezone.utc).timestamp()
        self.assertTrue(sch.in_quiet(ts, "22:00:00+0200", "06:00:00+0200"))

    def test_parse_quiet_time_rejects(self):
        for bad in ("25:00:00+0000", "22:00+0000", "abc", 2200, None, "22:00",
                    "22:61:00+0000", "22:00:00Z", "22:00:00+00:00", "22:00:00 +0000",
                    "9:00:00", "22:00:00.5", "22:00:00+1500", ""):
            self.assertRaises(PiccoloError, sch.parse_quiet_time, bad)

    def test_quiet_time_without_offset_is_utc(self):
        # what the piccolo3 client sends for a naive datetime.time
        self.assertEqual(sch.normalise_quiet_time("21:00:00"), "21:00:00+0000")
        self.assertEqual(sch.normalise_quiet_time("21:00:00+0100"), "21:00:00+0100")
        self.assertEqual(sch.normalise_quiet_time("21:00:00-0530"), "21:00:00-0530")
        ts = datetime(2026, 6, 1, 21, 30, tzinfo=timezone.utc).timestamp()
        self.assertTrue(sch.in_quiet(ts, "21:00:00", "22:00:00"))
        self.assertFalse(sch.in_quiet(ts, "21:00:00+0100", "21:30:00+0100"))

    def test_next_run_fast_forward(self):
        self.assertEqual(sch.next_run(100, 60, 50), 100)
        self.assertEqual(sch.next_run(100, 60, 100), 160)
        self.assertEqual(sch.next_run(100, 60, 1000), 1060)
        self.assertIsNone(sch.next_run(100, None, 1000))


class SchedulerTests(unittest.SynchronousTestCase):

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.clock = task.Clock()
        self.clock.advance(T0.timestamp())
        self.control = FakeControl()
        self.s = self.make()

    def make(self):
        s = sch.Scheduler(self.control, os.path.join(self.dir, sch.DB_NAME), self.clock,
                          run_db=sync_db, wall=self.clock.seconds)
        s.open()
        s.startService()
        self.addCleanup(s.close)
        self.addCleanup(lambda: s.running and s.stopService())
        return s

    def add(self, *a, s=None):
        return self.successResultOf((s or self.s).add(*a))

    def tick(self, seconds=1):
        for _ in range(int(seconds)):
            self.clock.advance(1)
            self.s.tick()

    def test_one_off_job_runs_on_time(self):
        self.add("record", JOB, at(T0 + timedelta(seconds=10)))
        self.tick(9)
        self.assertEqual(self.control.runs, [])
        self.tick(1)
        self.assertEqual(self.control.runs, [JOB])
        self.tick(100)
        self.assertEqual(len(self.control.runs), 1)
        self.assertEqual(self.s.listing(), [])          # done jobs are not listed

    def test_repeating_until_end(self):
        jid = self.add("record", JOB, at(T0 + timedelta(seconds=60)), 60,
                         at(T0 + timedelta(seconds=300)))
        self.assertEqual(self.s.listing()[0][0], jid)
        self.tick(299)
        self.assertEqual(len(self.control.runs), 4)     # 60, 120, 180, 240
        self.tick(200)
        self.assertEqual(len(self.control.runs), 5)     # and 300
        self.assertNotIn(jid, self.s.jobs)              # finished: purged

    def test_fast_forward_after_gap(self):
        self.add("record", JOB, at(T0 + timedelta(seconds=60)), 60)
        self.clock.advance(3600)                        # the server was down
        self.s.tick()
        self.assertEqual(len(self.control.runs), 1)
        job = list(self.s.jobs.values())[0]
        self.assertGreater(job.next_time, self.clock.seconds())
        self.assertEqual((job.next_time - (T0.timestamp() + 60)) % 60, 0)
        self.s.tick()
        self.assertEqual(len(self.control.runs), 1)

    def test_suspend_unsuspend_delete(self):
        jid = self.add("record", JOB, at(T0 + timedelta(seconds=5)), 10)
        self.s.suspend(jid)
        self.assertEqual(self.s.listing()[0][5], "suspended")
        self.tick(30)
        self.assertEqual(self.control.runs, [])
        self.s.unsuspend(jid)
        self.tick(10)
        self.assertEqual(len(self.control.runs), 1)
        self.s.delete(jid)
        self.tick(30)
        self.assertEqual(len(self.control.runs), 1)
        self.assertEqual(self.s.listing(), [])
        for bad in ("x", None, 1.5):
            self.assertRaises(PiccoloError, self.s.suspend, bad)
        # an id no job has: done, as the legacy server answered (2.04)
        for unknown in (jid, 999):
            for verb in (self.s.suspend, self.s.unsuspend, self.s.delete):
                self.assertIsNone(verb(unknown))

    def test_listing_format(self):
        self.add("record", JOB, at(T0 + timedelta(seconds=5)), 10)
        self.add("power_on", None, at(T0 + timedelta(hours=1)), 86400)
        [rec, power] = self.s.listing()
        self.assertEqual(rec[1], ["record", ["r", 2, 0, 0.0, 80]])
        self.assertEqual(rec[2], (T0 + timedelta(seconds=5)).isoformat())
        self.assertEqual((rec[3], rec[4], rec[5]), (None, 10, "active"))
        self.assertEqual(power[1], ["power_on"])

    def test_bad_jobs_store_nothing(self):
        past = at(T0 - timedelta(hours=1))
        cases = [(past, None, None), ("soon", None, None),
                 (at(T0 + timedelta(hours=1)), 0, None),
                 (at(T0 + timedelta(hours=1)), -5, None),
                 (at(T0 + timedelta(hours=1)), "Infinity", None),
                 (at(T0 + timedelta(hours=2)), 60, at(T0 + timedelta(hours=1)))]
        for start, interval, end in cases:
            self.assertRaises(PiccoloError, self.s.add, "record", JOB, start, interval, end)
        self.assertEqual(self.s.jobs, {})

    def test_naive_and_legacy_times(self):
        self.add("record", JOB, "2026-06-01 12:00:30")              # naive = UTC
        self.add("record", JOB, str(T0 + timedelta(seconds=40)))    # str(datetime)
        self.tick(40)
        self.assertEqual(len(self.control.runs), 2)

    def test_job_waits_while_busy(self):
        self.add("record", JOB, at(T0 + timedelta(seconds=5)))
        self.control.busy = True
        self.tick(20)
        self.assertEqual(self.control.runs, [])
        self.control.busy = False
        self.tick(1)
        self.assertEqual(self.control.runs, [JOB])

    def test_quiet_time_across_midnight(self):
        self.quiet("22:00:00+0000", "04:00:00+0000")
        start = T0.replace(hour=23)
        self.add("record", JOB, at(start), 3600)
        self.clock.advance(start.timestamp() - self.clock.seconds() - 1)
        self.tick(5 * 3600 - 1)                    # until 03:59:59
        self.assertEqual(self.control.runs, [])
        self.tick(2)
        self.assertEqual(len(self.control.runs), 1)  # at 04:00, once

    def quiet(self, start, end, power_delay=None):
        s = self.s.resources()
        s["quietStart"].put(start)
        s["quietEnd"].put(end)
        if power_delay is not None:
            s["powerDelay"].put(power_delay)
            s["powerOffEnabled"].put(True)
        s["quietTimeEnabled"].put(True)

    def test_power_window_too_short_refused(self):
        self.quiet("22:00:00+0000", "22:05:00+0000", 300)
        self.clock.advance(T0.replace(hour=21, minute=59).timestamp() - self.clock.seconds())
        self.tick(1200)
        self.assertEqual(self.control.power, [])

    def test_bad_settings_refused(self):
        res = self.s.resources()
        cases = {"quietTimeEnabled": ["yes", 2, None], "powerOffEnabled": ["abc"],
                 "quietStart": ["22:00", "abc", 5, "99:00:00+0000"],
                 "quietEnd": ["", None], "powerDelay": [-1, "abc", "Infinity", 1.5, 10 ** 9]}
        for key, values in cases.items():
            before = self.s.settings[key].value
            for v in values:
                self.assertRaises(PiccoloError, res[key].put, v)
            self.assertEqual(self.s.settings[key].value, before)
        # and the scheduler still runs
        self.add("record", JOB, at(T0 + timedelta(seconds=2)))
        self.tick(3)
        self.assertEqual(len(self.control.runs), 1)

    def test_failing_job_does_not_stop_the_scheduler(self):
        def boom(job):
            raise RuntimeError("disk on fire")
        self.control.run_record = boom
        self.add("record", JOB, at(T0 + timedelta(seconds=1)))
        self.add("power_off", None, at(T0 + timedelta(seconds=3)), 86400)
        self.tick(5)
        self.assertEqual(self.control.power, ["power_off"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_failing_power_job_is_recorded(self):
        spectrometers = self.control.instrument.spectrometers
        spectrometers.power_on_all = lambda: defer.fail(RuntimeError("relay stuck"))
        jid = self.add("power_on", None, at(T0 + timedelta(seconds=2)), 86400)
        self.tick(3)
        [entry] = self.s.history
        self.assertEqual((entry.job, entry.outcome), (jid, "failed"))
        self.assertIn("relay stuck", entry.reason)
        # a later power call that works is done
        self.add("power_off", None, at(T0 + timedelta(seconds=5)), 86400)
        self.tick(3)
        self.assertEqual(self.s.history[-1].outcome, "done")

    def test_tick_survives_anything(self):
        self.s.runner.evaluate = lambda now: 1 / 0
        self.s.tick()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_persistence(self):
        jid = self.add("record", JOB, at(T0 + timedelta(hours=1)), 600)
        jid2 = self.add("power_on", None, at(T0 + timedelta(hours=2)), 86400)
        self.s.suspend(jid2)
        res = self.s.resources()
        res["quietStart"].put("21:30:00+0100")
        res["quietTimeEnabled"].put(True)
        res["powerDelay"].put(120)
        self.s.close()
        again = self.make()
        self.assertEqual(again.listing(), self.s.listing())
        self.assertEqual(again.jobs[jid2].status, "suspended")
        self.assertEqual(again.settings["quietStart"].value, "21:30:00+0100")
        self.assertIs(again.settings["quietTimeEnabled"].value, True)
        self.assertEqual(again.settings["powerDelay"].value, 120)
        self.assertEqual(again.jobs[jid].args, JOB)

    def test_corrupt_database_moved_aside(self):
        self.s.close()
        path = os.path.join(self.dir, sch.DB_NAME)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
        with open(path, "wb") as f:
            f.write(b"this is not a database" * 100)
        again = self.make()
        self.assertEqual(again.jobs, {})
        aside = [n for n in os.listdir(self.dir) if ".corrupt-" in n]
        self.assertEqual(len(aside), 1)
        self.add("record", JOB, at(T0 + timedelta(hours=1)), s=again)
        self.assertEqual(len(again.listing()), 1)
