"""/control/scheduler: persistent measurement jobs, quiet time, power window.

State lives in memory (reactor thread); SQLite holds it durably. Every
change a client asks for is written first and applied after: a PUT is
answered 2.04 only once SQLite has committed it, and when the write fails
the answer is 4.00 with the reason and memory is left as it was. Writes go
to one one-thread pool, in order; changes queued while a write is under way
are committed together in the next transaction (group commit).

Start-up never depends on the database file. A corrupt file (not a
database, failed integrity check) is moved aside together with its
``-wal``/``-shm``/``-journal`` files and a fresh one started; a file that
cannot be opened (a directory in its place or in its journal's, a lock,
permissions) leaves the scheduler running in memory, saying so in
``fault``, and the open is retried with back-off until it succeeds, when
what was done in memory is written to the database.

The power window is a state: on every tick the scheduler decides whether
the spectrometers should be off (quiet time and power-off enabled, now in
[start + delay, end - delay)) and remembers durably that it switched them
off, so that whenever they should be on again -- window over, flags
cleared, times changed, a clock jump, a restart -- they are switched on.

Wall time (job times, quiet windows) comes from ``wall``, a callable
returning POSIX seconds, separate from the clock that drives the tick so
tests can make the wall clock jump.
"""

import json
import os
import re
import sqlite3
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, time as dtime, timedelta, timezone

from twisted.application.internet import TimerService
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .api import EncodedJSON, Resource
from .errors import BusyError, PiccoloError
from .observable import Observable
from .values import END_TIMESTAMP, to_bool, to_datetime, to_float, to_int

SCHEMA_VERSION = 2
DB_NAME = "scheduler.sqlite"
DAY = 24 * 3600
MAX_JOBS = 1000
QUIET_TIME = re.compile(r"^(\d{2}):(\d{2}):(\d{2})(?:([+-])(\d{2})(\d{2}))?$", re.ASCII)
LIVE = ("active", "suspended")

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
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

#: The legacy piccolo3-server's defaults (PiccoloScheduler.__init__).
DEFAULT_SETTINGS = {
    "quietTimeEnabled": False,
    "quietStart": "22:00:00+0000",
    "quietEnd": "04:00:00+0000",
    "powerOffEnabled": False,
    "powerDelay": 600,
}

INSERT_JOB = ("INSERT OR REPLACE INTO jobs (id, kind, args, start_time, next_time, "
              "end_time, interval, ignore_quiet, status) VALUES (?,?,?,?,?,?,?,?,?)")
SET_STATE = "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)"
SET_SETTING = "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)"


# -- pure schedule arithmetic -------------------------------------------------

def parse_quiet_time(value):
    """ "HH:MM:SS+zzzz" (or "HH:MM:SS", taken as UTC) -> an aware
    ``datetime.time``; PiccoloError for anything else."""
    if not isinstance(value, str):
        raise PiccoloError("quiet times are strings like '22:00:00+0000'")
    m = QUIET_TIME.match(value.strip())
    if not m:
        raise PiccoloError(f"not a time like '22:00:00+0000' or '22:00:00': {value!r}")
    hh, mm, ss, sign, oh, om = m.groups()
    hh, mm, ss = int(hh), int(mm), int(ss)
    oh, om = (int(oh), int(om)) if sign else (0, 0)
    if hh > 23 or mm > 59 or ss > 59 or oh > 14 or om > 59:
        raise PiccoloError(f"time out of range: {value!r}")
    offset = timedelta(hours=oh, minutes=om) * (-1 if sign == "-" else 1)
    return dtime(hh, mm, ss, tzinfo=timezone(offset))


def normalise_quiet_time(value):
    """The form read back: "HH:MM:SS+zzzz" (no offset given means +0000)."""
    parse_quiet_time(value)
    text = value.strip()
    return text if len(text) > 8 else text + "+0000"


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

    def row(self):
        return (self.id, self.kind, json.dumps(self.args), self.start_time,
                self.next_time, self.end_time, self.interval, int(self.ignore_quiet),
                self.status)


# -- the database, thread side --------------------------------------------------

class Corrupt(Exception):
    """The file is not a usable scheduler database: move it aside."""


class Vanished(sqlite3.OperationalError):
    """The database file was removed or replaced under the open connection
    (SQLite would go on writing into the unlinked file)."""


def file_identity(path):
    """(device, inode) of ``path``, or None if there is nothing there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _move_aside(path, stamp):
    """Move ``path`` and its -wal/-shm/-journal aside under one new name
    (so they still pair with each other); returns that name."""
    base = f"{path}.corrupt-{stamp}"
    aside, n = base, 1
    while any(os.path.lexists(aside + s) for s in ("", "-wal", "-shm", "-journal")):
        aside, n = f"{base}.{n}", n + 1
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.lexists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    return aside


def _out_of_range(job):
    """Why a stored job's times are not what the server accepts now (an
    older version may have stored them), or None. Such a job cannot be
    listed (e.g. a time that formats into year 10000)."""
    for name, ts in (("start_time", job.start_time), ("end_time", job.end_time)):
        if ts is None and name == "end_time":
            continue
        try:
            ts = float(ts)
            if not 0 <= ts < END_TIMESTAMP:
                raise ValueError
            iso(ts)
        except (TypeError, ValueError, OverflowError, OSError):
            return f"{name} {ts!r} out of range"
    if job.interval is not None:
        try:
            to_float(job.interval, "interval", lo=1.0, hi=366 * DAY)
        except PiccoloError as e:
            return str(e)
    return None


def _read_tables(db):
    """``(jobs, settings, state)`` as stored; unreadable entries skipped;
    live jobs whose times are out of range are marked deleted (and so
    purged) and named in ``state["invalid"]``."""
    jobs, bad, invalid = {}, [], []
    for row in db.execute("SELECT id, kind, args, start_time, next_time, end_time, "
                          "interval, ignore_quiet, status FROM jobs"):
        try:
            job = Job(int(row[0]), row[1], json.loads(row[2]), float(row[3]),
                      float(row[4]), row[5], row[6], bool(row[7]), row[8])
            why = _out_of_range(job) if job.status in LIVE else None
            if why is not None:
                job.status = "deleted"
                invalid.append((job.id, why))
            elif job.kind == "record":
                job.listing()
        except (TypeError, ValueError, KeyError, OverflowError, OSError):
            bad.append(row[0])
            continue
        jobs[job.id] = job
    settings = {}
    for key, value in db.execute("SELECT key, value FROM settings"):
        try:
            settings[key] = json.loads(value)
        except ValueError:
            bad.append(key)
    state = {}
    for key, value in db.execute("SELECT key, value FROM state"):
        try:
            state[key] = json.loads(value)
        except ValueError:
            bad.append(key)
    state.setdefault("next_id", max(jobs, default=0) + 1)
    state["unreadable"] = bad
    state["invalid"] = invalid
    return jobs, settings, state


def read_database(path):
    """What a database that cannot be opened for writing holds (a full
    disk, a lock): ``(jobs, settings, state)`` read without writing
    anything, or None. Blocking."""
    if not os.path.isfile(path):
        return None
    uri = "file:" + urllib.parse.quote(os.path.abspath(path))
    # read-only still needs the -shm of a WAL database; without a -wal, or
    # with an empty one (a clean close; a failed open on a full disk
    # leaves one), the file alone is the whole database
    try:
        wal = os.path.getsize(path + "-wal")
    except OSError:
        wal = 0
    modes = ["?mode=ro"] + ([] if wal else ["?immutable=1"])
    for mode in modes:
        try:
            db = sqlite3.connect(uri + mode, uri=True, check_same_thread=False, timeout=0.1)
        except sqlite3.Error:
            continue
        try:
            jobs, settings, state = _read_tables(db)
        except sqlite3.Error:
            continue
        finally:
            db.close()
        jobs = {i: j for i, j in jobs.items() if j.status in LIVE}
        return jobs, settings, state
    return None


def load_database(path, timeout=1.0):
    """Open (creating if need be) and read the database: blocking.

    Returns ``(connection, jobs, settings, state)``. Raises ``Corrupt`` for a
    file that is not a scheduler database, ``sqlite3.OperationalError`` or
    ``OSError`` when it cannot be opened now (a retry may succeed).
    """
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if os.path.isfile(path):
        # judged before SQLite touches it: closing a connection on a file that
        # is not a database can delete the -wal that belongs with it
        with open(path, "rb") as f:
            header = f.read(16)
        if header and header != b"SQLite format 3\x00":
            raise Corrupt("file is not a database")
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                         timeout=timeout)
    try:
        try:
            db.execute("PRAGMA journal_mode=WAL").fetchone()
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as e:
            raise Corrupt(str(e)) from None
        if check != "ok":
            raise Corrupt(f"integrity check failed: {check}")
        if version > SCHEMA_VERSION:
            raise Corrupt(f"schema version {version} is newer than ours")
        try:
            db.executescript("BEGIN IMMEDIATE;" + SCHEMA
                             + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            jobs, settings, state = _read_tables(db)
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as e:
            raise Corrupt(str(e)) from None
        state["file"] = file_identity(path)
        # finished and deleted jobs are purged (older files kept them)
        gone = [j for j in jobs.values() if j.status not in LIVE]
        if gone:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("DELETE FROM jobs WHERE id = ?", [(j.id,) for j in gone])
            db.execute(SET_STATE, ("next_id", json.dumps(state["next_id"])))
            db.execute("COMMIT")
            for j in gone:
                del jobs[j.id]
    except BaseException:
        db.close()
        raise
    return db, jobs, settings, state


def write_batch(db, batch, path=None, identity=None):
    """Commit each change of ``batch`` (a list of statement lists); all in
    one transaction, or one by one if that fails. Returns one result per
    change: None (committed) or the exception. Nothing is written when the
    file at ``path`` is no longer the one opened (``identity``)."""
    if path is not None and file_identity(path) != identity:
        return [Vanished(f"{path} was removed or replaced")] * len(batch)
    def run(changes):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statements in changes:
                for sql, params in statements:
                    db.execute(sql, params)
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
    try:
        run(batch)
        return [None] * len(batch)
    except sqlite3.Error as e:
        if len(batch) == 1:
            return [e]
    results = []
    for change in batch:
        try:
            run([change])
            results.append(None)
        except sqlite3.Error as e:
            results.append(e)
    return results


# -- the scheduler, reactor side ----------------------------------------------

class Scheduler:
    log = Logger()

    #: seconds between attempts to open an unusable database (doubling)
    RETRY_FIRST, RETRY_MAX = 10.0, 600.0
    #: seconds before a failed power call of the window is tried again
    POWER_RETRY = 60.0
    #: seconds SQLite waits for a lock when opening (start-up waits this long)
    OPEN_TIMEOUT = 1.0

    def __init__(self, control, db_path, clock, run_db=None, tick=1.0, wall=None):
        self.control = control
        self.path = db_path
        self.clock = clock
        self.wall = wall or clock.seconds
        self.jobs = {}
        self.jobs_changed = Observable(0)
        self.settings = {k: Observable(v) for k, v in DEFAULT_SETTINGS.items()}
        #: what is wrong, for /control/scheduler/fault and the health resource
        self.fault = Observable("")
        self._faults = {}
        self._db = None
        self._db_file = None            # (device, inode) of the open file
        self._pool = None
        self._run_db = run_db
        self._queue = []
        self._writing = None
        self._next_id = 1
        self._pending_adds = 0
        self._listing = None
        self._encoded = None
        self._next_due = None
        # the power window
        self.switched_off = False        # durable: we switched them off
        self._off_applied = False        # this process has switched them off
        self._power_call = None          # Deferred of a power call under way
        self._power_retry_at = None
        self._refused_window = None
        # degraded mode
        self._dirty_settings = set()
        self._from_disk = set()         # ids of jobs read from a file we could not open
        self._moved_aside = None
        self._retry_call = None
        self._retry_delay = self.RETRY_FIRST
        self._opening = None
        self._closed = False
        self.timer = TimerService(tick, self.tick)
        self.timer.clock = clock

    # -- faults ---------------------------------------------------------------

    def _set_fault(self, key, text):
        if text:
            self._faults[key] = text
        else:
            self._faults.pop(key, None)
        self.fault.set("; ".join(self._faults[k] for k in sorted(self._faults)))

    @property
    def degraded(self):
        """True while the scheduler runs in memory only."""
        return self._db is None

    # -- persistence ----------------------------------------------------------

    def open(self):
        """Load jobs and settings (blocking, once, before serving). Never
        raises: an unusable database leaves the scheduler in memory."""
        if self._run_db is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="scheduler-db")
            self._pool.start()
            from twisted.internet import reactor
            pool = self._pool
            self._run_db = lambda fn, *a: threads.deferToThreadPool(reactor, pool, fn, *a)
        try:
            loaded = self._load()
        except Exception as e:
            stored = read_database(self.path)
            if stored is not None:
                self._adopt((None,) + stored)
                self._from_disk = set(self.jobs)
            self._go_degraded(e)
            return
        self._adopt(loaded)

    def _load(self):
        """Thread-safe: open the database, moving a corrupt one aside."""
        try:
            return load_database(self.path, self.OPEN_TIMEOUT)
        except Corrupt as e:
            aside = _move_aside(self.path, int(self.wall()))
            # said on the reactor side, when the fresh database is taken on
            self._moved_aside = (f"scheduler database {self.path} was corrupt ({e}); "
                                 f"moved aside to {aside}: the jobs and settings it "
                                 "held are not used")
            self.log.error("scheduler database {path} is corrupt ({error}); moved aside "
                           "(with its -wal/-shm) to {aside}; starting a fresh one",
                           path=self.path, error=e, aside=aside)
            return load_database(self.path, self.OPEN_TIMEOUT)

    def _report_moved_aside(self):
        """A corrupt file moved aside lost what it held: a lasting fault."""
        if self._moved_aside is not None:
            self._set_fault("corrupt", self._moved_aside)
            self._moved_aside = None

    def _report_invalid(self, state):
        """Jobs dropped at load for out-of-range times: a lasting fault."""
        invalid = state.get("invalid") or []
        for job_id, why in invalid:
            self.log.warn("scheduler database: job {id} dropped (deleted): {why}",
                          id=job_id, why=why)
        if invalid:
            self._set_fault("invalid", "scheduler database: jobs with times out of "
                            "range dropped (deleted): " + ", ".join(
                                f"job {i} ({why})" for i, why in invalid))

    def _go_degraded(self, error):
        reason = f"{type(error).__name__}: {error}" if isinstance(error, OSError) else str(error)
        self.log.error("scheduler database {path} cannot be used ({reason}); jobs and "
                       "settings are kept in memory only, retrying in {delay:g} s",
                       path=self.path, reason=reason, delay=self._retry_delay)
        self._set_fault("database", f"scheduler database {self.path} unusable ({reason}): "
                                    "jobs and settings are kept in memory only until it "
                                    "can be opened")
        self._schedule_retry()

    def _schedule_retry(self):
        if self._closed:
            return
        self._retry_call = self.clock.callLater(self._retry_delay, self._retry_open)
        self._retry_delay = min(self._retry_delay * 2, self.RETRY_MAX)

    def _retry_open(self):
        self._retry_call = None
        d = self._run_db(self._load)
        self._opening = d

        def opened(loaded):
            self._opening = None
            if self._closed:
                self._run_db(loaded[0].close)
                return
            self._merge(loaded)

        def failed(f):
            self._opening = None
            self.log.info("scheduler database still unusable ({error}); next try in "
                          "{delay:g} s", error=f.value, delay=self._retry_delay)
            self._schedule_retry()
        d.addCallbacks(opened, failed)
        d.addErrback(self._internal_failure, "reopening the scheduler database")

    def _adopt(self, loaded):
        db, jobs, settings, state = loaded
        self._db = db
        self._db_file = state.get("file")
        self._report_moved_aside()
        self._report_invalid(state)
        self.jobs = jobs
        for key, value in settings.items():
            if key in self.settings:
                self.settings[key].set(value)
        self._next_id = max(int(state.get("next_id", 1)), max(jobs, default=0) + 1)
        self.switched_off = bool(state.get("switched_off", False))
        if state.get("unreadable"):
            self.log.warn("scheduler database: unreadable entries skipped: {bad}",
                          bad=state["unreadable"])
        self._jobs_modified()
        self.log.info("scheduler: {n} jobs loaded from {path}{off}", n=len(jobs),
                      path=self.path,
                      off="; spectrometers were switched off for quiet time"
                      if self.switched_off else "")

    def _merge(self, loaded):
        """The database opened after a time in memory: keep both, what was
        done in memory winning, and write the result."""
        db, jobs, settings, state = loaded
        mine = sorted(self.jobs.values(), key=lambda j: j.id)
        next_id = max(int(state.get("next_id", 1)), max(jobs, default=0) + 1)
        merged = dict(jobs)
        statements = []
        for gone in self._from_disk - set(self.jobs):       # deleted meanwhile
            if merged.pop(gone, None) is not None:
                statements.append(("DELETE FROM jobs WHERE id = ?", (gone,)))
        for job in mine:
            if job.id in self._from_disk:
                pass                                        # the same job, ours newer
            elif job.id in merged or job.id < next_id:
                old = job.id
                job.id, next_id = next_id, next_id + 1
                self.log.info("job {old} renumbered {new}", old=old, new=job.id)
            merged[job.id] = job
            next_id = max(next_id, job.id + 1)
            statements.append((INSERT_JOB, job.row()))
        for key, value in settings.items():
            if key in self.settings and key not in self._dirty_settings:
                self.settings[key].set(value)
        for key in self._dirty_settings:
            statements.append((SET_SETTING, (key, json.dumps(self.settings[key].value))))
        self._dirty_settings.clear()
        self._from_disk = set()
        self.switched_off = self.switched_off or bool(state.get("switched_off", False))
        self._next_id = max(self._next_id, next_id)
        statements.append((SET_STATE, ("next_id", json.dumps(self._next_id))))
        statements.append((SET_STATE, ("switched_off", json.dumps(self.switched_off))))
        self.jobs = merged
        self._db = db
        self._db_file = state.get("file")
        self._report_moved_aside()
        self._report_invalid(state)
        self._retry_delay = self.RETRY_FIRST
        self._jobs_modified()
        self._set_fault("database", "")
        self.log.info("scheduler database {path} opened: {n} jobs", path=self.path,
                      n=len(merged))
        self._write(statements).addErrback(self._write_failed)

    def _write(self, statements, apply=None):
        """Commit ``statements``; then run ``apply`` (reactor side). The
        Deferred fails with a PiccoloError saying why when it is not stored.
        In memory-only mode the change is applied at once."""
        if self._db is None:
            if apply is not None:
                apply()
            return defer.succeed(None)
        d = defer.Deferred()
        self._queue.append((statements, apply, d))
        if self._writing is None:
            self._flush()
        return d

    def _flush(self):
        batch, self._queue = self._queue, []
        db = self._db
        self._writing = self._run_db(write_batch, db, [b[0] for b in batch],
                                     self.path, self._db_file)

        def written(results):
            for (statements, apply, d), error in zip(batch, results):
                if error is None:
                    if apply is not None:
                        try:
                            apply()
                        except Exception:
                            d.errback(Failure())
                            continue
                    d.callback(None)
                else:
                    d.errback(Failure(PiccoloError(
                        f"not stored: the scheduler database failed ({error})")))
            vanished = [e for e in results if isinstance(e, Vanished)]
            if vanished and self._db is db:
                self._lost(db, vanished[0])

        def crashed(f):
            for _, _, d in batch:
                d.errback(Failure(PiccoloError(
                    f"not stored: the scheduler database failed ({f.value})")))

        def next_batch(_):
            self._writing = None
            if self._queue and self._db is not None:
                self._flush()
        self._writing.addCallbacks(written, crashed)
        self._writing.addBoth(next_batch)

    def _lost(self, db, error):
        """The file went away under the connection: from now on in memory,
        and everything (not only what changes meanwhile) is written into
        the database the retry opens."""
        self._db = None
        self._db_file = None
        self._dirty_settings = set(self.settings)
        queued, self._queue = self._queue, []
        for _, _, d in queued:
            d.errback(Failure(PiccoloError(
                f"not stored: the scheduler database failed ({error})")))
        self._run_db(db.close).addErrback(lambda f: None)
        self._go_degraded(error)

    def _write_failed(self, failure):
        """For writes no client waits on (a tick's progress, a merge)."""
        self.log.error("scheduler database write failed: {error}", error=failure.value)
        self._set_fault("write", f"scheduler database write failed: {failure.value}")

    def _internal_failure(self, failure, what):
        self.log.failure("{what} failed", failure, what=what)

    def close(self):
        """Wait for queued writes, close the database, stop its thread."""
        self._closed = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None

        @defer.inlineCallbacks
        def drain():
            while self._writing is not None or self._opening is not None:
                try:
                    yield (self._writing or self._opening)
                except Exception:
                    pass
            db, pool = self._db, self._pool
            self._db = None
            self._pool = None
            if db is not None:
                if pool is not None:
                    yield self._run_db(db.close)
                else:
                    db.close()
            if pool is not None:
                pool.stop()
        d = drain()
        d.addErrback(self._internal_failure, "closing the scheduler database")
        return d

    # -- jobs -------------------------------------------------------------------

    def _jobs_modified(self):
        self._listing = None
        self._encoded = None
        self._next_due = None
        self.jobs_changed.set(self.jobs_changed.value + 1)

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
        if len(self.jobs) + self._pending_adds >= MAX_JOBS:
            raise PiccoloError(f"too many scheduled jobs: at most {MAX_JOBS} active or "
                               "suspended; delete some first")
        ignore_quiet = kind in ("power_on", "power_off")
        job_id = self._next_id
        self._next_id += 1
        first = start if start >= now - 1 else next_run(start, interval, now)
        job = Job(job_id, kind, args, start, first, end, interval, ignore_quiet, "active")

        def apply():
            self.jobs[job_id] = job
            self._jobs_modified()
            self.log.info("job {id} added: {kind} at {start}{every}", id=job_id,
                          kind=kind, start=iso(start),
                          every=f" every {interval:g} s" if interval else "")

        def done(result):
            self._pending_adds -= 1
            return result
        self._pending_adds += 1
        d = self._write([(INSERT_JOB, job.row()),
                         (SET_STATE, ("next_id", json.dumps(job_id + 1)))], apply)
        return d.addBoth(done).addCallback(lambda _: job_id)

    def _job(self, job_id):
        job_id = to_int(job_id, "job id")
        job = self.jobs.get(job_id)
        if job is None:
            raise PiccoloError(f"no such job: {job_id}")
        return job

    def _set_status(self, job_id, status, verb):
        job = self._job(job_id)
        if job.status == status:
            return defer.succeed(None)
        next_time = job.next_time
        if status == "active":
            next_time = next_run(job.next_time, job.interval, self.wall()) or job.next_time

        def apply():
            live = self.jobs.get(job.id)
            if live is not None:
                live.status, live.next_time = status, next_time
                self._jobs_modified()
                self.log.info("job {id} {verb}", id=job.id, verb=verb)
        return self._write([("UPDATE jobs SET status = ?, next_time = ? WHERE id = ?",
                             (status, next_time, job.id))], apply)

    def suspend(self, job_id):
        return self._set_status(job_id, "suspended", "suspended")

    def unsuspend(self, job_id):
        job = self._job(job_id)
        if job.status != "suspended":
            return defer.succeed(None)
        return self._set_status(job_id, "active", "active again")

    def delete(self, job_id):
        job = self._job(job_id)
        return self._remove(job, "deleted")

    def _remove(self, job, why):
        def apply():
            if self.jobs.pop(job.id, None) is not None:
                self._jobs_modified()
                self.log.info("job {id} {why}", id=job.id, why=why)
        return self._write([("DELETE FROM jobs WHERE id = ?", (job.id,))], apply)

    def listing(self):
        """The active and suspended jobs (cached until the next change)."""
        if self._listing is None:
            self._listing = [j.listing() for j in sorted(self.jobs.values(),
                                                         key=lambda j: j.id)]
        return self._listing

    def listing_encoded(self):
        """The listing as JSON, encoded once per change."""
        if self._encoded is None:
            self._encoded = EncodedJSON.encode(self.listing())
        return self._encoded

    # -- running ----------------------------------------------------------------

    def quiet_now(self, now):
        s = self.settings
        if not s["quietTimeEnabled"].value:
            return False
        return in_quiet(now, s["quietStart"].value, s["quietEnd"].value)

    def tick(self):
        """Once a second; cheap when nothing is due; never raises."""
        try:
            now = self.wall()
            self._power_window(now)
            self._run_due(now)
        except Exception:
            self.log.failure("scheduler tick failed (the scheduler goes on)")

    def _due_time(self):
        if self._next_due is None:
            self._next_due = min((j.next_time for j in self.jobs.values()
                                  if j.status == "active"), default=float("inf"))
        return self._next_due

    def _run_due(self, now):
        if now < self._due_time():
            return
        quiet = None
        due = sorted((j for j in self.jobs.values()
                      if j.status == "active" and j.next_time <= now),
                     key=lambda j: (j.next_time, j.id))
        for job in due:
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
        elif job.kind in ("power_on", "power_off"):
            spectrometers = self.control.instrument.spectrometers
            d = (spectrometers.power_on_all() if job.kind == "power_on"
                 else spectrometers.power_off_all())
            d.addCallbacks(self._power_done, self._power_failed,
                           callbackArgs=(f"job {job.id} ({job.kind})",),
                           errbackArgs=(f"job {job.id} ({job.kind})",))
        else:
            raise PiccoloError(f"unknown job kind {job.kind!r}")

    def _advance(self, job, now):
        nxt = next_run(job.next_time, job.interval, now)
        if nxt is None or (job.end_time is not None and nxt > job.end_time):
            self._finish(job)
        else:
            # applied at once (the next tick must not run it again); written after
            job.next_time = nxt
            self._next_due = None
            self._write([("UPDATE jobs SET next_time = ? WHERE id = ?",
                          (nxt, job.id))]).addErrback(self._write_failed)

    def _finish(self, job):
        """A job has run for the last time: purged from memory and database."""
        if self.jobs.pop(job.id, None) is not None:
            self._jobs_modified()
            self.log.info("job {id} done", id=job.id)
        self._write([("DELETE FROM jobs WHERE id = ?", (job.id,))]
                    ).addErrback(self._write_failed)

    # -- the power window ---------------------------------------------------------

    def power_should_be_off(self, now):
        s = self.settings
        if not (s["quietTimeEnabled"].value and s["powerOffEnabled"].value):
            return False
        delay = s["powerDelay"].value
        start, end = quiet_window(now, s["quietStart"].value, s["quietEnd"].value)
        if start <= now < end and end - start <= 2 * delay:
            if self._refused_window != start:
                self._refused_window = start
                self.log.warn("quiet time {start} to {end} is too short for a power "
                              "delay of {delay} s: spectrometers stay on",
                              start=iso(start), end=iso(end), delay=delay)
            return False
        return start + delay <= now < end - delay

    def _power_window(self, now):
        if self._power_call is not None:
            return                              # one power call at a time
        if self._power_retry_at is not None and self.clock.seconds() < self._power_retry_at:
            return
        if self.power_should_be_off(now):
            if self.switched_off and self._off_applied:
                return
            if self.control.busy:
                return                          # never in the middle of a batch
            self._power_off()
        elif self.switched_off:
            self._power_on()

    def _reconsider_power(self):
        """A setting of the window changed: act now, not at the next tick."""
        if not self.timer.running:
            return
        try:
            self._power_window(self.wall())
        except Exception:
            self.log.failure("power window check failed")

    def _power_off(self):
        spectrometers = self.control.instrument.spectrometers
        first = not self.switched_off

        def remember():
            self.switched_off = True
        d = (self._write([(SET_STATE, ("switched_off", "true"))], remember)
             if first else defer.succeed(None))

        def switch(_):
            self.log.info("quiet time: powering spectrometers off")
            self._off_applied = True
            return spectrometers.power_off_all()
        d.addCallback(switch)
        self._track_power(d, "quiet time power-off")

    def _power_on(self):
        spectrometers = self.control.instrument.spectrometers
        self.log.info("quiet time over: powering spectrometers on")
        d = defer.maybeDeferred(spectrometers.power_on_all)

        def forget(result):
            def apply():
                self.switched_off = False
                self._off_applied = False
            return self._write([(SET_STATE, ("switched_off", "false"))],
                               apply).addCallback(lambda _: result)
        d.addCallback(forget)
        self._track_power(d, "quiet time power-on")

    def _track_power(self, d, what):
        self._power_call = d
        d.addCallbacks(self._power_done, self._power_failed,
                       callbackArgs=(what,), errbackArgs=(what,))

        def over(_):
            self._power_call = None
        d.addBoth(over)

    def _power_done(self, result, what):
        self._power_retry_at = None
        if result not in (None, "ok"):
            self.log.warn("{what}: {result}", what=what, result=result)
        self._set_fault("power", "")

    def _power_failed(self, failure, what):
        self._power_retry_at = self.clock.seconds() + self.POWER_RETRY
        self.log.failure("{what} failed (tried again in {delay:g} s)", failure,
                         what=what, delay=self.POWER_RETRY)
        self._set_fault("power", f"{what} failed: {failure.value}")

    # -- settings ----------------------------------------------------------------

    def _setter(self, key, check):
        def put(value):
            value = check(value)
            obs = self.settings[key]
            if value == obs.value and type(value) is type(obs.value):
                return None

            def apply():
                obs.set(value)
                if self._db is None:
                    self._dirty_settings.add(key)
                self.log.info("scheduler {key} = {value}", key=key, value=value)
                self._reconsider_power()
            return self._write([(SET_SETTING, (key, json.dumps(value)))], apply)
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
