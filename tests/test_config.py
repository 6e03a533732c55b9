"""Configuration errors are one line (issue 11.9) and mounting at start
(issue 15.5): twistd is run as a subprocess, as a person would run it."""

import os
import subprocess
import sys

from twisted.logger import globalLogPublisher, formatEvent
from twisted.trial import unittest

from piccolo_twisted import tap
from piccolo_twisted.config import ConfigError, load_instrument_config

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

CHANNELS = """
[channels]
  [[shutter_1]]
    direction = upwelling
  [[shutter_2]]
    direction = downwelling
"""


def script(directory, name, body):
    """An executable stand-in for a system command."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return path


def fake_path(directory):
    """A PATH with the stand-ins first and the system's shell tools after
    (the stand-ins are shell scripts)."""
    return directory + os.pathsep + "/bin" + os.pathsep + "/usr/bin"


class TwistdConfigErrorTests(unittest.TestCase):
    """Each bad configuration: exit code 1, one line on stderr naming the
    file and the key, no traceback, nothing on stdout from a server."""

    def write(self, text, name="piccolo.config"):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def cases(self):
        inst = self.write
        keys = self.write("ssh-rsa garbage\n"
                          "command=\"ls\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIK\n",
                          "authorized_keys")
        bin_fail = os.path.abspath(self.mktemp())
        script(bin_fail, "sudo", 'echo "mount: /mnt/x: special device $5 does not '
                                 'exist." >&2; exit 32')
        bin_none = os.path.abspath(self.mktemp())
        os.makedirs(bin_none)
        srv = self.write("[coap]\naddress = not an address\n", "piccolo.cfg")
        mnt = os.path.abspath(self.mktemp())
        os.makedirs(mnt)
        data = os.path.abspath(self.mktemp())
        return [
            # (arguments, env PATH or None, words the one line must hold)
            (["-i", inst(CHANNELS + "  [[shutter_3]]\n    direction = x\n"
                         "    open_pin = 17\n    close_pin = 4\n")],
             None, ["[channels/shutter_3/open_pin]", "GPIO 17",
                    "[channels/shutter_1/open_pin]"]),
            (["-i", inst(CHANNELS.replace("downwelling", "downwelling\n    open_pin = 25"))],
             None, ["[channels/shutter_2/open_pin]", "GPIO 25", "status LED"]),
            (["-i", inst(CHANNELS + "[spectrometers]\n  [[sim_QEP1]]\n"
                         "    power_switch = 5\n")],
             None, ["[spectrometers/sim_QEP1/power_switch]", "GPIO 5", "LED"]),
            (["-i", inst(CHANNELS + "[spectrometers]\n  [[sim_QEP1]]\n"
                         "    power_switch = 6\n  [[sim_FLMT2]]\n    power_switch = 6\n")],
             None, ["[spectrometers/sim_FLMT2/power_switch]", "GPIO 6",
                    "[spectrometers/sim_QEP1/power_switch]"]),
            (["-i", inst(CHANNELS + "  [[shutter_3]]\n    direction = x\n"
                         "    open_pin = 10\n    close_pin = 4\n")],
             None, ["[channels/shutter_3/open_pin]", "GPIO 10", "reboot button"]),
            (["-i", inst(CHANNELS.replace("upwelling\n", "upwelling\n    fibreDiameter = nan\n", 1))],
             None, ["[channels/shutter_1/fibreDiameter]", "finite"]),
            (["-i", inst(CHANNELS.replace("downwelling\n", "downwelling\n    fibreDiameter = 1e999\n"))],
             None, ["[channels/shutter_2/fibreDiameter]", "finite"]),
            (["-i", inst(CHANNELS + "[spectrometers]\n  [[sim_QEP1]]\n"
                         "    detectorSetTemperature = NaN\n")],
             None, ["[spectrometers/sim_QEP1/detectorSetTemperature]", "finite"]),
            (["-i", inst(CHANNELS + "[spectrometers]\n  [[sim_QEP1]]\n"
                         "    [[[calibration]]]\n      [[[[upwelling]]]]\n"
                         "        wavelengthCalibrationCoefficientsPiccolo = 1, nan\n")],
             None, ["wavelengthCalibrationCoefficientsPiccolo", "finite"]),
            (["--address", "999.1.1.1"], None, ["--address", "999.1.1.1"]),
            (["-c", srv], None, [srv, "[coap/address]", "not an address"]),
            (["--manhole", "65536"], None, ["--manhole", "65536"]),
            (["--port", "abc"], None, ["--port", "'abc' is not a port number"]),
            (["--manhole", "x"], None, ["--manhole", "'x' is not a port number"]),
            (["--address", "::1", "--port", "0", "--manhole", "1", "--manhole-keys", keys],
             None, [keys, "no usable public key"]),
            (["--port", "5683x"], None, ["--port", "'5683x' is not a port number"]),
            (["-m", "-o", data], fake_path(bin_fail),
             ["--mount", "cannot mount",
              "special device /dev/piccolo-none does not exist"]),
            (["-m", "-o", data], bin_none, ["--mount", "sudo: command not found"]),
        ], mnt

    #: the cases run through a real twistd process (one of each kind); the
    #: rest go through the same option parsing in this process (cheaper)
    SUBPROCESS = (0, 1, 5, 9, 14, 15, 16, 17)

    def test_one_line_errors(self):
        cases, mnt = self.cases()
        procs = []
        in_process = []
        for i, (args, path, words) in enumerate(cases):
            env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock")
            if path is not None:
                env["PATH"] = path
            if "-m" in args:
                server_cfg = self.write(f"[datadir]\ndevice = /dev/piccolo-none\n"
                                        f"mntpnt = {mnt}\n", "piccolo.cfg")
                args = args + ["-c", server_cfg]
            if i not in self.SUBPROCESS:
                in_process.append((args, words))
                continue
            argv = TWISTD + ["-n", "--pidfile=", "piccolo"] + args
            # all at once: each is a fresh interpreter
            procs.append((args, words, subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)))
        for args, words in in_process:
            e = self.assertRaises(SystemExit, tap.Options().parseOptions, args)
            err = str(e)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertTrue(err.startswith("twistd piccolo: "), err)
            for word in words:
                self.assertIn(word, err, args)
        for args, words, p in procs:
            out, err = p.communicate(timeout=60)
            what = f"{args}: rc={p.returncode} stderr={err!r} stdout={out[-300:]!r}"
            self.assertEqual(p.returncode, 1, what)
            self.assertEqual(len(err.strip().splitlines()), 1, what)
            self.assertTrue(err.startswith("twistd piccolo: "), what)
            self.assertNotIn("Traceback", err + out, what)
            self.assertNotIn("serving CoAP", out, what)
            for word in words:
                self.assertIn(word, err, what)


class InstrumentConfigTests(unittest.SynchronousTestCase):

    def test_pins_distinct_pass(self):
        cfg = load_instrument_config(text=CHANNELS + "[spectrometers]\n  [[sim_QEP1]]\n"
                                     "    power_switch = 6\n  [[sim_FLMT2]]\n"
                                     "    power_switch = 13\n")
        self.assertEqual([(c.open_pin, c.close_pin) for c in cfg.channels],
                         [(17, 18), (27, 22)])

    def test_reverse_swaps_then_collides(self):
        # shutter_2 reversed keeps its own pins; a third shutter on 22 collides
        text = CHANNELS.replace("downwelling", "downwelling\n    reverse = True") + \
            "  [[shutter_3]]\n    direction = x\n    close_pin = 22\n"
        e = self.assertRaises(ConfigError, load_instrument_config, text=text)
        self.assertIn("[channels/shutter_3/close_pin] GPIO 22 is already used by "
                      "[channels/shutter_2/open_pin]", str(e))


class AddressTests(unittest.SynchronousTestCase):

    def test_literals_names_and_nonsense(self):
        import socket
        from piccolo_twisted.config import check_address
        lookups = []
        real = socket.getaddrinfo

        def getaddrinfo(host, *a, **kw):
            lookups.append(host)
            if host != "localhost":     # never ask a DNS server from a test
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real(host, *a, **kw)
        self.patch(socket, "getaddrinfo", getaddrinfo)
        for literal in ("::", "0.0.0.0", "::1", "fe80::1%lo", "192.168.1.20"):
            self.assertEqual(check_address(literal, "x"), literal)
        # legacy configs may name a host: resolved once, at start
        self.assertIn(check_address("localhost", "x"), ("127.0.0.1", "::1"))
        for bad in ("999.1.1.1", "1.2.3", "not an address", "a..b", "-x", ""):
            e = self.assertRaises(ConfigError, check_address, bad, "[coap/address]")
            self.assertIn("is not an IP address", str(e))
        self.assertEqual(lookups, ["localhost"])       # nonsense is never looked up
        e = self.assertRaises(ConfigError, check_address, "nosuchhost.invalid", "w")
        self.assertIn("cannot resolve 'nosuchhost.invalid'", str(e))


class ManholeKeysTests(unittest.SynchronousTestCase):

    def setUp(self):
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from twisted.conch.ssh import keys
        self.key = keys.Key(ed25519.Ed25519PrivateKey.generate()).public()
        self.other = keys.Key(ed25519.Ed25519PrivateKey.generate()).public()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def test_malformed_skipped_options_refused(self):
        from piccolo_twisted import manhole
        good = self.key.toString("openssh")
        other = self.other.toString("openssh")
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"# keys\n"
                    b"ssh-rsa garbage\n"
                    b"ssh-ed25519\n"
                    b'from="10.0.0.1,10.0.0.2",no-pty,command="echo a, b" ' + other + b" x@y\n"
                    b"no-port-forwarding " + other + b"\n"
                    b"not a key at all\n"
                    + good + b" admin@field\n")
        found = manhole.load_authorized_keys(path)
        self.assertEqual(found, [self.key])
        lines = [formatEvent(e) for e in self.events
                 if e.get("log_namespace", "").startswith("piccolo_twisted.manhole")]
        text = "\n".join(lines)
        self.assertIn("line 2: unreadable ssh-rsa key, skipped", text)
        self.assertIn("line 3: unreadable ssh-ed25519 key, skipped", text)
        self.assertIn("line 4: key refused: its options (from, no-pty, command)", text)
        self.assertIn("line 5: key refused: its options (no-port-forwarding)", text)
        self.assertIn("line 6: not a public key, skipped", text)
        self.assertEqual(len(lines), 5, text)

    def test_only_bad_lines_is_one_line_error(self):
        from piccolo_twisted import manhole
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"no-pty " + self.key.toString("openssh") + b"\nssh-rsa garbage\n")
        e = self.assertRaises(SystemExit, manhole.load_authorized_keys, path)
        self.assertEqual(str(e), f"twistd piccolo: {path}: no usable public key "
                                 "for the manhole")


class MountAtStartTests(unittest.SynchronousTestCase):
    """-m and [datadir] mount = True run `sudo -n mount -o uid=,gid= DEVICE
    MNTPNT` (a stand-in sudo on PATH) before the data directory is looked
    at; a relative datadir is taken relative to the mount point."""

    def setUp(self):
        self.bin = os.path.abspath(self.mktemp())
        self.log = os.path.abspath(self.mktemp())
        script(self.bin, "sudo", f'printf "%s\\n" "$*" >> {self.log}')
        old = os.environ["PATH"]
        os.environ["PATH"] = fake_path(self.bin)
        self.addCleanup(os.environ.__setitem__, "PATH", old)
        self.mnt = os.path.abspath(self.mktemp())
        # what is on the "stick": an instrument config in the data directory
        os.makedirs(os.path.join(self.mnt, "piccolo_data"))
        with open(os.path.join(self.mnt, "piccolo_data", "piccolo.config"), "w") as f:
            f.write("[channels]\n[[shutter_1]]\ndirection = onstick\n")
        self.cfg = os.path.abspath(self.mktemp())
        with open(self.cfg, "w") as f:
            f.write(f"[datadir]\ndatadir = piccolo_data\ndevice = /dev/piccolo-none\n"
                    f"mntpnt = {self.mnt}\n")

    def parse(self, *args):
        o = tap.Options()
        o.parseOptions(["-c", self.cfg] + list(args))
        return o

    def calls(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return f.read().splitlines()

    def test_command_line_mount(self):
        o = self.parse("-m")
        self.assertEqual(self.calls(), [f"-n mount -o uid={os.getuid()},gid={os.getgid()} "
                                        f"/dev/piccolo-none {self.mnt}"])
        self.assertEqual(o.settings.datadir, os.path.join(self.mnt, "piccolo_data"))
        self.assertEqual(o.instrument.channel_names, ["onstick"])
        self.assertIn("mounted /dev/piccolo-none at", o.notes[0])

    def test_config_mount_and_absolute_datadir(self):
        with open(self.cfg, "a") as f:
            f.write("mount = True\n")
        absolute = os.path.abspath(self.mktemp())
        o = self.parse("-o", absolute)
        self.assertEqual(len(self.calls()), 1)
        self.assertEqual(o.settings.datadir, absolute)

    def test_no_mount_no_command(self):
        o = self.parse()
        self.assertEqual(self.calls(), [])
        self.assertEqual(o.settings.datadir, os.path.abspath("piccolo_data"))

    def test_failure_is_one_line(self):
        script(self.bin, "sudo", 'echo "mount: only root can do that" >&2; exit 1')
        e = self.assertRaises(SystemExit, self.parse, "-m")
        self.assertEqual(
            str(e), f"twistd piccolo: --mount: cannot mount /dev/piccolo-none at "
                    f"{self.mnt}: sudo -n mount -o uid={os.getuid()},gid={os.getgid()} "
                    f"/dev/piccolo-none {self.mnt} failed: mount: only root can do that")

    def test_already_mounted_elsewhere(self):
        from piccolo_twisted.errors import PiccoloError
        from piccolo_twisted.mount import mount_at_start
        mounts = self.mktemp()
        with open(mounts, "w") as f:
            f.write(f"/dev/piccolo-none /media/other vfat rw 0 0\n"
                    f"/dev/piccolo-two {self.mnt} vfat rw 0 0\n")
        e = self.assertRaises(PiccoloError, mount_at_start, "/dev/piccolo-none",
                              self.mnt, mounts_file=mounts)
        self.assertIn("mounted at /media/other", str(e))
        self.assertIn("already mounted",
                      mount_at_start("/dev/piccolo-two", self.mnt, mounts_file=mounts))
        self.assertEqual(self.calls(), [])


class NamedInstrumentConfigTests(unittest.TestCase):
    """An instrument config that is named (``-i`` or the server config's
    ``config`` key) but missing, a directory or unreadable stops twistd
    with one line: a Pi must never fall back to the simulated instrument
    because of a typo. Only the unnamed default may fall back."""

    def test_named_but_missing_is_one_line_error(self):
        d = os.path.abspath(self.mktemp())
        data = os.path.join(d, "data")
        os.makedirs(os.path.join(data, "piccolo.config"))    # a directory
        absent = os.path.join(d, "x", "piccolo.config")
        cfgs = []
        for value in (absent, "piccolo.config"):
            path = os.path.join(d, f"server{len(cfgs)}.cfg")
            with open(path, "w") as f:
                f.write(f"config = {value}\n[datadir]\ndatadir = {data}\n")
            cfgs.append(path)
        cases = [
            (["-c", cfgs[0]], f"twistd piccolo: {cfgs[0]}: [config] instrument "
                              f"config {absent} not found"),
            (["-c", cfgs[1]], f"twistd piccolo: {cfgs[1]}: [config] instrument "
                              f"config {data}/piccolo.config is not a file"),
            (["-i", absent], f"twistd piccolo: --instrument: instrument "
                             f"config {absent} not found"),
        ]
        env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock")
        procs = [(args, line, subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "piccolo", "--port", "0"] + args,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            for args, line in cases]
        for args, line, p in procs:
            try:
                out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            what = f"{args}: rc={p.returncode} stderr={err!r} stdout={out[-300:]!r}"
            self.assertEqual(p.returncode, 1, what)
            self.assertEqual(err.strip(), line, what)
            self.assertNotIn("Traceback", err + out, what)
            self.assertNotIn("simulated", out, what)

    def test_unnamed_default_still_falls_back(self):
        """No ``config`` key (or no server config): the bundled simulated
        instrument when <datadir>/piccolo.config is absent, as before."""
        data = os.path.abspath(self.mktemp())
        cfg = os.path.abspath(self.mktemp())
        with open(cfg, "w") as f:
            f.write("[coap]\nport = 0\n")
        for args in (["-o", data], ["-c", cfg, "-o", data]):
            options = tap.Options()
            options.parseOptions(args)
            self.assertIn("using the embedded default", options.instrument_note)
