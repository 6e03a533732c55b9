"""Downloads: one spectrum file, or a whole run as a zip, streamed.

Nothing here blocks the reactor or holds a whole run in memory: every
file-system call and every piece of compression runs in the web's own
small thread pool (never the instrument's devices' threads or the data
directory's pool), one short step at a time, and the bytes of a step go
to the client before the next step is asked for. A client that reads
slowly pauses the stream (the transport pauses its producer); a thread is
never kept waiting for a client.

A run's zip is written as it goes (``zipfile`` on a stream it cannot seek:
sizes follow each entry in a data descriptor; ZIP64 where sizes or offsets
need it), its entries ``<run>/<file>`` in the order they were recorded.
"""

import os
import stat
import time
import zipfile
from urllib.parse import quote

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import implementer

from .. import runindex
from ..datadir import check_run_name
from ..errors import PiccoloError
from .limits import Shares, host_key

CHUNK = 64 * 1024           # bytes read from a file per step
ZIP_STEP = 128 * 1024       # file bytes compressed per zip step
MAX_DOWNLOADS = 4           # of each kind (files, zips), shared out per host
MAX_DOWNLOADS_PER_HOST = 2
STALL = 30.0                # s a download may go unread before it is dropped
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)   # the earliest date a zip can hold


# -- thread side ----------------------------------------------------------

def open_spectrum(root, run, name):
    """(fd, size, mtime) of a spectrum file of the run: a regular file,
    reached without following a symlink; None when there is no such file."""
    if runindex.parse(name) is None:
        return None
    try:
        root_fd = runindex.open_root(root)
    except OSError:
        return None
    try:
        try:
            run_fd, _ = runindex.open_run(root_fd, run)
        except (runindex.NoSuchRun, OSError):
            return None
    finally:
        os.close(root_fd)
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=run_fd)
        except OSError:
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return fd, st.st_size, st.st_mtime
    finally:
        os.close(run_fd)


def _libc():
    """glibc's malloc controls through ctypes, or None elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            libc.malloc_trim, libc.mallopt       # both there: glibc
            _LIBC = libc
        except (ImportError, OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


_LIBC = None
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024


def keep_big_buffers_apart():
    """Thread side, once before the first zip: blocks of 64 KiB and more
    (a zip's reads, compressed steps, the transport's joined writes) each
    get pages of their own, returned whole when freed. glibc's default
    threshold rises to the largest block freed so far, after which such
    blocks are carved from the heap and leave it fragmented."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def return_memory():
    """Thread side, after the last zip: hand the C heap's free pages back
    to the system (malloc_trim). Together with the above, and with the
    zips' state freed when they end (not when a cycle is collected), RSS
    after rounds of parallel zips of a 3,000-file run stays within a few
    MiB of where it started (it grew by 25 MiB; docs/BENCHMARKS.md)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class _Sink:
    """Where zipfile writes: bytes collected until the step hands them
    on; it can tell its position but not seek (so zipfile streams)."""

    def __init__(self):
        self.parts = []
        self.offset = 0

    def write(self, data):
        data = bytes(data)
        self.parts.append(data)
        self.offset += len(data)
        return len(data)

    def tell(self):
        return self.offset

    def flush(self):
        pass

    def take(self):
        data = b"".join(self.parts)
        self.parts = []
        return data


class RunZip:
    """A run as a zip, made step by step (each ``step()`` in a worker,
    never two at once): returns the next bytes, b"" for none yet, or None
    at the end."""

    def __init__(self, root, run, now=time.time):
        self.root = root
        self.run = run
        self.now = now
        self.sink = _Sink()
        self.zip = None
        self.names = None
        self.current = None     # (fd, writer)
        self.done = False

    def step(self):
        if self.done:
            return None
        if self.names is None:
            self._list()
            return self.sink.take()
        budget = ZIP_STEP
        while budget > 0:
            if self.current is None:
                if not self.names:
                    self.zip.close()
                    last = self.sink.take()
                    self._drop()
                    return last
                self._open(self.names.pop())
                continue
            fd, writer = self.current
            data = os.read(fd, min(budget, CHUNK))
            if not data:
                writer.close()
                os.close(fd)
                self.current = None
                continue
            writer.write(data)
            budget -= len(data)
        return self.sink.take()

    def _list(self):
        root_fd = runindex.open_root(self.root)
        try:
            run_fd, _ = runindex.open_run(root_fd, self.run)
        finally:
            os.close(root_fd)
        try:
            keys = runindex.scan_files(run_fd)[0]      # (keys, leftovers, ...)
        finally:
            os.close(run_fd)
        # popped from the end: the oldest first
        self.names = [runindex.name(k) for k in reversed(keys)]
        self.zip = zipfile.ZipFile(self.sink, "w", compression=zipfile.ZIP_DEFLATED,
                                   allowZip64=True)

    def _open(self, name):
        opened = open_spectrum(self.root, self.run, name)
        if opened is None:
            return          # removed since the listing: left out
        fd, size, mtime = opened
        when = time.gmtime(mtime)[:6]
        info = zipfile.ZipInfo(f"{self.run}/{name}", date_time=max(when, ZIP_EPOCH))
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        try:
            writer = self.zip.open(info, "w", force_zip64=size > (1 << 30))
        except BaseException:
            os.close(fd)
            raise
        self.current = (fd, writer)

    def close(self):
        """Thread side: release what an unfinished zip holds."""
        if self.current is not None:
            try:
                os.close(self.current[0])
            except OSError:
                pass
            self.current = None
        self._drop()

    def _drop(self):
        # the zip's entries (a ZipInfo per file: 3,000 files are ~2 MB)
        # and buffers go now, by reference count, whoever still holds
        # this object (a cycle waiting for the garbage collector held
        # several runs' worth after a few downloads)
        self.done = True
        self.zip = None
        self.names = []
        self.sink = _Sink()

class FileChunks:
    """An open file read step by step (thread side)."""

    def __init__(self, fd):
        self.fd = fd

    def step(self):
        if self.fd is None:
            return None
        data = os.read(self.fd, CHUNK)
        if not data:
            self.close()
            return None
        return data

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


# -- reactor side -------------------------------------------------------------

@implementer(IPushProducer)
class PooledStream:
    """Writes what ``source.step()`` (run in the pool) returns to the
    request until it returns None; paused while the transport is full."""

    log = Logger()

    def __init__(self, request, source, in_pool, done=None, clock=None):
        self.request = request
        self.source = source
        self.in_pool = in_pool
        self.done = done
        self.clock = clock
        self.paused = False
        self.stepping = False
        self.finished = False
        self.sent = 0
        self._stall = None

    def start(self):
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addBoth(lambda _: self.stopProducing())
        self._next()

    def _next(self):
        if self.stepping or self.paused or self.finished:
            return
        self.stepping = True
        self.in_pool(self.source.step).addCallbacks(self._got, self._failed)

    def _got(self, data):
        self.stepping = False
        if self.finished:
            self.in_pool(self.source.close)
            return
        if data is None:
            self._end()
            return
        if data:
            self.sent += len(data)
            self.request.write(data)
        self._next()

    def _failed(self, failure):
        self.stepping = False
        self.log.failure("a download failed", failure)
        # the response has begun: all a client can be told is a cut stream
        self._end(abort=True)

    def _end(self, abort=False):
        if self.finished:
            return
        self.finished = True
        self._unstall()
        self.in_pool(self.source.close)
        self._done()
        try:
            self.request.unregisterProducer()
        except Exception:
            pass
        if abort:
            transport = getattr(self.request.channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        elif not self.request.finished:
            self.request.finish()

    # IPushProducer
    def pauseProducing(self):
        # Twisted turns a connection's idle timer off while it answers: a
        # client that stops reading would hold its download for good
        self.paused = True
        if self._stall is None and self.clock is not None and not self.finished:
            self._stall = self.clock.callLater(STALL, self._stalled)

    def resumeProducing(self):
        self.paused = False
        self._unstall()
        self._next()

    def stopProducing(self):
        self._unstall()
        if not self.finished:
            self.finished = True
            self._done()
            if not self.stepping:
                self.in_pool(self.source.close)

    def _done(self):
        # once: and the callback (which refers to this stream) let go, so
        # no cycle keeps the source alive until the garbage collector runs
        done, self.done = self.done, None
        if done is not None:
            done()

    def _unstall(self):
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None

    def _stalled(self):
        """Nothing read for STALL seconds: the download is dropped."""
        self._stall = None
        self.log.info("a download unread for {s:.0f} s dropped", s=STALL)
        self._end(abort=True)


class Downloads(resource.Resource):
    """``/files/<run>/<file>`` (``?download=1``: as an attachment) and
    ``/zip/<run>``."""

    isLeaf = True
    log = Logger()

    def __init__(self, root, in_pool, zipped=False, clock=None):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
        self.root = root
        self.in_pool = in_pool
        self.zipped = zipped
        self.clock = clock
        self.shares = Shares(MAX_DOWNLOADS, MAX_DOWNLOADS_PER_HOST)   # of requests
        self.tuned = False      # keep_big_buffers_apart done
        self.streams = set()    # the PooledStreams sending now

    def _answer(self, request, code, text):
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        body = text.encode("utf-8")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body

    def _slot(self, host, request):
        """None when ``request`` from ``host`` may download now (the
        download it displaces, if any, is cut), else the reason."""
        admitted, evict = self.shares.admit(host)
        if not admitted:
            if self.shares.holding(host) >= MAX_DOWNLOADS_PER_HOST:
                return (f"too many downloads at once from {host} "
                        f"({MAX_DOWNLOADS_PER_HOST}); try again shortly")
            return (f"too many downloads at once ({MAX_DOWNLOADS}, a fair share "
                    f"each); try again shortly")
        if evict is not None:
            # the biggest holder's oldest download makes room
            self.shares.remove(evict.share_host, evict)
            channel = getattr(evict, "channel", None)
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        request.share_host = host
        self.shares.add(host, request)
        return None

    def render_GET(self, request):
        from .guard import client_host
        try:
            # each segment percent-decoded once, by twisted.web
            parts = [p.decode("utf-8") for p in request.postpath if p]
        except UnicodeDecodeError:
            return self._answer(request, 404, "no such file")
        if len(parts) != (1 if self.zipped else 2):
            return self._answer(request, 404, "use /files/<run>/<file> or /zip/<run>")
        # /zip/<run> is the run named <run>, whatever it ends with (a run
        # may be named "a.zip"); ".zip" is only in the file name offered
        run = parts[0]
        try:
            check_run_name(run)
        except PiccoloError as e:
            return self._answer(request, 404, str(e))
        host = host_key(client_host(request))
        refusal = self._slot(host, request)
        if refusal is not None:
            request.setHeader(b"retry-after", b"5")
            return self._answer(request, 503, refusal)

        def release():
            self.shares.remove(host, request)
        if self.zipped:
            self._zip(request, run, release)
        else:
            self._file(request, run, parts[1], release)
        return server.NOT_DONE_YET

    def _zip(self, request, run, release):
        source = RunZip(self.root, run)
        if not self.tuned:
            self.tuned = True
            self.in_pool(keep_big_buffers_apart)

        def listed(first):
            if request.finished or getattr(request, "_gone", False):
                release()
                self.in_pool(source.close)
                return
            request.setHeader(b"content-type", b"application/zip")
            request.setHeader(b"content-disposition", _attachment(f"{run}.zip"))
            request.setHeader(b"cache-control", b"no-store")
            if request.method == b"HEAD":
                release()
                self.in_pool(source.close)
                request.finish()
                return
            if first:
                request.write(first)
            self._stream(request, source, release)

        def failed(f):
            release()
            if f.check(runindex.NoSuchRun):
                body = self._answer(request, 404, f"no such run: {run}")
            else:
                self.log.failure("listing run {run} for a zip failed", f, run=run)
                body = self._answer(request, 500, "cannot read the run (see the server log)")
            if not request.finished:
                request.write(body)
                request.finish()
        request.notifyFinish().addErrback(lambda _: setattr(request, "_gone", True))
        self.in_pool(source.step).addCallbacks(listed, failed).addErrback(
            lambda f: self.log.failure("a zip download failed", f))

    def _file(self, request, run, name, release):
        def opened(result):
            if result is None:
                release()
                body = self._answer(request, 404, f"no spectrum file {name} in run {run}")
                if not request.finished:
                    request.write(body)
                    request.finish()
                return
            fd, size, mtime = result
            source = FileChunks(fd)
            if request.finished or getattr(request, "_gone", False):
                release()
                self.in_pool(source.close)
                return
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", b"%d" % size)
            request.setHeader(b"cache-control", b"private, max-age=3600")
            if request.args.get(b"download"):
                request.setHeader(b"content-disposition", _attachment(name))
            if request.method == b"HEAD":
                release()
                self.in_pool(source.close)
                request.finish()
                return
            self._stream(request, source, release)

        def failed(f):
            release()
            self.log.failure("opening {run}/{name} failed", f, run=run, name=name)
            if not request.finished:
                request.write(self._answer(request, 500, "cannot read the file"))
                request.finish()
        request.notifyFinish().addErrback(lambda _: setattr(request, "_gone", True))
        self.in_pool(open_spectrum, self.root, run, name).addCallbacks(opened, failed)


    def _stream(self, request, source, release):
        def done():
            self.streams.discard(stream)
            release()
            if self.zipped and not self.streams:
                # the last zip ended: its memory goes back to the system
                self.in_pool(return_memory)
        stream = PooledStream(request, source, self.in_pool, done=done, clock=self.clock)
        self.streams.add(stream)
        stream.start()

    def active_count(self):
        return self.shares.count


def _attachment(filename):
    ascii_name = filename.encode("ascii", "replace").decode("ascii").replace('"', "_")
    return (f'attachment; filename="{ascii_name}"; '
            f"filename*=UTF-8''{quote(filename, safe='')}").encode("ascii")

