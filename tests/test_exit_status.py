"""What a shell (or systemd) sees when a foreground server is stopped with
SIGTERM, as the README states it: a clean stop (batch ended, shutters
closed, "piccolo stopped" logged, no pid file left), then twistd ends the
process with the signal that stopped it, so the shell's ``$?`` is 143
(128 + 15). Twisted does this on purpose (``app._exitWithSignal``);
systemd counts a SIGTERM death as a clean stop."""

import os
import signal
import subprocess
import sys
import time

from twisted.trial import unittest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "bench"))
from run import TWISTD, free_port  # noqa: E402

import loadclient  # noqa: E402


class ForegroundExitTests(unittest.TestCase):
    timeout = 60

    def test_sigterm_in_foreground(self):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        port = free_port()
        log = os.path.join(d, "server.log")
        # the README's foreground command, run from a shell that reports $?
        script = ('"$@" >server.log 2>&1 & echo $! >server.pid; wait $!; '
                  'echo "status $?"')
        argv = ["bash", "-c", script, "_"] + TWISTD + [
            "-n", "--pidfile=", "piccolo", "--address", "::1", "--port", str(port), "--web", "0",
            "--data-dir", os.path.join(d, "data")]
        env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", PICCOLO_TIME_SCALE="0.05")
        shell = subprocess.Popen(argv, cwd=d, env=env, stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    code, _, _ = loadclient.fetch("::1", port, "/sysinfo/version",
                                                  timeout=0.2)
                    if code == 0x45:
                        break
                except OSError:
                    pass
                self.assertIsNone(shell.poll(), "the server ended early")
                self.assertLess(time.monotonic(), deadline, "the server never answered")
                time.sleep(0.1)
            # a batch is running when the signal comes: the stop must end it
            code, body, _ = loadclient.fetch(
                "::1", port, "/control/record_sequence", method=3,
                payload=b'[[], {"run": "stop", "nsequence": 50, "auto": -1}]')
            self.assertEqual(code, 0x44, body)
            time.sleep(0.3)
            with open(os.path.join(d, "server.pid")) as f:
                os.kill(int(f.read()), signal.SIGTERM)
            out, _ = shell.communicate(timeout=30)
        finally:
            if shell.poll() is None:
                shell.kill()
                shell.wait()
        self.assertEqual(out.strip(), "status 143")
        with open(log) as f:
            text = f.read()
        self.assertIn("Received SIGTERM", text)
        self.assertIn("batch aborted", text)
        self.assertIn("piccolo stopped", text)
        self.assertNotIn("Traceback", text)
        # --pidfile= : no twistd.pid left in the working directory
        self.assertFalse(os.path.exists(os.path.join(d, "twistd.pid")))
        for name in os.listdir(os.path.join(d, "data", "stop")):
            self.assertTrue(name.endswith(".pico"), name)     # no partial file


class PortTakenTests(unittest.TestCase):
    timeout = 60

    def test_port_taken_exits(self):
        """A port already in use is a one-line error and the process ends
        (the data directory's file pool, started before the bind, held it
        alive for good, serving nothing; attack on issue 13)."""
        import socket
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        taken = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.addCleanup(taken.close)
        taken.bind(("::1", 0))
        port = taken.getsockname()[1]
        env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock")
        proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "piccolo", "--address", "::1", "--port",
                      str(port), "--web", "0", "--data-dir", os.path.join(d, "data")],
            cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.fail("the server did not end when its port was taken")
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn(f"piccolo: cannot listen on [::1]:{port}: ", out)
