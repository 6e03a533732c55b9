"""Installs as the README gives them, in fresh venvs on a copy of the
repository without the clone's venv (issue 21):

- the laptop: the README's laptop commands, verbatim but for the server's
  address and a shorter batch, end with ``piccolo3`` against a running
  server, and the hardware stack is not installed;
- the Pi (``PICCOLO_CI=1``, as ``.ci/run`` runs it): ``pip install .`` into a
  fresh venv, ``piccolo3-setup`` in a temporary root, the unit's ExecStart
  of that venv serving.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from . import readme
from .readme import ROOT, Server, venv_bin

#: distributions of the server's stack that must not come with the laptop's
HARDWARE = {"twisted", "seabreeze", "gpiozero", "txthings", "pyusb", "configobj"}


def copy_of_the_repository(target):
    """The repository's files (tracked, or new and not ignored), without the
    clone's venv or anything built, as the most limited copy leaves them:
    a symlink becomes a plain file holding its target's name (Git for
    Windows with core.symlinks=false; a FAT stick or a zip drop links)."""
    listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, timeout=60)
    if listed.returncode != 0:
        raise unittest.SkipTest("not a git checkout: " + listed.stderr.decode()[-200:])
    for name in sorted(set(filter(None, listed.stdout.decode().split("\0")))):
        source, dest = os.path.join(ROOT, name), os.path.join(target, name)
        if not os.path.lexists(source):
            continue            # deleted in the work tree
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.islink(source):
            with open(dest, "w") as f:
                f.write(os.readlink(source))
        else:
            shutil.copy2(source, dest)
    return target


def clean_environment(home):
    """The environment of a new shell: no venv of the clone on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
           and not k.startswith(("PYTEST_", "PICCOLO_"))}
    venv = os.path.dirname(os.path.abspath(sys.executable))
    env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                  if p and os.path.abspath(p) != venv
                                  and not p.startswith(ROOT)) or "/usr/bin:/bin"
    env["HOME"] = home
    return env


def installed(python):
    p = subprocess.run([python, "-m", "pip", "list", "--format=json"],
                       capture_output=True, text=True, timeout=120)
    return {d["name"].lower() for d in json.loads(p.stdout)}


class InstallCase(unittest.TestCase):

    def setUp(self):
        if shutil.which("python3") is None:
            raise unittest.SkipTest("no python3 on PATH")
        self.work = tempfile.mkdtemp(prefix="piccolo-install-")
        self.addCleanup(shutil.rmtree, self.work, True)
        self.repo = copy_of_the_repository(os.path.join(self.work, "piccolo-twisted"))
        self.home = os.path.join(self.work, "home")
        os.makedirs(self.home)

    def shell(self, script, timeout=600):
        p = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=self.repo,
                           env=clean_environment(self.home), capture_output=True,
                           text=True, timeout=timeout)
        return p

    def server(self, twistd, *args, env=None):
        data = os.path.join(self.work, "server-data")
        server = Server([twistd, "-n", "--pidfile=", "piccolo", "-o", data,
                         "--address", "127.0.0.1", "--port", "0", *args],
                        os.path.join(self.work, "server.out"),
                        env=dict(env or {}, PICCOLO_TIME_SCALE="0.05"))
        self.addCleanup(server.stop)
        return server


class LaptopInstallTests(InstallCase):

    def test_laptop_section_verbatim(self):
        section = readme.section("From the field to your laptop")
        install, use = readme.blocks(section)[:2]
        install = readme.commands(install)
        self.assertEqual(install, [
            "python3 -m venv ~/piccolo3 && ~/piccolo3/bin/pip install ./client",
            ". ~/piccolo3/bin/activate",
            "export PICCOLO_SERVER=coap://piccolo.local"])
        server = self.server(venv_bin("twistd"))
        install[-1] = f"export PICCOLO_SERVER=coap://127.0.0.1:{server.port}"
        steps = readme.commands(use)
        self.assertIn("piccolo3 status --watch", steps)
        steps.remove("piccolo3 status --watch")         # runs until Ctrl-C
        batch = "piccolo3 record --run transect1 -n 20 --auto 0 --delay 5"
        # a shorter batch with the same files as far as the plot's s000003
        steps[steps.index(batch)] = batch.replace("-n 20", "-n 4").replace("--delay 5",
                                                                          "--delay 0")
        script = "\n".join(install + [f"{step} < /dev/null" for step in steps])
        p = self.shell(script)
        self.assertEqual(p.returncode, 0, f"{script}\n{p.stdout}\n{p.stderr}")
        self.assertIn("run transect1 batch 0: 4 sequences recorded", p.stdout)
        self.assertTrue(os.path.getsize(os.path.join(self.repo, "s3.png")) > 1000)
        fetched = sorted(os.listdir(os.path.join(self.home, "piccolo", "transect1")))
        self.assertEqual(len(fetched), 6, fetched)         # 4 light, first and last dark
        python = os.path.join(self.home, "piccolo3", "bin", "python")
        self.assertEqual(installed(python) & HARDWARE, set())
        self.assertIn("piccolo3-cli", installed(python))


class PiInstallTests(InstallCase):
    """``sudo python3 -m venv /opt/piccolo && sudo /opt/piccolo/bin/pip install .``
    and the rest of the deployment, with /opt/piccolo in a temporary place."""

    def setUp(self):
        if not os.environ.get("PICCOLO_CI"):
            raise unittest.SkipTest("a fresh server install (~1 min): PICCOLO_CI=1, "
                                    "as .ci/run runs it")
        super().setUp()

    def test_server_install_in_a_fresh_venv(self):
        steps = readme.commands(readme.blocks(
            readme.section("Deployment on a Raspberry Pi"))[0])
        install = steps[1]
        self.assertEqual(install, "sudo python3 -m venv /opt/piccolo && "
                                  "sudo /opt/piccolo/bin/pip install .")
        opt = os.path.join(self.work, "opt", "piccolo")
        script = install.replace("sudo ", "").replace("/opt/piccolo", opt)
        p = self.shell(script)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        root = os.path.join(self.work, "root")
        p = subprocess.run([os.path.join(opt, "bin", "piccolo3-setup"), "--root", root],
                           capture_output=True, text=True, timeout=120,
                           env=clean_environment(self.home))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        with open(os.path.join(root, "etc/systemd/system/piccolo.service")) as f:
            execstart = [line for line in f if line.startswith("ExecStart=")][0]
        argv = shlex.split(execstart.split("=", 1)[1])
        self.assertEqual(argv[0], os.path.join(opt, "bin", "twistd"))
        argv[argv.index("/etc/piccolo.cfg")] = os.path.join(root, "etc/piccolo.cfg")
        data = os.path.join(self.work, "data")
        server = Server(argv + ["-i", os.path.join(root, "etc/piccolo/piccolo.config"),
                                "-o", data, "--address", "127.0.0.1", "--port", "0"],
                        os.path.join(self.work, "piccolo.log"),
                        env={"PICCOLO_LOGFILE": os.path.join(self.work, "piccolo.log")})
        self.addCleanup(server.stop)
        p = subprocess.run([venv_bin("piccolo3"), "status", "--server",
                            f"coap://127.0.0.1:{server.port}"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        # the server's package ships its samples
        site = subprocess.run([os.path.join(opt, "bin", "python"), "-c",
                               "from piccolo_twisted.tools.deploy import sample; "
                               "print(sample('piccolo.cfg') and sample('piccolo.service') "
                               "and sample('piccolo.config') and 'ok')"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(site.stdout.strip(), "ok", site.stderr)


class CopyWithoutSymlinksTests(InstallCase):
    """A copy of the repository made where symlinks do not survive (Git for
    Windows, a FAT stick, a zip) builds a package with its sample configs,
    and the README's first command serves from it (the samples were a
    symlink: pip succeeded silently without them, piccolo3-setup crashed and
    the first command stopped on "pdata/piccolo.config: no such file")."""

    def test_the_repository_holds_no_symlink(self):
        listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-s"], capture_output=True,
                                text=True, timeout=60)
        if listed.returncode != 0:
            raise unittest.SkipTest("not a git checkout")
        links = [line.split("\t", 1)[1] for line in listed.stdout.splitlines()
                 if line.startswith("120000 ")]
        self.assertEqual(links, [])

    def pip(self, *args):
        p = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True,
                           text=True, timeout=600, env=clean_environment(self.home))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)

    def test_the_built_package_ships_its_samples(self):
        dist, site = os.path.join(self.work, "dist"), os.path.join(self.work, "site")
        self.pip("wheel", "-q", "--no-deps", "-w", dist, self.repo)
        [wheel] = os.listdir(dist)
        self.pip("install", "-q", "--no-deps", "--no-index", "--target", site,
                 os.path.join(dist, wheel))
        root = os.path.join(self.work, "root")
        script = ("import sys, piccolo_twisted\n"
                  "from piccolo_twisted.config import bundled_instrument_config, "
                  "load_instrument_config\n"
                  "from piccolo_twisted.tools.deploy import main, sample\n"
                  "print(piccolo_twisted.__file__)\n"
                  "load_instrument_config(bundled_instrument_config())\n"
                  "for name in ('piccolo.cfg', 'piccolo.config', 'piccolo.service'):\n"
                  "    print(name, len(sample(name)))\n"
                  f"sys.exit(main(['--root', {root!r}, '--emulate', 'QEPRO:QEP01234']))\n")
        p = subprocess.run([sys.executable, "-c", script], cwd=self.work,
                           capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=site))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertEqual(p.stderr, "")
        self.assertTrue(p.stdout.startswith(os.path.join(site, "piccolo_twisted")), p.stdout)
        for name in ("piccolo.cfg", "piccolo.config", "piccolo.service"):
            with open(os.path.join(ROOT, "pdata", name)) as f:
                self.assertIn(f"{name} {len(f.read())}\n", p.stdout)
        for path in ("etc/piccolo.cfg", "etc/piccolo/piccolo.config",
                     "etc/systemd/system/piccolo.service"):
            self.assertIn(f"wrote {os.path.join(root, path)}", p.stdout)
        # the build left nothing in the copy (as root: nothing root-owned
        # in the user's checkout) and reused nothing from an earlier build
        self.assertEqual(sorted(n for n in os.listdir(self.repo)
                                if n == "build" or n.endswith(".egg-info")), [])
        # a package without them says so in one line (it was a traceback)
        shutil.rmtree(os.path.join(site, "piccolo_twisted", "pdata"))
        p = subprocess.run([sys.executable, "-c", script.replace(root, root + "2")],
                           cwd=self.work, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=site))
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertEqual(p.stderr.splitlines()[-1],
                         "piccolo_twisted.config.ConfigError: the shipped sample "
                         "piccolo.config is missing (looked in "
                         f"{os.path.join(site, 'piccolo_twisted', 'pdata')}): the "
                         "installation is incomplete; reinstall it")
        p = subprocess.run([sys.executable, "-c", "import sys\n"
                            "from piccolo_twisted.tools.deploy import main\n"
                            f"sys.exit(main(['--root', {root + '3'!r}, '--emulate', "
                            "'QEPRO:QEP01234']))"],
                           cwd=self.work, capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=site))
        self.assertEqual((p.returncode, p.stderr.count("\n")), (1, 1), p.stderr)
        self.assertTrue(p.stderr.startswith("piccolo3-setup: the shipped sample "
                                            "piccolo.cfg is missing"), p.stderr)

    def test_the_first_command_from_the_copy(self):
        """``pip install -e .`` then ``twistd -n --pidfile= piccolo``: the
        editable install reads the samples from the copy's pdata/; the
        server's dependencies come from the tests' venv (not downloaded)."""
        venv = os.path.join(self.work, "venv")
        p = self.shell(f"python3 -m venv {shlex.quote(venv)} && "
                       f"{shlex.quote(venv)}/bin/pip install -q --no-deps -e .")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        python = os.path.join(venv, "bin", "python")
        site = subprocess.run([python, "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
        ours = subprocess.run([sys.executable, "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, timeout=60).stdout.strip()
        with open(os.path.join(site, "zz_dependencies.pth"), "w") as f:
            f.write(ours + "\n")
        twistd = ("import sys; from twisted.scripts.twistd import run; "
                  "sys.argv[0] = 'twistd'; run()")
        server = Server([python, "-c", twistd, "-n", "--pidfile=", "piccolo",
                         "-o", os.path.join(self.work, "data"), "--address", "127.0.0.1",
                         "--port", "0", "--web", "0"],
                        os.path.join(self.work, "first.out"), cwd=self.repo,
                        env={"PYTHONPATH": ""})
        self.addCleanup(server.stop)
        bundled = os.path.join(self.repo, "pdata", "piccolo.config")
        self.assertIn(f"using the embedded default {bundled} (simulated instrument)",
                      server.log())
        self.assertEqual(server.stop(), -15)


class RebuildTests(InstallCase):
    """``pip install ./client`` again after an upgrade reused the previous
    build's ``client/build/lib``: a module deleted from piccolo_twisted/cli
    stayed installed; and ``sudo pip install .`` left a root-owned build/
    and egg-info in the user's checkout (nits 2 and 3 of the attack on 21a)."""

    def wheel(self, n):
        import zipfile
        dist = os.path.join(self.work, f"dist{n}")
        p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "-w", dist, "./client"], cwd=self.repo, capture_output=True,
                           text=True, timeout=600, env=clean_environment(self.home))
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        [name] = os.listdir(dist)
        with zipfile.ZipFile(os.path.join(dist, name)) as z:
            return set(z.namelist())

    def test_a_deleted_module_is_not_installed_again(self):
        stale = os.path.join(self.repo, "piccolo_twisted", "cli", "stale_module.py")
        with open(stale, "w") as f:
            f.write("GONE = False\n")
        self.assertIn("piccolo3_cli/stale_module.py", self.wheel(1))
        os.unlink(stale)
        files = self.wheel(2)
        self.assertNotIn("piccolo3_cli/stale_module.py", files)
        self.assertIn("piccolo3_cli/main.py", files)
        left = [n for d in (self.repo, os.path.join(self.repo, "client"))
                for n in os.listdir(d) if n == "build" or n.endswith(".egg-info")]
        self.assertEqual(left, [])
