"""A season in simulation (issue 18): ``piccolo3-season`` over a year for
three seeds, as CI runs it; ``PICCOLO_LONG=1`` runs 20 seeds over ten
years. And the simulator can fail: a scheduler that forgets a missed slot,
a health tally that drops a file, are caught."""

import os
import re
import subprocess
import sys
import textwrap

from twisted.trial import unittest

from piccolo_twisted.season.world import FAULTS

ALL = tuple(FAULTS)
LONG = os.environ.get("PICCOLO_LONG") == "1"
SEEDS = range(1, 21) if LONG else (1, 2, 3)
DAYS = 3650 if LONG else 365
LAST_LINE = re.compile(r"^(\d+(?:\.\d+)?) days, (\d+) batches, (\d+) faults, (\d+) violations$")


class SeasonRunner:
    """One subprocess per season: the console script as a user runs it."""

    timeout = 3600 * 4 if LONG else 600

    def season(self, seed, days=DAYS):
        proc = subprocess.run(
            [sys.executable, "-m", "piccolo_twisted.season.main", "--days", str(days),
             "--seed", str(seed)],
            capture_output=True, text=True, timeout=self.timeout,
            env=dict(os.environ, GPIOZERO_PIN_FACTORY="mock"))
        lines = proc.stdout.strip().splitlines()
        self.assertTrue(lines, proc.stderr[-3000:])
        m = LAST_LINE.match(lines[-1])
        self.assertIsNotNone(m, proc.stdout[-3000:] + proc.stderr[-3000:])
        self.assertEqual((proc.returncode, m.group(4)), (0, "0"), proc.stdout[-3000:])
        self.assertEqual(float(m.group(1)), days)
        # a world with something in it
        self.assertGreater(int(m.group(2)), 5 * days)
        self.assertGreater(int(m.group(3)), days)


class SeasonTests(SeasonRunner, unittest.TestCase):
    pass


for _seed in SEEDS:
    def _test(self, seed=_seed):
        self.season(seed)
    _test.__name__ = f"test_seed_{_seed}_{DAYS}_days"
    setattr(SeasonTests, _test.__name__, _test)
del _seed, _test


class ReplayTests(SeasonRunner, unittest.TestCase):
    """Seasons that once found a violation, replayed to just past it."""

    def test_seed_930188_an_unanswered_unsuspend_then_a_reboot_with_the_clock_behind(self):
        # day 196.2: the check went on from where the job was suspended
        self.season(930188, days=197)


class SeasonCanFailTests(unittest.SynchronousTestCase):
    """The invariants bite: the real components with one defect put in,
    a short season finds it (in this process, a few simulated weeks)."""

    def run_season(self, days, seed=1, faults=()):
        from piccolo_twisted.season.run import Season
        season = Season(days, seed, faults)
        self.addCleanup(season.cleanup)
        return season.run()

    def test_a_forgotten_miss_is_found(self):
        from piccolo_twisted.scheduler.jobs import Jobs

        def forget(self, job, first, count, reason, now):
            # moves on without recording: the slots vanish
            nxt = self._next_after(job, first + (count - 1) * (job.interval or 0.0))
            self.store.progress(self._advance_statements(job, nxt),
                                lambda: self._advance(job, nxt))
        self.patch(Jobs, "_miss", forget)
        season = self.run_season(60, faults=("crash",))
        self.assertTrue(season.violations)
        self.assertEqual(season.violations[0].name, "slot-accounted")
        self.assertIn("has no outcome", season.violations[0].detail)
        self.assertIn("violations", season.summary().splitlines()[-1])

    def test_a_dropped_file_in_the_health_tally_is_found(self):
        from piccolo_twisted.sysinfo import Tally
        self.patch(Tally, "_insert", lambda self, when, size: None)
        season = self.run_season(10)
        self.assertTrue(season.violations)
        self.assertEqual(season.violations[0].name, "health-matches-disk")

    def mutated_season(self, mutation, days, seed):
        """A season of all faults in a process of its own, with
        ``mutation`` (Python source) applied to the server first: the name
        and text of the first violation. (In a process of its own: trial
        keeps logged failures, and with them the Deferreds whose unhandled
        errors the season looks for.)"""
        code = (textwrap.dedent(mutation) + textwrap.dedent(f"""
            from piccolo_twisted.season.run import Season
            from piccolo_twisted.season.world import FAULTS
            from twisted.logger import globalLogBeginner
            globalLogBeginner.beginLoggingTo([], discardBuffer=True,
                                             redirectStandardIO=False)
            season = Season({days}, {seed}, tuple(FAULTS))
            try:
                season.run()
            finally:
                season.cleanup()
            v = season.violations[:1]
            print(v[0].name if v else "none")
            print(v[0].detail if v else "")
            """))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=600, env=dict(os.environ, GPIOZERO_PIN_FACTORY="mock"))
        lines = proc.stdout.strip().splitlines()
        self.assertGreaterEqual(len(lines), 1, proc.stderr[-3000:])
        return lines[-2] if len(lines) >= 2 and lines[-1] != "" else lines[-1], lines[-1]

    def test_jobs_run_before_the_instrument_is_ready_are_found(self):
        # issue 18's first fault: the start-up lease given back at once, so
        # a job due at a restart fails on spectrometers still connecting
        name, _ = self.mutated_season("""
            from piccolo_twisted.instrument.lease import Lease
            real = Lease.try_take
            def try_take(self, holder):
                token = real(self, holder)
                if holder == "start-up":
                    token.release()
                return token
            Lease.try_take = try_take
            """, 3, 31337)
        self.assertEqual(name, "jobs-wait-for-ready")

    def test_a_power_change_answered_on_its_first_failure_is_found(self):
        # finding 7: gatherResults fires on the first failure, the lease
        # goes while another spectrometer still switches, the other
        # failures are left unhandled
        name, _ = self.mutated_season("""
            from twisted.internet import defer
            from piccolo_twisted.instrument import spectrometer
            spectrometer.settle_all = lambda ds: defer.gatherResults(ds).addCallback(
                lambda rs: "|".join(r for r in rs if r != "ok") or "ok")
            """, 12, 31337)
        self.assertEqual(name, "errors-handled")

    def test_a_spectrum_file_written_in_place_is_found(self):
        # the full disk fails write() (a short write, then ENOSPC) and a
        # crash can tear a write(): a writer without a temporary leaves a
        # partial file under the final name
        name, detail = self.mutated_season("""
            import os
            from piccolo_twisted.acquisition import pico
            def in_place(dir_fd, name, data, clobber, fsync):
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644,
                             dir_fd=dir_fd)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    fsync(fd)
                finally:
                    os.close(fd)
            pico._write_at = in_place
            """, 3, 31337)
        self.assertEqual(name, "files-intact")
        self.assertIn("not a complete .pico file", detail)

    def test_the_same_seed_is_the_same_season(self):
        first = self.run_season(5, seed=11, faults=("crash", "clock", "unplug")).summary()
        again = self.run_season(5, seed=11, faults=("crash", "clock", "unplug")).summary()
        self.assertEqual(first, again)
