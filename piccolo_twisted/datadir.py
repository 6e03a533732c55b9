"""/data_dir: the data directory, its runs and their spectrum files.

The storage component: it owns the run layout, the ``.pico`` names and
atomic writes (control hands it spectra and asks it to save), an index of
runs and files, and the listings encoded from it.

- Every file-system call runs in the component's own thread pool (a USB
  stick can stall; it must not starve device calls or the reactor's pool).
- The index (``runindex``) is built once in that pool at start; requests
  that need it wait for it. It is updated by every file written and run
  created here, and re-validated against the disk at every request: one
  ``fstat`` of the directory while its mtime vouches for the index; where
  it cannot (a save of ours moved it) one pass over the names, compared
  with what the index expects; a change by hand (a file copied in or
  removed) lists that directory again. A look at a run and a save into it
  never overlap (each waits for the other in flight), so a look sees
  acknowledged saves and hand changes only; and a request never takes an
  answer from a look that had begun before it came.
- The JSON bodies of ``spectra_list`` and ``all_runs`` are encoded once
  per change (large ones in the pool) and kept until the run or the set of
  runs changes; blockwise follow-ups get the same bytes.
- Nothing leaves the data directory: runs are real directories opened with
  ``O_NOFOLLOW``, served files regular files inside them, writes never go
  through a symlink. Spectra are 0644 and run directories 0755 whatever
  the process umask (twistd daemon mode has 077).
- The server's own files live in ``<datadir>/.piccolo/``, out of reach of
  run names, which are never hidden.
"""

import errno
import json
import os
import re
import stat
import time
import unicodedata
from collections import OrderedDict
from array import array
from bisect import bisect_left

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool

from . import jsontext, runindex
from .acquisition import pico
from .api import EncodedJSON as Encoded, Resource
from . import commands, mount as mounting
from .errors import NotFoundError, PiccoloError, UnavailableError
from .observable import Observable
from .values import to_bool, to_int

SPECTRUM_FILE = runindex.SPECTRUM_FILE
DEFAULT_RUN = "spectra"
MAX_RUN_NAME = 100              # bytes of UTF-8
#: runs the data directory may hold before new ones are refused (a client
#: creating run after run filled a disk with empty directories, a listing
#: of megabytes and an index build of seconds at every start)
MAX_RUNS = 10_000
#: C0 controls, DEL and C1 controls: an ESC in a run name reached the
#: operator's terminal, a newline forged a log line
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
STATE_DIR = ".piccolo"
#: server files that earlier versions kept in the data directory itself
STATE_FILES = ("scheduler.sqlite", "scheduler.sqlite-wal", "scheduler.sqlite-shm",
               "scheduler.sqlite-journal", "manhole_host_key")
FILE_THREADS = 3                # a write, a validation and an encoding at once
BODY_CACHE_BYTES = 8 << 20      # encoded spectra lists kept (least recently used go)
SPLICE_DEPTH = 64               # a saved name this near the top is spliced in
SMALL_LIST = 500                # names encoded on the reactor; more in the pool
MAX_FILE = 64 << 20             # largest file served
TEXTS_KEPT = 64                 # scanned spectrum files remembered (jsontext)


def check_run_name(name):
    """A run name is one safe path component; return it or raise PiccoloError.

    Checked whenever a run name is set (current_run, record_sequence,
    record_dark, scheduled jobs), so that no later file operation fails."""
    if not isinstance(name, str):
        raise PiccoloError("a run name must be a string")
    if (not name or name in (".", "..") or name.startswith(".") or "/" in name
            or "\\" in name or "\x00" in name):
        raise PiccoloError(
            f"invalid run name {name[:MAX_RUN_NAME]!r}: one path component, not empty, "
            "not hidden, no '/' or '..'")
    if _CONTROL.search(name):
        raise PiccoloError(
            f"invalid run name {name[:MAX_RUN_NAME]!r}: no control characters "
            "(C0, DEL, C1)")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise PiccoloError("a run name must be valid UTF-8") from None
    if size > MAX_RUN_NAME:
        raise PiccoloError(f"run name too long: {size} bytes of UTF-8, "
                           f"at most {MAX_RUN_NAME}")
    return name


#: not in a file name on Windows (':' not on macOS either; the data
#: directory is often a FAT stick, and runs are copied to laptops)
_WINDOWS_FORBIDDEN = frozenset('<>:"/\\|?*')
#: Windows device names: reserved with any extension, in any case
_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"])
#: what the deployed client's URIs cannot carry in a path segment
_URI_RESERVED = frozenset("#%?")
#: Unicode categories no new run name holds: controls, format characters
#: (bidi overrides, zero-width spaces, the BOM), surrogates, line and
#: paragraph separators
_INVISIBLE = frozenset(["Cc", "Cf", "Cs", "Zl", "Zp"])


def new_run_name_problem(name):
    """None when the server may create a run named ``name``, else why not.

    Beyond ``check_run_name`` (which names an existing run, perhaps made by
    an earlier version or by hand), a new run's name is the same on every
    file system it may be copied to and reachable from every client: none
    of ``< > : " / \\ | ? *`` (``C:x`` is a drive-relative path on Windows),
    no ``#`` or ``%`` (the deployed client builds URIs of run names as they
    are), nothing invisible (a control, format, line or paragraph separator
    character: a bidi override shows a name in another order, a zero-width
    space makes two names look alike), not ending in ``.`` or a space, not a
    Windows device name (``CON``, ``nul.txt``). The command line checks the
    names it writes locally by the same rules (``cli/names.py``)."""
    try:
        check_run_name(name)
    except PiccoloError as e:
        return str(e)
    for char in name:
        if char in _WINDOWS_FORBIDDEN:
            return f"holds {char!r} (not in a name on Windows)"
        if unicodedata.category(char) in _INVISIBLE:
            return "holds a control, format or line separator character"
        if char in _URI_RESERVED:
            return f"holds {char!r} (not in a URI's path as it is)"
    if name[-1] in ". ":
        return "ends in '.' or a space (Windows drops them)"
    if name.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES:
        return "a device name on Windows"
    return None


def _folded(name):
    """``name`` as a case- and normalisation-insensitive file system
    compares it (``Run`` and ``run`` are one folder there)."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def check_new_run_name(name):
    """``name`` if a run may be created with it, else PiccoloError (4.00)."""
    problem = new_run_name_problem(name)
    if problem:
        raise PiccoloError(f"invalid name for a new run {name[:MAX_RUN_NAME]!r}: {problem}")
    return name


def is_run_name(name):
    """Whether ``name`` passes check_run_name: a directory named otherwise
    (made by hand, or by an earlier version) is not a run -- not listed,
    never the current run -- since no request could name it."""
    try:
        check_run_name(name)
    except PiccoloError:
        return False
    return True


def _is_truthy(value, name):
    return to_bool(value, name)


class RootMissing(Exception):
    """Thread side: the data directory itself is gone or unusable (a
    pulled stick); the argument says how."""


def root_problem(root):
    """Thread side: None if ``root`` is a usable directory, else why not."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be used ({e.strerror or e})"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    return None


def _makedir(path):
    """Create ``path`` and every missing parent 0755 whatever the umask: a
    parent left 0700 (daemon umask 077) would hide the data from the user
    copying it off the Pi."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if parent != path and not os.path.isdir(parent):
        _makedir(parent)
    try:
        os.mkdir(path, runindex.DIR_MODE)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    os.chmod(path, runindex.DIR_MODE)


def set_aside(path):
    """Rename ``path`` to ``<path>.unusable-<time>`` (a free name); return it."""
    base = f"{path}.unusable-{int(time.time())}"
    aside, n = base, 1
    while os.path.lexists(aside):
        aside, n = f"{base}.{n}", n + 1
    os.replace(path, aside)
    return aside


def prepare_state(root, note=None):
    """Create ``<root>/.piccolo`` and move server files an earlier version
    left in the data directory into it (blocking, start-up; idempotent).
    Returns its path."""
    log = DataDir.log
    _makedir(root)
    state = os.path.join(root, STATE_DIR)
    if os.path.lexists(state) and not os.path.isdir(state):
        aside = set_aside(state)
        log.error("{state} is not a directory; moved aside to {aside}",
                  state=state, aside=aside)
        if note is not None:
            note(f"{state} was not a directory; moved aside to {aside}")
    if not os.path.isdir(state):
        os.mkdir(state, 0o755)
        os.chmod(state, 0o755)
    moves = (list(STATE_FILES[:4])
             if not os.path.lexists(os.path.join(state, STATE_FILES[0])) else [])
    if not os.path.lexists(os.path.join(state, STATE_FILES[4])):
        moves.append(STATE_FILES[4])
    for name in moves:
        old = os.path.join(root, name)
        if os.path.islink(old) or not os.path.isfile(old):
            continue        # absent, or a run of that name: leave it
        try:
            os.rename(old, os.path.join(state, name))
        except OSError as e:
            log.warn("cannot move {old} to {state}: {e}", old=old, state=state, e=e)
        else:
            log.info("moved {old} to {state}", old=old, state=state)
    return state


class SaveFailed(Exception):
    """A spectrum file could not be written (its message names the file)."""


class _Run:
    """The index entry of one run."""
    __slots__ = ("mtime", "listed", "keys", "version", "fp", "unverified")

    def __init__(self, mtime, listed=None, keys=None, fp=None):
        self.mtime = mtime          # directory mtime: all_runs sorts by it
        self.listed = listed        # the mtime ``keys`` is valid for, or None
        self.keys = keys            # sorted array('q') of file keys, or None
        self.version = 0            # bumped whenever keys change
        self.fp = fp                # fingerprint of the names ``keys`` stand for
        # a save of ours moved ``listed``: the names are checked against
        # ``fp`` at the next look (a change by hand in the same moment
        # left no trace in the mtime)
        self.unverified = False


class _Body:
    """A run's encoded spectra_list: ``body`` with the names of ``pending``
    (keys saved since, all among the SPLICE_DEPTH newest) still to go in."""
    __slots__ = ("version", "body", "pending")

    def __init__(self, version, body):
        self.version = version
        self.body = body
        self.pending = []


class DataDir:
    log = Logger()

    def __init__(self, path, device="/dev/sda1", mntpnt="/mnt",
                 run_command=None, mounts_file="/proc/mounts",
                 to_thread=None, max_runs=MAX_RUNS, write_file=None):
        self.path = FilePath(os.path.abspath(path))
        self.max_runs = max_runs
        #: writes one spectrum file atomically (thread side); None:
        #: ``pico.write_atomic`` (the season simulator injects faults here)
        self.write_file = write_file
        #: how an encoding worker gives the GIL away between spectra (no
        #: use where workers run in simulated time)
        self.pause = time.sleep
        self.device = device
        self.mntpnt = mntpnt
        self.mounts_file = mounts_file
        self._run = run_command or commands.run
        self.pool = None
        self._trigger = None
        if to_thread is None:
            self.pool = ThreadPool(minthreads=0, maxthreads=FILE_THREADS,
                                   name="piccolo-files")
            to_thread = self._in_pool
        self._to_thread = to_thread
        self._texts = OrderedDict()     # (run, name) -> jsontext.JSONText
        self.current_run = Observable(DEFAULT_RUN)
        self.files_written = Observable(0)
        #: what start-up found wrong in the data directory (health's faults)
        self.fault = Observable("")
        #: called with (run, file name, size) after every file saved here
        self.save_listeners = []
        # the index, reactor side
        self._built = False
        self._waiting = []              # Deferreds waiting for the build
        self._root_mtime = None
        self._runs = {}                 # run -> _Run
        self._lists = {}                # (alpha, reverse) -> (names, body)
        self._lists_gen = 0             # bumped by any change to run orders
        self._bodies = OrderedDict()    # run -> _Body (spectra_list)
        self._body_bytes = 0
        self._inflight = {}             # key -> [Deferred] sharing one trip
        self._next = {}                 # key -> (start, [Deferred]): the look after it
        self._begun = set()             # keys of looks that have begun on the disk
        self._after_look = {}           # key -> [Deferred]: saves waiting for that look
        self._saving = {}               # run -> saves in the pool now
        self._saves_waiters = {}        # run -> [Deferred]: fired when none is
        self._creating = set()          # new runs admitted, not yet indexed
        self._folded_cache = (-1, {})   # (_lists_gen, _folded_runs())

    def _in_pool(self, f, *args, **kwargs):
        from twisted.internet import reactor
        return threads.deferToThreadPool(reactor, self.pool, f, *args, **kwargs)

    def _fs(self, f, *args):
        """``f(*args)`` in the file pool; a failure caused by the data
        directory itself being gone (a pulled stick: ENOENT, or EIO from a
        dead mount) fails as UnavailableError (5.03) with the reason (one
        more look, in the pool, after an OSError); other failures are left
        to the caller."""
        root = self.path.path

        def failed(failure):
            if failure.check(RootMissing):
                raise UnavailableError(self.missing_message(failure.value.args[0]))
            if not failure.check(OSError):
                return failure

            def decide(problem):
                if problem is not None:
                    raise UnavailableError(self.missing_message(problem))
                return failure
            return self._to_thread(root_problem, root).addCallback(decide)
        return self._to_thread(f, *args).addErrback(failed)

    def missing_message(self, problem):
        return (f"the data directory {self.path.path} {problem} (a pulled stick? "
                f"plug it in and mount it: PUT /data_dir/mount true)")

    def root_problem(self):
        """Thread side (health): None, or what is wrong with the data
        directory itself, in words."""
        problem = root_problem(self.path.path)
        return None if problem is None else self.missing_message(problem)

    @property
    def state_dir(self):
        """Where the server keeps its own files (scheduler DB, host key)."""
        return os.path.join(self.path.path, STATE_DIR)

    # -- start-up and stop ------------------------------------------------

    def prepare_state(self):
        return prepare_state(self.path.path, note=self.note_fault)

    def note_fault(self, text):
        """Reactor side (or start-up): add ``text`` to ``fault``."""
        self.fault.set("; ".join(t for t in (self.fault.value, text) if t))

    def prepare(self):
        """Create the data directory and the current run, move the server's
        files into ``.piccolo``, and start building the index (blocking once
        before serving; the build itself runs in the file pool)."""
        root = self.path.path
        self.prepare_state()
        fd = runindex.open_root(root)
        try:
            root_mtime, runs = runindex.scan_root(fd)
            runs = {name: t for name, t in runs.items() if is_run_name(name)}
            if runs:
                self.current_run.set(max(runs, key=lambda r: (runs[r], r)))
            run = self.current_run.value
            if run not in runs:
                try:
                    run_fd, _ = runindex.open_run(fd, run, create=True)
                except runindex.NoSuchRun:
                    # a file or symlink of that name: serve anyway, a batch
                    # into it ends with a fault saying why
                    self.log.warn("{run} in {root} is not a directory",
                                  run=run, root=root)
                else:
                    try:
                        runs[run] = os.fstat(run_fd).st_mtime_ns
                    finally:
                        os.close(run_fd)
                root_mtime = None
        finally:
            os.close(fd)
        self._root_mtime = root_mtime
        self._runs = {name: _Run(mtime) for name, mtime in runs.items()}
        if self.pool is not None and not self.pool.started:
            from twisted.internet import reactor
            self.pool.start()
            # like the reactor's own pool: stopped at shutdown at the latest
            self._trigger = reactor.addSystemEventTrigger("during", "shutdown",
                                                          self.stop)
        self.log.info("data directory {path}, current run {run}",
                      path=root, run=self.current_run.value)
        self._build(list(runs))

    def _build(self, names):
        from time import monotonic
        started = monotonic()

        def built(found):
            files = 0
            for name, (mtime, listed, keys, _, fp) in found.items():
                entry = self._runs.get(name)
                if entry is not None:
                    entry.mtime, entry.listed, entry.keys = mtime, listed, keys
                    entry.fp = fp
                    files += len(keys)
            self.log.info("index of {runs} runs and {files} files built in "
                          "{t:.2f} s", runs=len(found), files=files,
                          t=monotonic() - started)

        def failed(f):
            # not fatal: every run is then listed when first asked for
            self.log.failure("building the index of the data directory failed", f)

        def ready(_):
            self._built = True
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)
            self._prewarm()
        d = self._to_thread(runindex.build, self.path.path, names)
        d.addCallbacks(built, failed).addCallback(ready)
        return d

    def _prewarm(self):
        """Encode the big listings once now (all_runs in the clients' order,
        the current run, then the largest runs), so that no first request
        waits for it."""
        current = self.current_run.value
        big = sorted(((len(e.keys), name) for name, e in self._runs.items()
                      if e.keys is not None and len(e.keys) > SMALL_LIST),
                     key=lambda t: (t[1] != current, -t[0]))
        d = defer.Deferred.fromCoroutine(self._sorted_runs(False, False))
        d.addErrback(lambda f: self.log.failure("sorting the runs failed", f))
        budget = BODY_CACHE_BYTES
        for n, name in big:
            budget -= n * 29
            if budget < 0:
                break
            d = defer.Deferred.fromCoroutine(self._spectra_body(name, self._runs[name]))
            d.addErrback(lambda f: self.log.failure("encoding a listing failed", f))

    def stop(self):
        """Stop the file pool (after the last write: service stop)."""
        if self.pool is not None and self.pool.started and not self.pool.joined:
            from twisted.internet import reactor
            self.pool.stop()
            try:
                reactor.removeSystemEventTrigger(self._trigger)
            except (ValueError, KeyError):
                pass            # it is the trigger running

    # -- the index, reactor side ---------------------------------------------

    def _until_built(self):
        if self._built:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def _shared(self, key, start):
        """Run ``start()`` (a Deferred) once for everyone asking for ``key``
        while it is in flight."""
        d = defer.Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(d)
            return d
        waiters = self._inflight[key] = [d]

        def done(result):
            del self._inflight[key]
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)
        defer.maybeDeferred(start).addBoth(done)
        return d

    def _fresh(self, key, start):
        """Like ``_shared``, for a look at the disk: a request shares a
        look in flight only while it has not begun on the disk (see
        ``_begin``); else it waits for the next one (which begins when that
        one ends), so that its answer has seen every change made before it
        came. The requests that come meanwhile share that next look.
        A save waiting for the look on the disk (``_settled``) goes on
        before anyone else: the next look then waits for it."""
        d = defer.Deferred()
        if key in self._begun:
            self._next.setdefault(key, (start, []))[1].append(d)
        elif key in self._inflight:
            self._inflight[key].append(d)
        else:
            self._look(key, start, [d])
        return d

    def _begin(self, key):
        """The look ``key`` begins on the disk now: later requests wait for
        the next one."""
        if key in self._inflight:
            self._begun.add(key)

    def _look(self, key, start, waiters):
        self._inflight[key] = waiters

        def done(result):
            del self._inflight[key]
            self._begun.discard(key)
            # the saves first (they register at once): a look asked for by
            # the waiters below waits for them, never the other way round
            for d in self._after_look.pop(key, ()):
                d.callback(None)
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)
            queued = self._next.pop(key, None)
            if queued is not None:
                if key in self._inflight:   # begun just now, after they came
                    self._inflight[key].extend(queued[1])
                else:
                    self._look(key, *queued)
        defer.maybeDeferred(start).addBoth(done)

    def _runs_changed(self):
        self._lists.clear()
        self._lists_gen += 1

    def _run_touched(self, run, old, new):
        """A run's mtime moved: the orders by mtime change, unless the run
        was the newest already and stays so."""
        if old == new:
            return
        self._lists_gen += 1
        for rev in (False, True):
            cached = self._lists.get((False, rev))
            if cached is not None:
                names = cached[0]
                newest = names[0] if rev else names[-1]
                if not (newest == run and new > old):
                    del self._lists[(False, rev)]

    def _root_changed(self, change):
        """We created a run: keep the root's mtime if it was ours to see."""
        before, after = change
        self._root_mtime = after if self._root_mtime == before else None
        self._runs_changed()

    def _drop(self, run):
        if self._runs.pop(run, None) is not None:
            self._forget_body(run)
            self._runs_changed()

    def _forget_body(self, run):
        cached = self._bodies.pop(run, None)
        if cached is not None:
            self._body_bytes -= len(cached.body)

    def _apply_run(self, run, state, version):
        """Take in what a look at the run found (``runindex.check_run``);
        ``version`` is the entry's when the look began."""
        mtime, listed, keys, root_change, fp = state
        if root_change is not None:
            self._root_changed(root_change)
        entry = self._runs.get(run)
        if entry is None:
            entry = self._runs[run] = _Run(mtime)
            self._runs_changed()
        else:
            self._run_touched(run, entry.mtime, mtime)
            entry.mtime = mtime
        if keys is not None:
            # the disk as it is (no save of ours can complete during a
            # look; another look may have, with a listing no fresher)
            entry.keys, entry.listed, entry.fp = keys, listed, fp
            entry.unverified = False
            entry.version += 1
            self._forget_body(run)
        elif fp is not None and entry.version == version and entry.fp == fp:
            # the names are as the index has them, for good at ``listed``
            entry.listed = listed
            entry.unverified = False
        return entry

    def _check(self, run, create=False):
        """The run's index entry, validated against the disk in the pool:
        one fstat while the mtime vouches for the index, a pass over the
        names where it cannot (after a save of ours), a listing only when
        the names changed. A look waits for the saves into the run in
        flight (they wait for the looks in flight: ``_settled``), so what
        it sees is acknowledged saves and changes by hand, nothing half
        done -- a change by hand made during a save is seen, not taken for
        the save's. NotFoundError when the run is not a real directory."""
        key = ("run", run, create)

        async def check():
            await self._until_built()
            admitted = create and run not in self._runs and await self._admit(run)
            try:
                await self._saves_done(run)
                # from here to the pool in one reactor step: a save that
                # comes now waits for this look (_settled)
                self._begin(key)
                entry = self._runs.get(run)
                known = fp = None
                verified = True
                version = 0
                if entry is not None:
                    version = entry.version
                    if entry.keys is not None:
                        known, fp = entry.listed, entry.fp
                        verified = not entry.unverified
                try:
                    state = await self._fs(runindex.check_run, self.path.path,
                                           run, known, create, fp, verified)
                except runindex.NoSuchRun:
                    self._drop(run)
                    if create:
                        raise PiccoloError(f"run {run!r} exists and is not a directory")
                    raise NotFoundError(f"no such run: {run}")
                except OSError as e:
                    raise PiccoloError(f"cannot use run {run!r}: {e.strerror or e}")
            finally:
                if admitted:
                    self._creating.discard(run)
            return self._apply_run(run, state, version)
        return self._fresh(key, lambda: defer.Deferred.fromCoroutine(check()))

    async def _admit(self, run):
        """Room for ``run``, which the index does not know, to be created:
        True once admitted (counted in ``_creating`` until the caller's
        look at the disk is over); PiccoloError when the data directory
        holds ``max_runs`` runs already. At the cap the data directory is
        looked at again first (runs moved away by hand, or ``run`` made
        by hand). Count and reservation happen in one reactor step, so
        two requests never both take the last place."""
        problem = new_run_name_problem(run)
        if problem or len(self._runs) + len(self._creating) >= self.max_runs:
            # made by hand (or copied in) since the index last looked?
            await self._check_root()
            if run in self._runs:
                return False
        if problem:
            check_new_run_name(run)
        self._check_twin(run)
        count = len(self._runs) + len(self._creating)
        if count >= self.max_runs:
            raise PiccoloError(
                f"too many runs: the data directory holds {count}, at most "
                f"{self.max_runs}; record into an existing run or move old runs away")
        self._creating.add(run)
        return True

    def _check_twin(self, run):
        """PiccoloError if a known run differs from ``run`` only in case or
        Unicode normal form (one folder on Windows, macOS, a FAT stick)."""
        key = _folded(run)
        twin = self._folded_runs().get(key) or next(
            (r for r in self._creating if _folded(r) == key), None)
        if twin is not None and twin != run:
            raise PiccoloError(
                f"invalid name for a new run {run!r}: the run {twin!r} exists, and names "
                f"differing only in case are one folder on Windows, macOS and a FAT stick")

    def _folded_runs(self):
        """{folded name: run} of the runs known (rebuilt after a change)."""
        gen, folded = self._folded_cache
        if gen != self._lists_gen:
            folded = {_folded(r): r for r in self._runs}
            self._folded_cache = (self._lists_gen, folded)
        return folded

    def _check_root(self):
        async def check():
            await self._until_built()
            self._begin(("root",))
            known = self._root_mtime
            try:
                result = await self._fs(runindex.check_root, self.path.path, known)
            except OSError as e:
                raise PiccoloError(f"cannot list the data directory: "
                                   f"{e.strerror or e}") from None
            if result is None:
                return
            mtime, found = result
            found = {name: t for name, t in found.items() if is_run_name(name)}
            self._root_mtime = mtime
            changed = False
            for name in list(self._runs):
                if name not in found:
                    self._drop(name)
                    changed = True
            for name, run_mtime in found.items():
                entry = self._runs.get(name)
                if entry is None:
                    self._runs[name] = _Run(run_mtime)
                    changed = True
                elif entry.mtime != run_mtime:
                    self._run_touched(name, entry.mtime, run_mtime)
                    entry.mtime = run_mtime
            if changed:
                self._runs_changed()
        return self._fresh(("root",), lambda: defer.Deferred.fromCoroutine(check()))

    async def _spectra_body(self, run, entry):
        """The JSON body of the run's spectra_list: from the cache, or the
        cache plus the files saved since (a batch appends: the new names
        go in front), or encoded afresh; large ones in the pool."""
        version = entry.version
        cached = self._bodies.get(run)
        if cached is not None and cached.version == version:
            self._bodies.move_to_end(run)
            if not cached.pending:
                return cached.body
            pending = list(cached.pending)
            old = cached.body
            # the newest names, from the oldest one saved since: the old
            # body's first ones are replaced by them (a batch's final dark
            # file sorts below the light one of its sequence)
            keys = entry.keys
            top = keys[bisect_left(keys, min(pending)):].tolist()
            saved = set(pending)
            old_top = [k for k in top if k not in saved]
            whole = len(old_top) == len(keys) - len(pending)

            def prepend():
                if whole:
                    return Encoded(runindex.encode_names(top))
                return Encoded(runindex.splice_names(top, old_top, old))
            body = (prepend() if len(old) < SMALL_LIST * 32 else
                    await self._shared(("prepend", run, version),
                                       lambda: self._to_thread(prepend)))
            if (self._bodies.get(run) is cached
                    and cached.pending[:len(pending)] == pending):
                self._body_bytes += len(body) - len(cached.body)
                cached.body = body
                del cached.pending[:len(pending)]
            return body
        keys = entry.keys[:]

        def encode():
            return Encoded(runindex.encode_names(keys))
        if len(keys) <= SMALL_LIST:
            body = encode()
        else:
            body = await self._shared(("body", run, version),
                                      lambda: self._to_thread(encode))
        if entry.version == version and self._runs.get(run) is entry:
            self._forget_body(run)
            self._bodies[run] = _Body(version, body)
            self._body_bytes += len(body)
            while self._body_bytes > BODY_CACHE_BYTES and len(self._bodies) > 1:
                _, dropped = self._bodies.popitem(last=False)
                self._body_bytes -= len(dropped.body)
        return body

    async def _sorted_runs(self, alpha, reverse):
        order = (alpha, reverse)
        cached = self._lists.get(order)
        if cached is not None:
            return cached
        snapshot = [(name, entry.mtime) for name, entry in self._runs.items()]

        def sort():
            key = (lambda r: r[0]) if alpha else (lambda r: (r[1], r[0]))
            names = [r[0] for r in sorted(snapshot, key=key, reverse=reverse)]
            return names, Encoded(json.dumps(names, separators=(",", ":")).encode("utf-8"))
        gen = self._lists_gen
        result = (sort() if len(snapshot) <= SMALL_LIST
                  else await self._to_thread(sort))
        if self._lists_gen == gen:      # nothing changed meanwhile
            self._lists[order] = result
        return result

    # -- saving (what control calls) -----------------------------------------

    def file_name(self, batch, sequence, kind=None):
        return runindex.name(runindex.key(batch, sequence, kind))

    def save(self, run, batch, sequence, kind, spectra, clobber=False):
        """Write ``spectra`` (a list of pico spectra) as the file of
        ``batch``/``sequence``/``kind`` (``"dark"``, ``"light"``, or None for
        an unsplit sequence) of ``run``, atomically, in the file pool; the
        run is created if needed. Fires with the file name; any failure
        (not only OSError) fails it with SaveFailed naming the file."""
        check_run_name(run)
        k = runindex.key(batch, sequence, kind)
        filename = runindex.name(k)

        sizes = []

        pause = self.pause

        def encode():
            data = pico.encode(pico.document(spectra), pause=pause)
            sizes.append(len(data))
            return data

        async def go():
            await self._until_built()
            # a look at the run in the pool now would see our write half
            # done and list the run again: let it finish first (and the
            # looks asked for from now on wait for us: _check)
            await self._settled(run)
            entry = self._runs.get(run)
            version = entry.version if entry is not None else 0
            self._saving[run] = self._saving.get(run, 0) + 1
            try:
                before, after, root_change = await self._fs(
                    runindex.save, self.path.path, run, filename, encode, clobber,
                    self.write_file or pico.write_atomic)
            except Exception as e:
                self._unsaving(run)
                if isinstance(e, runindex.NoSuchRun):
                    reason = "the run is not a directory"
                elif isinstance(e, UnavailableError):
                    reason = str(e)
                elif isinstance(e, OSError):
                    reason = e.strerror or str(e)
                else:
                    self.log.failure("writing {name} failed", name=filename)
                    reason = f"{type(e).__name__}: {e}"
                raise SaveFailed(f"cannot write {filename}: {reason}") from None
            try:
                self._saved(run, k, before, after, root_change, version)
            finally:
                self._unsaving(run)
            for listener in list(self.save_listeners):
                try:
                    listener(run, filename, sizes[-1] if sizes else 0)
                except Exception:
                    self.log.failure("a save listener failed")
            return filename
        return defer.Deferred.fromCoroutine(go())

    def _unsaving(self, run):
        left = self._saving[run] - 1
        if left:
            self._saving[run] = left
            return
        del self._saving[run]
        for d in self._saves_waiters.pop(run, ()):
            d.callback(None)

    def _saves_done(self, run):
        """Fires when no save into ``run`` is in flight."""
        if not self._saving.get(run):
            return defer.succeed(None)
        d = defer.Deferred()
        self._saves_waiters.setdefault(run, []).append(d)
        return d

    async def _settled(self, run):
        """Wait for the looks at ``run`` that have begun on the disk (a
        look that has not waits for us: ``_check``)."""
        for create in (False, True):
            key = ("run", run, create)
            while key in self._begun:
                d = defer.Deferred()
                self._after_look.setdefault(key, []).append(d)
                await d

    def _saved(self, run, k, before, after, root_change, version):
        if root_change is not None:
            self._root_changed(root_change)
        entry = self._runs.get(run)
        if entry is None:
            entry = self._runs[run] = _Run(after)
            if root_change is not None:     # a new, empty run: we know it all
                entry.keys, entry.listed, entry.fp = array("q"), before, 0
            self._runs_changed()
        else:
            self._run_touched(run, entry.mtime, after)
            entry.mtime = after
        if entry.keys is not None:
            keys = entry.keys
            i = bisect_left(keys, k)
            new = i == len(keys) or keys[i] != k
            if new:
                keys.insert(i, k)
                if entry.fp is not None:    # the names the keys stand for
                    entry.fp ^= runindex.name_hash(runindex.name(k))
            # our change on top of a listing still valid: valid after it
            # too, once the names are seen to be what the index expects (a
            # change by hand during the save moved the mtime no further
            # than ours); a change by someone else before ours: the next
            # look compares the names (and lists the run on a mismatch)
            if entry.listed == before and entry.fp is not None:
                entry.listed = after
                entry.unverified = True
            else:
                entry.listed = None
            cached = self._bodies.get(run)
            if new and len(keys) - 1 - i <= SPLICE_DEPTH and cached is not None \
                    and cached.version == entry.version:
                cached.pending.append(k)        # among the newest: in front
                cached.version += 1
            elif new:
                self._forget_body(run)
            if new:
                entry.version += 1

    def check_run_usable(self, run):
        """Fires when ``run`` can be recorded into later: missing (created
        then) or a real directory; a file or a symlink of that name is
        PiccoloError now (a job scheduled into it would fail when it runs)."""
        check_run_name(run)
        path = os.path.join(self.path.path, run)

        def look():
            try:
                return os.lstat(path).st_mode
            except FileNotFoundError:
                problem = root_problem(self.path.path)
                if problem is not None:
                    raise RootMissing(problem) from None
                return None

        def answer(mode):
            if mode is None:
                check_new_run_name(run)         # created when the job runs
                self._check_twin(run)
            elif not stat.S_ISDIR(mode):
                raise PiccoloError(f"run {run!r} exists and is not a directory")
        return self._fs(look).addCallback(answer)

    def prepare_run(self, run):
        """Create the run if needed and return its next batch number (from
        the index; one fstat, no listing)."""
        check_run_name(run)

        def next_batch(entry):
            keys = entry.keys
            return runindex.batch_of(keys[-1]) + 1 if keys else 0
        return self._check(run, create=True).addCallback(next_batch)

    # -- resources ----------------------------------------------------------

    def get_datadir(self):
        return self.path.path

    def get_mount(self):
        def answer(state):
            if state is not True and state is not False:
                raise PiccoloError(
                    f"{self.device} is mounted at {state}, not at {self.mntpnt}")
            return state
        return self._to_thread(mounting.state, self.device, self.mntpnt,
                               self.mounts_file).addCallback(answer)

    def set_mount(self, mount=True):
        """Mount (``sudo -n mount -o uid=,gid= DEVICE MNTPNT``) or unmount
        (``sudo -n umount DEVICE``) the data device, as the legacy server
        did; already so is a no-op. A missing or failing helper is a 4.00
        with its reason. After mounting, the data directory and the current
        run are created on the device if they are not there."""
        mounted = to_bool(mount, "mount")
        argv = (mounting.mount_argv(self.device, self.mntpnt) if mounted
                else mounting.umount_argv(self.device))

        def act(state):
            if state is not True and state is not False:
                raise PiccoloError(
                    f"{self.device} is mounted at {state}, not at {self.mntpnt}")
            if state == mounted:
                self.log.info("{device} is already {what}", device=self.device,
                              what="mounted" if mounted else "unmounted")
                return None
            return commands.call(self._run, argv).addCallback(
                lambda result: commands.check(argv, result)).addCallback(done)

        def done(_):
            self.log.info("{what} {device} at {point}",
                          what="mounted" if mounted else "unmounted",
                          device=self.device, point=self.mntpnt)
            if mounted:
                # the device has its own contents: create what is missing
                # there and bring the index up to date with it
                d = self._to_thread(prepare_state, self.path.path)
                d.addErrback(unusable)
                d.addCallback(lambda _: self._check(self.current_run.value, create=True))
                d.addCallback(lambda _: self._check_root())
                return d

        def unusable(f):
            f.trap(OSError)
            raise PiccoloError(f"mounted, but cannot use {self.path.path}: "
                               f"{f.value.strerror or f.value}")
        d = self._to_thread(mounting.state, self.device, self.mntpnt, self.mounts_file)
        return d.addCallback(act).addCallback(lambda _: None)

    def all_runs(self, alpha=False, reverse=False, nitems=None, page=None):
        alpha = _is_truthy(alpha, "alpha")
        reverse = _is_truthy(reverse, "reverse")
        nitems = to_int(nitems, "nitems", lo=0) if nitems is not None else None
        page = to_int(page, "page", lo=0) if page is not None else None

        async def answer():
            await self._check_root()
            names, body = await self._sorted_runs(alpha, reverse)
            # page only applies with a positive nitems (the deployed client
            # sends {"nitems": null, "page": 0} on every listing)
            if nitems:
                start = (page or 0) * nitems
                if start == 0 and nitems >= len(names):
                    return body
                return names[start:start + nitems]
            return body
        return defer.Deferred.fromCoroutine(answer())

    def get_current_run(self):
        return self.current_run.value

    def set_current_run(self, run):
        check_run_name(run)

        def created(_):
            if self.current_run.set(run):
                self.log.info("current run is now {run}", run=run)
            return None
        return self._check(run, create=True).addCallback(created)

    def run_get(self, run=None, what=None, *extra):
        if run is None or what is None or extra:
            raise NotFoundError("use /data_dir/runs/<run>/name, current_batch or spectra_list")
        if what == "spectra":
            raise PiccoloError("spectra takes PUT with a file name")
        if what not in ("name", "current_batch", "spectra_list"):
            raise NotFoundError(f"no such resource: runs/{run}/{what}")
        check_run_name(run)

        async def look():
            entry = await self._check(run)
            if what == "name":
                return run
            if what == "current_batch":
                return runindex.batch_of(entry.keys[-1]) if entry.keys else -1
            return await self._spectra_body(run, entry)
        return defer.Deferred.fromCoroutine(look())

    def run_put(self, run=None, what=None, *args):
        if run is None or what is None:
            raise NotFoundError("use PUT /data_dir/runs/<run>/spectra")
        if what != "spectra":
            raise PiccoloError(f"runs/<run>/{what} takes GET, not PUT")
        if len(args) != 1:
            raise PiccoloError("spectra takes one argument: a file name from spectra_list")
        name = args[0]
        k = runindex.parse(name) if isinstance(name, str) else None
        if k is None:
            raise PiccoloError("not a spectrum file name from spectra_list")
        check_run_name(run)

        root = self.path.path

        def opener():
            """A descriptor of the run's regular file ``name``, never
            through a symlink (FileNotFoundError when it is not one)."""
            root_fd = runindex.open_root(root)
            try:
                run_fd, _ = runindex.open_run(root_fd, run)
            finally:
                os.close(root_fd)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                             | os.O_CLOEXEC, dir_fd=run_fd)
            finally:
                os.close(run_fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise FileNotFoundError(name)
            return fd
        known = self._texts.get((run, name))

        def scan():
            # the file's text as a JSON string, read block by block by
            # offset (jsontext): scanned once per file, not per block
            try:
                if known is not None:
                    fd = opener()
                    try:
                        if jsontext.identity_of(fd) == known.identity:
                            return known
                    finally:
                        os.close(fd)
                return jsontext.JSONText.open(opener, self._to_thread, MAX_FILE)
            except (FileNotFoundError, NotADirectoryError, jsontext.FileChanged):
                return None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    return None
                raise

        async def answer():
            entry = await self._check(run)
            keys = entry.keys
            i = bisect_left(keys, k)
            if i == len(keys) or keys[i] != k:
                raise PiccoloError(f"{name} is not in the spectra list of run {run}")
            try:
                body = await self._fs(scan)
            except runindex.NoSuchRun:
                raise NotFoundError(f"no such run: {run}") from None
            except OSError as e:
                raise PiccoloError(f"cannot read {name}: {e.strerror or e}") from None
            if body is None:
                raise PiccoloError(f"{name} is not a spectrum file of run {run}")
            self._texts[(run, name)] = body
            self._texts.move_to_end((run, name))
            while len(self._texts) > TEXTS_KEPT:
                self._texts.popitem(last=False)
            return body
        return defer.Deferred.fromCoroutine(answer())

    def resources(self):
        return {
            "datadir": Resource(get=self.get_datadir),
            "mount": Resource(get=self.get_mount, put=self.set_mount, idempotent=True),
            # PUTs that only read (the legacy API's): open to every client
            "all_runs": Resource(put=self.all_runs, put_reads=True),
            "current_run": Resource(get=self.get_current_run, put=self.set_current_run,
                                    observe=self.current_run, idempotent=True),
            "runs": Resource(get=self.run_get, put=self.run_put, parse_path=True,
                             put_reads=True),
        }
