"""/sysinfo: host facts and the system clock."""

import bisect
import ctypes
import ctypes.util
import os
import shutil
import socket
import time
from array import array
from datetime import datetime, timezone

from twisted.internet import defer, task, threads
from twisted.python import failure
from twisted.logger import Logger

from . import __version__, commands
from .api import Resource
from .errors import PiccoloError
from .observable import Observable
from .values import to_datetime


def _read_cpu_times(path="/proc/stat"):
    with open(path) as f:
        fields = f.readline().split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


class SysInfo:
    log = Logger()

    def __init__(self, run_command=None, clock_command=("sudo", "-n", "date", "-s")):
        self._run = run_command or self._spawn
        self.clock_command = tuple(clock_command)
        #: called after the system clock was set (the scheduler looks again)
        self.clock_set = []
        try:
            self._cpu_last = _read_cpu_times()
        except OSError:
            self._cpu_last = None

    @staticmethod
    def _spawn(argv):
        return commands.run(argv)

    def cpu(self):
        """CPU use in percent since the previous call (or since boot)."""
        try:
            total, idle = _read_cpu_times()
        except OSError:
            raise PiccoloError("CPU statistics are not available here") from None
        last_total, last_idle = self._cpu_last or (0, 0)
        self._cpu_last = (total, idle)
        busy_total = total - last_total
        if busy_total <= 0:
            return 0.0
        return round(100.0 * (busy_total - (idle - last_idle)) / busy_total, 1)

    def mem(self):
        info = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    info[key] = int(rest.split()[0])
        except OSError:
            raise PiccoloError("memory statistics are not available here") from None
        total = info.get("MemTotal", 0)
        available = info.get("MemAvailable", info.get("MemFree", 0))
        return round(100.0 * (total - available) / total, 1) if total else 0.0

    def host(self):
        return socket.gethostname()

    def get_clock(self):
        return datetime.now(timezone.utc).isoformat()

    def set_clock(self, value):
        """``sudo -n date -s <ISO time>``: the legacy command; a missing or
        failing helper is a 4.00 with its reason."""
        when = to_datetime(value, "clock")
        argv = self.clock_command + (when.strftime("%Y-%m-%dT%H:%M:%S%z"),)

        def done(result):
            commands.check(argv, result)
            self.log.info("system clock set to {when}", when=when.isoformat())
            for listener in list(self.clock_set):
                listener()
        return commands.call(self._run, argv).addCallback(done)

    def version(self):
        return __version__

    def resources(self):
        return {
            "cpu": Resource(get=self.cpu),
            "mem": Resource(get=self.mem),
            "host": Resource(get=self.host),
            "clock": Resource(get=self.get_clock, put=self.set_clock),
            "version": Resource(get=self.version),
        }


# -- /sysinfo/health -------------------------------------------------------

TIME_ERROR = 5          # adjtimex(2) return: the clock is not synchronised
STA_UNSYNC = 0x0040     # timex.status bit: the kernel considers time unsynchronised


class _Timex(ctypes.Structure):
    """struct timex (linux/timex.h); the tail is padding the kernel may use."""
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long), ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long), ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long), ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 16),
    ]


_adjtimex = []


def kernel_clock_state():
    """``(adjtimex return value, timex.status)`` read without changing
    anything (modes = 0, no privileges needed); None where the call is not
    available (not Linux)."""
    if not _adjtimex:
        # found once: find_library runs ldconfig (a process) every call
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                               use_errno=True)
            _adjtimex.append(libc.adjtimex)
        except (OSError, AttributeError):
            _adjtimex.append(None)
    adjtimex = _adjtimex[0]
    if adjtimex is None:
        return None
    timex = _Timex()
    state = adjtimex(ctypes.byref(timex))
    if state < 0:
        return None
    return state, timex.status


def clock_synchronised(state):
    """The kernel's NTP verdict: synchronised unless adjtimex says
    TIME_ERROR or the status has STA_UNSYNC (a Pi without network time);
    None when unknown."""
    if state is None:
        return None
    result, status = state
    return result != TIME_ERROR and not status & STA_UNSYNC


def system_uptime(path="/proc/uptime"):
    try:
        with open(path) as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


RATE_WINDOW = 3 * 86400     # days_left: the recording rate of the last 3 days
MIN_RATE_SPAN = 3600        # ... measured over at least an hour


class SpectraScan:
    """Thread side, once: the spectrum files of the rate window under the
    data directory (what was recorded before the server started).

    After it, the tally grows from the data directory's own saves: the cost
    of a health refresh does not grow with the data (a season of data on
    one disk: 100,000 files in a run and 5,000 runs cost 90-500 ms of a
    worker holding the GIL on every refresh when they were listed)."""

    def __init__(self, root, suffix=".pico"):
        self.root = root
        self.suffix = suffix

    def _files(self, run, path, since, found):
        with os.scandir(path) as entries:
            for i, entry in enumerate(entries):
                if not entry.name.endswith(self.suffix) or entry.name.startswith("."):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if since <= st.st_mtime:
                    found.append((st.st_mtime, st.st_size, (run, entry.name)))
                if i % 256 == 255:
                    time.sleep(0)       # give the GIL to the reactor
        return found

    def recent(self, since):
        """``(mtime, size, (run, name))`` of the spectrum files modified at
        or after ``since`` -- those "from the future" too, after the wall
        clock went back -- sorted by mtime."""
        found = []
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return found
        for i, entry in enumerate(entries):
            if i % 256 == 255:
                time.sleep(0)
            if entry.name.startswith("."):
                continue
            try:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue
            # a file is created by a link into its run directory, which
            # updates the directory's mtime: an older directory holds no
            # file of the window
            if mtime < since:
                continue
            try:
                self._files(entry.name, entry.path, since, found)
            except OSError:
                pass
        found.sort()
        return found


class Tally:
    """Reactor side: mtimes and sizes of the spectrum files of the rate
    window (16 bytes a file), from one ``SpectraScan`` at the first refresh
    plus every file the server saves.

    Nothing here compares wall times with each other to decide whether a
    file is counted: a save while the scan runs is told apart from what the
    scan found by its name, so a wall clock that jumps back (a Pi without
    an RTC, NTP, ``PUT /sysinfo/clock``) loses nothing. The figures count
    the files up to the wall clock's now."""

    def __init__(self):
        self.mtimes = array("d")    # sorted
        self.sizes = array("q")     # in the same order
        self.newest = None
        self.scanning = False
        self.ready = False
        self.cutoff = None          # files before this were let go
        self._early = {}            # (run, name) -> (wall time, size) saved meanwhile

    def stale(self, now):
        """Has the wall clock gone back so far that files this tally let go
        count again? Then it is built again from a scan."""
        return self.cutoff is not None and now - RATE_WINDOW < self.cutoff

    def start(self):
        self.scanning = True

    def scanned(self, found):
        """The scan's ``(mtime, size, key)``; saves it may have missed are
        added by name."""
        self.mtimes = array("d", [m for m, _, _ in found])
        self.sizes = array("q", [size for _, size, _ in found])
        self.ready = True
        seen = {key for _, _, key in found}
        early, self._early = self._early, {}
        for key, (when, size) in early.items():
            if key not in seen:
                self._insert(when, size)
        self.newest = self.mtimes[-1] if self.mtimes else None

    def add(self, when, size, key=None):
        """A file the server saved at wall time ``when``."""
        if not self.scanning:
            return              # the scan, when it comes, will find it
        if not self.ready:
            self._early[key if key is not None else (when, size)] = (when, size)
            return
        self._insert(when, size)

    def _insert(self, when, size):
        i = bisect.bisect_right(self.mtimes, when)
        self.mtimes.insert(i, when)
        self.sizes.insert(i, size)
        if self.newest is None or when > self.newest:
            self.newest = when

    def figures(self, now, day_start):
        """``(files from day_start up to now, bytes per day over the
        window up to now or None)``."""
        mtimes = self.mtimes
        gone = bisect.bisect_left(mtimes, now - RATE_WINDOW)
        if gone:
            del mtimes[:gone]
            del self.sizes[:gone]
            self.cutoff = max(self.cutoff or 0.0, now - RATE_WINDOW)
        upto = bisect.bisect_right(mtimes, now)
        today = upto - bisect.bisect_left(mtimes, day_start, 0, upto)
        recorded = sum(self.sizes[:upto])
        if not recorded:
            return today, None
        span = max(now - mtimes[0], MIN_RATE_SPAN)
        return today, recorded * 86400.0 / span


class _WatchedObservable(Observable):
    """An Observable that tells its owner when the first watcher comes and
    the last one goes (health refreshes itself only while observed)."""

    __slots__ = ("_on_watched",)

    def __init__(self, on_watched):
        super().__init__(None)
        self._on_watched = on_watched

    def watch(self, watcher):
        super().watch(watcher)
        if len(self._watchers) == 1:
            self._on_watched(True)

    def unwatch(self, watcher):
        had = bool(self._watchers)
        super().unwatch(watcher)
        if had and not self._watchers:
            self._on_watched(False)


DISK_STEP = 0.005       # notify when free space moves by 0.5 % of the disk
TEMPERATURE_STEP = 0.5  # ... or a temperature by half a degree


def _iso(seconds):
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


class Health:
    """``GET /sysinfo/health``: disk, recording rate, devices, clock, faults.

    The file-system work and the kernel clock query run in a worker thread;
    the result is cached for ``max_age`` seconds. While observed, it is
    refreshed every ``max_age`` seconds and observers hear of meaningful
    changes only (not every byte of free space or second of uptime).
    """

    log = Logger()

    def __init__(self, datadir, clock, control=None, spectrometers=(),
                 scheduler=None, max_age=5.0, to_thread=None,
                 disk_usage=shutil.disk_usage, clock_state=kernel_clock_state,
                 uptime=system_uptime, wall_time=time.time):
        self.datadir = datadir
        self.clock = clock
        self.control = control
        self.spectrometers = list(spectrometers)
        self.scheduler = scheduler
        self.max_age = max_age
        self.to_thread = to_thread or threads.deferToThread
        self.disk_usage = disk_usage
        self.clock_state = clock_state
        self.uptime = uptime
        self.wall_time = wall_time
        self.started = clock.seconds()
        self.scan = SpectraScan(self._root())
        self.tally = Tally()
        listeners = getattr(datadir, "save_listeners", None)
        if listeners is not None:
            listeners.append(self._file_saved)
        self.observable = _WatchedObservable(self._watched)
        self._value = None
        self._published = None
        self._stamp = None
        self._pending = None
        self._loop = None
        self._errors = {s.serial: 0 for s in self.spectrometers}
        self._last_batch = None
        self._batch_files = None
        for s in self.spectrometers:
            s.status.watch(lambda status, s=s: self._status_changed(s, status))
        if control is not None:
            control.status.watch(self._control_status)

    def _root(self):
        path = getattr(self.datadir, "path", self.datadir)
        return getattr(path, "path", path)

    # -- reactor-side bookkeeping -----------------------------------------

    def _file_saved(self, run, name, size):
        self.tally.add(self.wall_time(), size, (run, name))

    def _status_changed(self, spectrometer, status):
        from .instrument.spectrometer import DROPPED
        if status == DROPPED:
            self._errors[spectrometer.serial] = self._errors.get(spectrometer.serial, 0) + 1

    def _control_status(self, status):
        """A batch is complete when control comes back to idle having
        written files, without a fault and without an abort."""
        control = self.control
        written = getattr(control, "files_written", None)
        if status != "idle":
            if self._batch_files is None:
                self._batch_files = written
            return
        started_with, self._batch_files = self._batch_files, None
        if written is None or started_with is None or written <= started_with:
            return
        if _value(getattr(control, "fault", "")) or getattr(control, "aborted", False):
            return
        self._last_batch = self.wall_time()

    def _watched(self, watched):
        if watched and self._loop is None:
            self._loop = task.LoopingCall(self._refresh_quietly)
            self._loop.clock = self.clock
            self._loop.start(self.max_age, now=False)
        elif not watched and self._loop is not None:
            self._loop.stop()
            self._loop = None

    def stop(self):
        self._watched(False)

    # -- the value ----------------------------------------------------------

    def get(self):
        if self._value is not None and self.clock.seconds() - self._stamp < self.max_age:
            return self._value
        return self.refresh()

    def _refresh_quietly(self):
        self.refresh().addErrback(lambda f: self.log.failure("health refresh failed", f))

    def refresh(self):
        """Recompute (one computation at a time); fires with the value."""
        if self._pending is not None:
            d = defer.Deferred()
            self._pending.append(d)
            return d
        self._pending = []
        now = self.wall_time()
        if self.tally.ready and self.tally.stale(now):
            self.log.info("the wall clock went back more than the rate window: the "
                          "spectrum files are counted again from the disk")
            self.tally = Tally()
        tally = self.tally
        scan = not tally.ready and not tally.scanning
        if scan:
            tally.start()
        probe = self.to_thread(self._probe, now, scan)
        d = defer.gatherResults([probe], consumeErrors=True)
        # the figures are as of when the value is made, files saved while
        # it was being made included
        d.addCallback(lambda results: self._publish(results[0], self.wall_time()))

        def scan_failed(f):
            if scan and not tally.ready:
                tally.scanning = False      # the next refresh scans again
            return f
        d.addErrback(scan_failed)

        def done(result):
            waiting, self._pending = self._pending, None
            for w in waiting:
                if isinstance(result, failure.Failure):
                    w.errback(result)
                else:
                    w.callback(result)
            return result
        d.addErrback(lambda f: f.value.subFailure if isinstance(f.value, defer.FirstError) else f)
        return d.addBoth(done)

    def _probe(self, now, scan=False):
        """Thread side: everything that touches the file system or the
        kernel. The spectrum files are read once (``scan``: the first
        refresh), then counted as the server saves them."""
        root = self.scan.root
        try:
            usage = self.disk_usage(root)
            free, total = usage.free, usage.total
        except OSError:
            free = total = None
        root_problem = getattr(self.datadir, "root_problem", None)
        return {
            "disk_free": free, "disk_total": total,
            "datadir_problem": root_problem() if root_problem is not None else None,
            "recent": self.scan.recent(now - RATE_WINDOW) if scan else None,
            "clock_synchronised": clock_synchronised(self.clock_state()),
            "uptime": self.uptime(),
        }

    def _spectrometers(self):
        from .instrument.spectrometer import STATUS_NAMES
        result = {}
        for s in self.spectrometers:
            status = s.status.value
            errors = getattr(s, "error_count", None)
            entry = {
                "name": s.name,
                "status": STATUS_NAMES.get(status, str(status)),
                "status_code": status,
                "errors": errors if isinstance(errors, int) else self._errors.get(s.serial, 0),
                "last_error": getattr(s, "last_error", None),
            }
            if s.have_tec():
                # the spectrometer's last reading (it reads its detector
                # every few seconds, between integrations while recording):
                # no device call here. Disconnected, powered off, dropped:
                # no temperature, not one from before (maybe hours old);
                # the set point stays what it is
                t = s.last_temperature() or {}
                entry["temperature"] = t.get("temperature")
                entry["temperature_age"] = t.get("age")
                entry["temperature_target"] = t.get("target")
                entry["temperature_stable"] = t.get("stable")
            result[s.serial] = entry
        return result

    def _slots(self, now):
        """Scheduled slots missed and failed in the 24 h before now (by
        their time), from the scheduler's history."""
        problems = getattr(self.scheduler, "problems", None)
        missed, failed = problems(now) if problems is not None else (0, 0)
        return {"slots_missed_24h": missed, "slots_failed_24h": failed}

    def _faults(self, datadir_problem=None):
        faults = {}
        for name in ("scheduler", "datadir"):
            fault = _value(getattr(getattr(self, name, None), "fault", None))
            if fault:
                faults[name] = fault if isinstance(fault, str) else str(fault)
        if datadir_problem:
            # the data directory gone (a pulled stick) comes first
            faults["datadir"] = "; ".join(filter(None, (datadir_problem,
                                                        faults.get("datadir"))))
        return faults

    def _publish(self, probe, now):
        if probe["recent"] is not None and not self.tally.ready:
            self.tally.scanned(probe["recent"])
        day_start = datetime.fromtimestamp(now).astimezone().replace(
            hour=0, minute=0, second=0, microsecond=0).timestamp()
        files_today, rate = self.tally.figures(now, day_start)
        free, total = probe["disk_free"], probe["disk_total"]
        last_batch = self._last_batch if self._last_batch is not None else self.tally.newest
        value = {
            "disk_free": free,
            "disk_total": total,
            "days_left": (round(free / rate, 1) if rate and free is not None else None),
            "files_today": files_today,
            "spectrometers": self._spectrometers(),
            "clock_synchronised": probe["clock_synchronised"],
            "uptime": probe["uptime"],
            "server_uptime": round(self.clock.seconds() - self.started, 1),
            "last_batch": _iso(last_batch),
            "fault": _value(getattr(self.control, "fault", "")) or "",
            "faults": self._faults(probe.get("datadir_problem")),
            "last_batch_summary": _value(getattr(self.control, "last_batch", None)),
            **self._slots(now),
            "time": _iso(now),
        }
        self._value = value
        self._stamp = self.clock.seconds()
        if self._published is None or self._differs(self._published, value):
            self._published = value
            self.observable.changed()
        return value

    @staticmethod
    def _differs(old, new):
        """Worth a notification? Everything counts but the running figures
        (uptime, time) and small drifts measured from the value last told:
        free space by less than DISK_STEP of the disk, days left by less
        than a day, a temperature by less than TEMPERATURE_STEP."""
        def moved(a, b, step):
            if a is None or b is None:
                return a is not b
            return abs(a - b) >= step
        total = new["disk_total"] or 0
        if moved(old["disk_free"], new["disk_free"], DISK_STEP * total or 1):
            return True
        if moved(old["days_left"], new["days_left"], 1.0):
            return True
        if old["spectrometers"].keys() != new["spectrometers"].keys():
            return True
        for serial, entry in new["spectrometers"].items():
            before = old["spectrometers"][serial]
            if any(before.get(k) != entry.get(k) for k in entry
                   if k not in ("temperature", "temperature_age")):
                return True
            if moved(before.get("temperature"), entry.get("temperature"), TEMPERATURE_STEP):
                return True
        return any(old[k] != new[k] for k in
                   ("disk_total", "files_today", "clock_synchronised", "last_batch",
                    "fault", "faults", "last_batch_summary", "slots_missed_24h",
                    "slots_failed_24h"))

    def resources(self):
        return {"health": Resource(get=self.get, observe=self.observable)}


def _value(thing):
    """An attribute that may be an Observable or a plain value."""
    return thing.value if isinstance(thing, Observable) else thing
