"""Daemon mode through twistd, the legacy launcher, the manhole, stopping
mid-batch, the reboot button and the status LEDs."""

import json
import os
import signal
import subprocess
import sys
import time

from gpiozero.pins.mock import MockFactory
from twisted.internet import defer, task
from twisted.trial import unittest

from piccolo_twisted.config import load_server_config
from piccolo_twisted.instrument.gpio import GPIO, StatusLEDs
from piccolo_twisted.tools import launcher
from piccolo_twisted.tools.reboot import RebootButton

from .helpers import ServerTestCase
from .test_wire import coro

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "bench"))
from run import TWISTD, free_port  # noqa: E402



def listening_tcp(pid):
    """TCP ports the process listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and parts[9] in inodes:
                    ports.append(parts[1])
    return ports


def get_version(port, timeout=0.5):
    from loadclient import fetch
    code, body, _ = fetch("::1", port, "/sysinfo/version", timeout=timeout)
    return code, json.loads(body)


class ProcessTestCase(unittest.TestCase):
    timeout = 60

    def wait_answer(self, port, seconds=20):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                return get_version(port)
            except OSError:
                time.sleep(0.2)
        self.fail("the daemon never answered")


def batch_files_readable(test, port, datadir):
    """A batch in daemon mode (umask 077) leaves 0644 spectra in a 0755 run
    directory: whoever copies the data off the Pi can read it (issue 10.7)."""
    from loadclient import fetch
    code, _, _ = fetch("::1", port, "/control/record_sequence", method=3,
                       payload=json.dumps({"run": "perm", "nsequence": 1,
                                           "auto": -1}).encode())
    test.assertEqual(code, 0x44)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        code, body, _ = fetch("::1", port, "/control/status")
        if json.loads(body) == "idle":
            break
        time.sleep(0.1)
    run = os.path.join(datadir, "perm")
    test.assertEqual(os.stat(run).st_mode & 0o777, 0o755)
    names = os.listdir(run)
    test.assertEqual(len(names), 2, names)       # dark, light
    for name in names:
        test.assertEqual(os.stat(os.path.join(run, name)).st_mode & 0o777, 0o644, name)
    test.assertEqual(os.stat(datadir).st_mode & 0o777, 0o755)


class DaemonTests(ProcessTestCase):

    def batch_files_readable(self, port, datadir):
        batch_files_readable(self, port, datadir)

    def test_daemon_sigterm_and_stale_pidfile(self):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        pidfile, logfile = os.path.join(d, "p.pid"), os.path.join(d, "p.log")
        with open(pidfile, "w") as f:
            f.write("999999")                      # stale: from a crash
        port = free_port()
        env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", PICCOLO_TIME_SCALE="0.05")
        p = subprocess.run(TWISTD + ["--pidfile", pidfile, "-l", logfile, "piccolo",
                                     "--address", "::1", "--port", str(port), "--web", "0",
                                     "--data-dir", os.path.join(d, "data")],
                           env=env, capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)     # detached
        code, version = self.wait_answer(port)
        self.assertEqual(code, 0x45)
        self.batch_files_readable(port, os.path.join(d, "data"))
        with open(pidfile) as f:
            pid = int(f.read())
        self.assertNotEqual(pid, 999999)
        self.assertEqual(listening_tcp(pid), [])         # no manhole: no TCP
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse(os.path.exists(pidfile))
        with open(logfile) as f:
            log = f.read()
        self.assertIn("piccolo serving CoAP", log)
        self.assertIn("piccolo stopped", log)
        self.assertNotIn("Traceback", log)


class LauncherProcessTests(ProcessTestCase):

    def test_piccolo3_server_from_config(self):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        port = free_port()
        cfg = os.path.join(d, "piccolo.cfg")
        with open(cfg, "w") as f:
            f.write(f"[coap]\naddress = ::1\nport = {port}\n"
                    f"[datadir]\ndatadir = {d}/data\n"
                    f"[daemon]\ndaemon = True\npid_file = {d}/p.pid\nlogfile = {d}/p.log\n")
        env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", PICCOLO_TIME_SCALE="0.05")
        p = subprocess.run([sys.executable, "-c",
                            "from piccolo_twisted.tools.launcher import main; main()",
                            "-s", cfg], env=env, capture_output=True, text=True, timeout=30)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.wait_answer(port)
        self.assertTrue(os.path.isdir(os.path.join(d, "data", "spectra")))
        batch_files_readable(self, port, os.path.join(d, "data"))
        with open(os.path.join(d, "p.pid")) as f:
            os.kill(int(f.read()), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while os.path.exists(os.path.join(d, "p.pid")) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse(os.path.exists(os.path.join(d, "p.pid")))
        with open(os.path.join(d, "p.log")) as f:
            self.assertIn("piccolo serving CoAP", f.read())


class LauncherTests(unittest.SynchronousTestCase):

    def test_foreground_by_default(self):
        args = launcher.parser().parse_args(["-s", "/etc/p.cfg", "-d", "-o", "/data"])
        argv, logfile = launcher.build_argv(args, load_server_config())
        self.assertEqual(argv[:2], ["twistd", "--nodaemon"])
        self.assertEqual(argv[argv.index("piccolo"):],
                         ["piccolo", "--config", "/etc/p.cfg", "--debug", "--data-dir", "/data"])
        self.assertFalse(logfile)

    def test_daemon_from_config(self):
        settings = load_server_config(text="[daemon]\ndaemon = True\npid_file = /run/x.pid\n"
                                           "logfile = /var/log/x.log\n")
        args = launcher.parser().parse_args(["-s", "c"])
        argv, logfile = launcher.build_argv(args, settings)
        self.assertNotIn("--nodaemon", argv)
        self.assertEqual(argv[argv.index("--pidfile") + 1], "/run/x.pid")
        self.assertEqual(logfile, "/var/log/x.log")
        args = launcher.parser().parse_args(["-D", "-p", "/tmp/p", "-L", "/tmp/l"])
        argv, logfile = launcher.build_argv(args, load_server_config())
        self.assertEqual((argv[argv.index("--pidfile") + 1], logfile), ("/tmp/p", "/tmp/l"))


class ManholeTests(unittest.TestCase):

    def setUp(self):
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from twisted.conch.ssh import keys
        self.keys = keys
        self.good = keys.Key(ed25519.Ed25519PrivateKey.generate())
        self.bad = keys.Key(ed25519.Ed25519PrivateKey.generate())
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.keyfile = os.path.join(self.dir, "authorized_keys")
        with open(self.keyfile, "wb") as f:
            f.write(b"# engineers\n" + self.good.public().toString("openssh") + b" admin@field\n")

    def login(self, key, user=b"admin"):
        from twisted.cred.credentials import SSHPrivateKey
        from twisted.conch.interfaces import IConchUser
        from piccolo_twisted import manhole
        portal = manhole.make_portal({"x": 1}, manhole.load_authorized_keys(self.keyfile))
        blob = key.public().blob()
        data = b"session data"
        creds = SSHPrivateKey(user, key.sshType(), blob, data, key.sign(data))
        return portal.login(creds, None, IConchUser), portal

    def test_key_check(self):
        from twisted.cred.error import UnauthorizedLogin
        d, portal = self.login(self.good)
        avatar = self.successResultOf(d)
        self.assertEqual(avatar[0].__name__, "IConchUser")
        d, _ = self.login(self.bad)
        self.failureResultOf(d, UnauthorizedLogin)
        d, _ = self.login(self.good, user=b"root")
        self.failureResultOf(d, UnauthorizedLogin)
        from twisted.cred.credentials import IUsernamePassword
        self.assertNotIn(IUsernamePassword, portal.listCredentialsInterfaces())

    def test_host_key_0600_and_loopback_binding(self):
        from piccolo_twisted import manhole

        class Fake:
            settings = load_server_config()

            def namespace(self):
                return {}
        fake = Fake()
        fake.settings.datadir = os.path.join(self.dir, "data")
        fake.settings.manhole_port = 0
        fake.settings.manhole_keys = self.keyfile
        state = os.path.join(self.dir, "state")
        fake.settings.manhole_host_key = os.path.join(state, manhole.HOST_KEY)
        service = manhole.manhole_service(fake)
        service.startService()
        mode = os.stat(fake.settings.manhole_host_key).st_mode & 0o777
        self.assertEqual(mode, 0o600)
        self.assertEqual(os.stat(state).st_mode & 0o777, 0o700)
        self.assertFalse(os.path.exists(fake.settings.datadir))     # nothing there

        def check(port):
            self.assertEqual(port.getHost().host, "127.0.0.1")
            return port.stopListening()
        return service._waitingForPort.addCallback(check)

    def test_unusable_host_key_replaced(self):
        """A directory or garbage where the host key goes does not stop the
        start: it is moved aside, logged, and a fresh key made (issue 15.3)."""
        from piccolo_twisted import manhole
        state = os.path.join(self.dir, "state")
        path = os.path.join(state, manhole.HOST_KEY)
        os.makedirs(os.path.join(path, "sub"))
        key = manhole.host_key(path)
        self.assertTrue(key.isPublic() is False)
        self.assertEqual(manhole.host_key(path), key)      # kept from now on
        with open(path, "wb") as f:
            f.write(b"garbage\n")
        other = manhole.host_key(path)
        self.assertNotEqual(other, key)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        aside = sorted(n for n in os.listdir(state) if n != manhole.HOST_KEY)
        self.assertEqual(len(aside), 2, aside)
        self.assertTrue(all(n.startswith(manhole.HOST_KEY + ".unusable-") for n in aside))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_unusable_host_key_in_health(self):
        """The replaced key is said over CoAP: /sysinfo/health's faults
        (issue 15.3: logged and visible)."""
        from piccolo_twisted import manhole
        from piccolo_twisted.datadir import DataDir

        class Fake:
            settings = load_server_config()
            datadir = DataDir(self.dir)

            def namespace(self):
                return {}
        fake = Fake()
        fake.settings.datadir = self.dir
        fake.settings.manhole_port = 0
        fake.settings.manhole_keys = self.keyfile
        fake.settings.manhole_host_key = os.path.join(self.dir, "state", manhole.HOST_KEY)
        os.makedirs(fake.settings.manhole_host_key)
        manhole.manhole_service(fake)
        self.assertIn("manhole host key", fake.datadir.fault.value)
        self.assertIn("moved aside", fake.datadir.fault.value)

    def test_no_keys_file_refused(self):
        from piccolo_twisted import manhole
        self.assertRaises(SystemExit, manhole.load_authorized_keys, "")
        self.assertRaises(SystemExit, manhole.load_authorized_keys, "/nonexistent")


class StopMidBatchTests(ServerTestCase):

    @coro
    async def test_stop_mid_batch(self):
        import asyncio
        await self.put("control/record_sequence", {"run": "stop", "nsequence": 100, "auto": -1})
        await self.wait_for("control/current_sequence", lambda s: s >= 2)
        await self.service.stopService().asFuture(asyncio.get_event_loop())
        for shutter in self.service.instrument.shutters:
            self.assertEqual(shutter.state, "closed")
        names = os.listdir(self.run_dir("stop"))
        self.assertTrue(names)
        for name in names:
            self.assertFalse(name.startswith("."), name)
            with open(os.path.join(self.run_dir("stop"), name)) as f:
                self.assertEqual(len(json.load(f)["Spectra"]), 4)
        # the test's tearDown stops it again: harmless
        self.service.startService = lambda: None


class RebootButtonTests(unittest.SynchronousTestCase):

    def make(self, dry=False):
        self.clock = task.Clock()
        self.ran = []
        return RebootButton(self.clock, lambda cmd: self.ran.append(cmd) or defer.succeed(None),
                            ["sudo", "reboot"], ["sudo", "shutdown", "-h", "now"], dry_run=dry)

    def test_short_press_reboots_long_press_shuts_down(self):
        b = self.make()
        b.pressed()
        self.clock.advance(1)
        b.released()
        b.pressed()
        self.clock.advance(5)
        b.released()
        self.assertEqual(self.ran, [["sudo", "reboot"], ["sudo", "shutdown", "-h", "now"]])

    def test_dry_run_only_logs(self):
        b = self.make(dry=True)
        b.pressed()
        self.clock.advance(6)
        b.released()
        self.assertEqual((self.ran, b.actions), ([], ["shutdown"]))

    def test_with_mock_gpio(self):
        factory = MockFactory()
        gpio = GPIO(factory)
        self.addCleanup(gpio.close)
        b = self.make()
        button = gpio.input(10)
        button.when_pressed = b.pressed
        button.when_released = b.released
        pin = factory.pin(10)
        pin.drive_low()                 # pressed (pull-up)
        self.clock.advance(2)
        pin.drive_high()
        self.assertEqual(self.ran, [["sudo", "reboot"]])


class LEDTests(unittest.SynchronousTestCase):

    def test_patterns(self):
        factory = MockFactory()
        gpio = GPIO(factory)
        self.addCleanup(gpio.close)
        clock = task.Clock()
        leds = StatusLEDs(gpio, clock)
        leds.serving()
        states = []
        for _ in range(4):
            states.append(factory.pin(25).state)
            clock.advance(0.5)
        self.assertEqual(states, [1, 0, 1, 0])
        leds.serving(fault=True)
        fast = []
        for _ in range(4):
            fast.append(factory.pin(25).state)
            clock.advance(0.075)
        self.assertEqual(fast, [1, 0, 1, 0])
        leds.recording(True)
        self.assertEqual(factory.pin(5).state, 1)
        leds.recording(False)
        leds.stop()
        self.assertEqual((factory.pin(5).state, factory.pin(25).state), (0, 0))
        self.assertEqual(clock.getDelayedCalls(), [])
