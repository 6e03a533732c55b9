"""The scheduler's database: answered means committed, failed writes change
nothing, start-up whatever lies at the database path, the job cap, purging,
and the listing encoded once per change."""

import json
import os
import sqlite3
from datetime import datetime, timedelta, timezone

from twisted.internet import task
from twisted.trial import unittest

from piccolo_twisted import scheduler as sch
from piccolo_twisted.errors import PiccoloError
from piccolo_twisted.scheduler.store import Store

from .test_scheduler import JOB, FakeControl, sync_db
from .test_scheduler_power import FailingWrites

T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)


def at(seconds):
    return (T0 + timedelta(seconds=seconds)).isoformat()


def rows(path, sql):
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


class Base(unittest.TestCase):

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, sch.DB_NAME)
        self.clock = task.Clock()
        self.clock.advance(T0.timestamp())
        self.control = FakeControl()

    def make(self):
        s = sch.Scheduler(self.control, self.path, self.clock, run_db=sync_db,
                          wall=self.clock.seconds)
        s.open()
        self.addCleanup(s.close)
        return s

    def reopen(self):
        """What a restarted server finds in the file."""
        db, jobs, settings, state = sch.load_database(self.path)
        db.close()
        return jobs, settings, state


class CommitTests(Base):

    def test_nothing_acknowledged_before_the_commit(self):
        """With the pool's answer held back, the PUT's Deferred waits."""
        held = []

        def run_db(fn, *a):
            from twisted.internet import defer
            d = defer.Deferred()
            held.append((d, fn, a))
            return d
        s = sch.Scheduler(self.control, self.path, self.clock, run_db=run_db,
                          wall=self.clock.seconds)
        s.open()
        res = s.resources()
        d1 = res["powerDelay"].put(120)
        d2 = s.add("record", JOB, at(60))
        d3 = res["quietStart"].put("21:00:00")
        self.assertNoResult(d1)
        self.assertNoResult(d2)
        self.assertEqual(s.settings["powerDelay"].value, 600)   # not applied yet
        self.assertEqual(s.listing(), [])
        # the first write runs alone; what queued meanwhile goes in one transaction
        d, fn, a = held.pop(0)
        d.callback(fn(*a))
        self.successResultOf(d1)
        self.assertEqual(s.settings["powerDelay"].value, 120)
        self.assertNoResult(d2)
        d, fn, a = held.pop(0)
        self.assertEqual(len(a[1]), 2)                           # group commit
        d.callback(fn(*a))
        self.assertEqual(self.successResultOf(d2), 1)
        self.successResultOf(d3)
        self.assertEqual(len(s.listing()), 1)
        s.store._db.close()
        jobs, settings, _ = self.reopen()
        self.assertEqual(list(jobs), [1])
        self.assertEqual(settings, {"powerDelay": 120, "quietStart": "21:00:00+0000"})

    def test_failed_write_is_an_error_and_changes_nothing(self):
        s = self.make()
        res = s.resources()
        jid = self.successResultOf(s.add("record", JOB, at(60), 60))
        real = s.store._db
        s.store._db = FailingWrites(real)
        before = (s.listing(), s.jobs_changed.value)
        for key, value in (("powerDelay", 5), ("quietTimeEnabled", True),
                           ("quietStart", "20:00:00"), ("powerOffEnabled", True)):
            old = s.settings[key].value
            f = self.failureResultOf(res[key].put(value), PiccoloError)
            self.assertIn("not stored", str(f.value))
            self.assertIn("disk is full", str(f.value))
            self.assertEqual(s.settings[key].value, old)
        for call in (lambda: s.add("record", JOB, at(120)), lambda: s.suspend(jid),
                     lambda: s.delete(jid)):
            self.failureResultOf(call(), PiccoloError)
        self.assertEqual((s.listing(), s.jobs_changed.value), before)
        self.assertEqual(s._pending_adds, 0)
        s.store._db = real
        # and it works again once the disk has room
        self.successResultOf(res["powerDelay"].put(5))
        self.assertEqual(self.reopen()[1]["powerDelay"], 5)

    def test_failed_write_over_the_resource_is_4_00_with_the_reason(self):
        from piccolo_twisted.coap import _tx
        from piccolo_twisted.coap.site import Site
        s = self.make()
        site = Site({"control/scheduler": s.resources()})
        s.store._db = FailingWrites(s.store._db)
        code, body, _, _ = self.successResultOf(
            site.handle(_tx.PUT, ("control", "scheduler", "powerDelay"), b"[[5], {}]"))
        self.assertEqual(code, _tx.BAD_REQUEST)
        self.assertIn(b"not stored", body)
        code, body, _, _ = site.handle(_tx.GET, ("control", "scheduler", "powerDelay"), b"")
        self.assertEqual(body, b"600")


    def test_database_removed_while_running(self):
        """The data directory removed (or replaced) under a running server:
        SQLite would go on committing into the unlinked file, every 2.04 a
        value lost at the next start. A write finds the file gone: 4.00, and
        the scheduler keeps everything in memory and writes all of it into a
        fresh database (issue 15.2)."""
        import shutil
        s = self.make()
        res = s.resources()
        self.successResultOf(res["powerDelay"].put(77))
        self.successResultOf(res["quietTimeEnabled"].put(True))
        self.successResultOf(s.add("record", JOB, at(3600), 600))
        shutil.rmtree(self.dir)
        f = self.failureResultOf(res["powerDelay"].put(12), PiccoloError)
        self.assertIn("not stored", str(f.value))
        self.assertEqual(s.settings["powerDelay"].value, 77)
        self.assertTrue(s.degraded)
        self.assertIn("in memory only", s.fault.value)
        self.clock.advance(s.store.RETRY_FIRST)
        self.assertFalse(s.degraded)
        self.assertEqual(s.fault.value, "")
        jobs, settings, _ = self.reopen()
        self.assertEqual([j.listing() for j in jobs.values()], s.listing())
        self.assertEqual((settings["powerDelay"], settings["quietTimeEnabled"]), (77, True))
        # replaced by another file (a stick swapped): the same
        os.replace(self.path, self.path + ".old")
        db = sqlite3.connect(self.path)
        db.execute("CREATE TABLE x (y)")
        db.close()
        self.failureResultOf(res["powerDelay"].put(13), PiccoloError)
        self.clock.advance(s.store.RETRY_FIRST)
        self.successResultOf(res["powerDelay"].put(14))
        jobs, settings, _ = self.reopen()
        self.assertEqual((len(jobs), settings["powerDelay"]), (1, 14))

class StartUpTests(Base):
    """Whatever is at the database path, the scheduler starts."""

    def check_degraded_then_recovers(self, fix):
        s = self.make()
        self.assertTrue(s.degraded)
        self.assertIn("in memory only", s.fault.value)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        # it works, in memory
        jid = self.successResultOf(s.add("record", JOB, at(3600), 600))
        self.successResultOf(s.resources()["powerDelay"].put(42))
        self.assertEqual(s.listing()[0][0], jid)
        # still broken at the first retry
        self.clock.advance(s.store.RETRY_FIRST)
        self.assertTrue(s.degraded)
        fix()
        self.clock.advance(2 * s.store.RETRY_FIRST)
        self.assertFalse(s.degraded)
        self.assertEqual(s.fault.value, "")
        self.assertEqual(s.settings["powerDelay"].value, 42)
        self.assertEqual(len(s.listing()), 1)
        jobs, settings, _ = self.reopen()
        self.assertEqual([j.listing() for j in jobs.values()], s.listing())
        self.assertEqual(settings["powerDelay"], 42)

    def test_directory_at_the_database_path(self):
        os.mkdir(self.path)
        self.check_degraded_then_recovers(lambda: os.rmdir(self.path))

    def test_directory_where_a_journal_goes(self):
        for suffix in ("-wal", "-journal", "-shm"):
            os.mkdir(self.path + suffix)
            self.check_degraded_then_recovers(lambda: os.rmdir(self.path + suffix))
            os.unlink(self.path)
            for other in ("-wal", "-shm"):
                if os.path.exists(self.path + other):
                    os.unlink(self.path + other)

    def test_locked_database(self):
        other = sqlite3.connect(self.path, isolation_level=None)
        other.execute("PRAGMA journal_mode=WAL")
        other.execute("CREATE TABLE x (y)")
        other.execute("BEGIN EXCLUSIVE")
        self.patch(Store, "OPEN_TIMEOUT", 0.05)
        self.check_degraded_then_recovers(lambda: (other.execute("COMMIT"), other.close()))

    def test_what_is_stored_is_used_while_the_database_cannot_be_written(self):
        """A database that can be read but not written at start (a full
        disk: the -wal cannot be made; a lock): its settings and jobs are
        used in memory, not the defaults, and the reopened file keeps them
        once, jobs not doubled (issue 15.3)."""
        s = self.make()
        self.successResultOf(s.resources()["powerDelay"].put(77))
        self.successResultOf(s.resources()["quietTimeEnabled"].put(True))
        keep = self.successResultOf(s.add("record", JOB, at(3600), 600))
        gone = self.successResultOf(s.add("record", JOB, at(7200), 600))
        s.close()
        listing = s.listing()
        other = sqlite3.connect(self.path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        self.patch(Store, "OPEN_TIMEOUT", 0.05)
        s = self.make()
        self.assertTrue(s.degraded)
        self.assertIn("in memory only", s.fault.value)
        self.assertEqual(s.settings["powerDelay"].value, 77)
        self.assertEqual(s.settings["quietTimeEnabled"].value, True)
        self.assertEqual(s.listing(), listing)
        self.successResultOf(s.delete(gone))
        other.execute("COMMIT")
        other.close()
        self.clock.advance(s.store.RETRY_FIRST)
        self.assertFalse(s.degraded)
        self.assertEqual([j[0] for j in s.listing()], [keep])
        jobs, settings, _ = self.reopen()
        self.assertEqual(sorted(jobs), [keep])
        self.assertEqual((settings["powerDelay"], settings["quietTimeEnabled"]), (77, True))

    def test_stored_values_read_beside_what_a_full_disk_leaves(self):
        """A failed open on a full disk leaves an empty -wal and a stub -shm
        beside a cleanly closed file: what the file holds is still read."""
        s = self.make()
        self.successResultOf(s.resources()["powerDelay"].put(55))
        s.close()
        self.assertFalse(os.path.exists(self.path + "-wal"))
        open(self.path + "-wal", "wb").close()
        with open(self.path + "-shm", "wb") as f:
            f.write(b"\0\0\0")
        jobs, settings, state = sch.read_database(self.path)
        self.assertEqual(settings["powerDelay"], 55)

    def test_unopenable_path(self):
        parent = os.path.join(self.dir, "state")
        open(parent, "w").close()                       # a file where a directory goes
        self.path = os.path.join(parent, sch.DB_NAME)
        self.check_degraded_then_recovers(lambda: os.unlink(parent))

    def test_stale_database_from_a_newer_schema_is_moved_aside(self):
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA user_version = 99")
        db.close()
        s = self.make()
        self.assertFalse(s.degraded)
        self.assertEqual(len([n for n in os.listdir(self.dir) if ".corrupt-" in n]), 1)

    def test_corrupt_database_moved_aside_with_wal_and_shm(self):
        with open(self.path, "wb") as f:
            f.write(b"garbage " * 1000)
        for suffix in ("-wal", "-shm"):
            with open(self.path + suffix, "wb") as f:
                f.write(suffix.encode() * 100)
        s = self.make()
        self.assertFalse(s.degraded)
        aside = sorted(n for n in os.listdir(self.dir) if ".corrupt-" in n)
        stamp = f"{sch.DB_NAME}.corrupt-{int(T0.timestamp())}"
        self.assertEqual(aside, [stamp, stamp + "-shm", stamp + "-wal"])
        with open(os.path.join(self.dir, stamp + "-wal"), "rb") as f:
            self.assertEqual(f.read(), b"-wal" * 100)
        # the fresh database works and pairs with no stale file
        self.successResultOf(s.add("record", JOB, at(3600)))
        s.close()
        self.assertEqual(len(self.reopen()[0]), 1)

    def test_corrupt_database_is_a_fault_over_coap(self):
        """Moving a corrupt database aside loses its jobs: said in
        /control/scheduler/fault (and so in /sysinfo/health), not only in
        the log (issue 15.3)."""
        from piccolo_twisted.coap import _tx
        from piccolo_twisted.coap.site import Site
        with open(self.path, "wb") as f:
            f.write(b"garbage " * 1000)
        s = self.make()
        site = Site({"control/scheduler": s.resources()})
        code, body, _, _ = site.handle(_tx.GET, ("control", "scheduler", "fault"), b"")
        self.assertIn(b"corrupt", body)
        self.assertIn(f"{sch.DB_NAME}.corrupt-{int(T0.timestamp())}".encode(), body)

    def test_unreadable_rows_are_skipped(self):
        s = self.make()
        self.successResultOf(s.add("record", JOB, at(3600)))
        self.successResultOf(s.add("record", JOB, at(7200)))
        s.close()
        db = sqlite3.connect(self.path)
        db.execute("UPDATE jobs SET args = 'not json' WHERE id = 1")
        db.commit()
        db.close()
        again = self.make()
        self.assertEqual([j[0] for j in again.listing()], [2])


class Held:
    """A database thread that runs when told: writes queue up meanwhile and
    are committed together, as under a burst of requests."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, *a):
        from twisted.internet import defer
        d = defer.Deferred()
        self.calls.append((d, fn, a))
        return d

    def run(self):
        while self.calls:
            d, fn, a = self.calls.pop(0)
            d.callback(fn(*a))


class BoundsTests(Base):

    def make(self):
        self.held = Held()
        s = sch.Scheduler(self.control, self.path, self.clock, run_db=self.held,
                          wall=self.clock.seconds)
        s.open()
        s.startService()
        self.addCleanup(lambda: (s.running and s.stopService(), self.held.run(), s.close(),
                                 self.held.run()))
        return s

    def fill(self, s, n, interval=None):
        ds = [s.add("record", JOB, at(3600 + i), interval) for i in range(n)]
        self.held.run()
        for d in ds:
            self.successResultOf(d)

    def test_at_most_1000_jobs(self):
        s = self.make()
        self.fill(s, sch.MAX_JOBS - 1)
        d = s.add("record", JOB, at(60))          # the 1000th, not yet stored,
        e = self.assertRaises(PiccoloError, s.add, "record", JOB, at(60))
        self.assertIn("at most 1000", str(e))
        self.held.run()
        self.successResultOf(d)
        first = s.listing()[0][0]
        d = s.delete(first)
        self.held.run()
        self.successResultOf(d)
        d = s.add("record", JOB, at(60))
        self.held.run()
        self.successResultOf(d)
        self.assertRaises(PiccoloError, s.add, "power_on", None, at(60), 86400)
        self.assertEqual(len(s.listing()), sch.MAX_JOBS)

    def test_finished_and_deleted_jobs_are_purged(self):
        s = self.make()
        ds = [s.add("record", JOB, at(2)), s.add("record", JOB, at(3600))]
        self.held.run()
        one, gone = [self.successResultOf(d) for d in ds]
        d = s.delete(gone)
        self.held.run()
        self.successResultOf(d)
        for _ in range(5):
            self.clock.advance(1)
            s.tick()
            self.held.run()
        self.assertEqual(self.control.runs, [JOB])
        self.assertEqual(s.jobs, {})
        self.assertEqual(rows(self.path, "SELECT count(*) FROM jobs"), [(0,)])
        # ids are never reused, even after a restart
        s.close()
        self.held.run()
        again = self.make()
        d = again.add("record", JOB, at(60))
        self.held.run()
        self.assertGreater(self.successResultOf(d), max(one, gone))

    def test_old_files_finished_jobs_purged_at_load(self):
        db = sqlite3.connect(self.path)
        db.executescript(sch.SCHEMA)
        for i, status in enumerate(("done", "deleted", "active", "suspended"), 1):
            db.execute(sch.INSERT_JOB, (i, "power_on", "null", 1.0, 2e9, None, 86400.0,
                                        1, status))
        db.commit()
        db.close()
        s = self.make()
        self.assertEqual(sorted(s.jobs), [3, 4])
        self.assertEqual(rows(self.path, "SELECT id FROM jobs ORDER BY id"), [(3,), (4,)])

    def test_listing_encoded_once_per_change(self):
        s = self.make()
        calls = []
        real = sch.EncodedJSON.encode

        def counting(value):
            calls.append(1)
            return real(value)
        self.patch(sch.EncodedJSON, "encode", staticmethod(counting))
        self.fill(s, 10)
        first = s.listing_encoded()
        for _ in range(50):
            self.assertIs(s.listing_encoded(), first)
        self.assertEqual(len(calls), 1)
        self.assertEqual(json.loads(first), s.listing())
        self.clock.advance(3700)
        s.tick()                                  # a job ran and finished
        self.held.run()
        self.assertEqual(len(json.loads(s.listing_encoded())), 9)
        self.assertEqual(len(calls), 2)

    def test_tick_is_cheap_with_1000_jobs(self):
        import time
        s = self.make()
        self.fill(s, sch.MAX_JOBS, 3600)
        s.tick()
        t0 = time.perf_counter()
        for _ in range(1000):
            s.tick()
        per_tick = (time.perf_counter() - t0) / 1000
        self.assertLess(per_tick, 50e-6)          # nothing due: no scan of the jobs


class PulledAndPluggedBackTests(Base):
    """The outside attack's finding 8: the data directory (a USB stick)
    pulled and plugged back in made the scheduled jobs duplicate ("job 1
    renumbered 2"): the file came back with the jobs memory had kept, and
    the merge took them for new ones. A job keeps its number and exists
    once; a slot run while the file was away is in the history once."""

    def setUp(self):
        super().setUp()
        self.data = os.path.join(self.dir, "mnt", "piccolo_data")
        self.path = os.path.join(self.data, ".piccolo", sch.DB_NAME)
        os.makedirs(os.path.dirname(self.path))

    def running(self):
        s = self.make()
        s.startService()
        self.addCleanup(lambda: s.running and s.stopService())
        return s

    def pull(self):
        os.rename(self.data, self.data + ".pulled")

    def plug(self):
        """Mounted again over the mount point (hiding whatever was made
        there meanwhile)."""
        if os.path.exists(self.data):
            os.rename(self.data, self.data + ".hidden")
        os.rename(self.data + ".pulled", self.data)

    def test_the_same_file_back_keeps_every_job_once(self):
        s = self.running()
        res = s.resources()
        first = self.successResultOf(s.add("record", JOB, at(600), 3600))
        second = self.successResultOf(s.add("record", dict(JOB, run="s"), at(7200)))
        self.assertEqual((first, second), (1, 2))
        listing = s.listing()
        self.pull()
        self.failureResultOf(res["powerDelay"].put(12), PiccoloError)   # finds it gone
        self.assertTrue(s.degraded)
        self.clock.advance(600)                     # job 1's slot runs meanwhile
        self.assertEqual(len(self.control.runs), 1)
        # nothing made at the mount point while the stick was out
        self.assertFalse(os.path.exists(self.data))
        self.plug()
        self.clock.advance(s.store.RETRY_MAX)
        self.assertFalse(s.degraded)
        self.assertEqual([j[0] for j in s.listing()], [1, 2])
        self.assertEqual(s.listing()[1], listing[1])
        jobs, _, state = self.reopen()
        self.assertEqual(sorted(jobs), [1, 2])
        self.assertEqual([j.listing() for j in jobs.values()], s.listing())
        # the slot run while the file was away: in the history once
        self.assertEqual([(o.job, o.outcome) for o in state["history"]], [(1, "done")])
        self.assertEqual(state["running"], [])
        self.assertEqual([(o.job, o.outcome) for o in s.history], [(1, "done")])
        # and the next job gets a number of its own
        self.assertEqual(self.successResultOf(s.add("record", JOB, at(9000))), 3)
        self.assertEqual(sorted(self.reopen()[0]), [1, 2, 3])

    def test_a_fresh_file_meanwhile_then_the_old_one_back(self):
        """The data directory is the mount point itself: while the stick is
        out the server writes a fresh database there; the stick mounted
        again hides it and brings the old file back, found at the next
        write. A job deleted meanwhile stays gone, none comes twice."""
        s = self.running()
        res = s.resources()
        self.successResultOf(s.add("record", JOB, at(600), 3600))
        self.successResultOf(s.add("record", dict(JOB, run="s"), at(7200)))
        self.pull()
        os.makedirs(self.data)                      # the empty mount point
        self.failureResultOf(res["powerDelay"].put(12), PiccoloError)
        self.successResultOf(s.delete(1))            # kept in memory
        self.successResultOf(s.add("record", dict(JOB, run="t"), at(8000)))
        self.clock.advance(s.store.RETRY_MAX)       # the fresh file at the mount point
        self.assertFalse(s.degraded)
        self.clock.advance(600)
        self.plug()
        f = self.failureResultOf(res["powerDelay"].put(13), PiccoloError)
        self.assertIn("removed or replaced", str(f.value))
        self.clock.advance(s.store.RETRY_MAX)
        self.assertFalse(s.degraded)
        self.assertEqual([j[0] for j in s.listing()], [2, 3])
        jobs, _, state = self.reopen()
        self.assertEqual(sorted(jobs), [2, 3])
        self.assertEqual([j.listing() for j in jobs.values()], s.listing())
        outcomes = [(o.job, o.slot) for o in state["history"]]
        self.assertEqual(len(outcomes), len(set(outcomes)))

    def test_another_file_keeps_the_jobs_clients_were_told(self):
        """A different stick with jobs of its own: the running server's jobs
        keep their numbers; the file's own jobs are kept beside them, a
        clashing number given to the file's job, once."""
        s = self.running()
        res = s.resources()
        self.successResultOf(s.add("record", JOB, at(600), 3600))
        self.pull()
        self.failureResultOf(res["powerDelay"].put(12), PiccoloError)
        os.makedirs(os.path.dirname(self.path))
        other = sch.Scheduler(FakeControl(), self.path, task.Clock(), run_db=sync_db,
                              wall=lambda: T0.timestamp())
        other.open()
        self.successResultOf(other.add("record", dict(JOB, run="other"), at(900), 3600))
        self.successResultOf(other.close())
        self.clock.advance(s.store.RETRY_MAX)
        self.assertFalse(s.degraded)
        listing = s.listing()
        self.assertEqual([(j[0], j[1][1][0]) for j in listing], [(1, "r"), (2, "other")])
        self.assertEqual(sorted(self.reopen()[0]), [1, 2])
        self.clock.advance(s.store.RETRY_MAX)
        self.assertEqual(len(s.listing()), 2)
