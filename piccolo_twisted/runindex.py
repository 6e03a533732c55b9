"""The index of runs and spectrum files, and the file-system walks that
fill it (thread side: plain functions of their arguments, no shared state).

A spectrum file name ``b<batch>_s<sequence>[_dark|_light].pico`` is kept as
one integer key, ``(batch * 10**7 + sequence) * 4 + kind``; with the kinds
ordered as their suffixes sort (none, dark, light) the keys sort in the
order the files were recorded (batch, then sequence, then kind). Numbers
have six digits at least and more when they need them (batch 1,000,000 is
``b1000000_...``; a batch of 1,000,000 sequences ends with sequence
1,000,000, its final dark): only the names ``pico.file_name`` writes are
spectrum files, so a name and its key map one to one (``b0000001_...`` is
not one). A run's files are one sorted ``array('q')``: 8 bytes a file,
where a list of names would take ~80.

A listing is valid for the directory mtime it was taken at. A save of ours
moves the mtime too, and a change by hand in the same moment is hidden by
it: after a save the index is trusted only once a *fingerprint* of the
directory's names (XOR of their hashes: one pass over the names, no
parsing or sorting) matches what the index expects, at the next look;
so is a listing taken too soon after a change (see RACY_NS). Only a
mismatch lists the directory again. (No look runs while a save of ours
writes into the run: ``datadir`` keeps them apart.)

Every walk opens the run below the data directory with ``O_NOFOLLOW``: a
symlink is never a run, a symlink inside a run is never a spectrum file.
"""

import errno
import os
from functools import reduce
from operator import xor
import re
import stat
import time
from array import array

#: six ASCII digits, or more without a leading zero; batches below 10**11,
#: sequences below SEQ (the keys fit in 63 bits); nothing after ".pico"
#: (``$`` let a trailing newline through, ``\d`` digits of any script,
#: which int() then read)
SPECTRUM_FILE = re.compile(
    r"b([0-9]{6}|[1-9][0-9]{6,10})_s([0-9]{6}|[1-9][0-9]{6})(_light|_dark)?\.pico\Z")
SUFFIXES = (".pico", "_dark.pico", "_light.pico")
KIND_CODES = {None: 0, "": 0, "dark": 1, "light": 2, "_dark": 1, "_light": 2}
SEQ = 10_000_000

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
RUN_FLAGS = DIR_FLAGS | os.O_NOFOLLOW
DIR_MODE = 0o755            # run directories, whatever the umask

#: a directory whose mtime is this close to the time it was listed may
#: change again within the same timestamp tick, unseen: such a listing is
#: not trusted, the next look lists again. Linux file systems stamp with the
#: kernel's coarse clock (a tick, <= 10 ms); FAT and others keep whole
#: (even) seconds.
RACY_NS = 20_000_000
RACY_COARSE_NS = 2_500_000_000
#: files scanned between two yields of the GIL to the reactor thread
CHUNK = 2000


class NoSuchRun(Exception):
    """The run does not exist, or is not a real directory."""


def key(batch, sequence, kind=None):
    return (batch * SEQ + sequence) * 4 + KIND_CODES[kind]


def parse(name):
    """The key of a spectrum file name, or None."""
    m = SPECTRUM_FILE.match(name)
    if m is None:
        return None
    return (int(m.group(1)) * SEQ + int(m.group(2))) * 4 + KIND_CODES[m.group(3)]


def name(k):
    batch, sequence = divmod(k >> 2, SEQ)
    return f"b{batch:06d}_s{sequence:06d}{SUFFIXES[k & 3]}"


def batch_of(k):
    return (k >> 2) // SEQ


def _yield_gil():
    # a worker holding the GIL stalls the reactor as surely as work on it
    time.sleep(0)


def encode_names(keys):
    """The JSON list of the names of ``keys`` (sorted ascending), newest
    first, as bytes; built in chunks that give the GIL back in between."""
    n = len(keys)
    if not n:
        return b"[]"
    parts = [b'["']
    for end in range(n, 0, -CHUNK):
        chunk = keys[max(0, end - CHUNK):end]
        chunk.reverse()
        parts.append('","'.join([name(k) for k in chunk]).encode("ascii"))
        parts.append(b'","')
        _yield_gil()
    parts[-1] = b'"]'
    return b"".join(parts)


def splice_names(top, old_top, body):
    """``body`` (an encoded list of names, newest first) with its first
    ``len(old_top)`` names -- those of ``old_top``, ascending, not all of
    the body's -- replaced by the names of ``top`` (ascending)."""
    skip = sum(len(name(k)) + 3 for k in old_top)      # '"' name '",'
    front = '","'.join([name(k) for k in reversed(top)]).encode("ascii")
    return b'["' + front + b'",' + body[1 + skip:]


# -- thread side ---------------------------------------------------------

def open_root(root):
    return os.open(root, DIR_FLAGS)


def open_run(root_fd, run, create=False):
    """A descriptor of the run directory, never through a symlink.

    Returns ``(fd, created)``; raises NoSuchRun when it is missing (and not
    to be created) or is not a real directory."""
    created = False
    if create:
        try:
            os.mkdir(run, DIR_MODE, dir_fd=root_fd)
            created = True
        except FileExistsError:
            pass
    try:
        fd = os.open(run, RUN_FLAGS, dir_fd=root_fd)
    except FileNotFoundError:
        raise NoSuchRun(run) from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):     # a symlink, a file
            raise NoSuchRun(run) from None
        raise
    if created:
        try:
            os.fchmod(fd, DIR_MODE)
            os.fsync(root_fd)
        except OSError:
            pass
    return fd, created


def name_hash(name):
    """A name's share of the fingerprint (process-wide: str hashes are
    salted per process, and the index lives in one)."""
    return hash(name)


def fingerprint(fd):
    """XOR of the hashes of the visible names in an open run directory (a
    save's temporary file is hidden, and no look runs during a save):
    the names as plain strings (``os.listdir``, which gives the GIL back
    at every entry), hashed CHUNK at a time in C (~40 ms for 100,000 names
    on the bench machine, half of what DirEntry objects cost)."""
    names = os.listdir(fd)
    fp = 0
    for start in range(0, len(names), CHUNK):
        fp = reduce(xor, map(hash, [n for n in names[start:start + CHUNK]
                                    if n[0] != "."]), fp)
        _yield_gil()
    return fp


def scan_files(fd):
    """Keys of the spectrum files in an open run directory (sorted), the
    names of temporary files a crash left there, and the fingerprint."""
    keys = []
    leftovers = []
    fp = 0
    mine = f".{os.getpid()}.tmp"
    with os.scandir(fd) as entries:
        for i, entry in enumerate(entries):
            n = entry.name
            if n[0] == ".":
                if n.endswith(".tmp") and ".pico." in n and not n.endswith(mine):
                    leftovers.append(n)
                continue
            fp ^= hash(n)
            k = parse(n)
            if k is not None and entry.is_file(follow_symlinks=False):
                keys.append(k)
            if i % CHUNK == CHUNK - 1:
                _yield_gil()
    keys.sort()
    return array("q", keys), leftovers, fp


def remove(fd, names):
    for n in names:
        try:
            os.unlink(n, dir_fd=fd)
        except OSError:
            pass


def stable_mtime(st):
    """The directory's mtime, or None when it is too fresh to vouch for a
    listing taken now (a change in the same tick would not move it)."""
    mtime = st.st_mtime_ns
    racy = RACY_COARSE_NS if mtime % 1_000_000_000 == 0 else RACY_NS
    return None if time.time_ns() - mtime < racy else mtime


def check_run(root, run, known, create=False, fp=None, verified=True):
    """Validate one run against the disk (thread side).

    ``known`` is the mtime the index's listing of the run is valid for
    (None: no valid listing); ``fp`` the fingerprint of the names the
    index stands for (None: unknown); ``verified`` False when ``known``
    comes from a save of ours, not yet checked (a change by hand in that
    moment left no trace in the mtime). Returns ``(sort_mtime,
    listed_mtime, keys, root_change, verified_fp)``:

    - ``keys`` is None when the index still holds: the directory's mtime
      is ``known`` and verified (one fstat), or, where the mtime cannot
      vouch (``known`` unverified or None), its names fingerprint to
      ``fp`` (one pass over them). ``verified_fp`` is then the
      fingerprint verified for good at ``listed_mtime`` (old enough that a
      later change would move it), or None;
    - else ``keys`` is a fresh listing and ``verified_fp`` its fingerprint;

    ``root_change`` is the data directory's (mtime before, mtime after)
    when the run was created here, else None."""
    root_fd = open_root(root)
    try:
        before = os.fstat(root_fd).st_mtime_ns if create else None
        fd, created = open_run(root_fd, run, create)
        root_change = (before, os.fstat(root_fd).st_mtime_ns) if created else None
    finally:
        os.close(root_fd)
    try:
        st = os.fstat(fd)
        mtime = st.st_mtime_ns
        if created:                     # new and empty: nothing to list
            return mtime, mtime, array("q"), root_change, 0
        if known is not None and mtime == known and verified:
            return mtime, known, None, root_change, None
        # the mtime cannot vouch: the names can (a moved mtime is someone
        # else's change: no fingerprint would match, list at once)
        if fp is not None and (known is None or mtime == known) \
                and fingerprint(fd) == fp:
            stable = stable_mtime(st)
            if stable is None:
                return mtime, known, None, root_change, None
            return mtime, stable, None, root_change, fp
        keys, leftovers, found = scan_files(fd)
        if leftovers:
            remove(fd, leftovers)
            st = os.fstat(fd)
        return st.st_mtime_ns, stable_mtime(st), keys, root_change, found
    finally:
        os.close(fd)


def save(root, run, filename, encode, clobber, write):
    """Encode and write one file into the run, creating the run if needed
    (thread side). Returns ``(mtime before, mtime after, root_change)`` of
    the run directory, for the index to tell its own change from others'."""
    data = encode()
    root_fd = open_root(root)
    try:
        before = os.fstat(root_fd).st_mtime_ns
        fd, created = open_run(root_fd, run, create=True)
        root_change = (before, os.fstat(root_fd).st_mtime_ns) if created else None
    finally:
        os.close(root_fd)
    try:
        run_before = os.fstat(fd).st_mtime_ns
        write(fd, filename, data, clobber)
        return run_before, os.fstat(fd).st_mtime_ns, root_change
    finally:
        os.close(fd)


def scan_root(root_fd):
    """(mtime, {run: mtime}) of the data directory: every non-hidden real
    directory is a run. The mtime is taken before the listing."""
    st = os.fstat(root_fd)
    runs = {}
    with os.scandir(root_fd) as entries:
        for i, entry in enumerate(entries):
            if entry.name[0] == ".":
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    runs[entry.name] = entry.stat(follow_symlinks=False).st_mtime_ns
            except OSError:
                pass
            if i % CHUNK == CHUNK - 1:
                _yield_gil()
    return st.st_mtime_ns, runs


def check_root(root, known):
    """None if the data directory's mtime is still ``known``, else a fresh
    ``scan_root``."""
    fd = open_root(root)
    try:
        st = os.fstat(fd)
        if known is not None and st.st_mtime_ns == known:
            return None
        _, runs = scan_root(fd)
        return stable_mtime(st), runs
    finally:
        os.close(fd)


def build(root, runs):
    """The listings of ``runs`` ({run: mtime} from scan_root): {run: (sort
    mtime, listed mtime, keys)} (thread side, once at start)."""
    found = {}
    for run in runs:
        try:
            found[run] = check_run(root, run, None)
        except (NoSuchRun, OSError):
            pass
        _yield_gil()
    return found


def read_file(root, run, filename, limit):
    """The bytes of a regular file inside the run, no symlink followed."""
    root_fd = open_root(root)
    try:
        fd, _ = open_run(root_fd, run)
    finally:
        os.close(root_fd)
    try:
        try:
            f = os.open(filename, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                        dir_fd=fd)
        except OSError:
            return None
        try:
            st = os.fstat(f)
            if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
                return None
            chunks = []
            while True:
                chunk = os.read(f, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(f)
    finally:
        os.close(fd)
