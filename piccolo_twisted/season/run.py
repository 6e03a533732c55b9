"""A season: the real server components living through simulated days.

Each life of the server process is an :class:`Incarnation`: a
``PiccoloService`` built from the configuration and the data directory on
disk (a real SQLite file, real spectrum files), on its own ``task.Clock``,
with its blocking calls run in simulated time (:mod:`.simio`). A crash
drops the incarnation with its clock: every timer, every call not yet run
or not yet answered dies with it, as with ``kill -9``; the next one starts
from what is on disk.

The season advances the world's time from event to event -- the next
timer of the running incarnation or the next event of the world -- so a
quiet simulated day costs only what happens in it.
"""

import gc
import math
import os
import shutil
import sys
import tempfile
import types
from datetime import datetime, timezone

from twisted.internet import defer, task
from twisted.logger import globalLogPublisher

from ..acquisition import pico
from ..config import load_instrument_config, load_server_config
from ..errors import PiccoloError
from ..instrument.simulator import SimulatedBus
from ..instrument.spectrometer import DROPPED, POWERED_OFF
from ..service import PiccoloService, Workers
from .checks import Checks
from .invariants import Violation, iso
from .ledger import Ledger
from .simio import (DiskWrites, SimCrash, SimGPIO, SimThreads, SimWall, failing_fsync,
                    full_disk_connect)
from .world import DAY, FAULTS, World, log_uniform

HOUR = 3600.0
MINUTE = 60.0
#: the world's calendar starts in 2012 (+ up to a year, by seed): ten
#: simulated years still end before the real clock, which stamps the run
#: directories (the spectrum files get the simulated time)
EPOCH = datetime(2012, 1, 1, tzinfo=timezone.utc).timestamp()

def instrument_text(tec):
    """The simulated instrument: two spectrometers behind power switches,
    generic 1024-pixel ones; with ``tec`` the first is a QE Pro-like one
    with a cooler, whose temperature the server reads every 10 s: 8,640
    device calls a simulated day, which triple a season's time."""
    first = "sim_QEP00981" if tec else "sim_GEN00017"
    return f"""
[channels]
  [[shutter_1]]
    direction = upwelling
  [[shutter_2]]
    direction = downwelling
[spectrometers]
  [[{first}]]
    detectorSetTemperature = -10.0
    fan = {tec}
    power_switch = 20
    min_integration_time = 8
    max_integration_time = 2000
  [[sim_GEN00042]]
    power_switch = 21
    min_integration_time = 3
    max_integration_time = 2000
[output]
  split = True
"""




class Disk:
    full = False


class Incarnation:
    """One life of the server process."""

    def __init__(self, season, number, wall_offset):
        self.season = season
        self.number = number
        self.clock = task.Clock()
        self.clock.advance(season.t)
        self.wall = SimWall(self.clock, wall_offset)
        rng = season.world.rng(f"io-{number}")
        # opening a spectrometer (USB enumeration, reading its EEPROM) takes
        # a while; everything else the simulated device's own time
        self.devices = SimThreads(self.clock, cost=lambda fn: rng.uniform(0.3, 3.0)
                                  if getattr(fn, "__name__", "") == "_open" else 0.0)
        self.devices.on_error = season.device_error
        self.files = SimThreads(self.clock, before=lambda: rng.uniform(0.001, 0.005))
        self.db = SimThreads(self.clock, serial=True, before=season.commit_time,
                             after=lambda: 0.001)
        self.db.on_call = None
        self.db.watch = lambda now, run_at: season.commit_started(self, now, run_at)
        self.compute = SimThreads(self.clock)
        self.gpio = SimGPIO(season.power_pins, plugged=lambda s: season.cable_in[s],
                            failing=lambda s: season.switch_fault,
                            before_switch=season.before_switch,
                            now=self.clock.seconds)
        self.booted_at = self.clock.seconds()
        self.bus = SimulatedBus(time_scale=1.0, time_source=self.devices)
        for serial in season.serials:
            device = self.bus.device(serial)
            device.read_delay = season.read_delay
            self.gpio.attach(serial, device)
        workers = Workers(devices=self.devices, files=self.files,
                          database=self.db, compute=self.compute,
                          connect=full_disk_connect(season.disk))
        self.service = PiccoloService(
            season.settings, season.instrument, clock=self.clock,
            configure_logging=False, time_scale=1.0, wall=self.wall,
            workers=workers, bus=self.bus, gpio=self.gpio, serve=False)
        season._booting = self
        self.service.datadir.write_file = season.file_writer(self.wall)
        self.service.datadir.pause = lambda seconds: None
        self.control = self.service.control
        self.scheduler = self.service.scheduler
        self.spectrometers = {s.serial: s for s in self.service.instrument.spectrometers}
        self.drops = {s: 0 for s in season.serials}
        for s in self.spectrometers.values():
            s.status.watch(lambda status, s=s: self._status(s, status))
        self.control.status.watch(self._control_status)
        self.service.datadir.save_listeners.append(season.file_saved)
        self.started = False
        # the history as a client observing it sees it, outcome by outcome
        self._seen = None
        store = getattr(self.scheduler, "store", None)
        if store is not None:
            store.history_changed.watch(lambda _: self._history_changed(store))

    def _history_changed(self, store):
        last = store.history[-1] if store.history else None
        if last is self._seen:
            return
        self._seen = last
        if self.started and last is not None and self.season.inc is self:
            self.season.outcome_recorded(self, last)

    def _status(self, spectrometer, status):
        if status == DROPPED:
            self.drops[spectrometer.serial] += 1
        if status == POWERED_OFF and self.control.busy:
            self.season.violation("never-off-under-batch",
                                  f"{spectrometer.name} POWERED_OFF while control is "
                                  f"{self.control.status.value!r}")

    def _control_status(self, status):
        self.season.control_status(self, status)

    def start(self):
        self.service.privilegedStartService()
        self.season.after_open(self)
        self.service.startService()
        self.started = True

    def resource(self, component, path):
        return self.service.components[component][path]

    def close_database(self):
        """What the OS does to a killed process's files: the connection
        goes (nothing uncommitted survives; SQLite's WAL is left as is)."""
        for holder in (self.scheduler, getattr(self.scheduler, "store", None)):
            db = getattr(holder, "_db", None) if holder is not None else None
            if db is not None:
                try:
                    db.close()
                except Exception:
                    pass


class Season(Checks):
    def __init__(self, days, seed, faults=tuple(FAULTS), root=None, verbose=False,
                 out=None, keep_going=False, tec=False):
        self.days = days
        self.seed = seed
        self.faults = set(faults)
        self.verbose = verbose
        self.out = out
        self.keep_going = keep_going
        self.world = World(seed)
        rng = self.world.rng("calendar")
        self.start = EPOCH + math.floor(rng.uniform(0, 365)) * DAY + rng.randrange(86400)
        self._t = self.start
        self.end = self.start + days * DAY
        self.catch_up = rng.choice([600] * 6 + [0, 60, 3600])
        self._own_root = root is None
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.root = root or tempfile.mkdtemp(prefix="piccolo-season-", dir=base)
        self.datadir = os.path.join(self.root, "data")
        os.makedirs(self.datadir, exist_ok=True)
        self.settings = load_server_config(text=self._server_config())
        self.settings.datadir = self.datadir
        self.tec = tec
        self.instrument = load_instrument_config(text=instrument_text(self.tec))
        first = self.instrument.spectrometers[0].serial
        self.power_pins = {20: first, 21: "sim_GEN00042"}
        self.serials = [first, "sim_GEN00042"]
        self.ledger = Ledger(self)
        self.inc = None
        self.incarnations = 0
        self.violations = []
        self.counts = {k: 0 for k in FAULTS}
        self.requests = {"acked": 0, "refused": 0, "unanswered": 0}
        # the world's state of the hardware
        self.cable_in = {s: True for s in self.serials}
        self.switch_fault = False
        self.read_delay = 0.0
        self.disk = Disk()
        self.slow_commit = False
        self.downtime = 0.0
        self.down_since = None
        # time in which nothing can be made durable (server down, disk full)
        self._stall_total = 0.0
        self._stall_mark = self.t
        self._stalling = False
        self.last_wall = None
        self.pending = {}              # request number -> what it changes
        self.memory_only = []          # acknowledged while the scheduler had no file
        self.power_jobs = []           # the power jobs that may still be live
        self.touched_runs = set()      # runs batches started in since the last scan
        self._request = 0
        self.batch_starts = {}         # run -> [(true, wall)]
        self.power_since = self.start  # the window's wanted state held since
        self.power_wanted = None
        self.user_excuse = 0           # window changes a user's power action excuses
        self.slow_reads_until = 0.0
        self.armed = None              # a crash waiting for its moment
        self.aim_commits = (0.0, 0.0, 0)  # commits starting then are aimed at
        self.history = None            # the scheduler keeps a history (feature)
        self.job_seq = 0
        self.stopped = False
        self._observer = None

    # -- configuration ----------------------------------------------------------

    def _server_config(self):
        from ..config import SERVER_SPEC
        text = "[datadir]\ndatadir = data\n"
        if "[scheduler]" in SERVER_SPEC:
            text += f"[scheduler]\ncatch_up = {self.catch_up}\n"
        return text

    def commit_time(self):
        """How long the next SQLite commit takes."""
        rng = self.world.rng("commit")
        if self.slow_commit:
            return log_uniform(rng, 1.0, 90.0)
        return rng.uniform(0.002, 0.02)

    def file_writer(self, wall):
        """The data directory's atomic writer, on a disk that can be full,
        stamping files with the simulated wall clock as the kernel would."""
        fsync = failing_fsync(self.disk)
        inc = self._booting

        def tear():
            if self.armed != "write" or self.inc is not inc:
                return False
            # the process dies in the middle of this write
            self.armed = None
            self.note("crash in the middle of a spectrum file's write()")
            self.crash()
            return True

        def write(directory, name, data, clobber=False):
            with DiskWrites(self.disk, tear, alive=lambda: self.inc is inc):
                pico.write_atomic(directory, name, data, clobber, fsync=fsync)
            t = wall()
            os.utime(name, (t, t), dir_fd=directory, follow_symlinks=False)
        return write

    # -- time ------------------------------------------------------------------

    @property
    def t(self):
        """The world's time: the running server's clock (also in the middle
        of advancing it), else the last event's."""
        inc = self.inc
        return inc.clock.seconds() if inc is not None else self._t

    @t.setter
    def t(self, value):
        self._t = value

    @property
    def day(self):
        return (self.t - self.start) / DAY

    def wall(self):
        return self.inc.wall() if self.inc is not None else None

    def _unraisable(self, info):
        """A crash leaves the dead server's coroutines to the garbage
        collector, which closes them: their ``finally`` blocks then run on
        a dead reactor (closed pins, a clock nobody advances), and what
        they raise is nobody's. Anything else goes to Python's hook."""
        if isinstance(info.object, types.CoroutineType):
            self.dead_coroutines += 1
            return
        self._previous_unraisable(info)

    def run(self):
        self._observer = self._log_observer
        globalLogPublisher.addObserver(self._observer)
        self.dead_coroutines = 0
        self._previous_unraisable = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        try:
            self._schedule_world()
            self.boot()
            while not self.stopped:
                inc = self.inc
                t_world = self.world.next_time()
                calls = inc.clock.calls if inc is not None else ()
                t_clock = calls[0].getTime() if calls else math.inf
                t = min(t_world, t_clock, self.end)
                if t >= self.end and t_world > self.end and t_clock > self.end:
                    self._advance(self.end)
                    break
                self._advance(t)
                if t_world <= t:
                    action, args = self.world.pop()
                    action(*args)
            self.final_checks()
        finally:
            # the dead processes' coroutines are closed now, while the hook
            # that knows them is in place
            self.world._queue.clear()
            self.inc = self._booting = None
            gc.collect()
            globalLogPublisher.removeObserver(self._observer)
            sys.unraisablehook = self._previous_unraisable
        return self

    def _advance(self, t):
        inc = self.inc
        try:
            if inc is not None and t > inc.clock.seconds():
                inc.clock.advance(t - inc.clock.seconds())
            elif inc is not None:
                inc.clock.advance(0)
        except SimCrash:
            pass                # the process died mid-call: it is gone
        self._t = max(self._t, t)
        if inc is not None and self.inc is inc:
            wall = inc.wall()
            self.last_wall = wall
            self.ledger.pass_time(wall, self.t, self.stalled())

    def _log_observer(self, event):
        from twisted.logger import formatEvent
        if str(event.get("log_format", "")).startswith("Unhandled error in Deferred"):
            failure = event.get("log_failure") or event.get("failure")
            self.violation("errors-handled", "Unhandled error in Deferred: " + (
                f"{failure.type.__name__}: {failure.getErrorMessage()}"
                if failure is not None else "(no failure in the event)"))
        if not self.verbose:
            return
        text = formatEvent(event)
        level = event.get("log_level")
        failure = event.get("log_failure")
        if failure is not None:
            text += f": {failure.getErrorMessage()}"
        wall = self.wall()
        print(f"[day {self.day:8.4f} wall {iso(wall)}] {level.name if level else ''} "
              f"{text}", file=self.out)

    def note(self, text):
        if self.verbose:
            print(f"[day {self.day:8.4f} wall {iso(self.wall())}] SEASON {text}", file=self.out)

    def stalled(self):
        """Seconds so far in which the server could make nothing durable."""
        return self._stall_total + (self.t - self._stall_mark if self._stalling else 0.0)

    def stall_changed(self):
        """Call after the server went down or up, or the disk filled or
        emptied."""
        self._stall_total = self.stalled()
        self._stall_mark = self.t
        self._stalling = self.inc is None or self.disk.full

    # -- violations --------------------------------------------------------------

    def violation(self, name, detail):
        v = Violation(name, detail, self.day, self.t, self.wall())
        self.violations.append(v)
        self.note(f"violation {name}: {detail}")
        if not self.keep_going:
            self.stopped = True

    # -- the server's lives -------------------------------------------------------

    def boot(self, wall_offset=0.0):
        self.incarnations += 1
        if self.down_since is not None:
            self.downtime += self.t - self.down_since
            self.down_since = None
        inc = Incarnation(self, self.incarnations, wall_offset)
        self.inc = inc
        self.stall_changed()
        self.note(f"boot #{inc.number}, wall clock {iso(inc.wall())}")
        self.history = hasattr(inc.scheduler, "history")
        self.wall_went_back()
        inc.start()
        self.power_disturbed()
        if "clock" in self.faults:
            rng = self.world.rng("clock-back-at-boot")
            if rng.random() < 0.3:
                from .actions import clock_back_after_boot
                self.world.at(self.t + rng.uniform(MINUTE, 30 * MINUTE),
                              clock_back_after_boot, self, inc)

    def crash(self):
        inc = self.inc
        if inc is None:
            return
        self.counts["crash"] += 1
        self.note(f"crash (control {inc.control.status.value!r}, "
                  f"{inc.db.running} SQLite calls in flight)")
        self._t = inc.clock.seconds()
        self.inc = None
        self.down_since = self.t
        self.stall_changed()
        inc.close_database()
        self.armed = None
        # what went unhandled in a Deferred is logged when the Deferred is
        # collected: collected here too, so that it is seen at the same
        # simulated moments whatever the process did before (an in-process
        # test, a replay)
        gc.collect()
        for number, what in self.pending.items():
            what["uncertain"] = True
            job = what.get("job")
            if job is not None:
                job.uncertain = True
            key = what.get("setting")
            if key is not None:
                self.ledger.uncertain_settings.setdefault(
                    key, {self.ledger.settings.get(key, what["old"])}).add(what["value"])
        self.pending = {}
        if getattr(inc.scheduler, "degraded", False):
            for what in self.memory_only:
                job = what.get("job")
                if job is not None:
                    # the job lived in memory only: it and what became of
                    # its slots may be gone with the process
                    job.uncertain = True
                    for slot in job.slots.values():
                        if slot.outcome is None:
                            slot.required = False
                key = what.get("setting")
                if key is not None:
                    self.ledger.uncertain_settings.setdefault(key, {what["old"]}).add(
                        self.ledger.settings.get(key, what["value"]))
        self.memory_only = []
        rng = self.world.rng("crash")
        down = log_uniform(rng, 5.0, 2 * HOUR)
        self.world.at(self.t + down, self.reboot)

    def reboot(self):
        offset = 0.0
        if "clock" in self.faults:
            rng = self.world.rng("boot-clock")
            r = rng.random()
            if r < 0.1:
                # no RTC, no fake-hwclock: the Pi thinks it is 1970
                offset = -self.t + rng.uniform(10, 60)
                self.world.at(self.t + log_uniform(rng, 10, 2 * HOUR), self.ntp_sync)
                self.counts["clock"] += 1
            elif r < 0.3 and self.last_wall is not None:
                # fake-hwclock: the time saved at the last shutdown
                offset = self.last_wall - self.t
                self.world.at(self.t + log_uniform(rng, 10, 30 * MINUTE), self.ntp_sync)
                self.counts["clock"] += 1
        self.boot(offset)

    def commit_started(self, inc, now, run_at):
        """An SQLite call was made: one near the power window's edge gets
        client batches asked for just before and just after it commits."""
        lo, hi, left = self.aim_commits
        if inc is self.inc and lo <= now <= hi and left > 0:
            self.aim_commits = (lo, hi, left - 1)
            from .actions import _edge_batch
            rng = self.world.rng("aim-commit")
            self.world.at(run_at - rng.uniform(0.0, 0.01), _edge_batch, self, inc)
            self.world.at(run_at + rng.uniform(0.0, 0.001), _edge_batch, self, inc)

    def ntp_sync(self):
        if self.inc is not None and self.inc.wall.offset != 0.0:
            self.note(f"NTP: wall clock {iso(self.inc.wall())} -> {iso(self.t)}")
            self.inc.wall.offset = 0.0
            self.clock_moved()

    def clock_moved(self):
        # nothing tells a real server that NTP stepped the clock: the
        # server is not told here either
        self.power_disturbed()
        self.wall_went_back()

    # -- what the incarnation reports ---------------------------------------------

    def after_open(self, inc):
        """The scheduler has read its database (before anything runs):
        everything acknowledged must be there."""
        self.check_acked(inc)
        self.scan_disk()

    def control_status(self, inc, status):
        if inc is not self.inc:
            return
        if status != "idle" and not getattr(inc, "_busy", False):
            inc._busy = True
            run = inc.service.datadir.current_run.value
            self.touched_runs.add(run)
            outcome = getattr(inc.control, "outcome", None)
            if outcome is None or outcome.kind == "batch":
                # (an autointegration alone is no batch of the current run)
                self.batch_starts.setdefault(run, []).append((self.t, inc.wall()))
            if self.armed == "batch":
                rng = self.world.rng("crash")
                self.armed = None
                self.world.at(self.t + rng.uniform(0, 60), self.crash)
        elif status == "idle":
            inc._busy = False

    # -- client requests ------------------------------------------------------------

    def request(self, component, path, *args, method="put", change=None, **kwargs):
        """A client's request through the same handler CoAP calls; ``change``
        describes what an acknowledgement makes true."""
        inc = self.inc
        if inc is None or not inc.started:
            self.requests["unanswered"] += 1
            return None
        resource = inc.resource(component, path)
        fn = resource.put if method == "put" else resource.get
        self._request += 1
        number = self._request
        what = dict(change or {})
        self.pending[number] = what
        d = defer.maybeDeferred(fn, *args, **kwargs)

        def acked(result):
            if inc is not self.inc:
                return None
            self.pending.pop(number, None)
            self.requests["acked"] += 1
            on_ack = what.get("on_ack")
            if on_ack is not None:
                on_ack(result)
            if getattr(inc.scheduler, "degraded", False) and (what.get("job") or
                                                               what.get("setting")):
                # documented: with its database unusable the scheduler keeps
                # what it acknowledges in memory only (and says so in its
                # fault) until the file can be written
                self.memory_only.append(what)
            return result

        def refused(f):
            if inc is not self.inc:
                return None
            self.pending.pop(number, None)
            if not f.check(PiccoloError):
                self.violation("acked-durable", f"{component}/{path} answered with an "
                                                f"unexpected error: {f.value!r}")
                return None
            self.requests["refused"] += 1
            on_refuse = what.get("on_refuse")
            if on_refuse is not None:
                on_refuse(f.value)
            return None
        d.addCallbacks(acked, refused)
        return d

    def listing(self, inc=None):
        import json
        inc = inc or self.inc
        body = inc.resource("control/scheduler", "jobs").get()
        return json.loads(body) if isinstance(body, bytes) else body

    # -- the world -------------------------------------------------------------------

    def _schedule_world(self):
        from . import actions
        actions.schedule(self)

    def summary(self):
        batches = sum(len(b) for b in self.ledger.batches.values())
        faults = sum(self.counts.values())
        o = self.ledger.outcomes
        lines = [
            f"season seed {self.seed}: {iso(self.start)} to {iso(min(self.t, self.end))}, "
            f"faults {','.join(sorted(self.faults)) or 'none'}, catch-up {self.catch_up} s"
            + (", a spectrometer with a cooler" if self.tec else ""),
            f"server lives {self.incarnations}; client requests {self.requests['acked']} "
            f"acknowledged, {self.requests['refused']} refused, "
            f"{self.requests['unanswered']} unanswered (server down)",
            f"jobs {len(self.ledger.jobs)}; slots done {o['done']}, missed {o['missed']}, "
            f"failed {o['failed']}" + ("" if self.history else " (no history: slots "
                                                              "counted from batches on disk)"),
            "faults " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items())),
        ]
        if self.violations:
            lines.append(self.violations[0].describe(self.seed))
            lines.append(f"replay: piccolo3-season --days {self.days:g} --seed {self.seed} "
                         f"--faults {','.join(sorted(self.faults)) or 'none'}"
                         f"{' --cooler' if self.tec else ''} --verbose")
        days = min(self.days, max(0.0, self.day))
        lines.append(f"{days:g} days, {batches} batches, {faults} faults, "
                     f"{len(self.violations)} violations")
        return "\n".join(lines)

    def cleanup(self):
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
