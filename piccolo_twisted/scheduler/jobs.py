"""Jobs: when each is due, running it, catch-up, and each slot's outcome.

A job's slots are its times: ``start_time`` for a one-off job, the grid
``start_time + k * interval`` up to ``end_time`` for a repeating one.
``next_time`` is the first slot not yet decided. Every slot ends as one
entry of the history:

- ``done``: its batch (or power change) ran to the end;
- ``failed``: it ran and did not complete (the reason says why: no
  spectrometer, a full disk, an abort, the server stopping under it);
- ``missed``: it never started, with the reason (the server was not
  running, quiet time, the instrument was busy, the wall clock jumped past
  it, the job was suspended or deleted).

The catch-up rule: a due slot waits -- for the quiet time to end, for the
instrument's lease (a batch running, a power change, start-up) -- and runs
once as soon as it can, if that is within ``catch_up`` seconds of its
time; otherwise it is missed. When a later slot of the same job comes due
while one waits, the earlier one is missed (runs are not stacked up).

Order, so that no slot is lost or run twice across a crash: the lease is
taken first; then the start is committed (the job's next slot and a
``running`` record, one transaction); only then does the batch start; its
outcome and the removal of the ``running`` record are committed together.
A process that dies mid-batch leaves the ``running`` record, which the
next start turns into a ``failed`` entry. A miss advances ``next_time``
in the same transaction that records it.
"""

from twisted.internet import defer
from twisted.logger import Logger

from ..errors import PiccoloError
from .calendar import due_slots, iso
from .database import Outcome

#: a slot counts as on time this long after it (a timer's jitter)
GRACE = 1.0
#: at most this many missed slots of one job are recorded one by one; the
#: older ones of a longer gap are summed up in one entry
MAX_MISSES_AT_ONCE = 100
#: seconds before a start that could not be committed is tried again
START_RETRY = 30.0


class Jobs:
    log = Logger()

    def __init__(self, store, control, lease, clock, wall, quiet_now, catch_up,
                 changed):
        self.store = store
        self.control = control
        self.lease = lease
        self.clock = clock
        self.wall = wall
        self.quiet_now = quiet_now          # wall time -> in quiet time now?
        self.catch_up = float(catch_up)
        self.changed = changed              # the listing changed
        self.started_wall = None            # when this process began serving
        self.jumped_at = None               # (wall before, wall after) of the last jump forward
        self.waiting = {}                   # job id -> why its due slot waits
        self._active = None                 # (job id, slot) starting or running
        self._take = None                   # the lease, asked for
        self._retry_at = None               # clock time a failed start is tried again
        self._earliest = None
        self.stopped = True

    # -- deciding -------------------------------------------------------------

    def invalidate(self):
        """The jobs changed: the earliest slot is looked for again."""
        self._earliest = None

    def earliest(self):
        """The earliest undecided slot of any active job (cached)."""
        if self._earliest is None:
            self._earliest = min((j.next_time for j in self.store.jobs.values()
                                  if j.status == "active"), default=float("inf"))
        return self._earliest

    def _due(self, now):
        if now < self.earliest():
            return []
        active = self._active
        return sorted((j for j in self.store.jobs.values()
                       if j.status == "active" and j.next_time <= now
                       # its start is being committed
                       and not (active is not None and active[0] == j.id
                                and j.next_time <= active[1])),
                      key=lambda j: (j.next_time, j.id))

    def evaluate(self, now):
        """Decide every slot due at ``now``: misses are recorded; the first
        slot that may run asks for the lease (and starts when it has it)."""
        runnable = []
        for job in self._due(now):
            slot = self._settle(job, now)
            if slot is not None:
                runnable.append((job, slot))
        self._dispatch(runnable, now)

    def _settle(self, job, now):
        """Record the slots of ``job`` up to ``now`` that can no longer run;
        the latest one if it still may, else None."""
        first, count, last = due_slots(job.next_time, job.interval, job.end_time, now)
        if count == 0:
            self._finish(job, "no slot left before its end")
            return None
        missed = count - 1
        if now - last > self.catch_up + GRACE:
            missed = count
        if missed:
            self._miss(job, first, missed, self._why(job, first, now), now)
        return None if missed == count else last

    def _why(self, job, slot, now):
        reason = self.waiting.pop(job.id, None)
        if reason is not None:
            return reason
        if self.started_wall is not None and slot < self.started_wall:
            return "the server was not running"
        if self.jumped_at is not None and self.jumped_at[0] < slot <= self.jumped_at[1]:
            return "the wall clock jumped past it"
        return f"not started within the catch-up of {self.catch_up:g} s"

    def _next_after(self, job, slot):
        if not job.interval:
            return None
        nxt = slot + job.interval
        if job.end_time is not None and nxt > job.end_time:
            return None
        return nxt

    def _advance_statements(self, job, nxt):
        if nxt is None:
            return [("DELETE FROM jobs WHERE id = ?", (job.id,))]
        return [("UPDATE jobs SET next_time = ? WHERE id = ?", (nxt, job.id))]

    def _advance(self, job, nxt):
        """Memory: ``job`` moves on to ``nxt`` (None: it is over)."""
        if nxt is None:
            if self.store.let_go(job.id) is not None:
                self.log.info("job {id} done", id=job.id)
        else:
            job.next_time = nxt
        self.changed()

    @staticmethod
    def _missed(job, first, count, reason):
        """The outcomes of ``count`` missed slots from ``first``: one each,
        the oldest of a long gap summed up in one."""
        step = job.interval or 0.0
        outcomes = []
        start = 0
        if count > MAX_MISSES_AT_ONCE:
            start = count - MAX_MISSES_AT_ONCE + 1
            outcomes.append(Outcome(job.id, first, "missed",
                                    f"{reason} (with the {start - 1} slots after it, "
                                    f"to {iso(first + (start - 1) * step)})",
                                    job.run, None))
        outcomes.extend(Outcome(job.id, first + i * step, "missed", reason, job.run, None)
                        for i in range(start, count))
        return outcomes

    def _miss(self, job, first, count, reason, now):
        """Record ``count`` slots from ``first`` as missed and move on."""
        last = first + (count - 1) * (job.interval or 0.0)
        nxt = self._next_after(job, last)
        outcomes = self._missed(job, first, count, reason)
        self.log.warn("job {id}: {n} slot{s} missed ({first}{to}): {reason}", id=job.id,
                      n=count, s="s" if count > 1 else "", first=iso(first),
                      to=f" to {iso(last)}" if count > 1 else "", reason=reason)
        statements = []
        for outcome in outcomes:
            self.store.remember(outcome)
            statements += self.store.outcome_statements(outcome)
        statements += self._advance_statements(job, nxt)
        d = self.store.progress(statements, lambda: self._advance(job, nxt))
        d.addCallback(lambda _: [self.store.written(o) for o in outcomes])

    def _finish(self, job, why):
        self.log.info("job {id}: {why}", id=job.id, why=why)
        self.store.progress(self._advance_statements(job, None),
                            lambda: self._advance(job, None))

    def settle_for(self, job, now, reason):
        """A job about to be suspended or deleted: its due slots that have
        not started are missed for ``reason``. Returns ``(statements,
        outcomes)`` for the client's write (the caller remembers the
        outcomes once it is stored)."""
        if job.status != "active" or job.next_time > now or (
                self._active is not None and self._active[0] == job.id):
            return [], []
        first, count, last = due_slots(job.next_time, job.interval, job.end_time, now)
        outcomes = self._missed(job, first, count, reason) if count else []
        self.waiting.pop(job.id, None)
        statements = []
        for outcome in outcomes:
            statements += self.store.outcome_statements(outcome)
        return statements, outcomes

    # -- running -------------------------------------------------------------------

    def _dispatch(self, runnable, now):
        if self.stopped or not runnable:
            return
        ready = []
        quiet = None
        for job, slot in runnable:
            if not job.ignore_quiet:
                if quiet is None:
                    quiet = self.quiet_now(now)
                if quiet:
                    self.waiting[job.id] = "quiet time"
                    continue
            ready.append(job)
        if not ready:
            return
        if self._active is None and self._take is None and self._retry_in() is None:
            take = self._take = self.lease.take("a scheduled job")
            take.addCallback(self._granted)
            take.addErrback(lambda f: f.trap(defer.CancelledError))
        if self._active is not None:
            busy = f"job {self._active[0]}"
        elif self._take is not None:
            busy = self.lease.holder.value
        else:
            return
        for job in ready:
            if self._active is not None and job.id == self._active[0]:
                continue
            if busy == "start-up":
                self.waiting[job.id] = "the instrument was starting up"
            else:
                self.waiting[job.id] = f"the instrument was busy ({busy})"

    def _granted(self, token):
        """The lease is ours: start the first slot that may still run."""
        self._take = None
        if self.stopped:
            token.release()
            return
        now = self.wall()
        candidates = []
        for job in self._due(now):
            slot = self._settle(job, now)
            if slot is None:
                continue
            if not job.ignore_quiet and self.quiet_now(now):
                self.waiting[job.id] = "quiet time"
                continue
            candidates.append((job, slot))
        if not candidates:
            token.release()
            return
        job, slot = candidates[0]
        self._start(job, slot, token)

    def _start(self, job, slot, token):
        self._active = (job.id, slot)
        self.waiting.pop(job.id, None)
        nxt = self._next_after(job, slot)
        statements = (self._advance_statements(job, nxt)
                      + self.store.running_statements(job.id, slot, job.kind, job.run))
        self.log.info("running job {id} ({kind}) for its slot {slot}", id=job.id,
                      kind=job.kind, slot=iso(slot))
        d = self.store.write(statements, lambda: self._advance(job, nxt))

        def not_stored(f):
            f.trap(PiccoloError)
            self.store.running.pop((job.id, slot), None)
            self._active = None
            token.release()
            self.waiting[job.id] = f"the scheduler database failed ({f.value})"
            self._retry_at = self.clock.seconds() + START_RETRY
            self.log.error("job {id} not started: {why}", id=job.id, why=f.value)
            return None
        d.addCallbacks(lambda _: self._run(job, slot, token), not_stored)
        d.addErrback(lambda f: self.log.failure("starting job {id}", f, id=job.id))

    def _run(self, job, slot, token):
        self._retry_at = None
        try:
            if job.kind == "record":
                d = self.control.start_record(dict(job.args), lease=token)
            elif job.kind == "dark":
                d = self.control.start_dark(job.args["run"], lease=token)
            elif job.kind in ("power_on", "power_off"):
                d = self._power(job.kind, token)
            else:
                raise PiccoloError(f"unknown job kind {job.kind!r}")
        except Exception as e:
            token.release()
            if not isinstance(e, PiccoloError):
                self.log.failure("job {id} ({kind}) failed", id=job.id, kind=job.kind)
            d = defer.succeed(_Failed(f"{type(e).__name__}: {e}"
                                      if not isinstance(e, PiccoloError) else str(e)))
        d.addCallback(lambda outcome: self._ended(job, slot, outcome))
        d.addErrback(lambda f: self.log.failure("job {id} ended badly", f, id=job.id))

    def _power(self, kind, token):
        from .power import all_switched
        spectrometers = self.control.instrument.spectrometers
        on = kind == "power_on"

        def check(result):
            if all_switched(spectrometers, off=not on):
                return _Done()
            return _Failed(f"the spectrometers did not switch {'on' if on else 'off'}: "
                           f"{result}")

        def failed(f):
            return _Failed(f"power {'on' if on else 'off'} failed: {f.value}")

        def release(result):
            token.release()
            return result
        d = defer.maybeDeferred(spectrometers.power_on_all if on
                                else spectrometers.power_off_all)
        return d.addCallbacks(check, failed).addBoth(release)

    def _ended(self, job, slot, result):
        self._active = None
        ok = getattr(result, "ok", False)
        outcome = Outcome(job.id, slot, "done" if ok else "failed",
                          None if ok else (getattr(result, "reason", None)
                                           or "it did not complete"),
                          getattr(result, "run", None) or job.run,
                          getattr(result, "batch", None))
        self.log.info("job {id} slot {slot}: {outcome}{why}", id=job.id, slot=iso(slot),
                      outcome=outcome.outcome,
                      why=f" ({outcome.reason})" if outcome.reason else "")
        self.store.record(outcome, self.store.finished_statements(job.id, slot))
        self.changed()

    def recover(self):
        """Batches the previous process died in: failed."""
        for job_id, slot, kind, run in self.store.interrupted:
            outcome = Outcome(job_id, slot, "failed",
                              "the server stopped while it ran", run, None)
            self.log.warn("job {id}: the batch of its slot {slot} was cut short by the "
                          "server stopping", id=job_id, slot=iso(slot))
            self.store.record(outcome, self.store.finished_statements(job_id, slot))
        self.store.interrupted = []

    # -- timing --------------------------------------------------------------------

    def next_event(self, now):
        """The next wall time something is due: a slot, or a waiting
        slot's catch-up running out."""
        wait = self._retry_in()
        retry = now + wait if wait is not None else float("inf")
        t = self.earliest()
        if t > now:                         # nothing due: no scan of the jobs
            return min(t, retry)
        t = retry
        for job in self.store.jobs.values():
            if job.status != "active":
                continue
            if job.next_time > now:
                t = min(t, job.next_time)
            else:
                _, count, last = due_slots(job.next_time, job.interval, job.end_time, now)
                if count:
                    t = min(t, last + self.catch_up + GRACE + 1e-3)
                    if job.interval:
                        t = min(t, last + job.interval)
        return t

    def _retry_in(self):
        """Seconds until a start that could not be committed is tried
        again, or None."""
        if self._retry_at is None:
            return None
        wait = self._retry_at - self.clock.seconds()
        if wait <= 0:
            self._retry_at = None
            return None
        return wait

    def stop(self):
        self.stopped = True
        if self._take is not None:
            take, self._take = self._take, None
            take.cancel()


class _Done:
    ok = True
    reason = None


class _Failed:
    ok = False

    def __init__(self, reason):
        self.reason = reason
