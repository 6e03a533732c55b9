"""Issue 11 tried again from outside (a black-box review): what got through
the first round of fixes, each over real UDP on loopback as an attacker or
a deployed client would send it.

- a date-time inside 1970..9999 whose float timestamp rounds into the year
  10000 (``9999-12-31T23:59:59.999999Z``) was stored as a job, answered
  5.00, and from then on ``GET /control/scheduler/jobs`` was 5.00;
- digits of other scripts (``"١٢"``, ``"１２"``) were taken as numbers and
  as quiet times (stored, and echoed back to a dashboard that cannot read
  them);
- Block1 with size exponent 7 in a final block 0 was executed;
- 64 Block1 starts from another host evicted a client's upload midway;
- more than 64 downloads in flight from one host were answered 5.03 (aiocoap,
  the deployed client, gives up on a 5.03);
- ``record_sequence``/``record_dark`` took a run name that exists in the
  data directory as a file or a symlink (``current_run`` refuses it), made
  it the current run, and failed later.
"""

import json
import os
import shutil
import struct
import sys
import tempfile

from twisted.internet import defer
from twisted.trial import unittest

from .helpers import ServerTestCase, as_deferred
from .test_hostile_coap import LoopbackServerCase
from .test_wire import coro

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "bench"))
import hostile  # noqa: E402

EDGE = ["9999-12-31T23:59:59.999999+00:00", "9999-12-31T23:59:59.9999999Z"]
FUTURE = "2099-01-01T00:00:00+00:00"


def coap(mid, path, payload=b"", code=hostile.PUT, token=b"a", block1=None,
         extra=()):
    """A CON request datagram; ``block1`` is ``(num, more, szx)``, sent as is
    (reserved values too); ``extra``: more (number, raw value) options."""
    options = [(11, seg.encode()) for seg in path.split("/")] + list(extra)
    if block1 is not None:
        num, more, szx = block1
        value = (num << 4) | (more << 3) | szx
        options.append((27, value.to_bytes((value.bit_length() + 7) // 8, "big")))
    options.sort(key=lambda o: o[0])
    out = struct.pack("!BBH", 0x40 | len(token), code, mid) + token
    last = 0
    for number, value in options:
        delta = number - last
        last = number
        head = [delta if delta < 13 else 13, len(value)]
        out += bytes([(head[0] << 4) | head[1]])
        if delta >= 13:
            out += bytes([delta - 13])
        out += value
    return out + (b"\xff" + payload if payload else b"")


class ValuesWireTests(ServerTestCase):

    async def code(self, method, path, payload):
        r = await self.request(method, path, payload)
        return r.code, r.payload

    @coro
    async def test_dates_rounding_into_year_10000_are_4_00(self):
        import aiocoap
        jobs = await self.get("control/scheduler/jobs")
        for value in EDGE:
            for path, payload in (
                    ("control/record_sequence", {"at_time": value}),
                    ("control/record_sequence", {"at_time": FUTURE, "end_time": value,
                                                 "interval": 60}),
                    ("control/power_on", {"at_time": value}),
                    ("control/power_off", [value]),
                    ("sysinfo/clock", value)):
                code, text = await self.code("PUT", path, payload)
                self.assertEqual(code, aiocoap.BAD_REQUEST, (path, payload, text))
                self.assertIn(b"out of range", text)
        r = await self.request("GET", "control/scheduler/jobs")
        self.assertEqual(r.code, aiocoap.CONTENT, r.payload)
        self.assertEqual(json.loads(r.payload), jobs)

    @coro
    async def test_digits_of_other_scripts_refused(self):
        import aiocoap
        before = await self.get("control/scheduler/quietStart")
        for value in ("\u0661\u0662:00:00", "\uff11\uff12:00:00+0000"):
            code, text = await self.code("PUT", "control/scheduler/quietStart", value)
            self.assertEqual(code, aiocoap.BAD_REQUEST, text)
        self.assertEqual(await self.get("control/scheduler/quietStart"), before)
        delay = await self.get("control/delay")
        for value in ("\u0661\u0662", "\uff12\uff10", "\u0663.\u0665"):
            for path in ("control/delay", "control/numSequences", "control/target"):
                code, text = await self.code("PUT", path, value)
                self.assertEqual(code, aiocoap.BAD_REQUEST, (path, value, text))
        self.assertEqual(await self.get("control/delay"), delay)


class RunNameOnDiskTests(ServerTestCase):
    """A run name that exists in the data directory but is no directory
    (a file of the operator's, a symlink) is refused when set, by every
    resource that sets one, as current_run refuses it."""

    def populate(self, datadir):
        with open(os.path.join(datadir, "notes.txt"), "w") as f:
            f.write("the operator's notes\n")
        self.outside = tempfile.mkdtemp(prefix="piccolo-outside-")
        self.addCleanup(shutil.rmtree, self.outside, True)
        os.symlink(self.outside, os.path.join(datadir, "linked"))

    @coro
    async def test_file_or_symlink_run_refused_when_set(self):
        import aiocoap
        run = await self.get("data_dir/current_run")
        for name in ("notes.txt", "linked"):
            for path, payload in (("data_dir/current_run", name),
                                  ("control/record_sequence",
                                   {"run": name, "nsequence": 1, "auto": -1}),
                                  ("control/record_sequence", name),
                                  ("control/record_sequence",
                                   {"run": name, "at_time": FUTURE}),
                                  ("control/record_dark", {"run": name})):
                r = await self.request("PUT", path, payload)
                self.assertEqual(r.code, aiocoap.BAD_REQUEST, (path, payload, r.payload))
                self.assertIn(b"not a directory", r.payload)
        self.assertEqual(await self.get("data_dir/current_run"), run)
        self.assertEqual(await self.get("control/scheduler/jobs"), [])
        self.assertEqual(await self.get("control/status"), "idle")
        self.assertEqual(await self.get("control/fault"), "")
        self.assertEqual(os.listdir(self.outside), [])
        # a good name still works, and the batch really runs
        await self.put("control/record_dark", {"run": "fresh"})
        await self.wait_for("control/status", lambda s: s == "idle")
        self.assertEqual(await self.get("data_dir/current_run"), "fresh")
        self.assertTrue(os.listdir(self.run_dir("fresh")))


class HostileCrowdTests(LoopbackServerCase):
    """The server on 127.0.0.1, so that other loopback hosts exist."""

    def exchange(self, data, sock):
        answer = hostile.exchange(self.dst, data, sock=sock)
        self.assertIsNotNone(answer)
        return hostile.parse(answer)

    def test_block1_size_exponent_7_refused(self):
        def go():
            sock = hostile.udp("127.0.0.2", self.dst)
            try:
                return self.exchange(coap(7, "control/delay", b"42",
                                          block1=(0, 0, 7)), sock)
            finally:
                sock.close()
        d = self.in_thread(go)

        def check(answer):
            self.assertEqual(answer[1], 0x80, answer)            # 4.00
            self.assertEqual(self.service.control.delay.value, 0.0)
        return d.addCallback(check)

    def test_bad_option_values_treated_as_unknown_options(self):
        # RFC 7252 5.4.3: a value of the wrong length, or a repeated
        # non-repeatable option, is an unknown option: elective -> ignored,
        # critical -> 4.02 (it was a RST, or the first Block2 was used)
        cases = [
            ([(6, b"\x00" * 5)], 0x45),                    # Observe, 5 bytes: 2.05
            ([(12, b"\x00" * 3)], 0x45),                   # Content-Format, 3 bytes
            ([(23, b"\x00\x00\x00\x06")], 0x82),          # Block2, 4 bytes: 4.02
            ([(23, b"\x06"), (23, b"\x16")], 0x82),        # Block2 twice
            ([(17, b"\x32"), (17, b"\x00")], 0x82),        # Accept twice
        ]

        def go():
            sock = hostile.udp("127.0.0.2", self.dst)
            try:
                return [self.exchange(coap(20 + i, "control/status", code=hostile.GET,
                                           extra=extra), sock)
                        for i, (extra, _) in enumerate(cases)]
            finally:
                sock.close()
        d = self.in_thread(go)

        def check(answers):
            self.assertEqual([(a[0], a[1]) for a in answers],
                             [(2, code) for _, code in cases], answers)
            self.assertEqual(self.service.coap.protocol._host_observers, {})
        return d.addCallback(check)

    def test_upload_survives_other_hosts_starting_uploads(self):
        name = "u" * 60
        body = json.dumps(name).encode()            # 62 bytes: 4 blocks of 16

        def go():
            victim = hostile.udp("127.0.0.2", self.dst)
            socks = [hostile.udp("127.0.0.3", self.dst) for _ in range(100)]
            try:
                answers = [self.exchange(coap(100, "data_dir/current_run", body[:16],
                                              token=b"v", block1=(0, 1, 0)), victim)]
                # 100 uploads begun, never ended: all read by the server
                # before the victim goes on (a 0.3 s wait let a loaded
                # server read them after it: the test then tested nothing)
                stats = self.service.coap.protocol.stats
                base = stats["received"]
                for i, sock in enumerate(socks):
                    sock.send(coap(i, "control/delay", b" " * 16, token=b"x",
                                   block1=(0, 1, 0)))
                deadline = hostile.time.monotonic() + 30
                while stats["received"] - base < len(socks):
                    assert hostile.time.monotonic() < deadline, "uploads not read"
                    hostile.time.sleep(0.005)
                for n in range(1, 4):
                    chunk = body[16 * n:16 * (n + 1)]
                    answers.append(self.exchange(
                        coap(100 + n, "data_dir/current_run", chunk, token=b"v",
                             block1=(n, int(16 * (n + 1) < len(body)), 0)), victim))
                return answers
            finally:
                victim.close()
                for s in socks:
                    s.close()
        d = self.in_thread(go)

        def check(answers):
            codes = [a[1] for a in answers]
            self.assertEqual(codes, [0x5F, 0x5F, 0x5F, 0x44], answers)  # 2.31 x3, 2.04
            self.assertEqual(self.service.datadir.current_run.value, name)
        return d.addCallback(check)

    @defer.inlineCallbacks
    def test_200_downloads_all_in_flight_at_once(self):
        # 200 clients each with its own port (as 200 aiocoap contexts): all
        # block-0 requests in flight together; any error code is a failure
        # (aiocoap hands a 5.03 to the application, which gives up)
        run = os.path.join(self.datadir, "field")
        os.makedirs(run)
        text = json.dumps({"Spectra": [{"Pixels": list(range(5000))}]})
        with open(os.path.join(run, "b000000_s000000_light.pico"), "w") as f:
            f.write(text)
        expected = json.dumps(text, separators=(",", ":")).encode()
        n = 200
        results = yield self.in_thread(
            hostile.downloads, self.dst, "data_dir/runs/field/spectra", n,
            code=hostile.PUT, payload=b'"b000000_s000000_light.pico"',
            every_block=False, window=n, timeout=60)
        errors = sorted({r for r in results if isinstance(r, str)})
        self.assertEqual(sum(r == expected for r in results), n, errors[:3])


class LogFileConfigTests(unittest.SynchronousTestCase):

    def test_unwritable_log_file_is_one_line(self):
        from piccolo_twisted import tap
        for logfile in ("/proc/piccolo-none/piccolo.log", "/proc/version"):
            cfg = os.path.abspath(self.mktemp())
            with open(cfg, "w") as f:
                f.write(f"[logging]\nlogfile = {logfile}\n")
            e = self.assertRaises(SystemExit, tap.Options().parseOptions, ["-c", cfg])
            err = str(e)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertTrue(err.startswith(f"twistd piccolo: {cfg}: [logging/logfile] "
                                           f"cannot write {logfile}: "), err)


class HostQueueTests(unittest.SynchronousTestCase):
    """On task.Clock: requests beyond a host's running handlers wait for a
    slot (in order), for QUEUE_WAIT at most, then 5.03."""

    def setUp(self):
        from twisted.internet import task
        from piccolo_twisted.api import Resource
        from piccolo_twisted.coap import protocol
        from piccolo_twisted.coap.protocol import ServerCoap
        from piccolo_twisted.coap.site import Site
        from .test_coap_protocol import FakeTransport
        self.protocol = protocol
        self.clock = task.Clock()
        self.running = []

        def slow(*args):
            d = defer.Deferred()
            self.running.append(d)
            return d
        self.proto = ServerCoap(Site({"": {"slow": Resource(put=slow)}}), clock=self.clock)
        self.transport = FakeTransport()
        self.proto.transport = self.transport
        self.proto.startProtocol()
        self.addCleanup(self.proto.stopProtocol)

    def send(self, mid, port):
        from .test_coap_protocol import request
        from piccolo_twisted.coap import _tx
        self.proto.datagramReceived(request(_tx.PUT, path="slow", mid=mid, payload=b"1"),
                                    ("127.0.0.2", port))

    def answers(self):
        from piccolo_twisted.coap.protocol import decode
        out = [(decode(d).mid, decode(d).code) for d, _ in self.transport.sent]
        self.transport.sent.clear()
        return out

    def test_waits_for_a_slot_then_5_03(self):
        from piccolo_twisted.coap import _tx
        cap = self.protocol.MAX_PENDING_PER_HOST
        for i in range(cap + 2):
            self.send(i, 40000 + i)
        self.assertEqual(len(self.running), cap)
        self.running[0].callback(None)
        self.clock.advance(0)               # the slot passes to the first waiting
        self.assertEqual(len(self.running), cap + 1)
        self.assertIn((0, _tx.CHANGED), self.answers())
        self.clock.advance(self.protocol.QUEUE_WAIT)
        # the second waiting one got no slot in time: 5.03, never run
        self.assertIn((cap + 1, _tx.SERVICE_UNAVAILABLE), self.answers())
        self.assertEqual(len(self.running), cap + 1)
        self.assertEqual((self.proto.queued, self.proto.queued_bytes), ({}, 0))
        for d in self.running[1:]:
            d.callback(None)
        self.assertEqual(self.proto.pending, {})
        self.assertEqual(self.proto.pending_total, 0)
