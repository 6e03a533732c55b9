"""The SSH manhole against idle connections (issue 19): 1,100 idle TCP
connections stayed open on ba916b9 (conch's login timeout is 10 h, and
none runs before the key exchange), and the server ran out of descriptors.
Now a connection has LOGIN_TIMEOUT s to log in, and at most MAX_PENDING
(MAX_PENDING_PER_HOST per host) may be waiting to."""

import os
import socket
import subprocess
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
        closed: once it has taken every connection in (``self.built``), and
        every one it does not hold (``factory.pending``) has been seen to
        close -- however long a loaded machine takes (a 2 s wait counted
        the closes made by then: its speed)."""
        factory = self.service.factory
        socks = []
        for host in hosts:
            for _ in range(per_host):
                s = socket.socket()
                s.bind((host, 0))
                s.settimeout(5)
                s.connect(("127.0.0.1", self.port))
                socks.append((host, s))
        deadline = time.monotonic() + 30
        while len(self.built) < len(socks) and time.monotonic() < deadline:
            time.sleep(0.01)
        closed, open_ = [], list(socks)
        for host, s in socks:
            s.setblocking(False)
        while True:
            for host, s in list(open_):
                try:
                    while True:
                        data = s.recv(4096)     # the server's SSH banner, then EOF
                        if not data:
                            closed.append(host)
                            open_.remove((host, s))
                            break
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    closed.append(host)
                    open_.remove((host, s))
            if len(closed) >= len(socks) - len(factory.pending) \
                    or time.monotonic() > deadline:
                return socks, closed
            time.sleep(0.01)

    @defer.inlineCallbacks
    def test_idle_connections_capped_per_host_and_in_all(self):
        factory = self.service.factory
        self.built = []
        real_build = factory.buildProtocol

        def counting(addr):
            self.built.append(addr)
            return real_build(addr)
        self.patch(factory, "buildProtocol", counting)
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


class ManholeLockoutTests(unittest.TestCase):
    """The attack on issue 19's manhole (findings-19.md, 6): 8 addresses x
    4 idle connections, renewed as the server closes them, kept every
    connection slot taken, and the administrator out (0 of 16 logins).
    Now a connection from a host holding fewer ends one of the biggest
    holder's (the one that has sent the least, the oldest), so the
    administrator gets in."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        import shutil
        if shutil.which("ssh") is None:
            raise unittest.SkipTest("needs the ssh client")
        from .helpers import make_ssh_key
        self.datadir = tempfile.mkdtemp(prefix="piccolo-manhole-")
        self.addCleanup(lambda: shutil.rmtree(self.datadir, True))
        self.key_path = os.path.join(self.datadir, "client", "id_ed25519")
        key = make_ssh_key(self.key_path)
        keys_path = os.path.join(self.datadir, "authorized_keys")
        with open(keys_path, "wb") as f:
            f.write(key.public().toString("openssh") + b" admin@test\n")
        settings = types.SimpleNamespace(
            manhole_keys=keys_path, datadir=self.datadir,
            manhole_interface="127.0.0.1", manhole_port=0,
            manhole_host_key=os.path.join(self.datadir, "state", "host_key"))
        piccolo = types.SimpleNamespace(settings=settings,
                                        namespace=lambda: {"answer": 6 * 7})
        self.service = manhole.manhole_service(piccolo)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        listening = defer.Deferred()

        def seen(port):
            listening.callback(port)
            return port
        self.service._waitingForPort.addCallback(seen)
        port = yield listening
        self.port = port.getHost().port

    def hold_connections(self, stop, made, addresses=8, per=4):
        """Keep ``addresses`` x ``per`` idle connections open, opening a new
        one whenever the server closes one, until ``stop`` is set."""
        socks = []
        n = 0
        try:
            while not stop.is_set():
                live = []
                for s in socks:
                    try:
                        if s.recv(4096, socket.MSG_DONTWAIT) == b"":
                            s.close()
                            continue
                    except BlockingIOError:
                        pass
                    except OSError:
                        s.close()
                        continue
                    live.append(s)
                socks = live
                for _ in range(addresses * per - len(socks)):
                    s = socket.socket()
                    s.bind((f"127.0.62.{(n // per) % addresses + 1}", 0))
                    try:
                        s.connect(("127.0.0.1", self.port))
                        socks.append(s)
                        n += 1
                        made.append(1)
                    except OSError:
                        s.close()
                time.sleep(0.05)
        finally:
            for s in socks:
                s.close()

    def login(self):
        """One ``ssh`` login that runs a line of Python: whether its answer
        came back. (Its input stays open: conch's terminal session cannot
        take an end of input; a ^D at the prompt ends the session.)"""
        import selectors
        p = subprocess.Popen(
            ["ssh", "-tt", "-p", str(self.port), "-i", self.key_path,
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
             "admin@127.0.0.1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        out = b""
        try:
            p.stdin.write(b"print(answer + 1000)\n")
            p.stdin.flush()
            sel = selectors.DefaultSelector()
            sel.register(p.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 20
            while b"1042" not in out and time.monotonic() < deadline:
                if sel.select(0.2):
                    chunk = os.read(p.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    out += chunk
            sel.close()
            p.stdin.write(b"\x04")
            p.stdin.flush()
            p.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            for pipe in (p.stdin, p.stdout):
                try:
                    pipe.close()
                except OSError:         # (the session was closed under it)
                    pass
        return b"1042" in out

    @defer.inlineCallbacks
    def test_a_few_hosts_cannot_keep_the_administrator_out(self):
        import threading
        stop, made = threading.Event(), []
        holding = threads.deferToThread(self.hold_connections, stop, made)
        try:
            factory = self.service.factory
            outputs = []
            for _ in range(3):
                # every slot held by the attackers (again) when the
                # administrator comes
                for _ in range(1000):
                    if len(factory.pending) >= manhole.MAX_PENDING:
                        break
                    yield task.deferLater(reactor, 0.01, lambda: None)
                self.assertEqual(len(factory.pending), manhole.MAX_PENDING)
                self.assertEqual(set(factory.pending.values()) & {"127.0.0.1"}, set())
                outputs.append((yield threads.deferToThread(self.login)))
            self.assertEqual(outputs, [True] * 3)
            self.assertGreater(len(made), manhole.MAX_PENDING)
        finally:
            stop.set()
            yield holding


from tests.helpers import ServerTestCase  # noqa: E402
from tests import readme  # noqa: E402


class ReadmeNamespaceTests(ServerTestCase):
    """The README's manhole lines (``>>> ...``) evaluated in the namespace
    the running server gives the manhole: every name they use is there
    and means what the README says."""

    def test_the_readme_expressions_work_in_the_live_namespace(self):
        body = readme.section("SSH manhole")
        lines = [line.strip()[4:] for line in body.splitlines()
                 if line.strip().startswith(">>> ")]
        self.assertIn("control.status.value", lines)
        namespace = self.service.namespace()
        for line in lines:
            value = eval(line, dict(namespace))
            if line == "control.status.value":
                self.assertEqual(value, "idle")
