"""The scheduler's durable state, reactor side: jobs, settings, the power
window's flag and the history, in memory and in SQLite.

Two kinds of write, in one queue, committed in order by one thread:

- ``write``: a change someone waits on (a client's PUT, the record that a
  batch is about to start). It is applied in memory only once SQLite has
  committed it; when the commit fails, the Deferred fails with a
  PiccoloError saying why and memory is left as it was.
- ``progress``: the scheduler's own bookkeeping (a slot's outcome, a
  batch over). It is applied in memory at once and written after; a failed
  commit (a full disk) is kept and tried again, before anything newer,
  until it succeeds.

Changes queued while a commit is under way go together in the next
transaction (group commit).

Start-up never depends on the file. A corrupt file (not a database, failed
integrity check) is moved aside together with its ``-wal``/``-shm``/
``-journal`` and a fresh one started; a file that cannot be opened (a
directory in its place, a lock, permissions, a full disk) leaves the store
in memory, saying so in ``fault``, using what the file holds if it can be
read, and the open is retried with back-off until it succeeds, when what
was done in memory is written to it. A file removed or replaced under the
running server is found at the next write, and the same happens.
"""

import json
import sqlite3

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..errors import PiccoloError
from ..observable import Observable
from .database import (DELETE_RUNNING, HISTORY_KEPT, INSERT_HISTORY,
                       INSERT_RUNNING, SET_SETTING, SET_STATE, TRIM_HISTORY, Corrupt,
                       Vanished, load_database, move_aside, read_database, write_batch)
from .merge import interrupted_rows, merge_jobs, new_outcomes


class Store:
    log = Logger()

    #: seconds between attempts to open an unusable database (doubling)
    RETRY_FIRST, RETRY_MAX = 10.0, 600.0
    #: seconds SQLite waits for a lock when opening (start-up waits this long)
    OPEN_TIMEOUT = 1.0
    #: seconds before a failed ``progress`` write is tried again
    PROGRESS_RETRY = 30.0

    def __init__(self, path, clock, wall, settings, run_db=None,
                 connect=sqlite3.connect):
        self.path = path
        self.clock = clock
        self.wall = wall
        self.settings = settings            # key -> Observable (the defaults)
        self.jobs = {}
        self.next_id = 1
        self.switched_off = False           # the power window switched them off
        self.history = []                   # Outcome, oldest first
        self.history_changed = Observable(0)
        self.running = {}                   # (job, slot) -> (job, slot, kind, run)
        self.interrupted = []               # running rows a dead process left
        self.fault = Observable("")
        self.on_reload = None               # jobs replaced (open, merge)
        self._faults = {}
        self._db = None
        self._db_file = None                # (device, inode) of the open file
        self._pool = None
        self._run_db = run_db
        self._connect = connect
        self._queue = []                    # (statements, apply, deferred, retry)
        self._backlog = []                  # failed progress writes, oldest first
        self._backlog_call = None
        self._writing = None
        self._dirty_settings = set()
        self._gone = {}                     # identities of jobs let go (deleted, done)
        self._unwritten = []                # outcomes not in the file yet
        self._moved_aside = None
        self._retry_call = None
        self._retry_delay = self.RETRY_FIRST
        self._opening = None
        self._closed = False

    # -- faults ---------------------------------------------------------------

    def set_fault(self, key, text):
        if text:
            self._faults[key] = text
        else:
            self._faults.pop(key, None)
        self.fault.set("; ".join(self._faults[k] for k in sorted(self._faults)))

    @property
    def degraded(self):
        """True while everything is kept in memory only."""
        return self._db is None

    @property
    def settled(self):
        """Is everything in memory also in the file (nothing queued, being
        written, or kept to be written again)?"""
        return not (self._db is None or self._writing is not None or self._queue
                    or self._backlog or self._unwritten)

    # -- opening --------------------------------------------------------------

    def open(self):
        """Load jobs, settings and history (blocking, once, before serving).
        Never raises: an unusable database leaves the store in memory."""
        if self._run_db is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="scheduler-db")
            self._pool.start()
            from twisted.internet import reactor
            pool = self._pool
            self._run_db = lambda fn, *a: threads.deferToThreadPool(reactor, pool, fn, *a)
        try:
            loaded = self._load()
        except Exception as e:
            stored = read_database(self.path, self._connect)
            if stored is not None:
                self._adopt((None,) + stored)
            self._go_degraded(e)
            return
        self._adopt(loaded)

    def _load(self):
        """Thread-safe: open the database, moving a corrupt one aside."""
        try:
            return load_database(self.path, self.OPEN_TIMEOUT, self._connect)
        except Corrupt as e:
            aside = move_aside(self.path, int(self.wall()))
            self._moved_aside = (f"scheduler database {self.path} was corrupt ({e}); "
                                 f"moved aside to {aside}: the jobs and settings it "
                                 "held are not used")
            self.log.error("scheduler database {path} is corrupt ({error}); moved aside "
                           "(with its -wal/-shm) to {aside}; starting a fresh one",
                           path=self.path, error=e, aside=aside)
            return load_database(self.path, self.OPEN_TIMEOUT, self._connect)

    def _report(self, state):
        if self._moved_aside is not None:
            self.set_fault("corrupt", self._moved_aside)
            self._moved_aside = None
        invalid = state.get("invalid") or []
        for job_id, why in invalid:
            self.log.warn("scheduler database: job {id} dropped (deleted): {why}",
                          id=job_id, why=why)
        if invalid:
            self.set_fault("invalid", "scheduler database: jobs with times out of "
                           "range dropped (deleted): " + ", ".join(
                               f"job {i} ({why})" for i, why in invalid))
        if state.get("unreadable"):
            self.log.warn("scheduler database: unreadable entries skipped: {bad}",
                          bad=state["unreadable"])

    def _adopt(self, loaded):
        db, jobs, settings, state = loaded
        self._db = db
        self._db_file = state.get("file")
        self._report(state)
        self.jobs = jobs
        for key, value in settings.items():
            if key in self.settings:
                self.settings[key].set(value)
        self.next_id = max(int(state.get("next_id", 1)), max(jobs, default=0) + 1)
        self.switched_off = bool(state.get("switched_off", False))
        self.history = list(state.get("history", []))
        self.interrupted = list(state.get("running", []))
        self.history_changed.set(self.history_changed.value + 1)
        self.log.info("scheduler: {n} jobs loaded from {path}{off}", n=len(jobs),
                      path=self.path,
                      off="; spectrometers were switched off for quiet time"
                      if self.switched_off else "")
        if self.on_reload is not None:
            self.on_reload()

    def _go_degraded(self, error):
        reason = (f"{type(error).__name__}: {error}" if isinstance(error, OSError)
                  else str(error))
        self.log.error("scheduler database {path} cannot be used ({reason}); jobs and "
                       "settings are kept in memory only, retrying in {delay:g} s",
                       path=self.path, reason=reason, delay=self._retry_delay)
        self.set_fault("database", f"scheduler database {self.path} unusable ({reason}): "
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
        d.addErrback(lambda f: self.log.failure("reopening the scheduler database", f))

    def _merge(self, loaded):
        """The database opened after a time in memory: keep both, what was
        done in memory winning, and write the result (merge.py says how)."""
        db, jobs, settings, state = loaded
        next_id = max(int(state.get("next_id", 1)), max(jobs, default=0) + 1,
                      self.next_id, max(self.jobs, default=0) + 1)
        merged, statements, foreign, next_id = merge_jobs(self.jobs, self._gone, jobs,
                                                          next_id)
        for key, value in settings.items():
            if key in self.settings and key not in self._dirty_settings:
                self.settings[key].set(value)
        for key in self._dirty_settings:
            statements.append((SET_SETTING, (key, json.dumps(self.settings[key].value))))
        known = set(self.running) | {(j, s) for j, s, _, _ in self.interrupted}
        self.interrupted.extend(interrupted_rows(state.get("running", []), foreign, known))
        statements.append(("DELETE FROM running", ()))
        statements.extend((INSERT_RUNNING, row) for row in self.running.values())
        statements.extend(new_outcomes(self._unwritten, state.get("history", [])))
        statements.append((TRIM_HISTORY, ()))
        self._unwritten = []
        self._dirty_settings.clear()
        self.switched_off = self.switched_off or bool(state.get("switched_off", False))
        self.next_id = max(self.next_id, next_id)
        statements.append((SET_STATE, ("next_id", json.dumps(self.next_id))))
        statements.append((SET_STATE, ("switched_off", json.dumps(self.switched_off))))
        self.jobs = merged
        self._db = db
        self._db_file = state.get("file")
        self._report(state)
        self._retry_delay = self.RETRY_FIRST
        self.set_fault("database", "")
        self.log.info("scheduler database {path} opened: {n} jobs", path=self.path,
                      n=len(merged))
        self.progress(statements)
        if self.on_reload is not None:
            self.on_reload()

    #: how many let-go jobs are remembered (for a file that comes back)
    GONE_KEPT = 10000

    def let_go(self, job_id):
        """Memory: the job is over (deleted, done); returns it or None. A
        file that comes back with it does not bring it back."""
        job = self.jobs.pop(job_id, None)
        if job is not None:
            self._gone[job.identity] = None
            while len(self._gone) > self.GONE_KEPT:
                del self._gone[next(iter(self._gone))]
        return job

    # -- writing -----------------------------------------------------------------

    def write(self, statements, apply=None):
        """Commit ``statements``, then run ``apply`` (reactor side). The
        Deferred fails with a PiccoloError saying why when it is not
        stored. In memory-only mode the change is applied at once."""
        if self._db is None:
            if apply is not None:
                apply()
            return defer.succeed(None)
        d = defer.Deferred()
        self._queue.append((statements, apply, d, False))
        if self._writing is None:
            self._flush()
        return d

    def progress(self, statements, apply=None):
        """Apply now, commit after, and keep trying until it is committed.
        The Deferred fires once it is (never fails)."""
        if apply is not None:
            apply()
        d = defer.Deferred()
        if self._db is None:
            d.callback(None)
            return d
        self._queue.append((statements, None, d, True))
        if self._writing is None:
            self._flush()
        return d

    def remember(self, outcome):
        """Keep an outcome in memory (the newest ``HISTORY_KEPT``); it is
        not in the file until its statements are committed."""
        self.history.append(outcome)
        if len(self.history) > HISTORY_KEPT:
            del self.history[:len(self.history) - HISTORY_KEPT]
        self._unwritten.append(outcome)
        self.history_changed.set(self.history_changed.value + 1)

    def written(self, outcome):
        """``outcome`` is committed."""
        if self._db is not None and outcome in self._unwritten:
            self._unwritten.remove(outcome)

    @staticmethod
    def outcome_statements(outcome):
        return [(INSERT_HISTORY, outcome.row()), (TRIM_HISTORY, ())]

    def record(self, outcome, statements=()):
        """A slot's outcome: kept in memory at once and committed with
        ``statements``, tried again until it is."""
        self.remember(outcome)
        d = self.progress(self.outcome_statements(outcome) + list(statements))
        return d.addCallback(lambda _: self.written(outcome))

    def running_statements(self, job_id, slot, kind, run):
        row = (job_id, slot, kind, run)
        self.running[(job_id, slot)] = row
        return [(INSERT_RUNNING, row)]

    def finished_statements(self, job_id, slot):
        self.running.pop((job_id, slot), None)
        return [(DELETE_RUNNING, (job_id, slot))]

    def _flush(self):
        batch = self._backlog + self._queue
        self._backlog, self._queue = [], []
        db = self._db
        self._writing = self._run_db(write_batch, db, [b[0] for b in batch],
                                     self.path, self._db_file)

        def written(results):
            failed_progress = []
            for entry, error in zip(batch, results):
                statements, apply, d, retry = entry
                if error is None:
                    if apply is not None:
                        try:
                            apply()
                        except Exception:
                            d.errback(Failure())
                            continue
                    d.callback(None)
                elif retry:
                    failed_progress.append(entry)
                else:
                    d.errback(Failure(PiccoloError(
                        f"not stored: the scheduler database failed ({error})")))
            errors = [e for e in results if e is not None]
            vanished = [e for e in errors if isinstance(e, Vanished)]
            if vanished and self._db is db:
                self._lost(db, vanished[0])
                return
            if failed_progress:
                self._backlog = failed_progress + self._backlog
                self.set_fault("write", f"scheduler database write failed: {errors[0]} "
                                        f"(tried again every {self.PROGRESS_RETRY:g} s)")
                self.log.error("scheduler database write failed: {error}; its progress "
                               "is kept and written again", error=errors[0])
                if self._backlog_call is None:
                    self._backlog_call = self.clock.callLater(self.PROGRESS_RETRY,
                                                              self._retry_backlog)
            elif not self._backlog and not errors:
                self.set_fault("write", "")

        def crashed(f):
            for _, _, d, retry in batch:
                if not retry:
                    d.errback(Failure(PiccoloError(
                        f"not stored: the scheduler database failed ({f.value})")))
            self.log.failure("scheduler database write", f)

        def next_batch(_):
            self._writing = None
            if self._queue and self._db is not None:
                self._flush()
        self._writing.addCallbacks(written, crashed)
        self._writing.addBoth(next_batch)

    def _retry_backlog(self):
        self._backlog_call = None
        if self._backlog and self._writing is None and self._db is not None:
            self._flush()

    def _lost(self, db, error):
        """The file went away under the connection: from now on in memory,
        and everything (not only what changes meanwhile) is written into
        the database the retry opens."""
        self._db = None
        self._db_file = None
        self._dirty_settings = set(self.settings)
        queued = self._backlog + self._queue
        self._backlog, self._queue = [], []
        for _, _, d, retry in queued:
            if retry:
                d.callback(None)        # memory has it; the merge writes it
            else:
                d.errback(Failure(PiccoloError(
                    f"not stored: the scheduler database failed ({error})")))
        # a new file: all of the history goes into it
        self._unwritten = list(self.history)
        self._run_db(db.close).addErrback(lambda f: None)
        self._go_degraded(error)

    def close(self):
        """Wait for queued writes, close the database, stop its thread."""
        self._closed = True
        for name in ("_retry_call", "_backlog_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

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
        d.addErrback(lambda f: self.log.failure("closing the scheduler database", f))
        return d
