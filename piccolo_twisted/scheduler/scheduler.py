"""/control/scheduler: the service that ties the store, the jobs and the
power window together, and the resources clients see.

It wakes when something may be due -- a job's slot, a waiting slot's
catch-up running out, the end of the quiet time, a boundary of the power
window, a retry -- and at least every ``MAX_SLEEP`` seconds, and whenever
something changes (a job or a setting stored, a batch over). Dates come
from ``wall`` (POSIX seconds, ``time.time`` unless given), never from the
reactor's clock, which counts monotonic time in the server: a wall clock
jump is noticed at the next wake at the latest, and nothing fires early.
"""

import json
import sqlite3
import time

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from ..api import EncodedJSON, Resource
from ..errors import PiccoloError
from ..observable import Observable
from ..values import to_bool, to_datetime, to_float, to_int
from .calendar import DAY, in_quiet, iso, next_run, normalise_quiet_time, quiet_window
from .database import INSERT_JOB, SET_SETTING, SET_STATE, Job
from .jobs import Jobs
from .power import PowerWindow
from .store import Store

DB_NAME = "scheduler.sqlite"
MAX_JOBS = 1000
CATCH_UP = 600.0

#: The legacy piccolo3-server's defaults (PiccoloScheduler.__init__).
DEFAULT_SETTINGS = {
    "quietTimeEnabled": False,
    "quietStart": "22:00:00+0000",
    "quietEnd": "04:00:00+0000",
    "powerOffEnabled": False,
    "powerDelay": 600,
}


class Scheduler(service.Service):
    log = Logger()

    #: the longest the scheduler sleeps: a step of the wall clock (NTP) is
    #: noticed this long after at the latest (``PUT /sysinfo/clock`` at once)
    MAX_SLEEP = 300.0
    #: a wall clock moving this much against the reactor's is a jump
    JUMP = 2.0

    def __init__(self, control, db_path, clock, run_db=None, wall=None,
                 catch_up=CATCH_UP, connect=sqlite3.connect):
        self.control = control
        self.path = db_path
        self.clock = clock
        self.wall = wall or time.time
        self.settings = {k: Observable(v) for k, v in DEFAULT_SETTINGS.items()}
        self.jobs_changed = Observable(0)
        self.store = Store(db_path, clock, self.wall, self.settings, run_db, connect)
        self.store.on_reload = self._reloaded
        self.store.history_changed.watch(lambda _: self._history_changed())
        #: what is wrong, for /control/scheduler/fault and the health resource
        self.fault = self.store.fault
        instrument = control.instrument
        self.lease = instrument.lease
        self.runner = Jobs(self.store, control, self.lease, clock, self.wall,
                           self.quiet_now, catch_up, self._jobs_modified)
        self.power = PowerWindow(self.store, instrument.spectrometers, self.lease,
                                 clock, self.wall, self.settings, self._soon)
        self._pending_adds = 0
        self._listing = None
        self._encoded = None
        self._history = None
        self._call = None
        self._offset = None
        self._ticking = False
        self._spin = [None, 0]

    # -- what the rest of the server reads ----------------------------------

    @property
    def jobs(self):
        return self.store.jobs

    @property
    def degraded(self):
        return self.store.degraded

    @property
    def switched_off(self):
        return self.store.switched_off

    @property
    def history(self):
        """The kept slot outcomes (Outcome), oldest first."""
        return self.store.history

    def problems(self, now, span=DAY):
        """(missed, failed) slots of the last ``span`` seconds before ``now``."""
        missed = failed = 0
        for outcome in reversed(self.store.history):
            if outcome.slot <= now - span:
                continue
            if outcome.slot > now:
                continue
            if outcome.outcome == "missed":
                missed += 1
            elif outcome.outcome == "failed":
                failed += 1
        return missed, failed

    # -- life --------------------------------------------------------------------

    def open(self):
        """Load jobs, settings and history (blocking, once, before serving);
        record the batches the previous process died in."""
        self.store.open()
        self.runner.started_wall = self.wall()
        self.runner.recover()

    def close(self):
        """Wait for queued writes and close the database."""
        return self.store.close()

    def startService(self):
        super().startService()
        self.runner.stopped = False
        self.power.stopped = False
        self.tick()

    def stopService(self):
        super().stopService()
        self.runner.stop()
        self.power.stop()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def wall_changed(self):
        """The wall clock was set (``PUT /sysinfo/clock``): look now."""
        self._soon()

    # -- waking ------------------------------------------------------------------

    def tick(self):
        """Decide what is due now and when to look next; never raises."""
        if self._ticking:
            self._soon()
            return
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()                   # called by hand (tests)
        self._ticking = True
        try:
            now = self.wall()
            self._notice_jump(now)
            self.power.evaluate(now)
            self.runner.evaluate(now)
        except Exception:
            self.log.failure("scheduler tick failed (the scheduler goes on)")
        finally:
            self._ticking = False
        self._plan()

    def _notice_jump(self, now):
        offset = now - self.clock.seconds()
        last, self._offset = self._offset, offset
        if last is None or abs(offset - last) < self.JUMP:
            return
        jump = offset - last
        self.log.warn("the wall clock jumped {jump:+.0f} s (now {now})", jump=jump,
                      now=iso(now))
        if jump > 0:
            self.runner.jumped_at = (now - jump, now)

    def _plan(self):
        if not self.running:
            return
        try:
            now = self.wall()
            t = min(self.power.next_event(now), self.runner.next_event(now),
                    self._quiet_end(now), now + self.MAX_SLEEP)
            delay = min(max(0.0, t - now), self.MAX_SLEEP)
        except Exception:
            self.log.failure("planning the scheduler's next look failed")
            delay = self.MAX_SLEEP
        self._wake_in(delay)

    def _wake_in(self, delay):
        now = self.clock.seconds()
        if delay <= 0 and self._spin[0] == now:
            self._spin[1] += 1
            if self._spin[1] > 1000:
                # a bug, not a schedule: never spin the reactor
                if self._spin[1] == 1001:
                    self.log.error("the scheduler kept waking at once; looking again "
                                   "in 1 s")
                delay = 1.0
        elif delay <= 0:
            self._spin = [now, 0]
        if self._call is not None and self._call.active():
            if self._call.getTime() <= self.clock.seconds() + delay:
                return
            self._call.cancel()
        self._call = self.clock.callLater(delay, self.tick)

    def _soon(self):
        if self.running:
            self._wake_in(0)

    def _quiet_end(self, now):
        s = self.settings
        if not s["quietTimeEnabled"].value:
            return float("inf")
        start, end = quiet_window(now, s["quietStart"].value, s["quietEnd"].value)
        return end if start <= now else start

    def quiet_now(self, now):
        s = self.settings
        if not s["quietTimeEnabled"].value:
            return False
        return in_quiet(now, s["quietStart"].value, s["quietEnd"].value)

    def power_should_be_off(self, now):
        return self.power.should_be_off(now)

    # -- jobs --------------------------------------------------------------------

    def _jobs_modified(self):
        self._listing = None
        self._encoded = None
        self.runner.invalidate()
        self.jobs_changed.set(self.jobs_changed.value + 1)
        self._soon()

    def _reloaded(self):
        self._jobs_modified()

    def add(self, kind, args, at_time, interval=None, end_time=None):
        """Create a job: a Deferred firing with its id once it is stored.
        PiccoloError at once (nothing stored) on bad times or at the cap."""
        now = self.wall()
        start = to_datetime(at_time, "at_time").timestamp()
        if interval is not None:
            interval = to_float(interval, "interval", lo=1.0, hi=366 * DAY)
        end = to_datetime(end_time, "end_time").timestamp() if end_time is not None else None
        if interval is None and start < now - 1:
            raise PiccoloError("at_time is in the past and the job does not repeat")
        if end is not None and end <= start:
            raise PiccoloError("end_time is not after at_time")
        if end is not None and end <= now:
            raise PiccoloError("end_time is in the past")
        if len(self.store.jobs) + self._pending_adds >= MAX_JOBS:
            raise PiccoloError(f"too many scheduled jobs: at most {MAX_JOBS} active or "
                               "suspended; delete some first")
        ignore_quiet = kind in ("power_on", "power_off")
        job_id = self.store.next_id
        self.store.next_id += 1
        # a repeating job whose at_time has passed goes on from its next slot
        first = start if start >= now - 1 else next_run(start, interval, now)
        job = Job(job_id, kind, args, start, first, end, interval, ignore_quiet, "active")

        def apply():
            self.store.jobs[job_id] = job
            self._jobs_modified()
            self.log.info("job {id} added: {kind} at {start}{every}", id=job_id,
                          kind=kind, start=iso(start),
                          every=f" every {interval:g} s" if interval else "")

        def done(result):
            self._pending_adds -= 1
            return result
        self._pending_adds += 1
        d = self.store.write([(INSERT_JOB, job.row()),
                              (SET_STATE, ("next_id", json.dumps(job_id + 1)))], apply)
        return d.addBoth(done).addCallback(lambda _: job_id)

    def _job(self, job_id, verb):
        """The job, or None for an id no job has (now): the legacy server
        answered 2.04 to those, and the deployed client counts on it."""
        job_id = to_int(job_id, "job id")
        job = self.store.jobs.get(job_id)
        if job is None:
            self.log.info("{verb} job {id}: no such job (answered as done, as the "
                          "legacy server did)", verb=verb, id=job_id)
        return job

    def _set_status(self, job, status, verb):
        if job.status == status:
            return defer.succeed(None)
        now = self.wall()
        next_time = job.next_time
        statements, outcomes = [], []
        if status == "active":
            # from its next slot after now: slots passed meanwhile are not made up
            next_time = next_run(job.next_time, job.interval, now) or job.next_time
        else:
            statements, outcomes = self.runner.settle_for(job, now, "the job was suspended")
            if outcomes:
                last = outcomes[-1].slot
                next_time = self.runner._next_after(job, last) or job.next_time

        def apply():
            live = self.store.jobs.get(job.id)
            for outcome in outcomes:
                self.store.remember(outcome)
                self.store.written(outcome)
            if live is not None:
                live.status, live.next_time = status, next_time
                self._jobs_modified()
                self.log.info("job {id} {verb}", id=job.id, verb=verb)
        return self.store.write(statements + [
            ("UPDATE jobs SET status = ?, next_time = ? WHERE id = ?",
             (status, next_time, job.id))], apply)

    def suspend(self, job_id):
        job = self._job(job_id, "suspend")
        if job is None:
            return None
        return self._set_status(job, "suspended", "suspended")

    def unsuspend(self, job_id):
        job = self._job(job_id, "unsuspend")
        if job is None or job.status != "suspended":
            return None
        return self._set_status(job, "active", "active again")

    def delete(self, job_id):
        job = self._job(job_id, "delete")
        if job is None:
            return None
        statements, outcomes = self.runner.settle_for(job, self.wall(), "the job was deleted")

        def apply():
            for outcome in outcomes:
                self.store.remember(outcome)
                self.store.written(outcome)
            if self.store.let_go(job.id) is not None:
                self._jobs_modified()
                self.log.info("job {id} deleted", id=job.id)
        return self.store.write(statements + [("DELETE FROM jobs WHERE id = ?", (job.id,))],
                                apply)

    def listing(self):
        """The active and suspended jobs (cached until the next change)."""
        if self._listing is None:
            self._listing = [j.listing() for j in sorted(self.store.jobs.values(),
                                                         key=lambda j: j.id)]
        return self._listing

    def listing_encoded(self):
        """The listing as JSON, encoded once per change."""
        if self._encoded is None:
            self._encoded = EncodedJSON.encode(self.listing())
        return self._encoded

    def _history_changed(self):
        self._history = None

    def history_encoded(self):
        """``/control/scheduler/history``: the kept outcomes, oldest first."""
        if self._history is None:
            self._history = EncodedJSON.encode([o.wire() for o in self.store.history])
        return self._history

    # -- settings ----------------------------------------------------------------

    def _setter(self, key, check):
        def put(value):
            value = check(value)
            obs = self.settings[key]
            if value == obs.value and type(value) is type(obs.value):
                return None

            def apply():
                obs.set(value)
                if self.store.degraded:
                    self.store._dirty_settings.add(key)
                self.log.info("scheduler {key} = {value}", key=key, value=value)
                if self.running:
                    self.tick()             # the window acts at once
            return self.store.write([(SET_SETTING, (key, json.dumps(value)))], apply)
        return put

    def resources(self):
        checks = {
            "quietTimeEnabled": lambda v: to_bool(v, "quietTimeEnabled"),
            "quietStart": normalise_quiet_time,
            "quietEnd": normalise_quiet_time,
            "powerOffEnabled": lambda v: to_bool(v, "powerOffEnabled"),
            "powerDelay": lambda v: to_int(v, "powerDelay", lo=0, hi=12 * 3600),
        }
        res = {
            "jobs": Resource(get=self.listing_encoded, observe=self.jobs_changed),
            "history": Resource(get=self.history_encoded,
                                observe=self.store.history_changed),
            "suspend": Resource(put=self.suspend, idempotent=True),
            "unsuspend": Resource(put=self.unsuspend, idempotent=True),
            "delete": Resource(put=self.delete),
            "fault": Resource(get=lambda: self.fault.value, observe=self.fault),
        }
        for key, check in checks.items():
            obs = self.settings[key]
            res[key] = Resource(get=lambda obs=obs: obs.value,
                                put=self._setter(key, check), observe=obs,
                                idempotent=True)
        return res
