"""fetch: a run's spectrum files, byte-identical, atomically, resumable.

``PUT /data_dir/runs/<run>/spectra`` answers a file's text as a JSON
string; the file is that text in UTF-8. A file already here is compared
without downloading it: the server tags a blockwise answer with an ETag
(CRC-32 of the JSON body) and its size (Size2); the local file's JSON body
must match both (and the first block byte for byte). Anything else is
downloaded again.

The server is not trusted with the laptop's disk. Every run and file name
it sends is checked (``names``: the server's own rules) before anything
is created: one unsafe name and nothing is written (exit 2). A run is
fetched only into a folder name that is good on every system
(``names.local_name_problem``: ``C:evil`` is a path on Windows, ``CON`` a
device, ``run.`` is ``run`` there) and that no other run of the fetch, or
folder already in DIR, shares on a case-insensitive disk (``Run`` and
``run``); such a run is left out with a line saying why (exit 1), the
others are fetched. Files go to ``DIR/<run>/<file>`` only: a run directory
that is a symlink is refused, a local file is opened without following
symlinks and without blocking, and only a regular file of at most
MAX_LOCAL bytes is read (a FIFO or a device named like a spectrum file is
replaced, never read).

Time is bounded by progress, not by a deadline per file: each transfer
worker keeps a pace (``client.Pace``: MIN_RATE bytes/s after its first
seconds, every block within BLOCK_TIMEOUT), so a server that answers
slowly ends the fetch with a line saying so, whatever the number of
files.
"""

import asyncio
import errno
import json
import os
import stat
import tempfile
import zlib

from .client import CliError, NotFound, Pace, Refused, TooSlow
from .files import read_regular
from .names import folded, local_name_problem, run_name_problem
from .shape import BadAnswer
from .terminal import emit, printable, shown

MAX_LOCAL = 64 << 20            # the largest file the server serves


def json_body(text):
    """The server's JSON encoding of a file's text (compact, ASCII)."""
    return json.dumps(text, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()        # read once, in the main thread (umask is process-wide)


def write_atomically(path, data):
    """Write ``data`` to a temporary file beside ``path`` and rename it:
    an interrupted fetch leaves the whole file or none."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _local_body(path):
    """The local copy's JSON body, or None (then it is downloaded again):
    a symlink, a FIFO, a device or anything but a regular file of at most
    MAX_LOCAL bytes is never read."""
    try:
        return json_body(read_regular(path, MAX_LOCAL, follow=False).decode("utf-8"))
    except (OSError, UnicodeDecodeError):
        return None


def run_directory(directory, run):
    """``DIR/<run>``, created if missing; CliError if it exists as anything
    but a real directory (a symlink would lead out of DIR)."""
    target = os.path.join(directory, run)
    try:
        os.makedirs(directory, exist_ok=True)
        os.mkdir(target)
    except FileExistsError:
        pass
    except OSError as e:
        raise CliError(f"fetch: cannot create {target}: {e.strerror}") from None
    try:
        st = os.lstat(target)
    except OSError as e:
        raise CliError(f"fetch: cannot use {target}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CliError(f"fetch: {target} exists and is not a directory "
                       f"(a symlink is not followed)")
    return target


async def same_as_server(client, ctx, pace, run, name, path):
    """True when the local file at ``path`` has the server's content."""
    local = await asyncio.to_thread(_local_body, path)
    if local is None:
        return False
    first, more, etag, size = await client.put_first_block(
        f"data_dir/runs/{run}/spectra", name, ctx=ctx, pace=pace)
    if not more:
        return first == local
    return (local[:len(first)] == first and size == len(local)
            and etag == zlib.crc32(local).to_bytes(4, "big"))


def _lexists(path):
    try:
        os.lstat(path)
    except OSError as e:
        return e.errno != errno.ENOENT
    return True


async def fetch_file(client, ctx, pace, run, name, path):
    """Download one file unless it is here already; True if downloaded.
    ``name`` is a checked spectrum file name, ``path`` is in DIR/<run>."""
    if _lexists(path) and await same_as_server(client, ctx, pace, run, name, path):
        return False
    # the catalogue's shape: a string (the file's text)
    what = f"PUT /data_dir/runs/{run}/spectra"
    text = await client.put(f"data_dir/runs/{run}/spectra", name, ctx=ctx, pace=pace)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        # the server reads files as strict UTF-8: a lone surrogate ("\ud800")
        # is no text a file held
        raise BadAnswer(f"{what}: malformed answer from the server: the text of {name} "
                        f"holds a lone surrogate (not UTF-8)") from None
    await asyncio.to_thread(write_atomically, path, data)
    return True


def local_folders(plan, directory):
    """The runs of ``plan`` that get a folder in ``directory``, and a line
    for each one left out: a name that is not a good folder name on every
    system, or one a case-insensitive disk takes for another run's (or a
    folder already there)."""
    try:
        present = {folded(e): e for e in os.listdir(directory)}
    except OSError:
        present = {}
    kept, left_out, claimed = [], [], {}
    for run, names in plan:
        problem = local_name_problem(run)
        key = folded(run) if problem is None else None
        twin = claimed.get(key) or present.get(key)
        if problem is None and twin is not None and twin != run:
            problem = (f"one folder with {twin!r} on Windows, macOS or a FAT stick "
                       f"(fetch it into another DIR)")
        if problem is not None:
            left_out.append(f"run {shown(repr(run))} not fetched: {problem}")
            continue
        claimed[key] = run
        kept.append((run, names))
    return kept, left_out


async def fetch(client, run, directory, jobs, err):
    from tqdm import tqdm
    if run is None:
        # each a checked run name (shape.RUN_NAME), or BadAnswer: exit 2
        runs = await client.put("data_dir/all_runs", {"alpha": True})
    else:
        problem = run_name_problem(run)
        if problem:
            raise CliError(f"fetch: {shown(repr(run))} is not a run name ({problem})")
        problem = local_name_problem(run)
        if problem:
            raise CliError(f"fetch: run {shown(repr(run))} cannot be a folder name here: "
                           f"{problem}")
        runs = [run]
    # every name first, checked (shape: run names, spectrum file names);
    # only then is anything created on this computer
    plan = []
    for r in dict.fromkeys(runs):
        try:
            names = await client.get(f"data_dir/runs/{r}/spectra_list")
        except NotFound:
            raise CliError(f"fetch: unknown run {shown(repr(r))}") from None
        plan.append((r, list(dict.fromkeys(names))))
    plan, left_out = local_folders(plan, directory)
    for line in left_out:
        emit(err, f"piccolo3: fetch: {line}")
    work = []
    for r, names in plan:
        target = run_directory(directory, r)
        work.extend((r, n, os.path.join(target, n)) for n in names)
    queue = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    counts = {"downloaded": 0, "present": 0}
    failed = []
    bar = tqdm(total=len(work), unit="file", file=err, dynamic_ncols=True,
               desc="fetch")

    async def worker():
        # each worker its own endpoint: earlier servers kept one blockwise
        # body per (peer, path), and every file shares the path .../spectra
        ctx = await client.endpoint()
        pace = Pace(client.timeout)
        while True:
            try:
                r, name, path = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                fetched = await fetch_file(client, ctx, pace, r, name, path)
            except OSError as e:
                raise CliError(f"fetch: cannot write {path}: {e.strerror}") from None
            except TooSlow as e:
                raise CliError(f"fetch: {shown(r)}/{name}: {shown(e)}") from None
            except Refused as e:
                # the server will not give this one file (e.g. it cannot read
                # it): say so and go on with the others
                failed.append(f"{r}/{name}: {shown(e)}")
                bar.write(printable(f"piccolo3: fetch: {shown(r)}/{name}: {shown(e)}", err),
                          file=err)
                bar.update(1)
                continue
            counts["downloaded" if fetched else "present"] += 1
            bar.update(1)

    workers = [asyncio.ensure_future(worker()) for _ in range(max(1, min(jobs, len(work))))]
    try:
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
        bar.close()
    emit(err, f"{len(work)} files in {len(plan)} run{'s' if len(plan) != 1 else ''}: "
              f"{counts['downloaded']} downloaded, {counts['present']} already here")
    if failed:
        raise CliError(f"fetch: {len(failed)} file{'s' if len(failed) != 1 else ''} "
                       f"not fetched (first: {shown(failed[0])})")
    if left_out:
        raise CliError(f"fetch: {len(left_out)} run{'s' if len(left_out) != 1 else ''} "
                       f"not fetched (first: {left_out[0]})")
    return 0
