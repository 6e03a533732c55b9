"""A text file as a JSON string, read by offset.

``PUT /data_dir/runs/<run>/spectra`` answers a file's text as a JSON
string. Encoding a whole file per request (and keeping it in memory while
its blocks are fetched) costs O(size) per block once bodies are too big to
keep -- O(n^2) per fetch: a 7 MB file took 37.6 ms per 1 KiB block. Here
the file is scanned once (in the file pool): the encoded length, its CRC-32
(the ETag) and a checkpoint every PIECE bytes of the file (where the
encoded string is at that point). A block is then encoded from the one or
two pieces it falls in: a fixed amount of work whatever the file's size.

The JSON encoding of a string is the concatenation of its characters'
encodings (``ensure_ascii``: every character on its own), so pieces cut on
character boundaries encode independently. Standard library only; the
caller supplies how to open the file (safely) and where to run blocking
calls.
"""

import bisect
import codecs
import json
import os
import struct
import zlib
from array import array

PIECE = 8192                   # file bytes between checkpoints
HEAD = 1024                    # encoded bytes kept from the scan (block 0)


class FileChanged(OSError):
    """The file is not the one scanned (replaced or rewritten meanwhile)."""


def _identity(st):
    """What tells one version of a file from another: a rewrite in place
    may keep the size and (set back, or on FAT with its 2 s steps) the
    modification time, but never the status-change time, which only the
    kernel sets (and utime itself changes)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def identity_of(fd):
    return _identity(os.fstat(fd))


def _encode(text):
    return json.dumps(text)[1:-1].encode("ascii")


def scan(fd, limit):
    """Scan an open file: ``(identity, encoded size, crc, file offsets,
    encoded offsets)`` of its pieces; None when it is not UTF-8 or is over
    ``limit`` bytes."""
    st = os.fstat(fd)
    if st.st_size > limit:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    files, encoded = array("q"), array("q")
    crc = zlib.crc32(b'"')
    head = bytearray(b'"')
    position = 1                    # in the encoded string, after its opening quote
    offset = 0                      # file offset where the next piece starts
    read_at = 0
    while True:
        chunk = os.pread(fd, PIECE, read_at)
        read_at += len(chunk)
        final = len(chunk) < PIECE
        try:
            text = decoder.decode(chunk, final)
        except UnicodeDecodeError:
            return None
        if text:
            piece = _encode(text)
            files.append(offset)
            encoded.append(position)
            crc = zlib.crc32(piece, crc)
            position += len(piece)
            if len(head) < HEAD:
                head += piece[:HEAD - len(head)]
            # a character cut by the chunk's end starts the next piece
            offset = read_at - len(decoder.getstate()[0])
        if final:
            break
    crc = zlib.crc32(b'"', crc)
    if _identity(os.fstat(fd)) != _identity(st):
        raise FileChanged("the file changed while it was read")
    if len(head) < HEAD:
        head += b'"'
    return _identity(st), position + 1, crc, files, encoded, bytes(head)


class JSONText:
    """A file's text as a JSON string: ``size``, ``etag`` and
    ``read(offset, length)`` (a Deferred of the bytes, in the file pool).
    ``opener()`` returns a new read-only descriptor of the file (the caller
    makes it safe: no symlinks); ``to_thread(f, *args)`` runs a blocking call
    off the reactor."""

    def __init__(self, opener, to_thread, scanned):
        self.opener = opener
        self.to_thread = to_thread
        self.identity, self.size, crc, self.files, self.encoded, self.head = scanned
        self.etag = struct.pack("!I", crc)
        self.file_size = self.identity[2]
        # what keeping it costs: the checkpoints
        self.cost = 16 * len(self.files) + len(self.head) + 200

    def __len__(self):
        return self.size

    def __bool__(self):
        return True

    def __bytes__(self):
        """The whole encoded string (blocking: reads the file)."""
        return self.read_now(0, self.size)

    @classmethod
    def open(cls, opener, to_thread, limit):
        """Scan the file (blocking: call it in the file pool); None when it
        is not UTF-8 text or over ``limit`` bytes."""
        fd = opener()
        try:
            scanned = scan(fd, limit)
        finally:
            os.close(fd)
        return None if scanned is None else cls(opener, to_thread, scanned)

    def read(self, offset, length):
        """The bytes at ``offset`` (``length`` of them, fewer at the end):
        at once from the head kept by the scan, else a Deferred (the file
        pool reads them)."""
        if offset + length <= len(self.head):
            return self.head[offset:offset + length]
        return self.to_thread(self.read_now, offset, length)

    def read_now(self, offset, length):
        """Bytes ``offset`` to ``offset + length`` of the encoded string
        (blocking), from the pieces they fall in."""
        end = min(self.size, offset + length)
        if offset >= end:
            return b""
        out = bytearray()
        if offset == 0:
            out += b'"'
        start = max(offset, 1)
        if self.files and start < self.size - 1:
            i = bisect.bisect_right(self.encoded, start) - 1
            fd = self.opener()
            try:
                if _identity(os.fstat(fd)) != self.identity:
                    raise FileChanged("the file changed since its transfer began")
                position = self.encoded[i]
                skip = start - position
                while i < len(self.files):
                    first = self.files[i]
                    last = self.files[i + 1] if i + 1 < len(self.files) else self.file_size
                    piece = _encode(os.pread(fd, last - first, first).decode("utf-8"))
                    out += piece[skip:]
                    skip = 0
                    position += len(piece)
                    i += 1
                    if position >= end:
                        break
            finally:
                os.close(fd)
        if end == self.size:
            out += b'"'
        want = end - offset
        return bytes(out[:want])
