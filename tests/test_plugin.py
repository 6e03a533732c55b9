"""Packaging, command line and server configuration."""

import os
import subprocess
import sys

from twisted.trial import unittest

from piccolo_twisted.config import ConfigError, load_server_config
from piccolo_twisted import tap

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class PluginTests(unittest.SynchronousTestCase):

    def test_plugin_discoverable(self):
        # catches a broken (e.g. editable) install: twistd would say
        # "Unknown command: piccolo"
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins
        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("piccolo", names)

    def test_tac_builds_same_service(self):
        import runpy
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        tac = os.path.join(here, "piccolo.tac")
        if not os.path.exists(tac):
            raise unittest.SkipTest("piccolo.tac is not in this tree")
        d = self.mktemp()
        os.environ["PICCOLO_DATA_DIR"] = d
        self.addCleanup(os.environ.pop, "PICCOLO_DATA_DIR", None)
        ns = runpy.run_path(tac)
        from twisted.application.service import IServiceCollection
        services = list(IServiceCollection(ns["application"]))
        self.assertEqual(type(services[0]).__name__, "PiccoloService")


class TacProcessTests(unittest.SynchronousTestCase):
    """The README's ``twistd -n --pidfile= -y piccolo.tac``, run as a
    process: it serves CoAP (a GET over loopback UDP answers) and stops
    cleanly on SIGTERM."""

    def test_twistd_y_serves(self):
        import socket
        from tests import readme
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        tac = os.path.join(here, "piccolo.tac")
        if not os.path.exists(tac):
            raise unittest.SkipTest("piccolo.tac is not in this tree")
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        cfg = os.path.join(work, "piccolo.cfg")
        with open(cfg, "w") as f:
            f.write("[coap]\naddress = 127.0.0.1\nport = 0\n[web]\nport = 0\n")
        data = os.path.join(work, "data")
        # the README's words, with the venv's twistd
        argv = [readme.venv_bin("twistd"), "-n", "--pidfile=", "-y", tac]
        server = readme.Server(argv, os.path.join(work, "log"), cwd=work,
                               env={"PICCOLO_CONFIG": cfg, "PICCOLO_DATA_DIR": data})
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(sock.close)
            sock.settimeout(10)
            # CON GET /sysinfo/version, message ID 0x1234, no token
            sock.sendto(b"\x40\x01\x12\x34\xb7sysinfo\x07version",
                        ("127.0.0.1", server.port))
            while True:
                answer = sock.recv(2048)
                if answer[2:4] == b"\x12\x34" and answer[1] != 0:
                    break               # (a ping of ours, if any, is not the answer)
            self.assertEqual(answer[1], 0x45, answer)   # 2.05 Content
            self.assertIn(b"\xff", answer)
            self.assertTrue(os.path.isdir(data))
        finally:
            code = server.stop()
        self.assertIn(code, (0, -15), server.log()[-2000:])


class OptionsTests(unittest.SynchronousTestCase):

    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_embedded_default(self):
        cwd = os.getcwd()
        work = os.path.abspath(self.mktemp())
        os.makedirs(work)
        os.chdir(work)
        self.addCleanup(os.chdir, cwd)
        o = tap.Options()
        o.parseOptions([])
        self.assertEqual((o.settings.address, o.settings.port), ("::", 5683))
        self.assertEqual(o.settings.datadir, os.path.join(work, "piccolo_data"))
        self.assertIn("embedded default", o.instrument_note)
        self.assertEqual(len(o.instrument.spectrometers), 2)

    def test_command_line_overrides_config(self):
        cfg = self.write("[coap]\naddress = 127.0.0.1\nport = 6000\n"
                         "[datadir]\ndatadir = /tmp/x\n[logging]\ndebug = True\n")
        o = tap.Options()
        o.parseOptions(["-c", cfg, "--port", "6001", "-o", "/tmp/y"])
        self.assertEqual((o.settings.address, o.settings.port, o.settings.datadir,
                          o.settings.debug), ("127.0.0.1", 6001, "/tmp/y", True))

    def test_instrument_config_in_data_dir_preferred(self):
        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "piccolo.config"), "w") as f:
            f.write("[channels]\n[[shutter_1]]\ndirection = up\n")
        o = tap.Options()
        o.parseOptions(["-o", d])
        self.assertEqual(o.instrument.channel_names, ["up"])
        self.assertIn("from the data directory", o.instrument_note)

    def test_server_config_errors(self):
        cases = [
            ("[coap]\nport = abc\n", "coap/port"),
            ("[coap]\nport = 70000\n", "coap/port"),
            ("[bogus]\nx = 1\n", "bogus"),
            ("[datadir]\nmount = perhaps\n", "datadir/mount"),
            ("[coap\n", "cannot parse"),
        ]
        for text, word in cases:
            path = self.write(text)
            e = self.assertRaises(ConfigError, load_server_config, path)
            self.assertIn(word, str(e))
            self.assertIn(path, str(e))
        self.assertRaises(ConfigError, load_server_config, "/nonexistent/piccolo.cfg")


class TwistdTests(unittest.TestCase):
    """twistd itself exits non-zero with one clear line."""

    def run_twistd(self, *args):
        env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock")
        p = subprocess.run(TWISTD + ["-n", "--pidfile=", "piccolo"] + list(args),
                           capture_output=True, text=True, timeout=60, env=env,
                           )
        return p

    def test_missing_config_file(self):
        p = self.run_twistd("-c", "/nonexistent/piccolo.cfg")
        self.assertNotEqual(p.returncode, 0)
        self.assertEqual(p.stderr.strip().count("\n"), 0, p.stderr)
        self.assertIn("/nonexistent/piccolo.cfg: no such file", p.stderr)
        self.assertNotIn("Traceback", p.stderr + p.stdout)

    def test_invalid_value(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[coap]\nport = lots\n")
        p = self.run_twistd("-c", path)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(f"{path}: [coap/port]", p.stderr)
        self.assertNotIn("Traceback", p.stderr + p.stdout)
        self.assertNotIn("Usage", p.stdout)
