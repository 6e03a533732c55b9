"""A small malicious CoAP server for the command line's tests.

It answers whatever the test crafted -- any bytes, for any path -- the way
a spoofed or hostile Piccolo would: on 127.0.0.1, an ephemeral port, from
the test's own event loop, for a bounded number of requests, and closed by
the test's cleanup. It speaks just enough CoAP (RFC 7252) for aiocoap:
confirmable and non-confirmable requests answered piggybacked, Uri-Path,
and Block2 (RFC 7959) for answers longer than a block, with Size2 and an
ETag, so crafted answers of any length reach the client whole. Observe
registrations are answered once, without an Observe option (not
registered), as a server may -- unless the answer is ``Observed``, which
registers and then sends its notifications. ``Slow`` answers each block
late (a server that answers, but slowly), ``Body`` is an answer of any
length made as it is asked for (an endless answer without holding it).

Written from the RFCs for these tests; it shares nothing with the server
under test.
"""

import asyncio
import json
import struct
import zlib

GET, POST, PUT, DELETE = 1, 2, 3, 4
CON, NON, ACK, RST = 0, 1, 2, 3

URI_PATH, CONTENT_FORMAT, BLOCK2, SIZE2, ETAG, OBSERVE = 11, 12, 23, 28, 4, 6

CONTENT, CHANGED = (2, 5), (2, 4)
BAD_REQUEST, NOT_FOUND = (4, 0), (4, 4)

MAX_REQUESTS = 20000     # a test never needs more; a runaway client is cut off


def code_byte(code):
    cls, detail = code
    return (cls << 5) | detail


def _option_nibble(value):
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    return 14, struct.pack("!H", value - 269)


def encode(mtype, code, mid, token, options=(), payload=b""):
    out = bytearray(struct.pack("!BBH", 0x40 | (mtype << 4) | len(token),
                                code_byte(code), mid))
    out += token
    last = 0
    for number, value in sorted(options, key=lambda o: o[0]):
        delta, delta_ext = _option_nibble(number - last)
        length, length_ext = _option_nibble(len(value))
        out.append((delta << 4) | length)
        out += delta_ext + length_ext + value
        last = number
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def uint(value):
    if value == 0:
        return b""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode(data):
    """(type, code, mid, token, {number: [values]}, payload) or None."""
    if len(data) < 4 or data[0] >> 6 != 1:
        return None
    mtype = (data[0] >> 4) & 3
    tkl = data[0] & 15
    code = data[1]
    mid = struct.unpack_from("!H", data, 2)[0]
    token = data[4:4 + tkl]
    pos = 4 + tkl
    options = {}
    number = 0
    while pos < len(data):
        if data[pos] == 0xFF:
            return mtype, code, mid, token, options, data[pos + 1:]
        delta, length = data[pos] >> 4, data[pos] & 15
        pos += 1
        for kind in ("delta", "length"):
            nibble = delta if kind == "delta" else length
            if nibble == 13:
                nibble, pos = data[pos] + 13, pos + 1
            elif nibble == 14:
                nibble, pos = struct.unpack_from("!H", data, pos)[0] + 269, pos + 2
            elif nibble == 15:
                return None
            if kind == "delta":
                delta = nibble
            else:
                length = nibble
        number += delta
        options.setdefault(number, []).append(data[pos:pos + length])
        pos += length
    return mtype, code, mid, token, options, b""


class Missing:
    """No route."""


class CraftedServer(asyncio.DatagramProtocol):
    """Answers from ``routes``: {"path/to/resource": answer}, where an
    answer is a JSON-able value (sent as JSON), ``Raw(bytes)``, ``(code,
    bytes)``, or a callable ``(method, path, payload) -> answer``. Unknown
    paths are 4.04. ``requests`` records (method, path, payload)."""

    def __init__(self, routes):
        self.routes = dict(routes)
        self.requests = []
        self.transport = None
        self.calls = []             # pending call_later handles (closed with the server)

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        if len(self.requests) >= MAX_REQUESTS:
            return
        message = decode(data)
        if message is None:
            return
        mtype, code, mid, token, options, payload = message
        if mtype not in (CON, NON) or not 1 <= code <= 31:
            return
        path = "/".join(p.decode("utf-8", "replace") for p in options.get(URI_PATH, []))
        self.requests.append((code, path, payload))
        answer = self.routes.get(path, Missing)
        delay, size2 = 0.0, True
        if isinstance(answer, Slow):
            delay, answer = answer.delay, answer.answer
        observed = None
        if isinstance(answer, Observed):
            observed, answer = answer, answer.now(asyncio.get_running_loop().time())
        if isinstance(answer, Body):
            size2 = answer.size2
        status, body = self.answer(code, path, payload, answer)
        block = options.get(BLOCK2)
        num, szx = 0, 6
        if block:
            value = int.from_bytes(block[0], "big")
            num, szx = value >> 4, min(value & 7, 6)
        reply_type = ACK if mtype == CON else NON
        register = observed is not None and options.get(OBSERVE) == [b""] and not num
        extra = [(OBSERVE, uint(1))] if register else []
        reply = encode(reply_type, status, mid, token,
                       extra + self.block_options(status, body, num, szx, size2),
                       self.block(body, num, szx))
        self.send_later(delay, reply, addr)
        if register:
            observed.registered = asyncio.get_running_loop().time() + delay
            observed.to = (mid, token, addr)
            if observed.stepped:
                # one note now; each next one only after the client has read
                # the resource again (no race with how fast the client is)
                self.notify(path, observed, 0, delay + observed.interval)
            else:
                for i in range(len(observed.notes)):
                    self.notify(path, observed, i, delay + observed.interval * (i + 1))
        elif observed is not None and observed.stepped and code == GET and \
                0 < observed.sent < len(observed.notes):
            self.notify(path, observed, observed.sent, delay + observed.interval)

    def notify(self, path, observed, i, delay):
        mid, token, addr = observed.to
        observed.sent = i + 1
        n_status, n_body = self.answer(GET, path, b"", observed.notes[i])
        message = encode(NON, n_status, (mid + 1 + i) & 0xFFFF, token,
                         [(OBSERVE, uint(2 + i))] +
                         self.block_options(n_status, n_body, 0, 6, True),
                         self.block(n_body, 0, 6))
        self.send_later(delay, message, addr)

    @staticmethod
    def block(body, num, szx):
        size = 1 << (szx + 4)
        if len(body) > size or num or isinstance(body, Body):
            return body[num * size:(num + 1) * size]
        return body

    @staticmethod
    def block_options(status, body, num, szx, size2=True):
        size = 1 << (szx + 4)
        options = []
        if status[0] == 2:
            options.append((CONTENT_FORMAT, uint(50)))
        if len(body) > size or num:
            more = (num + 1) * size < len(body)
            options.append((BLOCK2, uint((num << 4) | (more << 3) | szx) or b"\x00"))
            options.append((ETAG, body.etag if isinstance(body, Body)
                            else zlib.crc32(body).to_bytes(4, "big")))
            if num == 0 and size2:
                options.append((SIZE2, uint(len(body))))
        return options

    def send_later(self, delay, data, addr):
        if not delay:
            self.transport.sendto(data, addr)
            return
        loop = asyncio.get_running_loop()
        self.calls = [c for c in self.calls if not c.cancelled()]
        self.calls.append(loop.call_later(delay, self._send, data, addr))

    def _send(self, data, addr):
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def close(self):
        for call in self.calls:
            call.cancel()
        if self.transport is not None:
            self.transport.close()

    def answer(self, code, path, payload, answer=Missing):
        if answer is Missing:
            answer = self.routes.get(path, Missing)
        if callable(answer) and not isinstance(answer, (Raw, Body, type)):
            answer = answer(code, path, payload)
        if answer is Missing:
            return NOT_FOUND, f"no such resource: /{path}".encode()
        ok = CONTENT if code == GET else CHANGED
        if isinstance(answer, Raw):
            return ok, answer.data
        if isinstance(answer, Body):
            return ok, answer
        if isinstance(answer, tuple) and len(answer) == 2 and isinstance(answer[0], tuple):
            return answer
        return ok, json.dumps(answer).encode("utf-8")


class Raw:
    """An answer's payload exactly as given (not JSON-encoded)."""

    def __init__(self, data):
        self.data = data if isinstance(data, bytes) else data.encode("utf-8")


class Slow:
    """``answer``, each of its blocks sent ``delay`` seconds late."""

    def __init__(self, answer, delay):
        self.answer, self.delay = answer, delay


class Observed:
    """``first`` to the registration (with an Observe option), then each of
    ``notes`` as a notification, ``interval`` seconds apart (NON). With
    ``stepped``, each note after the first is sent only once the client
    has read the resource again with a plain GET (``interval`` after it)."""

    def __init__(self, first, notes, interval=0.2, stepped=False):
        self.first, self.notes, self.interval = first, list(notes), interval
        self.stepped = stepped      # each next note only after a plain GET
        self.registered = None
        self.sent = 0
        self.to = None

    def now(self, t):
        """What a GET answers at loop time ``t``: the latest notified."""
        if self.registered is None:
            return self.first
        if self.stepped:
            return self.notes[self.sent - 1] if self.sent else self.first
        sent = int((t - self.registered) / self.interval)
        return self.notes[min(sent, len(self.notes)) - 1] if sent >= 1 else self.first


class Body:
    """A payload of ``length`` bytes made block by block by ``make(offset,
    size)`` (never held whole: an endless answer costs nothing here);
    ``size2=False`` leaves Size2 out, as a server need not send it."""

    def __init__(self, length, make, size2=True):
        self.length, self.make, self.size2 = length, make, size2
        self.etag = b"\x00\x00\x00\x01"

    def __len__(self):
        return self.length

    def __getitem__(self, part):
        start, stop = max(part.start or 0, 0), min(part.stop or self.length, self.length)
        return self.make(start, max(stop - start, 0)) if stop > start else b""


async def serve(routes):
    """Start a CraftedServer on 127.0.0.1:<ephemeral>; (server, url, close)."""
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: CraftedServer(routes), local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    return server, f"coap://127.0.0.1:{port}", server.close


#: a well-behaved idle instrument, as the real server answers (the crafted
#: cases replace one answer at a time)
def honest_routes():
    return {
        "control/status": "idle",
        "control/current_sequence": -1,
        "control/numSequences": 1,
        "control/fault": "",
        "data_dir/current_run": "spectra",
        "data_dir/runs/spectra/current_batch": -1,
        "spectrometer/spectrometers": ["S_sim_QEP00981"],
        "spectrometer/channels": ["downwelling", "upwelling"],
        "spectrometer/S_sim_QEP00981/status": 6,
        "spectrometer/S_sim_QEP00981/haveTEC": True,
        "spectrometer/S_sim_QEP00981/current_temperature": -10.0,
        "spectrometer/S_sim_QEP00981/current_time/upwelling": 100,
        "spectrometer/S_sim_QEP00981/current_time/downwelling": 100,
        "shutter/shutters": ["downwelling", "upwelling"],
        "shutter/upwelling/status": "closed",
        "shutter/downwelling/status": "closed",
        "control/scheduler/jobs": [
            [1, ["record", ["night", 2, 0, 1.5, 80.0]], "2030-01-01T12:00:00+00:00",
             "2030-01-02T00:00:00+00:00", 3600.0, "active"]],
        "control/scheduler/quietTimeEnabled": False,
        "control/scheduler/quietStart": "22:00:00+0000",
        "control/scheduler/quietEnd": "04:00:00+0000",
        "sysinfo/health": {
            "disk_free": 5e9, "disk_total": 3e10, "days_left": 12.5, "files_today": 3,
            "spectrometers": {"sim_QEP00981": {"name": "S_sim_QEP00981", "status": "IDLE",
                                               "status_code": 6, "errors": 0,
                                               "last_error": None, "temperature": -10.0}},
            "clock_synchronised": True, "uptime": 3600.0, "server_uptime": 60.0,
            "last_batch": None, "fault": "", "faults": {}, "time": "2030-01-01T00:00:00+00:00"},
    }
