"""``[access] control_from``: the policy alone, its configuration, and CoAP
requests from many source addresses (127.x.y.z) as a refused or allowed
client sends them (raw datagrams from a socket bound to that address)."""

import asyncio
import ipaddress
import json
import os
import random
import socket
import sys

from twisted.internet import threads
from twisted.trial import unittest

from piccolo_twisted.access import AccessError, ControlPolicy, client_address, parse_networks
from piccolo_twisted.config import ConfigError, load_server_config

from .helpers import ServerTestCase, as_deferred

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "bench"))
import loadclient  # noqa: E402

GET, PUT = 1, 3
CHANGED, CONTENT, FORBIDDEN, BAD_REQUEST = 0x44, 0x45, 0x83, 0x80


class PolicyTests(unittest.SynchronousTestCase):

    def test_default_is_everyone(self):
        policy = ControlPolicy.from_entries(["any"])
        self.assertTrue(policy.everyone)
        for host in ("127.0.0.1", "192.0.2.7", "::ffff:10.1.2.3", "fe80::1%eth0", "junk"):
            self.assertIsNone(policy.refusal(host))
        self.assertIsNone(load_server_config().control_from)

    def test_addresses_and_networks(self):
        policy = ControlPolicy.from_entries(["127.0.0.1", "192.168.4.0/24", "fd00::/8"])
        self.assertIsNone(policy.refusal("127.0.0.1"))
        self.assertIsNone(policy.refusal("192.168.4.200"))
        self.assertIsNone(policy.refusal("fd12::5"))
        # an IPv4 client of a dual-stack socket is its IPv4 address
        self.assertIsNone(policy.refusal("::ffff:192.168.4.9"))
        for host in ("127.0.0.2", "192.168.5.1", "::1", "::ffff:10.0.0.1", "fe80::1%eth0"):
            reason = policy.refusal(host)
            self.assertIsNotNone(reason, host)
            self.assertTrue(reason.startswith("[access] control_from refuses "), reason)
        self.assertIn("192.168.5.1", policy.refusal("192.168.5.1"))
        self.assertIn("10.0.0.1", policy.refusal("::ffff:10.0.0.1"))
        # what a transport could hand over that is no address: refused, said so
        self.assertIn("not an IP address", policy.refusal("not-an-address"))
        self.assertIn("not an IP address", policy.refusal(None))

    def test_ipv4_mapped_entries(self):
        """Clients are matched by their IPv4 address (a dual-stack socket's
        ::ffff:a.b.c.d peers included), so mapped entries mean the same."""
        for entry in ("::ffff:127.0.0.1", "::ffff:127.0.0.0/104", "::ffff:0:0/96", "::/0"):
            policy = ControlPolicy.from_entries([entry])
            self.assertIsNone(policy.refusal("127.0.0.1"), entry)
            self.assertIsNone(policy.refusal("::ffff:127.0.0.1"), entry)
        policy = ControlPolicy.from_entries(["::ffff:192.168.4.0/120"])
        self.assertEqual(policy.describe(), "192.168.4.0/24")
        self.assertIsNone(policy.refusal("192.168.4.77"))
        self.assertIsNotNone(policy.refusal("192.168.5.1"))
        self.assertIsNone(ControlPolicy.from_entries(["::/0"]).refusal("2001:db8::1"))
        self.assertIsNotNone(ControlPolicy.from_entries(["::ffff:0:0/96"]).refusal("::1"))

    def test_many_source_addresses(self):
        """Every address of 127/8 but the allowed one is refused."""
        policy = ControlPolicy.from_entries(["127.0.0.1"])
        rng = random.Random(22)
        for _ in range(2000):
            host = str(ipaddress.ip_address(0x7F000000 + rng.randrange(2, 1 << 24)))
            self.assertIsNotNone(policy.refusal(host), host)
        self.assertIsNone(policy.refusal("127.0.0.1"))
        self.assertIsNone(ControlPolicy.from_entries(["localhost"]).refusal("127.45.6.7"))
        self.assertIsNone(ControlPolicy.from_entries(["localhost"]).refusal("::1"))

    def test_bad_entries(self):
        for entries, words in ((["10.0.0.300"], "'10.0.0.300' is not an address"),
                               (["any", "10.0.0.1"], "cannot be combined"),
                               ([], "no address given"),
                               ([" "], "no address given"),
                               (["10.0.0.0/33"], "'10.0.0.0/33'"),
                               (["piccolo.local"], "'piccolo.local'")):
            e = self.assertRaises(AccessError, parse_networks, entries)
            self.assertIn(words, str(e))

    def test_config(self):
        s = load_server_config(text="[access]\ncontrol_from = 127.0.0.1, 192.168.4.0/24\n")
        self.assertEqual([str(n) for n in s.control_from], ["127.0.0.1/32", "192.168.4.0/24"])
        e = self.assertRaises(ConfigError, load_server_config,
                              text="[access]\ncontrol_from = 192.168.4.0/24, x\n")
        self.assertEqual(str(e), "<string>: [access/control_from] 'x' is not an address "
                                 "or a network (e.g. 127.0.0.1, 192.168.4.0/24, fd00::/8)")
        self.assertRaises(ConfigError, load_server_config, text="[access]\nnope = 1\n")

    def test_client_address(self):
        self.assertEqual(str(client_address("::ffff:127.0.0.2")), "127.0.0.2")
        self.assertEqual(str(client_address("fe80::1%wlan0")), "fe80::1")
        self.assertIsNone(client_address("piccolo.local"))


class ReadmeTests(unittest.SynchronousTestCase):

    def test_the_recommended_setting(self):
        """The README's "Who may control" block, as written, is a server
        config that lets the Pi and its Wi-Fi control and nobody else."""
        from . import readme
        block = readme.block_starting(readme.section("Who may control"), "[access]")
        settings = load_server_config(text=block)
        policy = ControlPolicy(settings.control_from)
        for host in ("127.0.0.1", "192.168.4.23", "::ffff:192.168.4.1"):
            self.assertIsNone(policy.refusal(host), host)
        for host in ("192.168.5.1", "10.0.0.1", "::1", "127.0.0.2"):
            self.assertIsNotNone(policy.refusal(host), host)


def in_thread(fn, *args):
    """A blocking client call in a thread, awaitable in the test's asyncio task."""
    return threads.deferToThread(fn, *args).asFuture(asyncio.get_event_loop())


def coap(source, port, method, path, payload=b"", dest="127.0.0.1"):
    """One confirmable request from ``source`` (blocking; run in a thread):
    (code, payload)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect((dest, port))
        mid = random.randrange(1 << 16)
        sock.send(loadclient.encode_request(mid, path, code=method, token=b"\x22",
                                            payload=payload))
        while True:
            data = sock.recv(65536)
            _, code, got, _, _, body = loadclient.parse(data)
            if got == mid:
                return code, body
    finally:
        sock.close()


class CoapAccessTests(ServerTestCase):
    """The server on 127.0.0.1; control only from 127.0.0.1."""

    address = "127.0.0.1"
    server_text = "[access]\ncontrol_from = 127.0.0.1\n"

    def ask(self, source, method, path, payload=None):
        raw = b"" if payload is None else json.dumps(payload).encode()
        return in_thread(coap, source, self.port, method, path, raw)

    def test_refused_from_elsewhere_with_the_reason(self):
        async def check():
            before = await self.get("control/numSequences")
            for source in ("127.0.0.2", "127.9.8.7", "127.255.0.1"):
                code, body = await self.ask(source, PUT, "control/numSequences", 7)
                self.assertEqual(code, FORBIDDEN, (source, body))
                self.assertEqual(body.decode(), f"[access] control_from refuses {source}")
                # a GET that acts, and a batch, refused the same way
                code, body = await self.ask(source, GET, "control/abort")
                self.assertEqual(code, FORBIDDEN)
                code, body = await self.ask(source, PUT, "control/record_sequence",
                                            {"nsequence": 1})
                self.assertEqual(code, FORBIDDEN)
                code, body = await self.ask(source, GET, "spectrometer/connect")
                self.assertEqual(code, FORBIDDEN)
                # reads stay open, the legacy API's reading PUTs included
                code, body = await self.ask(source, GET, "control/status")
                self.assertEqual((code, json.loads(body)), (CONTENT, "idle"))
                code, body = await self.ask(source, PUT, "data_dir/all_runs", {})
                self.assertEqual(code, CHANGED, body)
                self.assertIn("spectra", json.loads(body))
            self.assertEqual(await self.get("control/numSequences"), before)
            self.assertEqual(await self.get("control/status"), "idle")
            # the allowed address controls
            code, body = await self.ask("127.0.0.1", PUT, "control/numSequences", 7)
            self.assertEqual(code, CHANGED, body)
            self.assertEqual(await self.get("control/numSequences"), 7)
            code, body = await self.ask("127.0.0.1", GET, "control/abort")
            self.assertEqual((code, body.decode()),
                             (BAD_REQUEST, "nothing to abort: piccolo system is idle"))
        return as_deferred(check())


class CoapEveryoneTests(ServerTestCase):
    """The default: everyone controls, as the legacy server let them."""

    address = "127.0.0.1"

    def test_everyone_controls_by_default(self):
        async def check():
            code, body = await in_thread(
                coap, "127.0.0.2", self.port, PUT, "control/numSequences", b"5")
            self.assertEqual(code, CHANGED, body)
            self.assertEqual(await self.get("control/numSequences"), 5)
        return as_deferred(check())


def coap_raw(source, port, data, timeout=5.0):
    """One datagram from ``source``, the answer's bytes (blocking)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        sock.send(data)
        return sock.recv(65536)
    finally:
        sock.close()


class CoapReasonWholeTests(ServerTestCase):
    """The 4.03 reason reaches a host not yet verified whole, within the
    3x limit (RFC 9175 / RFC 7252 11.3): the smallest changing requests,
    from the longest 127/8 addresses, and what coap-client-notls sends."""

    address = "127.0.0.1"
    server_text = "[access]\ncontrol_from = 127.0.0.2\n"

    def test_smallest_requests_get_the_whole_reason(self):
        async def check():
            for source in ("127.0.9.9", "127.255.255.254", "127.100.200.201"):
                for i, (method, path, payload) in enumerate((
                        (PUT, "control/auto", b""), (GET, "control/pause", b""),
                        (GET, "control/abort", b""), (PUT, "control/delay", b"1"),
                        (PUT, "data_dir/current_run", b'"x"'))):
                    data = loadclient.encode_request(1000 + i, path, code=method, token=b"",
                                                     payload=payload)
                    answer = await in_thread(coap_raw, source, self.port, data)
                    _, code, _, _, _, body = loadclient.parse(answer)
                    self.assertEqual((code, body.decode()),
                                     (FORBIDDEN, f"[access] control_from refuses {source}"),
                                     (source, path))
                    self.assertLessEqual(len(answer), 3 * len(data), (source, path))
            self.assertEqual(await self.get("control/status"), "idle")
        return as_deferred(check())

    def test_coap_client_notls(self):
        import shutil
        import subprocess
        tool = shutil.which("coap-client-notls")
        if tool is None:
            raise unittest.SkipTest("coap-client-notls is not installed (libcoap3-bin)")

        def run(*args):
            return subprocess.run([tool, *args], capture_output=True, text=True, timeout=20)

        async def check():
            base = f"coap://127.0.0.1:{self.port}"
            for method, path in (("get", "control/abort"), ("get", "control/pause"),
                                 ("put", "control/auto")):
                out = await in_thread(run, "-m", method, f"{base}/{path}")
                self.assertEqual(out.stdout.strip() + out.stderr.strip(),
                                 "4.03 [access] control_from refuses 127.0.0.1", path)
        return as_deferred(check())


class ReasonCutTests(unittest.SynchronousTestCase):
    """Over the 3x limit a diagnostic loses whole words, never part of one:
    a long IPv6 address is left out, the setting's name stays."""

    def test_long_ipv6_address(self):
        from twisted.internet import task
        from piccolo_twisted.api import Resource
        from piccolo_twisted.coap import _tx
        from piccolo_twisted.coap.protocol import ServerCoap, cut_text, decode
        from piccolo_twisted.coap.site import Site
        from .test_coap_protocol import FakeTransport, request
        self.assertEqual(cut_text(b"[access] control_from refuses 2001:db8::1", 29),
                         b"[access] control_from refuses")
        self.assertEqual(cut_text(b"[access] control_from refuses 2001:db8::1", 28),
                         b"[access] control_from")
        self.assertEqual(cut_text(b"[access] control_from", 5), b"")
        self.assertEqual(cut_text(b"abc def", 7), b"abc def")
        self.assertEqual(cut_text("l'\u00e9t\u00e9 est".encode(), 8), "l'\u00e9t\u00e9".encode())
        proto = ServerCoap(Site({"control": {"auto": Resource(put=lambda *a: None)}}),
                           clock=task.Clock(), access=ControlPolicy.from_entries(["127.0.0.1"]))
        proto.transport = FakeTransport()
        proto.startProtocol()
        self.addCleanup(proto.stopProtocol)
        peer = "2001:db8:1234:5678:9abc:def0:1234:5678"
        data = request(_tx.PUT, path="control/auto", token=b"")
        proto.datagramReceived(data, (peer, 5683, 0, 0))
        # the answer (and nothing else: no ping), within 3x
        [sent] = [d for d, _ in proto.transport.sent if d[1]]
        self.assertLessEqual(sum(len(d) for d, _ in proto.transport.sent), 3 * len(data))
        answer = decode(sent)
        self.assertEqual((answer.code, answer.payload),
                         (_tx.FORBIDDEN, b"[access] control_from refuses"))
