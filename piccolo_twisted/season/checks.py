"""The season's checks: the named invariants (``invariants.py``) looked
at when something happens (a device call fails, a power switch turns, a
file is saved) and at regular moments (the history every hour, the power
window every 5 minutes, health three times a day, everything after every
restart and at the end).

A mixin of :class:`~.run.Season`: it reads the season's ledger, its
incarnation and the world's state of the hardware.
"""

import math
import os
import re
from datetime import datetime

from ..instrument.device import DeviceError
from ..instrument.spectrometer import CONNECTED
from .invariants import iso
from .ledger import load_pico
from .world import DAY

HOUR = 3600.0
MINUTE = 60.0
#: how a missed entry sums up the older slots of a long gap (jobs.py)
SUMMED_UP = re.compile(r"\(with the (\d+) slots after it, to [^)]*\)$")
#: a slot must be decided within this much server uptime after it is due
DECIDE_WITHIN = 3 * HOUR
#: how much later than its catch-up a batch may start: the scheduler's
#: grace, and the commit of its start (a slow commit takes up to 90 s)
LATE_SLACK = 1.0 + 90.0 + 1.0
#: power state must follow the window this long after it last changed
POWER_OFF_BOUND = 30 * MINUTE
POWER_ON_BOUND = 10 * MINUTE
#: a spectrometer plugged in or powered again is connected within this
#: (the reconnect tries every 5 s; opening it takes up to 3 s)
READY_GRACE = 30.0


class Checks:
    def device_error(self, fn, error):
        if not isinstance(error, DeviceError) or self.inc is None:
            return
        inc = self.inc
        # the simulated device names itself first in its errors
        serial = str(error).split(":", 1)[0]
        if serial not in self.serials:
            return
        drops = dict(inc.drops)
        self.world.at(self.t + 1.0, self._check_drop, inc, serial, drops, str(error))

    def _check_drop(self, inc, serial, drops, error):
        if inc is not self.inc:
            return
        failing = [s for s in [serial] if inc.drops[s] == drops[s]
                   and inc.spectrometers[s].status.value in CONNECTED
                   and not self.cable_in_and_powered(inc, s)]
        if failing:
            self.violation("device-fault-recorded",
                           f"a device call failed ({error}) and {failing} still "
                           "report connected")

    def cable_in_and_powered(self, inc, serial):
        return self.cable_in[serial] and inc.gpio.powered.get(serial, True)

    def outcome_recorded(self, inc, outcome):
        """A slot's outcome, the moment the scheduler records it: one that
        failed for want of a spectrometer while the world had every one of
        them plugged in and powered -- since this process started (the
        server must wait for the instrument at start-up), or long enough
        for it to connect them again -- is the server's fault."""
        if outcome.outcome != "failed" or "no spectrometer" not in (outcome.reason or ""):
            return
        now = inc.clock.seconds()
        for serial in self.serials:
            since = inc.gpio.ok_since.get(serial)
            if since is None:
                return
            if since > inc.booted_at + 1e-6 and now - since < READY_GRACE:
                return
        self.violation("jobs-wait-for-ready",
                       f"job {outcome.job} slot {iso(outcome.slot)} failed "
                       f"({outcome.reason}) {now - inc.booted_at:.1f} s after the "
                       f"server started, with every spectrometer plugged in and "
                       f"powered since " + ", ".join(
                           f"{s} {now - inc.gpio.ok_since[s]:.1f} s" for s in self.serials))

    def before_switch(self, serial, on):
        inc = self.inc
        if not on and inc is not None and inc.control.busy:
            self.violation("never-off-under-batch",
                           f"the power switch of {serial} turned off while control is "
                           f"{inc.control.status.value!r}")

    def file_saved(self, run, name, size):
        self._record_file(run, name)

    def _record_file(self, run, name):
        path = os.path.join(self.datadir, run, name)
        try:
            st = os.stat(path)
        except OSError as e:
            self.violation("files-intact", f"{run}/{name} was reported saved: {e}")
            return
        key = (run, name)
        known = self.ledger.files.get(key)
        if known is not None:
            if known[0] != st.st_ino or known[1] != st.st_size:
                self.violation("files-intact", f"{run}/{name} was overwritten")
            return
        # every file whole; one in twenty parsed to the end
        if load_pico(path, parse=len(self.ledger.files) % 20 == 0) is None:
            self.violation("files-intact", f"{run}/{name} is not a complete .pico file")
        self.ledger.add_file(run, name, st)

    def scan_disk(self, everything=False):
        """Files on disk the ledger has not seen (written just before a
        crash, their saving never reported): in the runs batches were
        started in since the last look (``everything``: in every run)."""
        runs = os.listdir(self.datadir) if everything else sorted(self.touched_runs)
        self.touched_runs = set()
        for run in runs:
            d = os.path.join(self.datadir, run)
            if run.startswith(".") or not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if name.endswith(".pico") and not name.startswith("."):
                    if (run, name) not in self.ledger.files:
                        self._record_file(run, name)


    # -- checks --------------------------------------------------------------------

    def check_acked(self, inc):
        ledger = self.ledger
        listing = {row[0]: row for row in self.listing(inc)}
        by_run = {row[1][1][0]: row for row in listing.values() if row[1][0] == "record"}
        resolved = []
        for job in ledger.jobs:
            row = listing.get(job.id) if job.id is not None else None
            if row is None and job.run is not None:
                row = by_run.get(job.run)
            elif row is None and job.id is None:
                # a power job: known by its kind and time
                row = next((r for r in listing.values() if r[1][0] == job.kind and abs(
                    datetime.fromisoformat(r[2]).timestamp() - job.start) < 1e-3), None)
            if row is not None:
                ledger.learn_id(job, row[0])
            if job.uncertain or job.state == "pending":
                # a write was unanswered: the file says what happened
                resolved.append(job)
                if row is None:
                    if job.state == "pending":
                        job.state = "deleted"
                    elif job.state in ("active", "suspended"):
                        job.state = "deleted"       # a delete went through
                elif row[5] == "active" and job.state == "suspended":
                    # an unsuspend unanswered at the crash went through: the
                    # job goes on from its next slot after the server's wall
                    # clock when it was asked, as an answered one does (not
                    # from where it was suspended: after a reboot with the
                    # clock behind, NTP's step made those slots due)
                    ledger.resumed(job, job.resume_wall if job.resume_wall is not None
                                   else inc.wall())
                elif row[5] == "suspended" and job.state == "active":
                    ledger.suspended(job)
                else:
                    job.state = row[5]
                job.uncertain = True
                continue
            if job.state not in ("active", "suspended") or job.cursor is None:
                continue
            if row is None:
                self.violation("acked-durable", f"job {job.id} ({job.kind} {job.run}) "
                                                "is gone after a restart")
                return
            if row[5] != job.state:
                self.violation("acked-durable", f"job {job.id} is {row[5]} after a restart, "
                                                f"was acknowledged {job.state}")
                return
            start = datetime.fromisoformat(row[2]).timestamp()
            if abs(start - job.start) > 1e-3 or (row[4] or None) != job.interval:
                self.violation("acked-durable", f"job {job.id} changed across a restart: {row}")
                return
        # the slots passed meanwhile are the uncertain jobs' to run or not
        ledger.pass_time(inc.wall(), self.t, self.stalled())
        for job in resolved:
            job.uncertain = False
        for key, value in ledger.settings.items():
            actual = inc.resource("control/scheduler", key).get()
            possible = ledger.uncertain_settings.get(key, {value})
            if actual not in possible:
                self.violation("acked-durable", f"setting {key} is {actual!r} after a "
                                                f"restart, acknowledged {value!r}")
                return
            ledger.settings[key] = actual
        ledger.uncertain_settings.clear()

    def check_slots(self, final=False):
        """Outcomes read from the durable history (or, without one, the
        batches on disk) against the slots the jobs passed."""
        ledger = self.ledger
        inc = self.inc
        if inc is None:
            return                  # looked at when the server is back
        if self.history:
            path = inc.scheduler.path
            for row in ledger.read_history(path):
                self._history_entry(*row)
                if self.stopped:
                    return
        uptime_now = self.t - self.stalled()
        wall = inc.wall()
        still = []
        for slot in ledger.open_slots:
            if slot.outcome is not None or not slot.required:
                continue
            if wall is not None and wall < slot.time:
                # the wall clock went back before it: due again when it
                # comes round (the server cannot know the earlier time was
                # wrong), if the job is still there then
                slot.again = True
                if slot.job.state in ("active", "finished"):
                    still.append(slot)
                continue
            if getattr(slot, "again", False) and slot.job.state not in ("active", "finished"):
                continue
            if getattr(slot, "again", False) and wall is not None:
                slot.again = False
                slot.since = (self.t, self.stalled())
            since_true, since_stall = getattr(slot, "since", (slot.due_true,
                                                              slot.downtime_at_due))
            up = uptime_now - (since_true - since_stall)
            if not self.history:
                still.append(slot)
                continue
            if up >= DECIDE_WITHIN or final:
                self.violation("slot-accounted",
                               f"job {slot.job.id} ({slot.job.kind} {slot.job.run}) slot "
                               f"{iso(slot.time)} has no outcome {up / HOUR:.1f} h of "
                               "server time after it was due")
                return
            still.append(slot)
        ledger.open_slots = still
        if not self.history:
            self._check_batches_on_disk(uptime_now, final)

    def wall_went_back(self):
        """The wall clock was set (a jump, NTP, a boot with a wrong clock):
        the open slots it is now before are due again when it comes round
        -- the server cannot know the earlier time was wrong -- if their
        job is still there then (a job suspended or deleted meanwhile
        never reaches them). Marked now, not at the next hourly look,
        which may come after the clock has passed them again."""
        wall = self.wall()
        if wall is None:
            return
        for slot in self.ledger.open_slots:
            if slot.outcome is None and slot.required and wall < slot.time:
                slot.again = True

    def _check_batches_on_disk(self, uptime_now, final):
        """Without a history the only record of a slot is its batch."""
        for job in self.ledger.jobs:
            if job.kind != "record" or not job.slots:
                continue
            due = [s for s in job.slots.values() if s.required and (
                final or uptime_now - (s.due_true - s.downtime_at_due) >= DECIDE_WITHIN)]
            if not due:
                continue
            batches = self.ledger.batches.get(job.run, {})
            if len(batches) < len(due):
                self.violation("slot-accounted",
                               f"job {job.id} (run {job.run}) passed {len(due)} slots "
                               f"({', '.join(iso(s.time) for s in sorted(due, key=lambda s: s.time)[-4:])}"
                               f"{', ...' if len(due) > 4 else ''}) but {len(batches)} "
                               "batches are on disk and nothing records the others")
                return
            if len(batches) > len(job.slots):
                self.violation("slot-accounted",
                               f"job {job.id} (run {job.run}) has {len(batches)} batches "
                               f"on disk for {len(job.slots)} slots")
                return

    def _history_entry(self, hid, job_id, slot_time, outcome, reason, run, batch):
        ledger = self.ledger
        job = ledger.by_id.get(job_id)
        if job is None and run is not None:
            job = ledger.by_run.get(run)
            if job is not None:
                ledger.learn_id(job, job_id)
        if job is None:
            self.violation("slot-accounted", f"history entry {hid} names job {job_id}, "
                                             "which no client created")
            return
        slot = ledger.slot(job, slot_time)
        if slot is None:
            why = ("is not one of its slots" if not job.grid(slot_time)
                   else "was never reached while the job was live")
            self.violation("slot-accounted", f"history entry {hid}: job {job_id} slot "
                                             f"{iso(slot_time)} {why}")
            return
        if slot.outcome is not None:
            self.violation("slot-accounted", f"job {job_id} slot {iso(slot_time)} recorded "
                                             f"twice: {slot.outcome}, then {outcome}")
            return
        if outcome not in ("done", "missed", "failed"):
            self.violation("slot-accounted", f"history entry {hid}: outcome {outcome!r}")
            return
        if outcome != "done" and not reason:
            self.violation("slot-accounted", f"job {job_id} slot {iso(slot_time)} "
                                             f"{outcome} without a reason")
            return
        slot.outcome, slot.reason, slot.run, slot.batch = outcome, reason, run, batch
        ledger.outcomes[outcome] += 1
        ledger.decided.append((slot_time, outcome))
        gap = SUMMED_UP.search(reason or "") if outcome == "missed" else None
        if gap is not None and job.interval:
            # a long gap: its older slots summed up in this one entry (API.md)
            for i in range(1, int(gap.group(1)) + 1):
                later = ledger.slot(job, slot_time + i * job.interval)
                if later is not None and later.outcome is None:
                    later.outcome, later.reason = outcome, reason
                    ledger.outcomes[outcome] += 1
        if job.kind != "record":
            return
        if outcome == "done":
            names = ledger.batches.get(run, {}).get(batch)
            if not names:
                self.touched_runs.add(run)
                self.scan_disk()
                names = ledger.batches.get(run, {}).get(batch)
            if not names:
                self.violation("files-intact", f"job {job_id} slot {iso(slot_time)} is done "
                                               f"as batch {batch} of run {run}, which has "
                                               "no file on disk")
                return
        if outcome in ("done", "failed") and run is not None:
            starts = self.batch_starts.get(run, [])
            start = next(((t, w) for t, w in starts if t >= slot.due_true - 1e-6), None)
            if start is None:
                if outcome == "done":
                    self.violation("timers-on-wall-time", f"job {job_id} slot "
                                   f"{iso(slot_time)} is done but no batch of run {run} "
                                   "started after it was due")
                return
            starts.remove(start)
            t, wall = start
            if self.verbose:
                self.note(f"slot {iso(slot_time)} of job {job_id} ({run}): started at "
                          f"{iso(wall)} (due since day {(slot.due_true - self.start) / DAY:.4f})")
            if wall < slot_time - 1e-3:
                self.violation("timers-on-wall-time", f"job {job_id} slot {iso(slot_time)} "
                               f"started early, at wall time {iso(wall)}")
            elif wall - slot_time > self.catch_up + LATE_SLACK:
                self.violation("timers-on-wall-time", f"job {job_id} slot {iso(slot_time)} "
                               f"started {wall - slot_time:.0f} s late (catch-up "
                               f"{self.catch_up} s)")

    # -- the power window ------------------------------------------------------------

    def power_disturbed(self):
        self.power_since = self.t
        self.power_wanted = None

    def user_power(self, on):
        """An operator (or a power job) switched the spectrometers: that
        is their wish until the window has changed once (on) or twice (off)."""
        self.user_excuse = 1 if on else 2
        self.power_since = self.t
        inc = self.inc
        if inc is not None and inc.started:
            # a window change before the operator's action is not one after it
            self.power_wanted = self.window_wants_off(inc, inc.wall())

    def live_power_jobs(self):
        live = []
        for job in self.power_jobs:
            if job.state in ("active", "pending", "suspended") and job.cursor is not None:
                live.append(job)
            else:
                # deleted (by the operator or any client): what it last did
                # stays the operator's wish for a while
                self.user_power(job.kind == "power_on")
        self.power_jobs = live
        return bool(live)

    def window_wants_off(self, inc, wall):
        get = lambda key: inc.resource("control/scheduler", key).get()
        if not (get("quietTimeEnabled") and get("powerOffEnabled")):
            return False
        delay = get("powerDelay")
        start, end = quiet_window(wall, get("quietStart"), get("quietEnd"))
        if end - start <= 2 * delay:
            return False
        return start + delay <= wall < end - delay

    def check_power(self):
        inc = self.inc
        if inc is None or not inc.started:
            return
        wanted_off = self.window_wants_off(inc, inc.wall())
        if self.live_power_jobs():
            self.power_disturbed()
            return
        if wanted_off != self.power_wanted:
            if self.power_wanted is not None and self.user_excuse:
                self.user_excuse -= 1
            self.power_wanted = wanted_off
            self.power_since = self.t
            return
        if self.user_excuse:
            return
        if (self.switch_fault or self.t < self.slow_reads_until
                or (wanted_off and self.disk.full)):
            # a switch that fails; a read still running (a power change
            # answers busy); off waits until it can be recorded (else a
            # restart would never switch them on again): the bound starts
            # when that is over
            self.power_since = self.t
            return
        bound = POWER_OFF_BOUND if wanted_off else POWER_ON_BOUND
        if self.t - self.power_since < bound:
            return
        wrong = [s for s in self.serials if inc.gpio.powered.get(s, True) == wanted_off]
        if wrong:
            self.violation("power-follows-window",
                           f"{', '.join(wrong)} {'on' if wanted_off else 'off'} "
                           f"{(self.t - self.power_since) / MINUTE:.0f} min after the "
                           f"window wanted them {'off' if wanted_off else 'on'}")

    # -- health -------------------------------------------------------------------

    def check_health(self):
        inc = self.inc
        if inc is None or not inc.started:
            return
        d = inc.service.health.refresh()

        def compare(value):
            if inc is not self.inc:
                return
            now = datetime.fromisoformat(value["time"]).timestamp()
            day_start = datetime.fromtimestamp(now).astimezone().replace(
                hour=0, minute=0, second=0, microsecond=0).timestamp()
            on_disk = self.ledger.files_between(day_start, now)
            if value["files_today"] != on_disk:
                self.violation("health-matches-disk",
                               f"files_today {value['files_today']}, but {on_disk} "
                               f"spectrum files on disk are from {iso(day_start)} to "
                               f"{iso(now)}")
                return
            store = inc.scheduler.store
            if not store.settled:
                return              # the file is behind memory (a full disk)
            for row in self.ledger.read_history(inc.scheduler.path):
                self._history_entry(*row)
            if self.stopped:
                return
            durable = {"missed": 0, "failed": 0}
            for slot_time, outcome in self.ledger.decided:
                if now - 86400 < slot_time <= now and outcome in durable:
                    durable[outcome] += 1
            shown = {"missed": value["slots_missed_24h"], "failed": value["slots_failed_24h"]}
            if shown != durable:
                self.violation("health-matches-disk",
                               f"slots missed/failed in the 24 h to {iso(now)}: health says "
                               f"{shown}, the history in the file {durable}")
        d.addCallback(compare)
        d.addErrback(lambda f: self.violation("health-matches-disk",
                                              f"/sysinfo/health failed: {f.value!r}"))

    # -- final --------------------------------------------------------------------

    def final_checks(self):
        if self.stopped:
            return
        # a last look: everything due long enough ago must be decided
        if self.inc is not None:
            self.check_slots()
        if self.stopped:
            return
        self.scan_disk(everything=True)
        for (run, name), (ino, size, _) in self.ledger.files.items():
            try:
                st = os.stat(os.path.join(self.datadir, run, name))
            except OSError as e:
                self.violation("files-intact", f"{run}/{name} is gone: {e}")
                return
            if st.st_ino != ino or st.st_size != size:
                self.violation("files-intact", f"{run}/{name} was overwritten")
                return


def quiet_window(now, start, end):
    """The quiet window (start, end) containing ``now`` or the next one, as
    docs/API.md defines it: "HH:MM:SS+zzzz" times, a window across midnight
    is one window. Written here again, apart from the scheduler's, so the
    check does not trust the code it checks."""
    def parse(text):
        hh, mm, ss = int(text[0:2]), int(text[3:5]), int(text[6:8])
        sign = -1 if text[8] == "-" else 1
        offset = sign * (int(text[9:11]) * 3600 + int(text[11:13]) * 60)
        return hh * 3600 + mm * 60 + ss, offset
    (s, s_off), (e, e_off) = parse(start), parse(end)
    # local midnight (in the start time's offset) of the day before now
    day = math.floor((now + s_off) / DAY) * DAY - s_off
    for shift in (-1, 0, 1):
        w_start = day + shift * DAY + s
        # the end on the same local date in its own offset, then after the start
        w_end = day + shift * DAY + s_off - e_off + e
        while w_end <= w_start:
            w_end += DAY
        if now < w_end:
            return w_start, w_end
    raise AssertionError("no window")
