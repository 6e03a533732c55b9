#!/usr/bin/env python3
"""Hostile traffic against the CoAP layer (issue 11, items 2, 3, 7, 8), as an
attacker or a crowd of clients would send it: raw UDP datagrams from many
ports and several loopback hosts (127.0.0.x), stdlib only.

The functions are used by ``tests/test_hostile_coap.py``; run as a script it
starts the server (``twistd -n piccolo`` on 127.0.0.1) and prints figures:

    python bench/hostile.py                      # every case
    python bench/hostile.py --only amp,options   # some of them

Cases: ``amp`` (NON amplification ratios), ``downloads`` (200 concurrent
blockwise downloads), ``options`` (CPU for 40 datagrams of 65 KB of empty
options), ``dedup``, ``observe``, ``blockwise`` (RSS after each flood).
Loopback only; every phase bounded in count and time.
"""

import ipaddress
import os
import random
import selectors
import socket
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadclient  # noqa: E402

CON, NON = 0, 1
GET, PUT, POST = 1, 3, 2
MAX_SECONDS = 120.0
SEPARATE_WAIT = 30.0    # seconds a client waits for a response after an empty ACK
# RFC 7252 4.8: a client's retransmission of a CON request
ACK_TIMEOUT = 2.0
ACK_RANDOM_FACTOR = 1.5
MAX_RETRANSMIT = 4


def _check(host):
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address")


def udp(src, dst):
    """A non-blocking UDP socket bound to ``src`` (a fresh port), connected
    to ``dst``."""
    _check(src)
    _check(dst[0])
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
    sock.bind((src, 0))
    sock.connect(dst)
    sock.setblocking(False)
    return sock


def request(mid, path, code=GET, token=b"", payload=b"", mtype=CON, block2=None,
            observe=None, echo=None):
    """One request datagram; ``block2`` is ``(num, szx)``; ``echo`` an Echo
    value to return (RFC 9175)."""
    return loadclient.encode_request(mid, path, code=code, token=token,
                                     payload=payload, observe=observe,
                                     block2=block2, mtype=mtype, echo=echo)


parse = loadclient.parse  # (mtype, code, mid, token, block2, payload)


def option_flood_datagram(mid, size=65000):
    """A CON GET whose options are one Uri-Path then ~``size`` empty
    Uri-Path options (one byte each)."""
    return struct.pack("!BBH", 0x40, GET, mid) + b"\xb0" + b"\x00" * (size - 5)


class Transfer:
    __slots__ = ("sock", "path", "code", "payload", "num", "body", "mid", "data",
                 "sent_at", "tries", "result", "resume_at", "every_block", "acked",
                 "con_mid", "wait", "echo", "szx")

    def __init__(self, sock, path, code, payload, every_block):
        self.sock = sock
        self.path = path
        self.code = code
        self.payload = payload
        self.every_block = every_block
        self.num = 0
        self.body = b""
        self.mid = int.from_bytes(os.urandom(2), "big")
        self.data = None
        self.sent_at = None
        self.tries = 0
        self.result = None          # bytes when complete, else an error string
        self.resume_at = 0.0
        self.acked = False          # an empty ACK came: the answer follows
        self.con_mid = None         # mid of the last separate response
        self.wait = ACK_TIMEOUT     # seconds until the next retransmission
        self.echo = None            # the server's Echo value, returned (RFC 9175)
        self.szx = 6


def downloads(dst, path, n, code=GET, payload=b"", src="127.0.0.1", window=32,
              every_block=True, pause=0.0, timeout=60.0, szx=6, echo=True):
    """``n`` blockwise downloads of one resource from ``n`` ports, all in
    progress at once (round robin, ``window`` requests in flight), as CON
    requests retransmitted as RFC 7252 4.8 has a client do it (after 2-3 s,
    doubling, 4 retransmissions). ``every_block``: the payload
    goes with every block request, or only with the first (as aiocoap and
    libcoap's coap-client send it). ``pause``: seconds between one transfer's blocks.
    The server's block size is followed (smaller blocks within 3x the
    request until the address is verified); ``echo``: return its Echo
    option as RFC 9175 has a client do (libcoap does; aiocoap does not).
    Returns the list of results: the body (bytes) or an error string."""
    transfers = [Transfer(udp(src, dst), path, code, payload, every_block)
                 for _ in range(n)]
    sel = selectors.DefaultSelector()
    for t in transfers:
        sel.register(t.sock, selectors.EVENT_READ, t)
    ready = list(transfers)
    inflight = {}
    deadline = time.monotonic() + min(timeout, MAX_SECONDS)

    def send(t):
        t.mid = (t.mid + 1) & 0xFFFF
        body = t.payload if (not t.body or t.every_block) else b""
        t.szx = loadclient.next_szx(len(t.body), szx)
        t.num = len(t.body) // (16 << t.szx)
        t.data = request(t.mid, t.path, code=t.code, token=b"\x7a", payload=body,
                         block2=(t.num, t.szx) if t.body else None, echo=t.echo)
        t.sock.send(t.data)
        t.sent_at = time.monotonic()
        t.tries = 0
        t.wait = random.uniform(ACK_TIMEOUT, ACK_TIMEOUT * ACK_RANDOM_FACTOR)
        t.acked = False
        inflight[t.sock] = t

    try:
        while (ready or inflight) and time.monotonic() < deadline:
            now = time.monotonic()
            later = []
            while ready and len(inflight) < window:
                t = ready.pop(0)
                if t.resume_at > now:
                    later.append(t)
                    continue
                send(t)
            ready.extend(later)
            for key, _ in sel.select(0.01):
                t = key.data
                try:
                    data = t.sock.recv(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    continue
                if len(data) < 4:
                    continue
                if loadclient.is_ping(data):
                    t.sock.send(loadclient.reset_for(data))     # as a client does
                    continue
                mtype, rcode, mid, token, block2, chunk = parse(data)
                if mtype == CON:
                    # a separate response (RFC 7252 5.2.2): acknowledged,
                    # and taken once
                    t.sock.send(struct.pack("!BBH", 0x60, 0, mid))
                    if t.sock not in inflight or mid == t.con_mid:
                        continue
                    t.con_mid = mid
                elif mid != t.mid or t.sock not in inflight:
                    continue
                elif rcode == 0:
                    # an empty ACK: the server is still working on it
                    t.acked = True
                    t.sent_at = time.monotonic()
                    continue
                del inflight[t.sock]
                if not 0x40 <= rcode < 0x60:
                    t.result = (f"{rcode >> 5}.{rcode & 31:02d} {chunk[:80]!r} at block {t.num}"
                                f" (type {mtype}, mid {mid}, request mid {t.mid})")
                    continue
                if t.body and (block2 is None
                               or block2[0] * (16 << block2[2]) != len(t.body)):
                    t.result = f"block {block2} answered for block {t.num}"
                    continue
                if echo:
                    t.echo = loadclient.echo_of(data) or t.echo
                t.body += chunk
                if block2 is None or not block2[1]:
                    t.result = t.body
                    continue
                t.num += 1
                t.resume_at = time.monotonic() + pause
                ready.append(t)
            now = time.monotonic()
            for t in list(inflight.values()):
                if t.acked:
                    if now - t.sent_at > SEPARATE_WAIT:
                        del inflight[t.sock]
                        t.result = f"no separate response at block {t.num}"
                    continue
                if now - t.sent_at > t.wait:
                    if t.tries >= MAX_RETRANSMIT:
                        del inflight[t.sock]
                        t.result = f"no answer at block {t.num}"
                    else:
                        t.tries += 1
                        t.sent_at = now
                        t.wait *= 2
                        t.sock.send(t.data)
    finally:
        sel.close()
        for t in transfers:
            t.sock.close()
    return [t.result if t.result is not None else f"timed out at block {t.num}"
            for t in transfers]


def flood(dst, make, count, rate, src="127.0.0.9", stop=None):
    """``count`` datagrams ``make(i)`` at ``rate``/s, each from a fresh port
    of ``src``; answers are not read. Returns the number sent."""
    start = time.monotonic()
    sent = 0
    socks = []
    try:
        for i in range(count):
            if stop is not None and stop.is_set():
                break
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if time.monotonic() - start > MAX_SECONDS:
                break
            sock = udp(src, dst)
            try:
                sock.send(make(i))
                sent += 1
            except OSError:
                pass
            socks.append(sock)
            if len(socks) > 64:          # keep a few open so ports stay fresh
                socks.pop(0).close()
    finally:
        for s in socks:
            s.close()
    return sent


def exchange(dst, datagram, src="127.0.0.1", timeout=2.0, sock=None, follow=True):
    """Send one datagram and return its answer (or None). ``follow``: as a
    client takes it -- a ping (an empty CON) is answered with a RST, as
    any CoAP endpoint must (this server sends none), an empty ACK means
    the answer follows as a separate CON response (acknowledged); else the
    first datagram that comes, whatever it is."""
    own = sock is None
    if own:
        sock = udp(src, dst)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    mid = struct.unpack_from("!H", datagram, 2)[0]
    token = datagram[4:4 + (datagram[0] & 15)]
    try:
        sock.send(datagram)
        deadline = time.monotonic() + timeout
        while sel.select(max(0.0, deadline - time.monotonic())):
            try:
                data = sock.recv(65536)
            except ConnectionRefusedError:      # nobody listening (yet)
                return None
            except BlockingIOError:
                continue
            if not follow:
                return data
            if len(data) < 4:
                continue
            if loadclient.is_ping(data):
                sock.send(loadclient.reset_for(data))
                continue
            mtype, code = (data[0] >> 4) & 3, data[1]
            if mtype == CON:
                sock.send(loadclient.ack_for(data))
                if data[4:4 + (data[0] & 15)] == token:
                    return data
                continue
            if mtype == NON:
                if data[4:4 + (data[0] & 15)] == token:
                    return data
                continue
            if struct.unpack_from("!H", data, 2)[0] != mid:
                continue
            if code == 0 and mtype == 2:
                deadline = max(deadline, time.monotonic() + SEPARATE_WAIT)
                continue                        # an empty ACK: the answer follows
            return data
        return None
    finally:
        sel.close()
        if own:
            sock.close()


def everything_sent(dst, datagram, src, wait=3.0, sock=None):
    """Every datagram the server sends to a fresh port of ``src`` after one
    datagram from it, as a spoofed source (which receives nothing, so
    answers nothing) would get them: until an answer with a code came and
    then 0.2 s more, or ``wait`` s."""
    own = sock is None
    if own:
        sock = udp(src, dst)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    out = []
    try:
        sock.send(datagram)
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return out
            try:
                data = sock.recv(65536)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            out.append(data)
            if len(data) >= 4 and data[1] != 0:
                deadline = min(deadline, time.monotonic() + 0.2)
    finally:
        sel.close()
        if own:
            sock.close()


def amplification(dst, datagram, src, wait=3.0):
    """(request bytes, bytes of everything sent back, ratio) for one
    datagram sent from a fresh port of ``src`` (nothing answered: a
    spoofed source receives nothing)."""
    size = sum(len(d) for d in everything_sent(dst, datagram, src, wait))
    return len(datagram), size, size / len(datagram)


# -- the attacks on issue 19's layer, all at once (issue 19b) ----------------------

def _paced_send(pairs, per_batch=100, pause=0.01, stop=None):
    for i, (sock, data, to) in enumerate(pairs):
        if stop is not None and stop.is_set():
            return i
        try:
            sock.sendto(data, to)
        except OSError:
            pass
        if i % per_batch == per_batch - 1:
            time.sleep(pause)
    return len(pairs)


def attack_mix(dst, stop, counts, scale=1.0):
    """Until ``stop`` (a threading.Event) is set, from spoofed loopback
    addresses that never answer anything (findings-19.md): 17 addresses
    sending ``PUT /control/numSequences`` (~1,000/s in all), 300 addresses x
    64 ``PUT /sysinfo/clock`` (requests that must not run twice; once per
    EXCHANGE_LIFETIME), 8 x 32 ``GET current_temperature`` every 9 s,
    2,100 observers of /control/status every 30 s, 4 x 64 ``GET
    /spectrometer/power_on`` every 2 s, one host pinning block 1 of 20
    listings every second. ``counts`` gets the datagrams sent per kind."""
    import threading
    _check(dst[0])

    def socks(prefix, n, port=0):
        out = []
        for h in range(n):
            address = f"127.{prefix}.{h // 250}.{h % 250 + 1}"
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, port))
            s.setblocking(False)
            out.append(s)
        return out

    def drain(all_socks):
        for s in all_socks:
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass

    def every(period, work, kind):
        while not stop.is_set():
            t0 = time.monotonic()
            counts[kind] = counts.get(kind, 0) + work()
            stop.wait(max(0.0, period - (time.monotonic() - t0)))

    flood = socks(60, 17)
    crowd = socks(61, 300)
    slow = socks(62, 8)
    power = socks(63, 4)
    hog = socks(64, 1)
    mids = {"n": 0}

    def mid():
        mids["n"] = (mids["n"] + 1) & 0xFFFF
        return mids["n"]

    def settings():
        n = _paced_send([(s, request(mid(), "control/numSequences", code=PUT, payload=b"1",
                                     token=b"n"), dst) for s in flood for _ in range(60)],
                        stop=stop)
        drain(flood)
        return n

    def clocks():
        n = _paced_send([(s, request(mid(), "sysinfo/clock", code=PUT, payload=b'"x"',
                                     token=b"c"), dst) for _ in range(64) for s in crowd],
                        stop=stop)
        drain(crowd)
        return n

    def reads():
        n = _paced_send([(s, request(mid(), "spectrometer/S_sim_QEP00981/current_temperature",
                                     token=b"t"), dst) for s in slow for _ in range(32)],
                        stop=stop)
        drain(slow)
        return n

    tokens = [os.urandom(4) for _ in range(2100)]

    def observers():
        sent = 0
        for start in range(0, 2100, 300):          # a few hundred descriptors at a time
            batch = []
            for h in range(start, min(start + 300, 2100)):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((f"127.2.{h // 250}.{h % 250 + 1}", 40000))
                    s.sendto(request(mid(), "control/status", token=tokens[h], observe=0), dst)
                    sent += 1
                except OSError:
                    pass
                batch.append(s)
                if h % 100 == 99:
                    time.sleep(0.01)
            for s in batch:
                s.close()
            if stop.is_set():
                break
        return sent

    def power_on():
        n = _paced_send([(s, request(mid(), "spectrometer/power_on", token=b"p"), dst)
                         for s in power for _ in range(64)], stop=stop)
        drain(power)
        return n

    def pin():
        n = 0
        for i in range(20):
            hog[0].sendto(request(mid(), "data_dir/runs/attacked/spectra_list",
                                  token=bytes((i,)), block2=(1, 6)), dst)
            n += 1
        drain(hog)
        return n
    jobs = [(1.0 / scale, settings, "settings"), (247.0, clocks, "clock"),
            (9.0, reads, "reads"), (30.0, observers, "observers"),
            (2.0, power_on, "power_on"), (1.0, pin, "pin")]
    workers = [threading.Thread(target=every, args=job) for job in jobs]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for s in flood + crowd + slow + power + hog:
        s.close()
    return counts


# -- the script --------------------------------------------------------------

def _server(address="127.0.0.1"):
    from run import Server, TWISTD
    import subprocess

    class V4Server(Server):
        def start(self, timeout=30.0):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((address, 0))
            self.port = s.getsockname()[1]
            s.close()
            self.log = open(os.path.join(self.datadir, "server.log"), "ab")
            self.proc = subprocess.Popen(
                TWISTD + ["-n", "--pidfile=", "piccolo", "--address", address,
                          "--port", str(self.port), "--web", "0",
                          "--data-dir", self.datadir],
                env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
            t0 = time.monotonic()
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError("the server exited; see " + self.log.name)
                if exchange((address, self.port), request(1, "sysinfo/version"),
                            src=address, timeout=0.2):
                    return self
            raise RuntimeError("the server did not answer")

        def cpu(self):
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def put(self, path, payload):
            import json
            answer = exchange((address, self.port),
                              request(int.from_bytes(os.urandom(2), "big"), path,
                                      code=PUT, payload=json.dumps(payload).encode()),
                              src=address, timeout=5)
            return parse(answer)
    return V4Server()


def _pico(server, dst):
    import json
    server.put("control/record_sequence", {"run": "hostile", "nsequence": 1, "auto": -1})
    for _ in range(300):
        time.sleep(0.1)
        answer = exchange(dst, request(7, "data_dir/runs/hostile/spectra_list"),
                          src=dst[0], timeout=2)
        if answer:
            names = json.loads(parse(answer)[5] or b"[]")
            if len(names) >= 2 and any(n.endswith("_light.pico") for n in names):
                status = exchange(dst, request(8, "control/status"), src=dst[0])
                if status and json.loads(parse(status)[5]) == "idle":
                    return sorted(names)[0]
    raise RuntimeError("no .pico was written")


def main():
    import argparse
    import json
    import threading
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="amp,downloads,options,dedup,observe,blockwise")
    p.add_argument("--n", type=int, default=200, help="concurrent downloads")
    p.add_argument("--rate", type=float, default=2000, help="flood datagrams/s")
    a = p.parse_args()
    only = set(a.only.split(","))
    server = _server()
    try:
        server.start()
        dst = ("127.0.0.1", server.port)
        time.sleep(1.0)
        name = _pico(server, dst)
        pico_req = json.dumps(name).encode()
        pico_path = "data_dir/runs/hostile/spectra"
        print(f"server pid {server.proc.pid}, RSS at start {server.rss_mib():.1f} MiB")
        if "amp" in only:
            for label, dgram in (
                    ("/.well-known/core", request(1, ".well-known/core", mtype=NON)),
                    (".pico", request(2, pico_path, code=PUT, mtype=NON, payload=pico_req))):
                req, resp, ratio = amplification(dst, dgram, src="127.0.0.77")
                print(f"amplification NON {label}: {req} B -> {resp} B = {ratio:.1f}x")
        if "downloads" in only:
            for label, kw in (("pico (payload with every block)", dict(code=PUT, payload=pico_req)),
                              ("pico (payload with block 0 only: aiocoap, coap-client)", dict(code=PUT, payload=pico_req,
                                                           every_block=False)),
                              ("/.well-known/core", dict())):
                path = pico_path if "pico" in label else ".well-known/core"
                t0 = time.monotonic()
                results = downloads(dst, path, a.n, **kw)
                good = [r for r in results if isinstance(r, bytes)]
                same = len(good) and all(r == good[0] for r in good)
                errors = sorted({r for r in results if isinstance(r, str)})[:3]
                print(f"{a.n} concurrent downloads {label}: {len(good)} complete"
                      f"{' byte-identical' if same else ''}"
                      f" ({len(good[0]) if good else 0} B) in {time.monotonic() - t0:.1f} s"
                      f"{'; e.g. ' + str(errors) if errors else ''}; RSS {server.rss_mib():.1f} MiB")
        if "options" in only:
            before = server.cpu()
            flood(dst, lambda i: option_flood_datagram(i), 40, 20, src="127.0.0.1")
            time.sleep(1.0)
            print(f"option flood 40 x 65 KB: server CPU {server.cpu() - before:.2f} s,"
                  f" RSS {server.rss_mib():.1f} MiB")
        if "dedup" in only:
            n = 20000
            flood(dst, lambda i: request(i & 0xFFFF, pico_path, code=PUT, payload=pico_req),
                  n, a.rate, src="127.0.0.9")
            time.sleep(2.0)
            print(f"dedup flood ({n} distinct PUT .pico fetches): RSS {server.rss_mib():.1f} MiB")
        if "observe" in only:
            n = 5000
            flood(dst, lambda i: request(i & 0xFFFF, "control/numSequences",
                                         token=struct.pack("!I", i), observe=0),
                  n, 2000, src="127.0.0.10")
            time.sleep(1.0)
            print(f"observe flood ({n} registrations): RSS {server.rss_mib():.1f} MiB")
        if "blockwise" in only:
            n = 20000
            flood(dst, lambda i: request(i & 0xFFFF, ".well-known/core") if i % 2 else
                  request(i & 0xFFFF, pico_path, code=PUT, payload=pico_req + b" " * (i % 97)),
                  n, 2000, src="127.0.0.11")
            time.sleep(2.0)
            print(f"blockwise flood ({n} block-0 fetches, fresh ports): RSS"
                  f" {server.rss_mib():.1f} MiB")
        ok = exchange(dst, request(9, "sysinfo/version"), src="127.0.0.1")
        print("server still answers:", bool(ok))
        del threading
    finally:
        server.stop()


if __name__ == "__main__":
    main()
