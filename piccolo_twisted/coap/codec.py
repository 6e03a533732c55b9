"""CoAP messages on the wire (RFC 7252 3): strict decoding into a small
record, and encoding of the answers we send.

txThings' own ``Message``/``Options`` classes parse every option into an
object and build the datagram through several layers of Python calls; the
server spends most of a request's CPU there. This codec keeps options as
raw bytes in a dict (numbers to lists of values) and reads the few it
needs on demand; answers are encoded in one pass.
"""

import struct
from typing import NamedTuple, Optional

from . import _tx

CON, NON, ACK, RST = 0, 1, 2, 3
EMPTY = 0
GET, POST, PUT, DELETE = 1, 2, 3, 4
TYPE_NAMES = ("CON", "NON", "ACK", "RST")

# option numbers (RFC 7252 5.10, 7641, 7959, 9175)
IF_MATCH, URI_HOST, ETAG, IF_NONE_MATCH, OBSERVE, URI_PORT = 1, 3, 4, 5, 6, 7
LOCATION_PATH, URI_PATH, CONTENT_FORMAT, MAX_AGE, URI_QUERY = 8, 11, 12, 14, 15
ACCEPT, LOCATION_QUERY, BLOCK2, BLOCK1, SIZE2 = 17, 20, 23, 27, 28
PROXY_URI, PROXY_SCHEME, SIZE1, ECHO, NO_RESPONSE, REQUEST_TAG = 35, 39, 60, 252, 258, 292

KNOWN_OPTIONS = frozenset(_tx.options) | {ECHO, NO_RESPONSE, REQUEST_TAG}
MAX_OPTIONS = 64               # options per message; more -> 4.02, unparsed

_LENGTH_LIMITS = {OBSERVE: 3, CONTENT_FORMAT: 2, ACCEPT: 2, BLOCK1: 3, BLOCK2: 3,
                  SIZE1: 4, SIZE2: 4, URI_PORT: 2, MAX_AGE: 4, ECHO: 40}
_REPEATABLE = frozenset((IF_MATCH, ETAG, LOCATION_PATH, URI_PATH, URI_QUERY,
                         LOCATION_QUERY))


class FormatError(ValueError):
    """The datagram is not a well-formed CoAP message."""


class TooManyOptions(FormatError):
    """More than MAX_OPTIONS options: the message is not parsed further."""

    def __init__(self, msg):
        super().__init__(f"more than {MAX_OPTIONS} options")
        self.msg = msg


class Block(NamedTuple):
    """A Block1/Block2 value (RFC 7959 2.2); compares equal to a tuple."""
    num: int
    more: bool
    szx: int

    @property
    def size(self):
        return 16 << self.szx

    # the names txThings' BlockOption value uses
    @property
    def block_number(self):
        return self.num

    @property
    def size_exponent(self):
        return self.szx


def uint(value):
    """An unsigned integer option value: big-endian, no leading zeros."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""


def read_uint(raw):
    return int.from_bytes(raw, "big")


def block_value(num, more, szx):
    return uint((num << 4) | (8 if more else 0) | szx)


class _Value:
    """An option value as txThings' option objects show it (``.value``)."""
    __slots__ = ("number", "value")

    def __init__(self, number, value):
        self.number = number
        self.value = value


_UINT = frozenset((OBSERVE, CONTENT_FORMAT, MAX_AGE, ACCEPT, SIZE1, SIZE2, URI_PORT,
                   NO_RESPONSE))


class Options:
    """Read-only view of a message's options, with the attribute names of
    txThings' ``Options`` (tests and tools read answers through it)."""

    __slots__ = ("_raw",)

    def __init__(self, raw):
        self._raw = raw

    def _first(self, number):
        values = self._raw.get(number)
        return values[0] if values else None

    def _uint(self, number):
        raw = self._first(number)
        return None if raw is None else read_uint(raw)

    def _block(self, number):
        raw = self._first(number)
        if raw is None:
            return None
        v = read_uint(raw)
        return Block(v >> 4, bool(v & 8), v & 7)

    block1 = property(lambda self: self._block(BLOCK1))
    block2 = property(lambda self: self._block(BLOCK2))
    observe = property(lambda self: self._uint(OBSERVE))
    content_format = property(lambda self: self._uint(CONTENT_FORMAT))
    accept = property(lambda self: self._uint(ACCEPT))
    max_age = property(lambda self: self._uint(MAX_AGE))
    size1 = property(lambda self: self._uint(SIZE1))
    size2 = property(lambda self: self._uint(SIZE2))
    etag = property(lambda self: self._first(ETAG))
    echo = property(lambda self: self._first(ECHO))
    uri_path = property(lambda self: tuple(self._raw.get(URI_PATH, ())))
    uri_query = property(lambda self: tuple(self._raw.get(URI_QUERY, ())))

    def getOption(self, number):
        values = self._raw.get(number)
        if not values:
            return None
        if number in _UINT:
            return [_Value(number, read_uint(v)) for v in values]
        return [_Value(number, v) for v in values]

    @property
    def _options(self):
        return self._raw


class Message:
    """One decoded datagram. ``options`` maps option numbers to lists of raw
    values; ``size`` is the datagram's length (the 3x limit's yardstick)."""

    __slots__ = ("mtype", "code", "mid", "token", "options", "payload", "size",
                 "bad_option", "raw")

    def __init__(self, mtype, code, mid, token, options, payload, size, raw):
        self.mtype = mtype
        self.code = code
        self.mid = mid
        self.token = token
        self.options = options
        self.payload = payload
        self.size = size
        self.bad_option = None
        self.raw = raw

    @property
    def opt(self):
        return Options(self.options)

    def encode(self):
        return self.raw

    def path(self):
        """The Uri-Path as a tuple of str; None when not UTF-8."""
        try:
            return tuple(s.decode("utf-8") for s in self.options.get(URI_PATH, ()))
        except UnicodeDecodeError:
            return None

    def first(self, number):
        values = self.options.get(number)
        return values[0] if values else None

    def block(self, number):
        raw = self.first(number)
        if raw is None:
            return None
        v = read_uint(raw)
        return Block(v >> 4, bool(v & 8), v & 7)

    def observe(self):
        raw = self.first(OBSERVE)
        return None if raw is None else read_uint(raw)

    def is_request(self):
        return (self.mtype == CON or self.mtype == NON) and 1 <= self.code < 32


def _extended(value, data, pos):
    if value < 13:
        return value, pos
    if value == 13:
        if pos + 1 > len(data):
            raise FormatError("truncated option header")
        return data[pos] + 13, pos + 1
    if value == 14:
        if pos + 2 > len(data):
            raise FormatError("truncated option header")
        return ((data[pos] << 8) | data[pos + 1]) + 269, pos + 2
    raise FormatError("reserved option nibble 15")


def decode(data):
    """Parse one datagram strictly (RFC 7252 3, 5.4)."""
    n = len(data)
    if n < 4:
        raise FormatError("shorter than a header")
    b0, code, mid = struct.unpack_from("!BBH", data)
    if b0 >> 6 != 1:
        raise FormatError("version is not 1")
    tkl = b0 & 0x0F
    if tkl > 8:
        raise FormatError("token length over 8")
    if n < 4 + tkl:
        raise FormatError("truncated token")
    if code == EMPTY and (tkl or n > 4):
        raise FormatError("empty message with content")
    options = {}
    msg = Message((b0 >> 4) & 3, code, mid, data[4:4 + tkl], options, b"", n, data)
    pos = 4 + tkl
    number = 0
    count = 0
    while pos < n:
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            if pos == n:
                raise FormatError("payload marker without payload")
            msg.payload = data[pos:]
            break
        count += 1
        if count > MAX_OPTIONS:
            raise TooManyOptions(msg)
        delta, pos = _extended(byte >> 4, data, pos)
        length, pos = _extended(byte & 0x0F, data, pos)
        number += delta
        if pos + length > n:
            raise FormatError("truncated option value")
        value = data[pos:pos + length]
        pos += length
        if (length > _LENGTH_LIMITS.get(number, 1034)
                or (number in options and number not in _REPEATABLE)):
            # RFC 7252 5.4.3: a value of the wrong length, or a repeat of a
            # non-repeatable option, is treated like an unknown option:
            # ignored when elective, 4.02 when critical
            if number & 1:
                msg.bad_option = number
            continue
        values = options.get(number)
        if values is None:
            options[number] = [value]
        else:
            values.append(value)
    return msg


def empty(mtype, mid):
    """An empty ACK or RST: four bytes, no token (#10)."""
    return struct.pack("!BBH", 0x40 | (mtype << 4), 0, mid)


def _nibble(x):
    if x < 13:
        return x, b""
    if x < 269:
        return 13, bytes((x - 13,))
    return 14, struct.pack("!H", x - 269)


def encode(mtype, code, mid, token, options=(), payload=b""):
    """One datagram; ``options`` are (number, raw value) pairs in number
    order."""
    out = bytearray(struct.pack("!BBH", 0x40 | (mtype << 4) | len(token), code, mid))
    out += token
    last = 0
    for number, value in options:
        delta = number - last
        last = number
        length = len(value)
        if delta < 13 and length < 13:
            out.append((delta << 4) | length)
        else:
            dn, dx = _nibble(delta)
            ln, lx = _nibble(length)
            out.append((dn << 4) | ln)
            out += dx
            out += lx
        out += value
    if payload:
        out.append(0xFF)
        out += payload
    return bytes(out)


class Reply(NamedTuple):
    """What an answer says, before it is fitted to a message type and a
    size: the code, a (slice of the) body and the options that describe it."""
    code: int
    payload: bytes = b""
    content_format: Optional[int] = None
    etag: Optional[bytes] = None
    observe: Optional[int] = None
    block2: Optional[Block] = None
    size2: Optional[int] = None
    block1: Optional[Block] = None
    size1: Optional[int] = None
    max_age: Optional[int] = None
    echo: Optional[bytes] = None

    def options(self):
        opts = []
        if self.etag is not None:
            opts.append((ETAG, self.etag))
        if self.observe is not None:
            opts.append((OBSERVE, uint(self.observe)))
        if self.content_format is not None:
            opts.append((CONTENT_FORMAT, uint(self.content_format)))
        if self.max_age is not None:
            opts.append((MAX_AGE, uint(self.max_age)))
        if self.block2 is not None:
            opts.append((BLOCK2, block_value(*self.block2)))
        if self.block1 is not None:
            opts.append((BLOCK1, block_value(*self.block1)))
        if self.size2 is not None:
            opts.append((SIZE2, uint(self.size2)))
        if self.size1 is not None:
            opts.append((SIZE1, uint(self.size1)))
        if self.echo is not None:
            opts.append((ECHO, self.echo))
        return opts

    def encode(self, mtype, mid, token):
        return encode(mtype, self.code, mid, token, self.options(), self.payload)
