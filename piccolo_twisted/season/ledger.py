"""What the server promised, and what happened: the season's bookkeeping.

The ledger knows only what a client and an observer of the disk and the
board know: the jobs a client was told were stored (2.04), with the times
it gave; when it suspended, resumed or deleted them; the settings it was
told were stored; the scheduler's durable history; the spectrum files on
disk. From the job times and the wall clock it knows which slots a job
has passed through while active -- the documented contract, not a model of
the scheduler: each of those slots must end as a batch on disk or as a
recorded miss or failure.
"""

import bisect
import heapq
import json
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass, field

from .invariants import iso


@dataclass
class Slot:
    job: "SimJob"
    time: float               # the slot's wall time
    required: bool            # passed while the job was surely active
    due_true: float           # the world's time when the wall clock reached it
    downtime_at_due: float    # the world's stalled time (down, disk full) then
    outcome: str | None = None
    reason: str | None = None
    run: str | None = None
    batch: int | None = None


@dataclass
class SimJob:
    n: int
    kind: str                  # record, power_on, power_off
    run: str | None
    start: float
    interval: float | None
    end: float | None
    added_wall: float
    id: int | None = None
    state: str = "pending"     # pending, active, suspended, deleted, finished
    uncertain: bool = False    # a write about it was unanswered at a crash
    cursor: float | None = None
    floor: float | None = None # the cursor when it was suspended
    resume_wall: float | None = None  # the server's wall clock at the last unsuspend asked
    slots: dict = field(default_factory=dict)

    def first_slot(self):
        """The first slot after the job was added: at_time itself, or for a
        repeating job whose at_time has passed, the first slot after then."""
        if self.start >= self.added_wall - 1 or not self.interval:
            return self.start
        k = int((self.added_wall - self.start) // self.interval) + 1
        return self.start + k * self.interval

    def after(self, slot):
        """The slot after ``slot``, or None."""
        if not self.interval:
            return None
        nxt = slot + self.interval
        if self.end is not None and nxt > self.end:
            return None
        return nxt

    def grid(self, t):
        """Is ``t`` one of this job's slots (within a millisecond)?"""
        if abs(t - self.start) < 1e-3:
            return True
        if not self.interval or t < self.start:
            return False
        k = round((t - self.start) / self.interval)
        return abs(self.start + k * self.interval - t) < 1e-3 and (
            self.end is None or t <= self.end + 1e-3)


class Ledger:
    def __init__(self, season):
        self.season = season
        self.jobs = []                 # SimJob, by n
        self.by_run = {}
        self.by_id = {}
        self._heap = []                # (cursor, n): the next slot each job meets
        self.settings = {}             # key -> acked value
        self.uncertain_settings = {}   # key -> set of possible values
        self.files = {}                # (run, name) -> (inode, size, mtime)
        self.batches = {}              # run -> {batch number: [file names]}
        self.mtimes = []               # every file's mtime, sorted
        self.history_seen = 0          # the highest history id read
        self.outcomes = {"done": 0, "missed": 0, "failed": 0}
        self.decided = []              # (slot time, outcome) of every entry read
        self.open_slots = []           # required slots without an outcome yet

    # -- jobs ----------------------------------------------------------------

    def new_job(self, kind, run, start, interval, end, wall):
        job = SimJob(len(self.jobs), kind, run, start, interval, end, wall)
        job.cursor = job.first_slot()
        if job.end is not None and job.cursor > job.end:
            job.cursor = None
        self.jobs.append(job)
        if run is not None:
            self.by_run[run] = job
        self._push(job)
        return job

    def _push(self, job):
        if job.cursor is not None:
            heapq.heappush(self._heap, (job.cursor, job.n))

    def learn_id(self, job, job_id):
        if job_id is not None and job.id is None:
            job.id = job_id
            self.by_id[job_id] = job

    def pass_time(self, wall, true_time, downtime):
        """Every job slot the wall clock has now reached is passed: required
        if the job was surely active then, allowed (not required) while its
        state was uncertain, skipped while suspended."""
        heap = self._heap
        while heap and heap[0][0] <= wall:
            cursor, n = heapq.heappop(heap)
            job = self.jobs[n]
            if job.cursor != cursor or job.state in ("deleted", "finished"):
                continue
            if job.state == "suspended" and not job.uncertain:
                pass                    # skipped: not made up (documented)
            else:
                required = job.state == "active" and not job.uncertain
                slot = Slot(job, cursor, required, true_time, downtime)
                job.slots[round(cursor, 3)] = slot
                if required:
                    self.open_slots.append(slot)
            job.cursor = job.after(cursor)
            if job.cursor is None:
                if job.state in ("active", "pending") and not job.uncertain:
                    job.state = "finished"
            else:
                self._push(job)

    def suspended(self, job):
        """A suspension was acknowledged: the slots it passes are skipped."""
        job.state = "suspended"
        job.floor = job.cursor

    def resumed(self, job, wall):
        """An unsuspension was acknowledged: the job goes on from its next
        slot after now, never from one it had already passed."""
        job.state = "active"
        if job.floor is None:
            return
        nxt = job.start
        if job.interval and wall >= job.start:
            nxt = job.start + (int((wall - job.start) // job.interval) + 1) * job.interval
        cursor = max(job.floor, nxt)
        if job.end is not None and cursor > job.end + 1e-6:
            job.cursor = None
            job.state = "finished"
            return
        job.cursor = cursor
        job.floor = None
        self._push(job)

    def add_file(self, run, name, st):
        self.files[(run, name)] = (st.st_ino, st.st_size, st.st_mtime)
        bisect.insort(self.mtimes, st.st_mtime)
        if name.startswith("b") and name[1:7].isdigit():
            self.batches.setdefault(run, {}).setdefault(int(name[1:7]), []).append(name)

    def files_between(self, lo, hi):
        """How many files have an mtime in [lo, hi]."""
        return bisect.bisect_right(self.mtimes, hi) - bisect.bisect_left(self.mtimes, lo)

    def slot(self, job, t):
        return job.slots.get(round(t, 3))

    # -- the durable history -------------------------------------------------

    def read_history(self, path):
        """New entries of the scheduler's durable history (its SQLite file,
        read as another process would), oldest first."""
        if not os.path.exists(path):
            return []
        uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=0.1)
        except sqlite3.Error:
            return []
        try:
            rows = db.execute("SELECT id, job, slot, outcome, reason, run, batch "
                              "FROM history WHERE id > ? ORDER BY id",
                              (self.history_seen,)).fetchall()
        except sqlite3.Error:
            return []
        finally:
            db.close()
        if rows:
            self.history_seen = rows[-1][0]
        return rows


def load_pico(path, parse=True):
    """The spectra of a complete .pico file, or None. Without ``parse``
    only its shape is looked at: the whole document, start to end (what a
    partial write would not have)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if not parse:
        ok = data.startswith(b'{"Spectra":[{') and data.endswith(b"}]}")
        return [None] if ok else None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    spectra = doc.get("Spectra") if isinstance(doc, dict) else None
    if not isinstance(spectra, list) or not spectra:
        return None
    return spectra


__all__ = ["Ledger", "SimJob", "Slot", "load_pico", "iso"]
