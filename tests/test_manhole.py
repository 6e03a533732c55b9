"""The SSH manhole against idle connections (issue 19): 1,100 idle TCP
connections stayed open on ba916b9 (conch's login timeout is 10 h, and
none runs before the key exchange), and the server ran out of descriptors.
Now a connection has LOGIN_TIMEOUT s to log in, and at most MAX_PENDING
(MAX_PENDING_PER_HOST per host) may be waiting to."""

import os
import socket
import tempfile
import time
import types

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from piccolo_twisted import manhole


def keys_file(directory):
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from twisted.conch.ssh import keys
    key = keys.Key(ed25519.Ed25519PrivateKey.generate()).public()
    path = os.path.join(directory, "authorized_keys")
    with open(path, "wb") as f:
        f.write(key.toString("openssh") + b" admin@test\n")
    return path


class ManholeIdleConnectionTests(unittest.TestCase):

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.datadir = tempfile.mkdtemp(prefix="piccolo-manhole-")
        self.addCleanup(lambda: __import__("shutil").rmtree(self.datadir, True))
        settings = types.SimpleNamespace(
            manhole_keys=keys_file(self.datadir), datadir=self.datadir,
            manhole_interface="127.0.0.1", manhole_port=0,
            manhole_host_key=os.path.join(self.datadir, "state", "host_key"))
        piccolo = types.SimpleNamespace(settings=settings, namespace=lambda: {})
        self.service = manhole.manhole_service(piccolo)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        listening = defer.Deferred()

        def seen(port):
            listening.callback(port)
            return port                 # stopService needs it too
        self.service._waitingForPort.addCallback(seen)
        port = yield listening
        self.port = port.getHost().port

    def connect_idle(self, hosts, per_host):
        """TCP connections that never say anything; which ones the server
        closed within 2 s."""
        socks = []
        for host in hosts:
            for _ in range(per_host):
                s = socket.socket()
                s.bind((host, 0))
                s.settimeout(5)
                s.connect(("127.0.0.1", self.port))
                socks.append((host, s))
        time.sleep(2.0)
        closed = []
        for host, s in socks:
            s.setblocking(False)
            try:
                while True:
                    data = s.recv(4096)     # the server's SSH banner, then EOF
                    if not data:
                        closed.append(host)
                        break
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed.append(host)
        return socks, closed

    @defer.inlineCallbacks
    def test_idle_connections_capped_per_host_and_in_all(self):
        hosts = [f"127.0.11.{i}" for i in range(1, 11)]
        socks, closed = yield threads.deferToThread(self.connect_idle, hosts, 6)
        try:
            # per host: the first MAX_PENDING_PER_HOST wait, the rest are closed
            kept = {h: 6 - closed.count(h) for h in hosts}
            self.assertTrue(closed, "every idle connection was kept")
            self.assertLessEqual(max(kept.values()), manhole.MAX_PENDING_PER_HOST, kept)
            self.assertLessEqual(sum(kept.values()), manhole.MAX_PENDING)
            self.assertLessEqual(manhole.LOGIN_TIMEOUT, 30)
        finally:
            for _, s in socks:
                s.close()
        # the server sees them go (their login timers end with them)
        factory = self.service.factory
        for _ in range(500):
            if not factory.pending:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(factory.pending, {})


class LoginTimeoutTests(unittest.SynchronousTestCase):
    """On task.Clock: a connection that has not logged in within
    LOGIN_TIMEOUT is closed; one that has is kept, and no longer counts."""

    def test_closed_after_login_timeout(self):
        from twisted.internet import protocol
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport
        clock = task.Clock()

        class Idle(protocol.Protocol):
            avatar = None

        factory = manhole.LoginGuardFactory(protocol.Factory.forProtocol(Idle), clock=clock)
        guards = []
        for i in range(3):
            addr = IPv4Address("TCP", "127.0.0.9", 40000 + i)
            guard = factory.buildProtocol(addr)
            guard.makeConnection(StringTransport(peerAddress=addr))
            guards.append(guard)
        guards[1].wrappedProtocol.avatar = object()         # logged in
        clock.advance(manhole.LOGIN_TIMEOUT - 1)
        self.assertEqual([g.transport.disconnecting for g in guards], [False] * 3)
        clock.advance(1)
        self.assertEqual([g.transport.disconnecting for g in guards], [True, False, True])
        self.assertEqual(factory.pending, {})
        self.assertEqual(factory.per_host_count, {})
        self.assertEqual(clock.getDelayedCalls(), [])
