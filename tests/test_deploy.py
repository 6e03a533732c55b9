"""Deployment by the book (issue 21): the README's deployment section,
followed in a temporary root, ends with a serving server; every config the
README shows, copied out of it, loads and serves; ``piccolo3-setup``
writes what it says and never overwrites; the data copy command neither
fails nor copies secrets."""

import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from piccolo_twisted.config import load_instrument_config, load_server_config

from . import readme
from .readme import Server, venv_bin

#: the CLI's wait for each answer, pinned (the tests are not about it): its
#: default 3 s is a server that has just started (importing, connecting the
#: emulated devices, freezing its heap) on a loaded machine
STATUS_TIMEOUT = "30"

DEPLOYMENT = [
    # (the README's command, how this test follows it)
    ("sudo apt install python3-venv libusb-1.0-0",
     "system packages: the machine running the tests has them"),
    ("sudo python3 -m venv /opt/piccolo && sudo /opt/piccolo/bin/pip install .",
     "the tests' own venv stands in (a fresh venv: test_install, under PICCOLO_CI)"),
    ("sudo /opt/piccolo/bin/seabreeze_os_setup",
     "not run (writes /etc/udev); the script must be in the venv"),
    ("sudo /opt/piccolo/bin/piccolo3-setup",
     "run with --root TMP"),
    ("sudo systemctl daemon-reload && sudo systemctl enable --now piccolo",
     "systemd-analyze verify on the unit written, then its ExecStart and "
     "Environment run re-rooted in TMP"),
    ("tail /var/log/piccolo/piccolo.log",
     "the unit's log file read for the serving line"),
]


def cseabreeze():
    """Listing without emulation uses seabreeze's choice; with cseabreeze
    that is USB only (pyseabreeze would also multicast to the network)."""
    try:
        import seabreeze.cseabreeze  # noqa: F401
        return True
    except ImportError:
        return False


class DeploymentTests(unittest.TestCase):

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)

    def at(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def serve(self, argv, log=None, env=None):
        out = os.path.join(self.root, f"twistd{len(os.listdir(self.root))}.out")
        server = Server(argv, log or out, env=env, out_path=out)
        self.addCleanup(server.stop)
        return server

    def status(self, port):
        """The laptop's first command against the server."""
        p = subprocess.run([venv_bin("piccolo3"), "status", "--timeout", STATUS_TIMEOUT,
                            "--server", f"coap://127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        return p.stdout

    def test_the_deployment_section_verbatim(self):
        section = readme.section("Deployment on a Raspberry Pi")
        steps = readme.commands(readme.blocks(section)[0])
        self.assertEqual(steps, [command for command, _ in DEPLOYMENT])
        self.assertTrue(os.access(venv_bin("seabreeze_os_setup"), os.X_OK))
        if not cseabreeze():
            raise unittest.SkipTest("seabreeze's choice would be pyseabreeze, whose "
                                    "listing sends a multicast to the network")

        # sudo /opt/piccolo/bin/piccolo3-setup, in a temporary root
        p = subprocess.run([venv_bin("piccolo3-setup"), "--root", self.root],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stderr, "")
        self.assertIn("no spectrometers found", p.stdout)
        self.assertIn("simulated default", p.stdout)
        for path in ("/etc/piccolo.cfg", "/etc/piccolo/piccolo.config",
                     "/etc/systemd/system/piccolo.service"):
            self.assertIn(f"wrote {self.at(path)}", p.stdout)
        # the server config is the README's sample, which is the packaged one
        with open(self.at("/etc/piccolo.cfg")) as f:
            written = f.read()
        shown = readme.block_starting(readme.section("Server configuration (`/etc/piccolo.cfg`)"),
                                      written.splitlines()[0])
        self.assertEqual(shown, written)
        settings = load_server_config(self.at("/etc/piccolo.cfg"))
        self.assertEqual(settings.instrument, "/etc/piccolo/piccolo.config")
        self.assertIsNone(settings.seabreeze_backend)
        self.assertEqual(settings.manhole_host_key, "/var/lib/piccolo/manhole_host_key")
        instrument = load_instrument_config(self.at(settings.instrument))
        self.assertTrue(all(s.simulated for s in instrument.spectrometers))

        # the unit: systemd's own check, then what systemd would run
        unit_path = self.at("/etc/systemd/system/piccolo.service")
        with open(unit_path) as f:
            unit = f.read()
        self.assertIn("\nLimitNOFILE=16384\n", unit)
        self.assertIn("\nStateDirectory=piccolo\n", unit)
        analyze = shutil.which("systemd-analyze")
        if analyze:
            v = subprocess.run([analyze, "verify", unit_path], capture_output=True,
                               text=True, timeout=60)
            self.assertEqual((v.returncode, v.stdout + v.stderr), (0, ""))
        keys = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
        env = dict(kv.split("=", 1) for kv in shlex.split(keys["Environment"]))
        env = {k: self.at(v) for k, v in env.items()}
        env["STATE_DIRECTORY"] = self.at("/var/lib/piccolo")
        argv = shlex.split(keys["ExecStart"])
        self.assertEqual(argv[0], venv_bin("twistd"))
        self.assertEqual(argv[-2:], ["-c", "/etc/piccolo.cfg"])
        argv[-1] = self.at("/etc/piccolo.cfg")
        # re-rooted: the paths inside the config name the real /etc and /mnt
        argv += ["-i", self.at(settings.instrument), "-o", self.at(settings.datadir),
                 "--address", "127.0.0.1", "--port", "0"]
        server = self.serve(argv, log=env["PICCOLO_LOGFILE"], env=env)

        # tail /var/log/piccolo/piccolo.log
        log = open(env["PICCOLO_LOGFILE"]).read()
        self.assertIn(f"piccolo serving CoAP on [127.0.0.1]:{server.port}", log)
        self.assertIn(f"instrument config {self.at(settings.instrument)}", log)
        out = self.status(server.port)
        self.assertIn("S_sim_QEP00981", out)
        self.assertEqual(server.stop(), -15)
        self.assertIn("piccolo stopped", server.log())

    def test_setup_never_overwrites(self):
        for path in ("/etc/piccolo.cfg", "/etc/piccolo/piccolo.config"):
            os.makedirs(os.path.dirname(self.at(path)), exist_ok=True)
            with open(self.at(path), "w") as f:
                f.write("# mine\n")
        p = subprocess.run([venv_bin("piccolo3-setup"), "--root", self.root,
                            "--emulate", "QEPRO:QEP01234"],
                           capture_output=True, text=True, timeout=120)
        for path in ("/etc/piccolo.cfg", "/etc/piccolo/piccolo.config"):
            with open(self.at(path)) as f:
                self.assertEqual(f.read(), "# mine\n")
            self.assertIn(f"kept {self.at(path)} (it exists; not overwritten)", p.stdout)
        # kept, and said not to load (an empty instrument config has no channel)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertEqual(p.stderr, "piccolo3-setup: warning: kept, but it does not load: "
                         f"{self.at('/etc/piccolo/piccolo.config')}: [channels] no "
                         "channel configured\n")
        self.assertIn(f"wrote {self.at('/etc/systemd/system/piccolo.service')}", p.stdout)
        self.assertEqual(sorted(os.listdir(self.at("/etc/piccolo"))), ["piccolo.config"])

    def test_setup_writes_the_serials_it_finds(self):
        """Through piccolo3-list-spec's logic: rehearsed on the emulated USB
        bus, the serials found are the config's, and it serves them."""
        p = subprocess.run([venv_bin("piccolo3-setup"), "--root", self.root, "--emulate",
                            "QEPRO:QEP01234, USB2000PLUS:FLMT05678"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("spectrometers found: QEPRO QEP01234, USB2000PLUS FLMT05678",
                      p.stdout)
        instrument = load_instrument_config(self.at("/etc/piccolo/piccolo.config"))
        self.assertEqual([s.serial for s in instrument.spectrometers],
                         ["QEP01234", "FLMT05678"])
        self.assertEqual(instrument.spectrometers[0].set_temperature, -10.0)
        settings = load_server_config(self.at("/etc/piccolo.cfg"))
        self.assertEqual(settings.emulate, [("QEPRO", "QEP01234"),
                                            ("USB2000PLUS", "FLMT05678")])
        server = self.serve([venv_bin("twistd"), "-n", "--pidfile=", "piccolo",
                             "-c", self.at("/etc/piccolo.cfg"),
                             "-i", self.at("/etc/piccolo/piccolo.config"),
                             "-o", self.at("/data"), "--address", "127.0.0.1",
                             "--port", "0"])
        out = self.status(server.port)
        self.assertIn("S_QEP01234", out)
        self.assertIn("S_FLMT05678", out)


class ReadmeConfigTests(unittest.TestCase):
    """Each config the README shows, copied out of the README, loads and
    serves; a config block no test knows fails here."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def save(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def serve(self, argv):
        server = Server(argv, os.path.join(self.dir, f"server{len(os.listdir(self.dir))}.log"),
                        cwd=self.dir)
        self.addCleanup(server.stop)
        return server

    def test_every_config_block_is_known(self):
        known = {"config = /etc/piccolo/piccolo.config",  # the server config: DeploymentTests
                 "# rehearse.cfg", "# rehearse.config",    # below
                 "# /etc/piccolo/piccolo.config",          # below
                 "[access]"}                               # test_access.ReadmeTests
        found = set()
        parts = [part for block in readme.blocks(readme.text())
                 for part in readme.paragraphs(block)]
        for part in parts:
            lines = part.splitlines()
            section = any(line.strip().startswith("[") and line.strip().endswith("]")
                          for line in lines)
            if section and any(" = " in line for line in lines):
                found.add(lines[0].split("   ")[0].strip())
        self.assertEqual(found, known)

    def test_your_own_serials(self):
        """The README's piccolo.config with your own serials; served here on
        the emulated bus, which stands in for the real devices."""
        section = readme.section("Instrument configuration (`piccolo.config`)")
        command, output = readme.paragraphs(readme.blocks(section)[0])
        self.assertEqual(command, "/opt/piccolo/bin/piccolo3-list-spec\n")
        listing = output.splitlines()
        devices = [tuple(line.split("\t")) for line in listing]
        self.assertEqual(devices, [("QEPRO", "QEP01234"), ("USB2000PLUS", "FLMT05678")])
        text = readme.block_starting(section, "# /etc/piccolo/piccolo.config")
        path = self.save("piccolo.config", text)
        config = load_instrument_config(path)
        self.assertEqual([s.serial for s in config.spectrometers], ["QEP01234", "FLMT05678"])
        cfg = self.save("piccolo.cfg", "[seabreeze]\nemulate = " +
                        ", ".join(f"{m}:{s}" for m, s in devices) + "\n")
        server = self.serve([venv_bin("twistd"), "-n", "--pidfile=", "piccolo", "-c", cfg,
                             "-i", path, "-o", os.path.join(self.dir, "data"),
                             "--address", "127.0.0.1", "--port", "0"])
        p = subprocess.run([venv_bin("piccolo3"), "status", "--timeout", STATUS_TIMEOUT,
                            "--server", f"coap://127.0.0.1:{server.port}"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("S_QEP01234", p.stdout)

    def test_rehearsal(self):
        section = readme.section("Rehearsing a deployment without hardware")
        self.save("rehearse.cfg", readme.block_starting(section, "# rehearse.cfg"))
        self.save("rehearse.config", readme.block_starting(section, "# rehearse.config"))
        [steps] = [readme.commands(part) for block in readme.blocks(section)
                   for part in readme.paragraphs(block)
                   if part.startswith("piccolo3-list-spec")]
        self.assertEqual(steps[0], "piccolo3-list-spec -c rehearse.cfg")
        p = subprocess.run([venv_bin("piccolo3-list-spec"), "-c", "rehearse.cfg"],
                           cwd=self.dir, capture_output=True, text=True, timeout=60)
        self.assertEqual(p.stdout, "QEPRO\tQEP01234\nUSB2000PLUS\tFLMT05678\n", p.stderr)
        argv = shlex.split(steps[1])
        self.assertEqual(argv[-2:], ["-o", "/tmp/rehearsal"])
        argv[0] = venv_bin(argv[0])
        argv[-1] = os.path.join(self.dir, "rehearsal")
        server = self.serve(argv + ["--address", "127.0.0.1", "--port", "0"])
        p = subprocess.run([venv_bin("piccolo3"), "status", "--timeout", STATUS_TIMEOUT,
                            "--server", f"coap://127.0.0.1:{server.port}"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("S_FLMT05678", p.stdout)


class DataCopyTests(unittest.TestCase):
    """The README's copy command (step 7) run against a data directory as
    the service leaves it: it must not fail for the user ``pi`` (modelled
    by ``nobody`` when the tests run as root) and must copy no secret."""

    def test_rsync_as_the_readme_says(self):
        rsync = shutil.which("rsync")
        if rsync is None:
            raise unittest.SkipTest("rsync is not installed")
        body = readme.section("First measurement")
        [command] = [c for c in readme.commands("\n".join(readme.blocks(body)))
                     if c.startswith("rsync ")]
        argv = shlex.split(command)
        self.assertEqual(argv[-2:], ["pi@<pi-address>:/mnt/piccolo_data/", "piccolo_data/"])
        work = tempfile.mkdtemp(prefix="piccolo-copy-")    # /tmp: others may enter
        self.addCleanup(shutil.rmtree, work, True)
        os.chmod(work, 0o755)
        data = os.path.join(work, "mnt", "piccolo_data")
        state = os.path.join(work, "var", "lib", "piccolo")
        os.makedirs(data)
        self.make_installation(data, state)
        laptop = os.path.join(work, "laptop")
        os.makedirs(laptop)
        argv[-2] = data + "/"
        argv[0] = rsync
        run_as = []
        if os.geteuid() == 0:
            shutil.chown(laptop, "nobody")
            run_as = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        p = subprocess.run(run_as + argv, cwd=laptop, capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        copied = [os.path.relpath(os.path.join(d, n), laptop)
                  for d, dirs, names in os.walk(laptop) for n in names]
        self.assertTrue(any(n.endswith(".pico") for n in copied), copied)
        self.assertFalse([n for n in copied if "host_key" in n or ".piccolo" in n], copied)
        self.assertTrue(os.path.exists(os.path.join(state, "manhole_host_key")))
        self.assertFalse(os.path.exists(os.path.join(data, ".piccolo", "manhole_host_key")))

    def make_installation(self, data, state):
        """A data directory as an earlier version left it (the host key in
        .piccolo), then started once by this one with the manhole on (the
        unit's state directory in ``state``), and the schedule database
        unreadable for others (daemon umask 077)."""
        from .helpers import make_service, make_ssh_key
        old_key = os.path.join(data, ".piccolo", "manhole_host_key")
        make_ssh_key(old_key)
        admin = make_ssh_key(os.path.join(state, "admin_key"))
        keys = os.path.join(state, "authorized_keys")
        with open(keys, "wb") as f:
            f.write(admin.public().toString("openssh") + b"\n")
        self.patch(os, "environ", dict(os.environ, STATE_DIRECTORY=state))
        make_service(data, server_text=f"[manhole]\nport = 2299\nkeys = {keys}\n")
        run = os.path.join(data, "first")
        os.makedirs(run)
        with open(os.path.join(run, "b000000_s000000_light.pico"), "w") as f:
            f.write("{}")
        db = os.path.join(data, ".piccolo", "scheduler.sqlite")
        with open(db, "wb") as f:
            f.write(b"SQLite format 3\x00")
        os.chmod(db, 0o600)


if sys.platform != "linux":
    DataCopyTests.skip = "setpriv and rsync are Linux tools here"


#: the unit an earlier version installed (before LimitNOFILE and the state
#: directory), for the upgrade test
EARLIER_UNIT = """[Unit]
Description=Piccolo spectrometer server
After=network.target local-fs.target

[Service]
Type=simple
# twistd in the foreground under systemd; rotating log, 10 files of 1 MB
Environment=PICCOLO_LOGFILE=/var/log/piccolo/piccolo.log
ExecStart=/opt/piccolo/bin/twistd --nodaemon --pidfile= --logger piccolo_twisted.logs.rotating_observer piccolo -c /etc/piccolo.cfg
# SIGTERM: shutters closed, batch ended cleanly, database closed
KillSignal=SIGTERM
TimeoutStopSec=30
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


class SetupChecksTests(unittest.TestCase):
    """What the outside attack on 21a found: a rerun after plugging the
    spectrometers in kept the simulated config without a word (W5); an
    installed unit never became the new one (W7); a start-up error never
    reached the log the README says to read (W6); serials that cannot be
    written were written (nit 10)."""

    EMULATE = "QEPRO:QEP01234"

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)

    def at(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    def setup(self, *args):
        return subprocess.run([venv_bin("piccolo3-setup"), "--root", self.root, *args],
                              capture_output=True, text=True, timeout=120)

    def test_rerun_after_plugging_the_spectrometers_in(self):
        if not cseabreeze():
            raise unittest.SkipTest("seabreeze's choice would be pyseabreeze, whose "
                                    "listing sends a multicast to the network")
        p = self.setup()                               # nothing plugged in yet
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("simulated default", p.stdout)
        path = self.at("/etc/piccolo/piccolo.config")
        with open(path) as f:
            simulated = f.read()
        p = self.setup("--emulate", self.EMULATE)     # plugged in; run again
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("spectrometers found: QEPRO QEP01234", p.stdout)
        [warning] = p.stderr.splitlines()
        self.assertIn(f"piccolo3-setup: warning: {path} (kept) does not name the "
                      f"spectrometers found: QEPRO QEP01234; the server will not record "
                      f"with them.", warning)
        self.assertIn("add [[QEP01234]] under [spectrometers]", warning)
        # the command it gives, as given (without sudo)
        command = shlex.split(warning.split(": sudo ", 1)[1].split(";")[0])
        self.assertEqual(command, [venv_bin("piccolo3-setup"), "--root", self.root,
                                   "--replace", "instrument"])
        p = subprocess.run(command + ["--emulate", self.EMULATE], capture_output=True,
                           text=True, timeout=120)
        self.assertEqual((p.returncode, p.stderr), (0, ""))
        [line] = [line for line in p.stdout.splitlines() if line.startswith("replaced ")]
        backup = line.split("(the old one is ")[1].rstrip(")")
        self.assertTrue(backup.startswith(path + ".") and backup.endswith(".bak"), backup)
        with open(backup) as f:
            self.assertEqual(f.read(), simulated)
        self.assertEqual([s.serial for s in load_instrument_config(path).spectrometers],
                         ["QEP01234"])
        p = self.setup("--emulate", self.EMULATE)     # nothing left to say
        self.assertEqual((p.returncode, p.stderr), (0, ""))

    def test_upgrade_as_the_readme_says(self):
        p = self.setup("--emulate", self.EMULATE)
        self.assertEqual(p.returncode, 0, p.stderr)
        unit_path = self.at("/etc/systemd/system/piccolo.service")
        with open(unit_path) as f:
            current = f.read()
        earlier = EARLIER_UNIT.replace("/opt/piccolo/bin/twistd", venv_bin("twistd"))
        with open(unit_path, "w") as f:
            f.write(earlier)

        section = readme.section("Deployment on a Raspberry Pi")
        steps = readme.commands(readme.block_starting(section,
                                                      "sudo /opt/piccolo/bin/pip install ."))
        self.assertEqual(steps, [
            "sudo /opt/piccolo/bin/pip install .",     # the tests' venv stands in
            "sudo /opt/piccolo/bin/piccolo3-setup",
            "sudo /opt/piccolo/bin/piccolo3-setup --replace unit",
            "sudo systemctl daemon-reload && sudo systemctl restart piccolo"])

        def run(step):
            argv = shlex.split(step)[1:]
            argv[0] = venv_bin(os.path.basename(argv[0]))
            return subprocess.run(argv + ["--root", self.root, "--emulate", self.EMULATE],
                                  capture_output=True, text=True, timeout=120)
        p = run(steps[1])
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        with open(unit_path) as f:
            self.assertEqual(f.read(), earlier)        # changes nothing
        self.assertIn(f"piccolo3-setup: warning: {unit_path} (kept) is not this version's "
                      f"unit; to install it (the old one kept beside it): sudo "
                      f"{venv_bin('piccolo3-setup')} --root {self.root} --replace unit && "
                      f"sudo systemctl daemon-reload && sudo systemctl restart piccolo.",
                      p.stderr)
        self.assertIn("\n+LimitNOFILE=16384\n", p.stderr)
        self.assertIn("\n+StateDirectory=piccolo\n", p.stderr)
        p = run(steps[2])
        self.assertEqual((p.returncode, p.stderr), (0, ""))
        with open(unit_path) as f:
            self.assertEqual(f.read(), current)
        [backup] = [n for n in os.listdir(os.path.dirname(unit_path)) if n.endswith(".bak")]
        with open(os.path.join(os.path.dirname(unit_path), backup)) as f:
            self.assertEqual(f.read(), earlier)
        analyze = shutil.which("systemd-analyze")
        if analyze:
            v = subprocess.run([analyze, "verify", unit_path], capture_output=True,
                               text=True, timeout=60)
            self.assertEqual((v.returncode, v.stdout + v.stderr), (0, ""))
        p = run(steps[1])
        self.assertEqual((p.returncode, p.stderr), (0, ""))

    def test_a_start_up_error_reaches_the_log(self):
        """The README's check after deploying is ``tail`` of the unit's log:
        a config error went to stderr (the journal) only."""
        p = self.setup("--emulate", self.EMULATE)
        self.assertEqual(p.returncode, 0, p.stderr)
        cfg = self.at("/etc/piccolo.cfg")
        with open(cfg) as f:
            text = f.read()
        with open(cfg, "w") as f:
            f.write(text.replace("port = 5683", "port = abc"))
        with open(self.at("/etc/systemd/system/piccolo.service")) as f:
            unit = f.read()
        keys = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
        env = dict(kv.split("=", 1) for kv in shlex.split(keys["Environment"]))
        env = {k: self.at(v) for k, v in env.items()}
        argv = shlex.split(keys["ExecStart"])
        argv[-1] = cfg
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, GPIOZERO_PIN_FACTORY="mock", **env))
        line = f'twistd piccolo: {cfg}: [coap/port] the value "abc" is of the wrong type.'
        self.assertEqual((p.returncode, p.stderr.strip()), (1, line))
        with open(env["PICCOLO_LOGFILE"]) as f:
            last = f.read().splitlines()[-1]
        self.assertTrue(last.endswith(f" [-] {line}"), last)

    def test_serials_that_cannot_be_written(self):
        for bad in ("QEPRO:QEP#1", "QEPRO:..", "QEPRO:[x]", "QEPRO:a b"):
            p = self.setup("--emulate", bad)
            self.assertEqual(p.returncode, 2, p.stdout + p.stderr)
            self.assertIn("invalid serial", p.stderr)
            self.assertEqual(os.listdir(self.root), [])
        # a device found with such a serial is left out, saying why
        import io
        from piccolo_twisted.tools import deploy, list_spec
        self.patch(list_spec, "find_spectrometers", lambda *a: (
            [("QEPRO", "QEP#1"), ("USB2000PLUS", "FLMT05678")], None))
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(deploy.main(["--root", self.root], out=out, err=err), 0)
        self.assertEqual(err.getvalue(), "piccolo3-setup: warning: the QEPRO with serial "
                         "'QEP#1' is left out of /etc/piccolo/piccolo.config: its serial "
                         "is not a plain word: ASCII letters, digits, '_', '+', '-' and "
                         "'.', at most 64, starting with a letter, digit or '_'\n")
        config = load_instrument_config(self.at("/etc/piccolo/piccolo.config"))
        self.assertEqual([s.serial for s in config.spectrometers], ["FLMT05678"])
