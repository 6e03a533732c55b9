"""Spectra, .pico JSON documents and atomic, never-overwriting file writes.

``write_atomic`` runs in a worker thread: temporary file in the same
directory, write, flush, fsync, publish (a hard link, which fails rather
than overwrite; rename where the file system has no links), fsync of the
directory. A crash or power cut leaves the whole file or none.
"""

import errno
import json
import os
import time
from datetime import datetime, timezone

DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f%z"


def timestamp(when=None):
    when = when or datetime.now(timezone.utc)
    return when.strftime(DATETIME_FORMAT)


def spectrum(metadata, pixels, direction, dark, sequence, batch, run, when=None):
    meta = dict(metadata)
    meta.update({
        "Direction": direction,
        "Dark": bool(dark),
        "Type": "dark" if dark else "light",
        "Datetime": timestamp(when),
        "SequenceNumber": sequence,
        "Batch": batch,
        "Run": run,
    })
    return {"Metadata": meta, "Pixels": list(pixels)}


def document(spectra):
    return {"Spectra": list(spectra)}


_encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode(doc, pause=time.sleep):
    """The document as compact JSON bytes (worker side).

    Spectrum by spectrum: each piece is one short call into the C encoder
    (well under a millisecond for 2,048 pixels), and between pieces the
    worker gives the GIL away (``pause(0)``), so the reactor thread is
    never kept waiting for a whole file's encoding. The bytes are those
    of one ``json.dumps`` of the whole document."""
    spectra = doc.get("Spectra") if len(doc) == 1 else None
    if not isinstance(spectra, list):
        return _encoder.encode(doc).encode("utf-8")
    parts = [b'{"Spectra":[']
    for i, spectrum in enumerate(spectra):
        if i:
            parts.append(b",")
            pause(0)
        # ASCII (ensure_ascii): the str encodes byte for byte
        parts.append(_encoder.encode(spectrum).encode("ascii"))
    parts.append(b"]}")
    return b"".join(parts)


def file_name(batch, sequence, kind=None):
    """``b000001_s000002_light.pico``; kind None gives the unsplit name."""
    suffix = f"_{kind}" if kind else ""
    return f"b{batch:06d}_s{sequence:06d}{suffix}.pico"


class FileExists(OSError):
    pass


FILE_MODE = 0o644       # readable by whoever copies the data off, whatever the umask


def _fsync_dir(dir_fd):
    try:
        os.fsync(dir_fd)
    except OSError:
        pass


def write_atomic(directory, name, data, clobber=False, fsync=os.fsync):
    """Write ``data`` to ``directory/name`` atomically (thread side).

    ``directory`` is a path or an open directory descriptor; every name is
    resolved relative to it without following a symlink (the temporary is
    created with O_EXCL|O_NOFOLLOW, published with a hard link that fails
    if anything, a dangling symlink included, has the name). The file is
    made 0644 whatever the process umask."""
    own = not isinstance(directory, int)
    dir_fd = (os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
              if own else directory)
    try:
        _write_at(dir_fd, name, data, clobber, fsync)
    finally:
        if own:
            os.close(dir_fd)
    return os.path.join(directory, name) if own else name


def _exists(dir_fd, name):
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _write_at(dir_fd, name, data, clobber, fsync):
    if not clobber and _exists(dir_fd, name):
        raise FileExists(errno.EEXIST, f"{name} exists already", name)
    tmp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, FILE_MODE, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, FILE_MODE)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            fsync(fd)
        finally:
            os.close(fd)
        if clobber:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        else:
            try:
                os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd,
                        follow_symlinks=False)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    raise FileExists(errno.EEXIST, f"{name} exists already", name) from None
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                # no hard links (FAT): rename; we are the only writer
                if _exists(dir_fd, name):
                    raise FileExists(errno.EEXIST, f"{name} exists already", name) from None
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                os.unlink(tmp, dir_fd=dir_fd)
        _fsync_dir(dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
