"""/control/scheduler: persistent measurement jobs, quiet time, power window.

Jobs and settings live in memory (reactor thread) and are written through
to SQLite on a one-thread pool, in order. The database is read once at
start-up; a corrupt or unreadable file is moved aside and a fresh one
started. A ``TimerService`` ticks once a second on the injected clock; the
tick is wrapped so that nothing a job does can stop it.
"""

import json
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, time as dtime, timedelta, timezone

from twisted.application.internet import TimerService
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .api import Resource
from .errors import BusyError, PiccoloError
from .observable import Observable
from .sysinfo import parse_datetime
from .values import to_bool, to_float, to_int

SCHEMA_VERSION = 1
DB_NAME = "scheduler.sqlite"
DAY = 24 * 3600
QUIET_TIME = re.compile(r"^(\d{2}):(\d{2}):(\d{2})([+-])(\d{2})(\d{2})$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    args TEXT NOT NULL,
    start_time REAL NOT NULL,
    next_time REAL NOT NULL,
    end_time REAL,
    interval REAL,
    ignore_quiet INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

DEFAULT_SETTINGS = {
    "quietTimeEnabled": False,
    "quietStart": "22:00:00+0000",
    "quietEnd": "04:00:00+0000",
    "powerOffEnabled": False,
    "powerDelay": 300,
}


# -- pure schedule arithmetic -------------------------------------------------

def parse_quiet_time(value):
    """ "HH:MM:SS+zzzz" -> an aware ``datetime.time``; PiccoloError if not."""
    if not isinstance(value, str):
        raise PiccoloError("quiet times are strings like '22:00:00+0000'")
    m = QUIET_TIME.match(value.strip())
    if not m:
        raise PiccoloError(f"not a time like '22:00:00+0000': {value!r}")
    hh, mm, ss, sign, oh, om = m.groups()
    hh, mm, ss, oh, om = int(hh), int(mm), int(ss), int(oh), int(om)
    if hh > 23 or mm > 59 or ss > 59 or oh > 14 or om > 59:
        raise PiccoloError(f"time out of range: {value!r}")
    offset = timedelta(hours=oh, minutes=om) * (1 if sign == "+" else -1)
    return dtime(hh, mm, ss, tzinfo=timezone(offset))


def quiet_window(now, start, end):
    """The quiet window (UTC epoch start, end) containing ``now`` or the
    next one after it. Windows are built as full date-times day by day, so
    a window across midnight (22:00 to 04:00) is one window."""
    start_t, end_t = parse_quiet_time(start), parse_quiet_time(end)
    tz = start_t.tzinfo
    local_day = datetime.fromtimestamp(now, tz).date()
    for shift in (-1, 0, 1):
        day = local_day + timedelta(days=shift)
        w_start = datetime.combine(day, start_t.replace(tzinfo=None), tz)
        w_end = datetime.combine(day, end_t.replace(tzinfo=None), end_t.tzinfo)
        while w_end <= w_start:
            w_end += timedelta(days=1)
        s, e = w_start.timestamp(), w_end.timestamp()
        if now < e:
            return s, e
    raise AssertionError("no quiet window found")  # pragma: no cover


def in_quiet(now, start, end):
    s, e = quiet_window(now, start, end)
    return s <= now < e


def next_run(next_time, interval, now):
    """The first run time after ``now`` on the grid ``next_time + k*interval``
    (missed runs are fast-forwarded: run once, not N times)."""
    if not interval:
        return None
    if next_time > now:
        return next_time
    k = int((now - next_time) // interval) + 1
    return next_time + k * interval


def iso(ts):
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()


@dataclass
class Job:
    id: int
    kind: str                 # "record", "power_on", "power_off", "dark"
    args: dict | None
    start_time: float
    next_time: float
    end_time: float | None
    interval: float | None
    ignore_quiet: bool
    status: str

    def listing(self):
        if self.kind == "record":
            a = self.args
            job = ["record", [a["run"], a["nsequence"], a["auto"], a["delay"], a["target"]]]
        elif self.kind == "dark":
            job = ["dark", [self.args["run"]]]
        else:
            job = [self.kind]
        return [self.id, job, iso(self.start_time), iso(self.end_time),
                self.interval, self.status]


class Scheduler:
    log = Logger()

    def __init__(self, control, directory, clock, run_db=None, tick=1.0):
        self.control = control
        self.path = os.path.join(directory, DB_NAME)
        self.clock = clock
        self.jobs = {}
        self.jobs_changed = Observable(0)
        self.settings = {k: Observable(v) for k, v in DEFAULT_SETTINGS.items()}
        self._db = None
        self._pool = None
        self._run_db = run_db
        self._powered_off_window = None
        self._refused_window = None
        self.timer = TimerService(tick, self.tick)
        self.timer.clock = clock

    # -- persistence ----------------------------------------------------------

    def open(self):
        """Load jobs and settings (blocking: once, before serving)."""
        try:
            self._db = self._connect()
        except (sqlite3.DatabaseError, OSError, ValueError) as e:
            aside = f"{self.path}.corrupt-{int(self.clock.seconds())}"
            self.log.error("scheduler database {path} unusable ({error}); moved "
                           "aside to {aside}, starting a fresh one",
                           path=self.path, error=e, aside=aside)
            try:
                if self._db is not None:
                    self._db.close()
                os.replace(self.path, aside)
            except OSError:
                pass
            self.jobs = {}
            self._db = self._connect()
        if self._run_db is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="scheduler-db")
            self._pool.start()
            from twisted.internet import reactor
            self._run_db = lambda fn, *a: threads.deferToThreadPool(reactor, self._pool, fn, *a)
        self.log.info("scheduler: {n} jobs loaded from {path}",
                      n=sum(1 for j in self.jobs.values() if j.status in ("active", "suspended")),
                      path=self.path)

    def _connect(self):
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"schema version {version} is newer than ours")
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            jobs = {}
            for row in db.execute("SELECT id, kind, args, start_time, next_time, end_time, "
                                  "interval, ignore_quiet, status FROM jobs"):
                jobs[row[0]] = Job(row[0], row[1], json.loads(row[2]), row[3], row[4],
                                   row[5], row[6], bool(row[7]), row[8])
            for key, value in db.execute("SELECT key, value FROM settings"):
                if key in self.settings:
                    self.settings[key].set(json.loads(value))
        except BaseException:
            db.close()
            raise
        self.jobs = jobs
        return db

    def _persist(self, sql, params):
        db = self._db

        def write():
            db.execute(sql, params)
        if self._run_db is None or db is None:
            return
        d = self._run_db(write)
        d.addErrback(lambda f: self.log.failure("scheduler database write failed", f))

    def _save_job(self, job):
        self._persist(
            "INSERT OR REPLACE INTO jobs (id, kind, args, start_time, next_time, end_time, "
            "interval, ignore_quiet, status) VALUES (?,?,?,?,?,?,?,?,?)",
            (job.id, job.kind, json.dumps(job.args), job.start_time, job.next_time,
             job.end_time, job.interval, int(job.ignore_quiet), job.status))
        self.jobs_changed.set(self.jobs_changed.value + 1)

    def _save_setting(self, key):
        self._persist("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                      (key, json.dumps(self.settings[key].value)))

    def close(self):
        d = defer.succeed(None)
        if self._pool is not None:
            db, pool = self._db, self._pool
            d = self._run_db(db.close)

            def stop(_):
                pool.stop()
            d.addBoth(stop)
            self._pool = None
        elif self._db is not None:
            self._db.close()
        self._db = None
        return d

    # -- jobs -------------------------------------------------------------------

    def add(self, kind, args, at_time, interval=None, end_time=None):
        """Create a job; PiccoloError (nothing stored) on bad times."""
        now = self.clock.seconds()
        start = parse_datetime(at_time).timestamp()
        if interval is not None:
            interval = to_float(interval, "interval", lo=1.0, hi=366 * DAY)
        end = parse_datetime(end_time).timestamp() if end_time is not None else None
        if interval is None and start < now - 1:
            raise PiccoloError("at_time is in the past and the job does not repeat")
        if end is not None and end <= start:
            raise PiccoloError("end_time is not after at_time")
        if end is not None and end <= now:
            raise PiccoloError("end_time is in the past")
        ignore_quiet = kind in ("power_on", "power_off")
        job_id = max(self.jobs, default=0) + 1
        first = start if start >= now - 1 else next_run(start, interval, now)
        job = Job(job_id, kind, args, start, first, end, interval, ignore_quiet, "active")
        self.jobs[job_id] = job
        self._save_job(job)
        self.log.info("job {id} added: {kind} at {start}{every}", id=job_id, kind=kind,
                      start=iso(start), every=f" every {interval:g} s" if interval else "")
        return job_id

    def _job(self, job_id):
        job_id = to_int(job_id, "job id")
        job = self.jobs.get(job_id)
        if job is None or job.status in ("deleted", "done"):
            raise PiccoloError(f"no such job: {job_id}")
        return job

    def suspend(self, job_id):
        job = self._job(job_id)
        job.status = "suspended"
        self._save_job(job)
        self.log.info("job {id} suspended", id=job.id)

    def unsuspend(self, job_id):
        job = self._job(job_id)
        if job.status == "suspended":
            job.status = "active"
            job.next_time = next_run(job.next_time, job.interval, self.clock.seconds()) \
                or job.next_time
            self._save_job(job)
            self.log.info("job {id} active again", id=job.id)

    def delete(self, job_id):
        job = self._job(job_id)
        job.status = "deleted"
        self._save_job(job)
        self.log.info("job {id} deleted", id=job.id)

    def listing(self):
        return [j.listing() for j in sorted(self.jobs.values(), key=lambda j: j.id)
                if j.status in ("active", "suspended")]

    # -- running ----------------------------------------------------------------

    def quiet_now(self, now):
        s = self.settings
        if not s["quietTimeEnabled"].value:
            return False
        return in_quiet(now, s["quietStart"].value, s["quietEnd"].value)

    def tick(self):
        """Once a second; never raises."""
        try:
            now = self.clock.seconds()
            self._power_window(now)
            self._run_due(now)
        except Exception:
            self.log.failure("scheduler tick failed (the scheduler goes on)")

    def _run_due(self, now):
        quiet = None
        for job in sorted(self.jobs.values(), key=lambda j: j.next_time):
            if job.status != "active" or job.next_time > now:
                continue
            if job.end_time is not None and job.next_time > job.end_time:
                self._finish(job)
                continue
            if not job.ignore_quiet:
                if quiet is None:
                    quiet = self.quiet_now(now)
                if quiet:
                    continue
            if self.control.busy:
                return              # waits until the control is idle
            try:
                self._execute(job)
            except BusyError:
                return
            except Exception as e:
                self.log.failure("job {id} ({kind}) failed: {e}", id=job.id,
                                 kind=job.kind, e=e)
            self._advance(job, now)
            return                  # one job a tick: it may have made us busy

    def _execute(self, job):
        self.log.info("running job {id}: {kind}", id=job.id, kind=job.kind)
        if job.kind == "record":
            self.control.run_record(dict(job.args))
        elif job.kind == "dark":
            self.control.record_dark(job.args["run"])
        elif job.kind == "power_on":
            self.control.power_on()
        elif job.kind == "power_off":
            self.control.power_off()
        else:
            raise PiccoloError(f"unknown job kind {job.kind!r}")

    def _advance(self, job, now):
        nxt = next_run(job.next_time, job.interval, now)
        if nxt is None or (job.end_time is not None and nxt > job.end_time):
            self._finish(job)
        else:
            job.next_time = nxt
            self._save_job(job)

    def _finish(self, job):
        job.status = "done"
        self._save_job(job)
        self.log.info("job {id} done", id=job.id)

    def _power_window(self, now):
        s = self.settings
        if not (s["quietTimeEnabled"].value and s["powerOffEnabled"].value):
            return
        start, end = quiet_window(now, s["quietStart"].value, s["quietEnd"].value)
        delay = s["powerDelay"].value
        if not start <= now < end:
            return
        if end - start <= 2 * delay:
            if self._refused_window != start:
                self._refused_window = start
                self.log.warn("quiet time {start} to {end} is too short for a power "
                              "delay of {delay} s: spectrometers stay on",
                              start=iso(start), end=iso(end), delay=delay)
            return
        if self._powered_off_window != start and start + delay <= now < end - delay:
            if self.control.busy:
                return
            self._powered_off_window = start
            self.log.info("quiet time: powering spectrometers off")
            self.control.instrument.spectrometers.power_off_all()
        elif self._powered_off_window == start and now >= end - delay:
            self._powered_off_window = ("on", start)
            self.log.info("quiet time ends: powering spectrometers on")
            self.control.instrument.spectrometers.power_on_all()

    # -- settings ----------------------------------------------------------------

    def _setter(self, key, check):
        def put(value):
            value = check(value)
            if self.settings[key].set(value):
                self._save_setting(key)
                self.log.info("scheduler {key} = {value}", key=key, value=value)
        return put

    def resources(self):
        def check_time(name):
            def check(value):
                parse_quiet_time(value)
                return value.strip()
            return check
        checks = {
            "quietTimeEnabled": lambda v: to_bool(v, "quietTimeEnabled"),
            "quietStart": check_time("quietStart"),
            "quietEnd": check_time("quietEnd"),
            "powerOffEnabled": lambda v: to_bool(v, "powerOffEnabled"),
            "powerDelay": lambda v: to_int(v, "powerDelay", lo=0, hi=12 * 3600),
        }
        res = {
            "jobs": Resource(get=self.listing, observe=self.jobs_changed),
            "suspend": Resource(put=self.suspend),
            "unsuspend": Resource(put=self.unsuspend),
            "delete": Resource(put=self.delete),
        }
        for key, check in checks.items():
            obs = self.settings[key]
            res[key] = Resource(get=lambda obs=obs: obs.value,
                                put=self._setter(key, check), observe=obs)
        return res
