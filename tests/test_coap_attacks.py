"""Issue 19: the outside attack on the CoAP layer, each over loopback UDP
from several 127.x.y.z source addresses, bounded in count and time. Each
of these failed on ba916b9.

Where time matters (retransmissions over minutes, holds), the server is a
ServerCoap on a task.Clock behind a real loopback UDP port: the datagrams
are real, the time is the test's.
"""

import json
import os
import socket
import struct
import sys
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from piccolo_twisted.api import Resource
from piccolo_twisted.coap import _tx, protocol
from piccolo_twisted.coap.protocol import ServerCoap, decode
from piccolo_twisted.coap.site import Site
from piccolo_twisted.observable import Observable

from .helpers import as_deferred
from .test_hostile_coap import LoopbackServerCase, fake_pico

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "bench"))
import hostile  # noqa: E402

GET, PUT = hostile.GET, hostile.PUT


def sock_from(host, dst):
    return hostile.udp(host, dst)


def drain(sock):
    """Every datagram waiting on ``sock``."""
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except (BlockingIOError, ConnectionRefusedError):
            return out


def paced(sends, per_batch=100, pause=0.005):
    """Send ``(sock, datagram)`` pairs in batches (a kernel buffer drops a
    burst of thousands)."""
    for i, (sock, data) in enumerate(sends):
        try:
            sock.send(data)
        except BlockingIOError:
            time.sleep(0.01)
            sock.send(data)
        if i % per_batch == per_batch - 1:
            time.sleep(pause)


def in_step(sends, received, per_batch=64, timeout=60.0):
    """Send ``(sock, datagram)`` pairs ``per_batch`` at a time, each batch
    once the server has received every datagram before it (``received()``,
    its count): never more in the kernel's buffer than it holds, however
    late a loaded machine lets the server read (a burst paced by the
    test's clock lost datagrams then, and counts were the machine's
    speed)."""
    base = received()
    for start in range(0, len(sends), per_batch):
        for sock, data in sends[start:start + per_batch]:
            sock.send(data)
        sent = min(start + per_batch, len(sends))
        deadline = time.monotonic() + timeout
        while received() - base < sent:
            assert time.monotonic() < deadline, \
                f"the server read {received() - base} of {sent} datagrams"
            time.sleep(0.001)


def answer_to(dst, datagram, sock, timeout=60.0, every=2.0):
    """The answer to the CON ``datagram`` (its message ID), as a client
    waits for it: retransmitted every ``every`` s (RFC 7252 4.2) until it
    comes, late answers to earlier requests skipped; None after
    ``timeout``."""
    mid = hostile.parse(datagram)[2]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.send(datagram)
        until = min(deadline, time.monotonic() + every)
        while True:
            left = until - time.monotonic()
            data = _next_datagram(sock, left) if left > 0 else None
            if data is None:
                break
            if hostile.parse(data)[2] == mid:
                return data
    return None


def ask(dst, datagram, sock, tries=4, timeout=2.0):
    """One CON request as a client sends it: retransmitted (same message
    ID) until answered, RFC 7252 4.2; the answer, or None."""
    for _ in range(tries):
        answer = hostile.exchange(dst, datagram, sock=sock, timeout=timeout)
        if answer is not None:
            return answer
    return None


def _next_datagram(sock, timeout):
    """The next datagram on ``sock`` within ``timeout`` s, or None."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    try:
        if sel.select(timeout):
            return sock.recv(65536)
        return None
    finally:
        sel.close()


def wait_until(predicate, timeout=30.0):
    """A Deferred firing when ``predicate()`` holds (the reactor runs)."""
    @defer.inlineCallbacks
    def poll():
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            yield task.deferLater(reactor, 0.01, lambda: None)
    return poll()


# -- the whole server on 127.0.0.1 ------------------------------------------------

class WholeServerAttacks(LoopbackServerCase):

    def setUp(self):
        super().setUp()
        self.proto = self.service.coap.protocol
        self.socks = []

        async def client():
            import aiocoap
            self.ctx = await aiocoap.Context.create_client_context()
        return as_deferred(client())

    def tearDown(self):
        for s in self.socks:
            s.close()

        async def close():
            await self.ctx.shutdown()
        return as_deferred(close())

    def udp(self, host):
        sock = sock_from(host, self.dst)
        self.socks.append(sock)
        return sock

    async def aio(self, method, path, payload=None, observe=None, timeout=20):
        import asyncio
        import aiocoap
        kw = {} if observe is None else {"observe": observe}
        msg = aiocoap.Message(code=getattr(aiocoap, method),
                              uri=f"coap://127.0.0.1:{self.port}/{path}",
                              payload=b"" if payload is None else json.dumps(payload).encode(),
                              **kw)
        req = self.ctx.request(msg)
        r = await asyncio.wait_for(req.response, timeout)
        return (r, req) if observe is not None else r

    @defer.inlineCallbacks
    def test_power_on_flood_leaves_others_served(self):
        """Four addresses each send 64 ``GET /spectrometer/power_on`` every
        2 s and never read a reply. On main power_on took >= 10 s even with
        every device on (powered 10 s apart), the 256 handler slots filled
        and an uninvolved client got 5.03 or nothing, /control/abort too.
        Now power_on of devices that are on answers at once, a host holds
        at most its share of the slots, and status and abort are served."""
        attackers = [self.udp(f"127.0.1.{i}") for i in range(1, 5)]
        client = self.udp("127.0.0.50")
        answers = []

        def attack_and_watch():
            mid = 1000
            for _ in range(3):                  # three rounds, 2 s apart
                sends = []
                for sock in attackers:
                    for _ in range(64):
                        mid += 1
                        sends.append((sock, hostile.request(mid, "spectrometer/power_on",
                                                            token=b"p")))
                paced(sends)
                for i in range(10):             # the uninvolved client meanwhile
                    mid += 1
                    a = ask(self.dst, hostile.request(mid, "control/status", token=b"s"),
                            client)
                    answers.append(("status", a))
                    time.sleep(0.1)
                for sock in attackers:
                    drain(sock)
            a = ask(self.dst, hostile.request(9999, "control/abort", token=b"a"), client)
            answers.append(("abort", a))
        yield self.in_thread(attack_and_watch)
        codes = [(what, decode(a).code if a else None) for what, a in answers]
        self.assertEqual([c for w, c in codes if w == "status"], [_tx.CONTENT] * 30, codes)
        # abort is answered: 4.00 "nothing to abort" (the batch is idle)
        self.assertEqual(codes[-1], ("abort", _tx.BAD_REQUEST), codes)

    @defer.inlineCallbacks
    def test_pause_retransmission_runs_once_under_a_put_flood(self):
        """A client's ``pause`` is answered, its ACK lost; meanwhile another
        host sends 4,000 PUTs. On main they evicted the dedup entry and the
        retransmitted pause ran again: the batch resumed. Now the entry is
        kept its lifetime (the flooding host is refused past its budget)
        and the retransmission gets the first answer."""
        yield as_deferred(self.aio("PUT", "control/record_sequence",
                                   {"run": "paused", "nsequence": 3, "auto": -1,
                                    "delay": 120}))
        client = self.udp("127.0.4.1")
        flooder = self.udp("127.0.4.2")
        pause = hostile.request(4242, "control/pause", token=b"q")

        def received():
            return self.proto.stats["received"]

        def scenario():
            # every answer waited for by its message ID, however long a
            # loaded server takes (a 2 s wait returned None, or the late
            # answer to an earlier request), and the flood sent in step
            # with the server's reading (none of it lost in the kernel)
            deadline = time.monotonic() + 20
            mid = 7
            while True:                 # pause while the batch waits between sequences
                mid += 1
                status = answer_to(self.dst, hostile.request(
                    mid, "control/status", token=b"w"), sock=client)
                if status and json.loads(hostile.parse(status)[5]) == "waiting":
                    break
                assert time.monotonic() < deadline, "the batch never waited"
                time.sleep(0.05)
            first = answer_to(self.dst, pause, sock=client)
            # requests that must not run twice (a PUT that sets a value,
            # numSequences as the attack sent, needs no entry now)
            flooded = received()
            in_step([(flooder, hostile.request(i & 0xFFFF, "sysinfo/clock",
                                               code=PUT, payload=b'"x"', token=b"f"))
                     for i in range(4000)], received, per_batch=50)
            flooded = received() - flooded
            drain(flooder)
            again = answer_to(self.dst, pause, sock=client)
            return first, again, flooded
        first, again, flooded = yield self.in_thread(scenario)
        self.assertGreaterEqual(flooded, 4000)
        self.assertIsNotNone(first)
        self.assertEqual(again, first)
        # paused once (a second pause would have resumed it)
        self.assertTrue(self.service.control.paused.value)
        r = yield as_deferred(self.aio("GET", "control/abort"))
        self.assertTrue(r.code.is_successful(), r)

    @defer.inlineCallbacks
    def test_silent_observers_do_not_multiply_changes(self):
        """256 CON registrations from a host that never acknowledges, then
        one change of ``quietTimeEnabled`` every half second: on main every
        change sent every observer a fresh notification (a reflector: 256
        datagrams per PUT). Now a newer notification only replaces the one
        in flight, which is retransmitted on its own schedule (RFC 7641
        4.5.2): in 6 s an observer gets at most 3 datagrams, each within 3x
        its registration."""
        silent = self.udp("127.0.3.1")
        registrations = [hostile.request(i, "control/scheduler/quietTimeEnabled",
                                         token=struct.pack("!H", i), observe=0)
                         for i in range(256)]

        def register():
            # in step with the server's reading (a burst lost registrations
            # under load), then every answer, however late
            in_step([(silent, r) for r in registrations],
                    lambda: self.proto.stats["received"])
            answers = []
            while len(answers) < len(registrations):
                data = _next_datagram(silent, 30)
                assert data is not None, f"{len(answers)} answers"
                answers.append(data)
            return answers
        answers = yield self.in_thread(register)
        registered = sum(1 for a in answers if decode(a).opt.observe is not None)
        self.assertGreater(registered, 200)
        received = []
        t0 = time.monotonic()
        for i in range(12):
            yield as_deferred(self.aio("PUT", "control/scheduler/quietTimeEnabled",
                                       i % 2 == 0))
            received += drain(silent)
            yield task.deferLater(reactor, max(0, t0 + 0.5 * (i + 1) - time.monotonic()),
                                  lambda: None)
        received += drain(silent)
        per_token = {}
        for data in received:
            m = decode(data)
            per_token[m.token] = per_token.get(m.token, 0) + 1
            self.assertLessEqual(len(data), 3 * len(registrations[0]))
        self.assertLessEqual(len(received), 3 * registered, per_token)
        self.assertLessEqual(max(per_token.values()), 3)

    @defer.inlineCallbacks
    def test_eight_hosts_cannot_hold_every_observation(self):
        """2,048 registrations from 8 addresses on a resource that never
        changes held every observe slot (for 24 h), and ``piccolo3 record``
        could not observe /control/status. Now a host below its fair share
        still registers: the biggest holder's oldest observation gives way
        (its client gets a 5.03 notification)."""
        hosts = [self.udp(f"127.0.5.{i}") for i in range(1, 9)]

        def register():
            sends = []
            for h, sock in enumerate(hosts):
                for i in range(256):
                    sends.append((sock, hostile.request(
                        (h << 8) | i, "control/numSequences",
                        token=struct.pack("!BH", h, i), observe=0)))
            # in step with the server's reading: none lost in the kernel
            in_step(sends, lambda: self.proto.stats["received"])
            return [drain(s) for s in hosts]
        yield self.in_thread(register)
        self.assertEqual(self.proto.observer_count(), protocol.MAX_OBSERVERS)
        r, req = yield as_deferred(self.aio("GET", "control/status", observe=0))
        self.assertIsNotNone(r.opt.observe)
        req.observation.cancel()

    @defer.inlineCallbacks
    def test_block2_hog_does_not_starve_other_transfers(self):
        """One host asks for block 0 and block 1 of 120 files (4.6 MiB) and
        keeps asking for block 1 again: on main transfers past block 0 were
        never evicted, and coap-client and ``piccolo3 fetch`` got none of
        another run's 7 files (4.08 on every later block). Now they get
        every file, byte-identical, while the hog goes on."""
        hog_run = os.path.join(self.datadir, "hog")
        os.makedirs(hog_run)
        for i in range(120):
            with open(os.path.join(hog_run, f"b{i:06d}_s000000_light.pico"), "w") as f:
                f.write(json.dumps({"Spectra": [{"Metadata": {"Batch": i},
                                                 "Pixels": list(range(i, i + 7000))}]}))
        field = os.path.join(self.datadir, "field")
        os.makedirs(field)
        for i in range(7):
            with open(os.path.join(field, f"b000000_s{i:06d}_light.pico"), "w") as f:
                f.write(fake_pico(20_000 + 1000 * i))
        import threading
        stop = threading.Event()
        hog = [self.udp("127.0.6.1") for _ in range(120)]

        def pin():
            mid = 0
            while not stop.is_set():
                for i, sock in enumerate(hog):
                    mid += 1
                    name = json.dumps(f"b{i:06d}_s000000_light.pico").encode()
                    sock.send(hostile.request(mid, "data_dir/runs/hog/spectra", code=PUT,
                                              payload=name, token=b"h"))
                time.sleep(0.2)
                for i, sock in enumerate(hog):
                    mid += 1
                    sock.send(hostile.request(mid, "data_dir/runs/hog/spectra", code=PUT,
                                              token=b"h", block2=(1, 6)))
                    drain(sock)
                for _ in range(10):
                    if stop.wait(0.1):
                        break
                    for sock in hog:
                        drain(sock)
        pinning = self.in_thread(pin)
        try:
            yield task.deferLater(reactor, 1.0, lambda: None)
            from .test_cli import piccolo3
            laptop = self.mktemp()
            os.makedirs(laptop)
            code, out, err = yield as_deferred(piccolo3(
                "--server", f"coap://127.0.0.1:{self.port}", "fetch", "field", laptop))
            self.assertEqual(code, 0, err)
            for name in os.listdir(field):
                with open(os.path.join(field, name), "rb") as a, \
                        open(os.path.join(laptop, "field", name), "rb") as b:
                    self.assertEqual(a.read(), b.read(), name)
            from .test_coap_md import client_binary
            binary = client_binary()
            if binary is not None:
                got = yield self.in_thread(self._coap_client_fetches, binary, field)
                self.assertEqual(got, sorted(os.listdir(field)))
        finally:
            stop.set()
            yield pinning

    def test_a_7_mb_file_costs_a_fixed_amount_per_block(self):
        return self.big_body_blocks("file")

    def test_a_4_mb_listing_costs_a_fixed_amount_per_block(self):
        return self.big_body_blocks("listing")

    @defer.inlineCallbacks
    def big_body_blocks(self, which):
        """A 7 MB file and a 4.4 MB listing fetched block by block: on main
        bodies over 4 MiB were not kept, so every 1 KiB block read and
        encoded the whole file again (37.6 ms a block, ~261 s of CPU per
        fetch) or took the CRC of the whole listing (1.9 ms a block). Now a
        block reads at most two 8 KiB pieces of the file, and a listing's
        ETag is computed once per encoded body. Work is counted (bytes
        read, bytes checksummed), not timed."""
        import zlib
        run = os.path.join(self.datadir, "huge")
        os.makedirs(run)
        name = "b000000_s000000_light.pico"
        text = json.dumps({"Spectra": [{"Metadata": {"Batch": 0},
                                        "Pixels": list(range(900_000))}]})
        self.assertGreater(len(text), 7_000_000)
        with open(os.path.join(run, name), "w") as f:
            f.write(text)
        for i in range(1, 150_000):
            path = os.path.join(run, f"b{i // 500:06d}_s{i % 500:06d}_light.pico")
            if i % 50_000 == 1:             # (a file takes 65,000 links at most)
                open(path, "w").close()
                source = path
            else:
                os.link(source, path)
        counted = {"read": 0, "crc": 0}
        real_read, real_pread, real_crc = os.read, os.pread, zlib.crc32

        def read(fd, n):
            data = real_read(fd, n)
            counted["read"] += len(data)
            return data

        def pread(fd, n, offset):
            data = real_pread(fd, n, offset)
            counted["read"] += len(data)
            return data

        def crc32(data, *a):
            counted["crc"] += len(data)
            return real_crc(data, *a)
        self.patch(os, "read", read)
        self.patch(os, "pread", pread)
        self.patch(zlib, "crc32", crc32)
        sock = self.udp("127.0.9.1")
        cases = {"file": [("data_dir/runs/huge/spectra", PUT, json.dumps(name).encode())],
                 "listing": [("data_dir/runs/huge/spectra_list", GET, b"")]}[which]

        def fetch_blocks(path, code, payload):
            echo, mid, costs, sizes = None, 100, [], []
            for n in (0, 0, 1, 2, 500, 3000, 4200, 1, 4200):
                mid += 1
                before = dict(counted)
                answer = hostile.exchange(self.dst, hostile.request(
                    mid, path, code=code, payload=payload, token=b"z",
                    block2=(n, 6), echo=echo), sock=sock, timeout=30)
                while answer is not None and answer[1] == 0:
                    # an empty ACK (the first scan took a while): the
                    # answer follows as a CON, acknowledged
                    answer = _next_datagram(sock, 30)
                    if answer is not None and hostile.parse(answer)[0] == hostile.CON:
                        sock.send(struct.pack("!BBH", 0x60, 0, hostile.parse(answer)[2]))
                assert answer is not None, (path, n)
                echo = hostile.loadclient.echo_of(answer) or echo
                _, rcode, _, _, block2, chunk = hostile.parse(answer)
                assert rcode in (0x44, 0x45), (path, n, rcode, chunk[:80])
                costs.append((n, counted["read"] - before["read"],
                              counted["crc"] - before["crc"]))
                sizes.append((n, block2, len(chunk)))
            return costs, sizes
        for path, code, payload in cases:
            costs, sizes = yield self.in_thread(fetch_blocks, path, code, payload)
            # the second request is verified (it returned the Echo): 1 KiB blocks
            self.assertEqual([s[1][2] for s in sizes[1:]], [6] * 8, sizes)
            for n, read_bytes, crc_bytes in costs[2:]:
                self.assertLessEqual(read_bytes, 2 * 8192, (path, costs))
                self.assertLessEqual(crc_bytes, 4096, (path, costs))

    def _coap_client_fetches(self, binary, field):
        import subprocess
        good = []
        for name in sorted(os.listdir(field)):
            p = subprocess.run([binary, "-m", "put", "-e", json.dumps(name),
                                f"coap://127.0.0.1:{self.port}/data_dir/runs/field/spectra"],
                               capture_output=True, timeout=60)
            with open(os.path.join(field, name), "rb") as f:
                expected = json.dumps(f.read().decode(), separators=(",", ":")).encode()
            if p.returncode == 0 and p.stdout.strip() == expected:
                good.append(name)
        return good


# -- a bare endpoint on a task.Clock, behind a real loopback port -------------------

class ClockedEndpoint(unittest.TestCase):
    """ServerCoap for a small site on 127.0.0.1: real datagrams, the
    test's time."""

    timeout = 60

    def setUp(self):
        self.clock = task.Clock()
        self.value = Observable(0)
        self.big = Observable("a" * 3000)
        self.proto = ServerCoap(Site({"": {
            "value": Resource(get=lambda: self.value.value, put=self.value.set,
                              observe=self.value),
            "big": Resource(get=lambda: self.big.value, observe=self.big),
        }}), clock=self.clock)
        self.listening = reactor.listenUDP(0, self.proto, interface="127.0.0.1",
                                           maxPacketSize=65535)
        self.addCleanup(self.listening.stopListening)
        self.dst = ("127.0.0.1", self.listening.getHost().port)
        self.socks = []
        self.addCleanup(lambda: [s.close() for s in self.socks])

    def udp(self, host):
        sock = sock_from(host, self.dst)
        self.socks.append(sock)
        return sock

    def received(self):
        return self.proto.stats["received"]

    @defer.inlineCallbacks
    def send_all(self, pairs):
        before = self.received()
        for sock, data in pairs:
            sock.send(data)
        yield wait_until(lambda: self.received() >= before + len(pairs))

    @defer.inlineCallbacks
    def test_unacknowledged_observers_end_though_the_value_keeps_changing(self):
        """16 observations whose client never acknowledges, the value
        changing every second for 200 s: on main every change restarted the
        retransmission timer, so they were never given up (110
        notifications each in 110 s). Now each gets its first notification
        and MAX_RETRANSMIT retransmissions (RFC 7252 4.2), then the
        observation ends (RFC 7641 4.5)."""
        silent = self.udp("127.0.7.1")
        yield self.send_all([(silent, hostile.request(i, "value", token=b"o%02d" % i,
                                                      observe=0)) for i in range(16)])
        answers = drain(silent)
        self.assertEqual(sum(decode(a).opt.observe is not None for a in answers), 16)
        counts = {}
        for second in range(200):
            self.value.set(second + 1)
            self.clock.advance(1)
            yield task.deferLater(reactor, 0, lambda: None)
            for data in drain(silent):
                m = decode(data)
                if m.code:                  # (a ping is not a notification)
                    counts[m.token] = counts.get(m.token, 0) + 1
        for data in drain(silent):
            if decode(data).code:
                counts[decode(data).token] = counts.get(decode(data).token, 0) + 1
        self.assertEqual(self.proto.observer_count(), 0)
        self.assertEqual(len(counts), 16)
        self.assertLessEqual(max(counts.values()), 1 + protocol.MAX_RETRANSMIT, counts)

    @defer.inlineCallbacks
    def test_held_notifications_are_bounded_and_not_polled(self):
        """Observers with SZX 0 on a multi-block resource, each fetching
        the later blocks of its last notification, and the value changes:
        on main every held notification was re-checked every 50 ms for as
        long as the transfers were kept alive (2,048 of them: 24 % of a
        core). Now holds are bounded per host, and a hold is a timer that
        fires about every NOTIFY_HOLD seconds, for NOTIFY_HOLD_MAX at most."""
        socks = [self.udp("127.0.8.1") for _ in range(64)]
        yield self.send_all([(s, hostile.request(1, "big", token=b"b", observe=0,
                                                 block2=(0, 0))) for s in socks])
        for s in socks:
            drain(s)
        calls = []
        real = self.clock.callLater

        def counting(delay, f, *a, **kw):
            calls.append(delay)
            return real(delay, f, *a, **kw)
        self.patch(self.clock, "callLater", counting)
        self.big.set("b" * 3000)            # block 0 of the new value goes out
        for s in socks:
            for data in drain(s):
                m = decode(data)
                if m.mtype == _tx.CON:
                    s.send(struct.pack("!BBH", 0x60, 0, m.mid))
        mid = 100
        for second in range(60):
            mid += 1
            # every observer fetches a later block (its transfer stays active)
            yield self.send_all([(s, hostile.request(mid, "big", token=b"g",
                                                     block2=(1 + second % 50, 0)))
                                 for s in socks])
            if second == 1:
                self.big.set("c" * 3000)    # held: the transfers are in progress
            self.clock.advance(1)
            yield task.deferLater(reactor, 0, lambda: None)
            for s in socks:
                drain(s)
        held = sum(1 for t in self.proto.targets.values() for o in t.observers.values()
                   if getattr(o, "hold", None) or getattr(o, "held", None))
        # at most one hold per observation (every observer fetching must be
        # held, or its client's transfer breaks: finding 5 of the attack on
        # issue 19), so holds are bounded by the observations
        self.assertLessEqual(held, len(socks))
        # every timer the endpoint started in the minute: retransmissions,
        # holds, housekeeping (50 ms re-checks of 64 holds would be 76,800)
        self.assertLess(len(calls), 5000, len(calls))


class AccessPolicyTests(unittest.SynchronousTestCase):
    """The hook issue 22's ``[access] control_from`` plugs into: a policy
    with ``refusal(host) -> Optional[str]``. Requests that change anything
    from a refused host are 4.03 with the reason; reads stay open."""

    class Stub:
        def __init__(self):
            self.asked = []

        def refusal(self, host):
            self.asked.append(host)
            return None if host == "127.0.0.1" else f"{host} may not control this instrument"

    def setUp(self):
        from .test_coap_protocol import FakeTransport, request, verify
        self.request = request
        self.value = Observable(1)
        self.acted = []
        self.policy = self.Stub()
        site = Site({"": {
            "value": Resource(get=lambda: self.value.value, put=self.value.set,
                              observe=self.value),
            "abort": Resource(get=lambda: self.acted.append("abort"), get_acts=True),
        }})
        self.proto = ServerCoap(site, clock=task.Clock(), access=self.policy)
        self.transport = FakeTransport()
        self.proto.transport = self.transport
        verify(self.proto, "127.0.0.2")
        verify(self.proto, "127.0.0.1")

    def send(self, code, path, peer, payload=b""):
        self.proto.datagramReceived(self.request(code, path=path, payload=payload,
                                                 mid=len(self.policy.asked) + 100), peer)
        [r] = [decode(d) for d, _ in self.transport.sent]
        self.transport.sent.clear()
        return r

    def test_changes_refused_reads_open(self):
        other, allowed = ("127.0.0.2", 5000), ("127.0.0.1", 5000)
        r = self.send(_tx.PUT, "value", other, b"5")
        self.assertEqual((r.code, r.payload),
                         (_tx.FORBIDDEN, b"127.0.0.2 may not control this instrument"))
        self.assertEqual(r.opt.content_format, 0)
        r = self.send(_tx.GET, "abort", other)
        self.assertEqual(r.code, _tx.FORBIDDEN)
        for code in (_tx.POST, _tx.DELETE):
            self.assertEqual(self.send(code, "value", other).code, _tx.FORBIDDEN)
        self.assertEqual((self.value.value, self.acted), (1, []))
        r = self.send(_tx.GET, "value", other)
        self.assertEqual((r.code, r.payload), (_tx.CONTENT, b"1"))
        self.assertEqual(self.send(_tx.PUT, "value", allowed, b"5").code, _tx.CHANGED)
        self.assertEqual(self.send(_tx.GET, "abort", allowed).code, _tx.CONTENT)
        self.assertEqual((self.value.value, self.acted), (5, ["abort"]))

    def test_coap_service_passes_the_policy(self):
        from piccolo_twisted.coap.server import coap_service
        service = coap_service({"": {}}, "127.0.0.1", 0, clock=task.Clock(),
                               access=self.policy)
        self.assertIs(service.protocol.access, self.policy)
