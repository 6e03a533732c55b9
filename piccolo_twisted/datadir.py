"""/data_dir: the data directory, its runs and their spectrum files.

Every file-system call runs in a worker thread (a USB stick can stall);
the reactor side only validates names and keeps the current run.
"""

import os
import re

from twisted.internet import threads, utils
from twisted.logger import Logger
from twisted.python.filepath import FilePath, InsecurePath

from .acquisition.pico import remove_leftovers
from .api import Resource
from .errors import NotFoundError, PiccoloError
from .observable import Observable

SPECTRUM_FILE = re.compile(r"^b(\d{6})_s(\d{6})(_light|_dark)?\.pico$")
DEFAULT_RUN = "spectra"


def check_run_name(name):
    """A run name is one safe path component; return it or raise PiccoloError."""
    if not isinstance(name, str):
        raise PiccoloError("a run name must be a string")
    if (not name or name in (".", "..") or name.startswith(".") or "/" in name
            or "\\" in name or "\x00" in name or len(name) > 200):
        raise PiccoloError(
            f"invalid run name {name!r}: one path component, not empty, "
            "not hidden, no '/' or '..'")
    return name


def _is_truthy(value, name):
    if isinstance(value, bool):
        return value
    raise PiccoloError(f"{name} must be true or false")


def read_mounts(path="/proc/mounts"):
    """(device, mount point) pairs from /proc/mounts."""
    pairs = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                # /proc/mounts escapes blanks as \040
                pairs.append(tuple(p.replace("\\040", " ") for p in parts[:2]))
    return pairs


class DataDir:
    log = Logger()

    def __init__(self, path, device="/dev/sda1", mntpnt="/mnt",
                 run_command=None, mounts_file="/proc/mounts",
                 to_thread=threads.deferToThread):
        self.path = FilePath(os.path.abspath(path))
        self.device = device
        self.mntpnt = mntpnt
        self.mounts_file = mounts_file
        self._run = run_command or (
            lambda argv: utils.getProcessOutputAndValue(argv[0], argv[1:]))
        self._to_thread = to_thread
        self.current_run = Observable(DEFAULT_RUN)
        self.files_written = Observable(0)

    # -- start-up ---------------------------------------------------------

    def prepare(self):
        """Create the directory (blocking: called once before serving)."""
        self.path.makedirs(ignoreExistingDirectory=True)
        runs = self._list_runs()
        if runs:
            newest = max(runs, key=lambda r: r[1])[0]
            self.current_run.set(newest)
        self.path.child(self.current_run.value).makedirs(ignoreExistingDirectory=True)
        self.log.info("data directory {path}, current run {run}",
                      path=self.path.path, run=self.current_run.value)

    # -- thread-side helpers (no shared state) ------------------------------

    def _list_runs(self):
        runs = []
        try:
            entries = list(os.scandir(self.path.path))
        except OSError:
            return runs
        for e in entries:
            if not e.name.startswith(".") and e.is_dir(follow_symlinks=False):
                try:
                    runs.append((e.name, e.stat().st_mtime))
                except OSError:
                    pass
        return runs

    def run_path(self, run):
        check_run_name(run)
        try:
            return self.path.child(run)
        except InsecurePath:
            raise PiccoloError(f"invalid run name {run!r}") from None

    @staticmethod
    def list_spectra(run_dir):
        """Spectrum file names of a run directory, newest first (thread side)."""
        try:
            names = [n for n in os.listdir(run_dir) if SPECTRUM_FILE.match(n)]
        except FileNotFoundError:
            return None
        names.sort(reverse=True)
        return names

    @classmethod
    def highest_batch(cls, run_dir):
        return cls._highest(cls.list_spectra(run_dir) or [])

    @staticmethod
    def _highest(names):
        return max((int(SPECTRUM_FILE.match(n).group(1)) for n in names), default=-1)

    # -- resources ----------------------------------------------------------

    def get_datadir(self):
        return self.path.path

    def get_mount(self):
        def check():
            mounts = read_mounts(self.mounts_file)
            for device, point in mounts:
                if device == self.device:
                    if os.path.realpath(point) == os.path.realpath(self.mntpnt):
                        return True
                    return ("elsewhere", point)
            return False

        def answer(state):
            if isinstance(state, tuple):
                raise PiccoloError(
                    f"{self.device} is mounted elsewhere, not at {self.mntpnt}")
            return state
        return self._to_thread(check).addCallback(answer)

    def set_mount(self, mount=True):
        mount = _is_truthy(mount, "mount")
        argv = (("sudo", "mount", self.device, self.mntpnt) if mount
                else ("sudo", "umount", self.mntpnt))

        def done(result):
            out, err, code = result
            if code != 0:
                text = (err or out or b"").decode("utf-8", "replace").strip()
                raise PiccoloError(f"{' '.join(argv[1:2])} failed: {text or f'exit {code}'}")
            self.log.info("{what} {device} at {point}",
                          what="mounted" if mount else "unmounted",
                          device=self.device, point=self.mntpnt)
        return self._run(argv).addCallback(done)

    def all_runs(self, alpha=False, reverse=False, nitems=None, page=None):
        alpha = _is_truthy(alpha, "alpha")
        reverse = _is_truthy(reverse, "reverse")
        for name, value in (("nitems", nitems), ("page", page)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise PiccoloError(f"{name} must be a non-negative integer")
        if page is not None and not nitems:
            raise PiccoloError("page needs nitems > 0")

        def order(runs):
            key = (lambda r: r[0]) if alpha else (lambda r: (r[1], r[0]))
            names = [r[0] for r in sorted(runs, key=key, reverse=reverse)]
            if nitems:
                start = (page or 0) * nitems
                names = names[start:start + nitems]
            return names
        return self._to_thread(self._list_runs).addCallback(order)

    def get_current_run(self):
        return self.current_run.value

    def set_current_run(self, run):
        path = self.run_path(run)

        def created(_):
            if self.current_run.set(run):
                self.log.info("current run is now {run}", run=run)
            return None

        def failed(f):
            f.trap(OSError)
            raise PiccoloError(f"cannot create run {run!r}: {f.value.strerror}")
        return self._to_thread(path.makedirs, True).addCallbacks(created, failed)

    def prepare_run(self, run):
        """Create the run if needed, remove temporary files a crash left
        there, and return the next batch number: one trip to a thread."""
        path = self.run_path(run)

        def prepare():
            path.makedirs(ignoreExistingDirectory=True)
            remove_leftovers(path.path)
            return self.highest_batch(path.path) + 1
        return self._to_thread(prepare)

    def run_get(self, run=None, what=None, *extra):
        if run is None or what is None or extra:
            raise NotFoundError("use /data_dir/runs/<run>/name, current_batch or spectra_list")
        if what == "spectra":
            raise PiccoloError("spectra takes PUT with a file name")
        if what not in ("name", "current_batch", "spectra_list"):
            raise NotFoundError(f"no such resource: runs/{run}/{what}")
        path = self.run_path(run)

        def look():
            names = self.list_spectra(path.path)     # None: no such run
            if names is None or not path.isdir():
                raise NotFoundError(f"no such run: {run}")
            if what == "name":
                return run
            if what == "current_batch":
                return self._highest(names)
            return names
        return self._to_thread(look)

    def run_put(self, run=None, what=None, *args):
        if run is None or what is None:
            raise NotFoundError("use PUT /data_dir/runs/<run>/spectra")
        if what != "spectra":
            raise PiccoloError(f"runs/<run>/{what} takes GET, not PUT")
        if len(args) != 1:
            raise PiccoloError("spectra takes one argument: a file name from spectra_list")
        name = args[0]
        if not isinstance(name, str) or not SPECTRUM_FILE.match(name):
            raise PiccoloError("not a spectrum file name from spectra_list")
        run_path = self.run_path(run)

        def read():
            names = self.list_spectra(run_path.path)
            if names is None:
                raise NotFoundError(f"no such run: {run}")
            if name not in names:
                raise PiccoloError(f"{name} is not in the spectra list of run {run}")
            with open(run_path.child(name).path, encoding="utf-8") as f:
                return f.read()
        return self._to_thread(read)

    def resources(self):
        return {
            "datadir": Resource(get=self.get_datadir),
            "mount": Resource(get=self.get_mount, put=self.set_mount),
            "all_runs": Resource(put=self.all_runs),
            "current_run": Resource(get=self.get_current_run, put=self.set_current_run,
                                    observe=self.current_run),
            "runs": Resource(get=self.run_get, put=self.run_put, parse_path=True),
        }
