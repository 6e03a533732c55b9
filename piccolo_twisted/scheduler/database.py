"""The scheduler's SQLite file, thread side: plain blocking functions of
their arguments, run in the store's one database thread.

Tables: ``jobs`` (live jobs), ``settings`` (quiet time, power window),
``state`` (next job id, whether the power window switched the
spectrometers off), ``history`` (the newest slot outcomes) and ``running``
(the slot whose batch is under way: written before it starts, so a batch
the process dies in is recorded as such at the next start).
"""

import json
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass

from ..errors import PiccoloError
from ..values import END_TIMESTAMP, to_float
from .calendar import DAY, iso

#: Tables added later (history, running) leave the version alone: an older
#: server ignores them, where a higher version would make it move the file
#: aside -- and lose the jobs -- on a downgrade.
SCHEMA_VERSION = 2
HISTORY_KEPT = 1000
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
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY,
    job INTEGER NOT NULL,
    slot REAL NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    run TEXT,
    batch INTEGER
);
CREATE TABLE IF NOT EXISTS running (
    job INTEGER NOT NULL,
    slot REAL NOT NULL,
    kind TEXT NOT NULL,
    run TEXT,
    PRIMARY KEY (job, slot)
);
"""

INSERT_JOB = ("INSERT OR REPLACE INTO jobs (id, kind, args, start_time, next_time, "
              "end_time, interval, ignore_quiet, status) VALUES (?,?,?,?,?,?,?,?,?)")
SET_STATE = "INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)"
SET_SETTING = "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)"
INSERT_HISTORY = ("INSERT INTO history (job, slot, outcome, reason, run, batch) "
                  "VALUES (?,?,?,?,?,?)")
TRIM_HISTORY = ("DELETE FROM history WHERE id <= (SELECT MAX(id) FROM history) - "
                f"{HISTORY_KEPT}")
INSERT_RUNNING = "INSERT OR REPLACE INTO running (job, slot, kind, run) VALUES (?,?,?,?)"
DELETE_RUNNING = "DELETE FROM running WHERE job = ? AND slot = ?"


@dataclass
class Job:
    id: int
    kind: str                 # "record", "power_on", "power_off", "dark"
    args: dict | None
    start_time: float
    next_time: float          # the job's next slot not yet decided
    end_time: float | None
    interval: float | None
    ignore_quiet: bool
    status: str

    @property
    def run(self):
        return self.args.get("run") if isinstance(self.args, dict) else None

    @property
    def identity(self):
        """What makes this job this job, wherever it is stored: its number
        and what it was created with (none of which ever changes). A file
        that comes back (a data directory pulled and plugged in again)
        holds the same jobs by this, where another file's job with the
        same number is another job."""
        return (self.id, self.kind, json.dumps(self.args, sort_keys=True),
                self.start_time, self.end_time, self.interval)

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


@dataclass
class Outcome:
    """One slot's end, as the history keeps it."""
    job: int
    slot: float
    outcome: str              # "done", "missed", "failed"
    reason: str | None = None
    run: str | None = None
    batch: int | None = None

    def row(self):
        return (self.job, self.slot, self.outcome, self.reason, self.run, self.batch)

    def wire(self):
        return {"job": self.job, "slot": iso(self.slot), "outcome": self.outcome,
                "reason": self.reason, "run": self.run, "batch": self.batch}


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


def move_aside(path, stamp):
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


def _table(db, sql):
    try:
        return db.execute(sql).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):       # a file of an older version, read only
            return []
        raise


def read_tables(db):
    """``(jobs, settings, state)`` as stored; unreadable entries skipped;
    live jobs whose times are out of range are marked deleted (and so
    purged) and named in ``state["invalid"]``. ``state["history"]`` holds
    the kept outcomes (oldest first), ``state["running"]`` the batches a
    process died in."""
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
    history = []
    for row in _table(db, f"SELECT job, slot, outcome, reason, run, batch FROM history "
                          f"ORDER BY id DESC LIMIT {HISTORY_KEPT}"):
        try:
            history.append(Outcome(int(row[0]), float(row[1]), str(row[2]), row[3],
                                   row[4], row[5]))
        except (TypeError, ValueError):
            bad.append(f"history {row!r}")
    history.reverse()
    running = [(int(j), float(s), k, r)
               for j, s, k, r in _table(db, "SELECT job, slot, kind, run FROM running")]
    state.setdefault("next_id", max(jobs, default=0) + 1)
    state["unreadable"] = bad
    state["invalid"] = invalid
    state["history"] = history
    state["running"] = running
    return jobs, settings, state


def read_database(path, connect=sqlite3.connect):
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
            db = connect(uri + mode, uri=True, check_same_thread=False, timeout=0.1)
        except sqlite3.Error:
            continue
        try:
            jobs, settings, state = read_tables(db)
        except sqlite3.Error:
            continue
        finally:
            db.close()
        jobs = {i: j for i, j in jobs.items() if j.status in LIVE}
        return jobs, settings, state
    return None


def load_database(path, timeout=1.0, connect=sqlite3.connect):
    """Open (creating if need be) and read the database: blocking.

    Returns ``(connection, jobs, settings, state)``. Raises ``Corrupt`` for a
    file that is not a scheduler database, ``sqlite3.OperationalError`` or
    ``OSError`` when it cannot be opened now (a retry may succeed).
    """
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        # its own directory (.piccolo) only: a data directory that is not
        # there (a pulled stick) is not made again at the mount point, where
        # the stick plugged back in would hide what was written meanwhile
        os.mkdir(directory)
    if os.path.isfile(path):
        # judged before SQLite touches it: closing a connection on a file that
        # is not a database can delete the -wal that belongs with it
        with open(path, "rb") as f:
            header = f.read(16)
        if header and header != b"SQLite format 3\x00":
            raise Corrupt("file is not a database")
    db = connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
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
            jobs, settings, state = read_tables(db)
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
