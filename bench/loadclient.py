"""A small raw-UDP CoAP load client (stdlib only), loopback targets only.

aiocoap is slower than the server, so the benchmark speaks CoAP itself:
pre-encoded CON requests, one socket, a closed loop with ``concurrency``
requests in flight, or an open loop at a fixed rate.
"""

import ipaddress
import json
import os
import selectors
import socket
import struct
import time

MAX_SECONDS = 600.0
ECHO = 252


def next_szx(offset, want=6):
    """The largest block size exponent <= ``want`` whose blocks align with
    ``offset`` (after a server answered with smaller blocks, RFC 7959 2.4)."""
    szx = want
    while szx and offset % (16 << szx):
        szx -= 1
    return szx


def echo_of(data):
    """The Echo option (RFC 9175) of an answer, or None: a client that
    returns it in its next requests proves its address, and the server's
    answers are no longer held to 3x the request."""
    return option(data, ECHO)


def option(data, wanted):
    """The first value of option ``wanted`` in a datagram, or None."""
    tkl = data[0] & 15
    pos, number = 4 + tkl, 0
    while pos < len(data):
        b = data[pos]
        pos += 1
        if b == 0xFF:
            return None
        d, l = b >> 4, b & 15
        if d == 13:
            d, pos = data[pos] + 13, pos + 1
        elif d == 14:
            d, pos = struct.unpack_from("!H", data, pos)[0] + 269, pos + 2
        if l == 13:
            l, pos = data[pos] + 13, pos + 1
        elif l == 14:
            l, pos = struct.unpack_from("!H", data, pos)[0] + 269, pos + 2
        number += d
        if number == wanted:
            return data[pos:pos + l]
        if number > wanted:
            return None
        pos += l
    return None


def is_ping(data):
    """An empty CON message (RFC 7252 4.3): the server checks that we
    receive what it sends to our address; every CoAP client answers it with
    a RST carrying its message ID."""
    return len(data) >= 4 and data[1] == 0 and (data[0] >> 4) & 3 == 0


def reset_for(data):
    """The RST answering a ping (or any message we do not want)."""
    return struct.pack("!BBH", 0x70, 0, struct.unpack_from("!H", data, 2)[0])


def ack_for(data):
    return struct.pack("!BBH", 0x60, 0, struct.unpack_from("!H", data, 2)[0])


def _check_loopback(host):
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address")


def encode_request(mid, path, code=1, token=b"", payload=b"", observe=None,
                   block2=None, mtype=0, echo=None):
    header = struct.pack("!BBH", 0x40 | (mtype << 4) | len(token), code, mid) + token
    opts = []
    if observe is not None:
        opts.append((6, observe.to_bytes((observe.bit_length() + 7) // 8, "big") if observe else b""))
    for seg in [s for s in path.split("/") if s]:
        opts.append((11, seg.encode()))
    if block2 is not None:
        num, szx = block2
        v = (num << 4) | szx
        opts.append((23, v.to_bytes(max(1, (v.bit_length() + 7) // 8), "big") if v else b""))
    if echo is not None:
        opts.append((ECHO, echo))           # RFC 9175: repeat the server's Echo
    out = bytearray(header)
    last = 0
    for number, value in opts:
        delta, length = number - last, len(value)
        last = number

        def nib(x):
            if x < 13:
                return x, b""
            if x < 269:
                return 13, bytes([x - 13])
            return 14, struct.pack("!H", x - 269)
        dn, dx = nib(delta)
        ln, lx = nib(length)
        out.append((dn << 4) | ln)
        out += dx + lx + value
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


def summary(latencies, sent, elapsed, lost, codes):
    lat = sorted(latencies)
    ms = lambda v: None if v is None else round(v * 1000, 3)
    return {"sent": sent, "answered": len(lat), "lost": lost,
            "seconds": round(elapsed, 3),
            "rps": round(len(lat) / elapsed, 1) if elapsed else 0.0,
            "p50_ms": ms(percentile(lat, 50)), "p99_ms": ms(percentile(lat, 99)),
            "max_ms": ms(lat[-1] if lat else None), "codes": codes}


def _socket(host, port):
    _check_loopback(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.connect((host, port))
    sock.setblocking(False)
    return sock


def closed_loop(host, port, path, concurrency=1, duration=5.0, count=None,
                timeout=2.0):
    """``concurrency`` requests in flight until ``duration`` s or ``count``."""
    duration = min(duration, MAX_SECONDS)
    sock = _socket(host, port)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    mid = int.from_bytes(os.urandom(2), "big")
    inflight = {}
    latencies, codes = [], {}
    sent = lost = 0
    start = time.perf_counter()
    deadline = start + duration

    def send():
        nonlocal mid, sent
        mid = (mid + 1) & 0xFFFF
        sock.send(encode_request(mid, path, token=struct.pack("!H", mid)))
        inflight[mid] = time.perf_counter()
        sent += 1

    for _ in range(concurrency):
        send()
    while inflight:
        now = time.perf_counter()
        if now >= deadline or (count is not None and sent >= count):
            if now >= deadline + timeout:
                lost += len(inflight)
                break
            more = False
        else:
            more = True
        for _key, _ in sel.select(0.05):
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                except ConnectionRefusedError:
                    codes["refused"] = codes.get("refused", 0) + 1
                    break
                if len(data) < 4:
                    continue
                if is_ping(data):
                    sock.send(reset_for(data))
                    continue
                rmid = struct.unpack_from("!H", data, 2)[0]
                t0 = inflight.pop(rmid, None)
                if t0 is None:
                    continue
                t = time.perf_counter()
                latencies.append(t - t0)
                c = "%d.%02d" % (data[1] >> 5, data[1] & 31)
                codes[c] = codes.get(c, 0) + 1
                if more and t < deadline and (count is None or sent < count):
                    send()
        now = time.perf_counter()
        for m, t0 in list(inflight.items()):
            if now - t0 > timeout:
                del inflight[m]
                lost += 1
                if more:
                    send()
    elapsed = time.perf_counter() - start
    sock.close()
    return summary(latencies, sent, min(elapsed, duration + timeout), lost, codes)


def open_loop(host, port, path, rate=50.0, duration=10.0, timeout=2.0, stop=None):
    """Send at a fixed rate; latency shows how responsive the reactor is.
    ``stop`` (a threading.Event) ends the run early."""
    duration = min(duration, MAX_SECONDS)
    sock = _socket(host, port)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    mid = int.from_bytes(os.urandom(2), "big")
    inflight, latencies, codes = {}, [], {}
    sent = lost = 0
    start = time.perf_counter()
    interval = 1.0 / rate
    next_send = start
    while True:
        now = time.perf_counter()
        if stop is not None and stop.is_set() and now < start + duration:
            duration = now - start
        if now >= start + duration and not inflight:
            break
        if now >= start + duration + timeout:
            lost += len(inflight)
            break
        if now >= next_send and now < start + duration:
            mid = (mid + 1) & 0xFFFF
            sock.send(encode_request(mid, path, token=struct.pack("!H", mid)))
            inflight[mid] = now
            sent += 1
            next_send += interval
        wait = max(0.0, min(next_send - time.perf_counter(), 0.01))
        for _key, _ in sel.select(wait):
            while True:
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                if is_ping(data):
                    sock.send(reset_for(data))
                    continue
                rmid = struct.unpack_from("!H", data, 2)[0]
                t0 = inflight.pop(rmid, None)
                if t0 is not None:
                    latencies.append(time.perf_counter() - t0)
                    c = "%d.%02d" % (data[1] >> 5, data[1] & 31)
                    codes[c] = codes.get(c, 0) + 1
        now = time.perf_counter()
        for m, t0 in list(inflight.items()):
            if now - t0 > timeout:
                del inflight[m]
                lost += 1
    elapsed = time.perf_counter() - start
    sock.close()
    return summary(latencies, sent, elapsed, lost, codes)


def fetch(host, port, path, method=1, payload=b"", timeout=5.0):
    """One request, following Block2 (and the server's block size, and
    returning its Echo option); returns (code, body, blocks)."""
    sock = _socket(host, port)
    sock.setblocking(True)
    sock.settimeout(timeout)
    body = b""
    blocks = 0
    echo = None
    mid = int.from_bytes(os.urandom(2), "big")
    try:
        while True:
            mid = (mid + 1) & 0xFFFF
            szx = next_szx(len(body))
            sock.send(encode_request(mid, path, code=method, token=b"\x42",
                                     payload=payload if not body else b"",
                                     block2=(len(body) // (16 << szx), szx) if body else None,
                                     echo=echo))
            data = answer_of(sock, mid, b"\x42")
            _, code, _, _, block2, chunk = parse(data)
            echo = echo_of(data) or echo
            blocks += 1
            more = bool(block2 and block2[1])
            body += chunk
            if not more:
                return code, body, blocks
    finally:
        sock.close()


def answer_of(sock, mid, token):
    """The answer to request ``mid`` on a blocking socket, as a client
    takes it: a ping is answered (RST), an empty ACK means the answer
    follows as a CON (acknowledged)."""
    while True:
        data = sock.recv(65536)
        if len(data) < 4:
            continue
        if is_ping(data):
            sock.send(reset_for(data))
            continue
        mtype = (data[0] >> 4) & 3
        if mtype == 0:
            sock.send(ack_for(data))
            if data[4:4 + (data[0] & 15)] == token:
                return data
            continue
        if struct.unpack_from("!H", data, 2)[0] == mid and data[1] != 0:
            return data


def parse(data):
    """(mtype, code, mid, token, block2 (num, more, szx) or None, payload)."""
    mtype = (data[0] >> 4) & 3
    tkl = data[0] & 15
    code = data[1]
    mid = struct.unpack_from("!H", data, 2)[0]
    token = data[4:4 + tkl]
    pos, number, block2 = 4 + tkl, 0, None
    payload = b""
    while pos < len(data):
        b = data[pos]
        pos += 1
        if b == 0xFF:
            payload = data[pos:]
            break
        d, l = b >> 4, b & 15
        if d == 13:
            d, pos = data[pos] + 13, pos + 1
        elif d == 14:
            d, pos = struct.unpack_from("!H", data, pos)[0] + 269, pos + 2
        if l == 13:
            l, pos = data[pos] + 13, pos + 1
        elif l == 14:
            l, pos = struct.unpack_from("!H", data, pos)[0] + 269, pos + 2
        number += d
        if number == 23:
            v = int.from_bytes(data[pos:pos + l], "big")
            block2 = (v >> 4, bool(v & 8), v & 7)
        pos += l
    return mtype, code, mid, token, block2, payload


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="::1")
    p.add_argument("--port", type=int, default=5683)
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-d", "--duration", type=float, default=5.0)
    p.add_argument("-r", "--rate", type=float, default=None)
    p.add_argument("path")
    a = p.parse_args()
    if a.rate:
        print(json.dumps(open_loop(a.host, a.port, a.path, a.rate, a.duration)))
    else:
        print(json.dumps(closed_loop(a.host, a.port, a.path, a.concurrency, a.duration)))


class Observers:
    """``n`` observations of one path from one socket; every confirmable
    notification is acknowledged (as a live client would) and counted."""

    def __init__(self, host, port, path, n):
        self.sock = _socket(host, port)
        self.path = path
        self.n = n
        self.tokens = [struct.pack("!I", 0x70000000 + i) for i in range(n)]
        self.counts = {t: 0 for t in self.tokens}
        self.registered = set()
        self.mid = int.from_bytes(os.urandom(2), "big")
        self.stop_at = None

    def register(self, timeout=5.0):
        for token in self.tokens:
            self.mid = (self.mid + 1) & 0xFFFF
            self.sock.send(encode_request(self.mid, self.path, token=token, observe=0))
        deadline = time.monotonic() + timeout
        while len(self.registered) < self.n and time.monotonic() < deadline:
            self.poll(0.05)
        return len(self.registered)

    def poll(self, wait):
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ)
        try:
            if not sel.select(wait):
                return
            while True:
                try:
                    data = self.sock.recv(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    return
                if len(data) < 4:
                    continue
                mtype = (data[0] >> 4) & 3
                token = data[4:4 + (data[0] & 15)]
                if mtype == 0:                      # CON notification: ACK it
                    self.sock.send(struct.pack("!BBH", 0x60, 0, struct.unpack_from("!H", data, 2)[0]))
                if token in self.counts:
                    if mtype == 2:
                        self.registered.add(token)
                    else:
                        self.counts[token] += 1
        finally:
            sel.close()

    def run(self, seconds):
        end = time.monotonic() + min(seconds, MAX_SECONDS)
        while time.monotonic() < end:
            self.poll(0.05)

    def close(self):
        self.sock.close()
