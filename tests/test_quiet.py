"""A quiet test run (issue 21): no deprecation noise from the libraries
underneath, and every warning from the project's own code is an error."""

import os
import subprocess
import sys
import warnings

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "PICCOLO_WARNING_PROBE"


def pytest(*args, **env_extra):
    env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", **env_extra)
    env.pop("PYTEST_XDIST_WORKER", None)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    return p.returncode, p.stdout + p.stderr


class QuietRunTests(unittest.TestCase):

    def test_manhole_tests_print_no_warnings(self):
        """The manhole's keys are ed25519, yet every key operation of conch
        printed cryptography's "DSA is deprecated" (354 lines in all)."""
        code, out = pytest("tests/test_config.py::ManholeKeysTests",
                           "tests/test_operations.py::ManholeTests")
        self.assertEqual(code, 0, out)
        self.assertNotIn("warning", out.lower(), out)
        self.assertNotIn("DSA", out)

    def test_the_servers_log_has_no_dsa_noise(self):
        """The server itself: making the host key and reading the keys file
        print nothing (the warning went to twistd's log)."""
        script = ("import warnings, tempfile, os\n"
                  "from piccolo_twisted import manhole\n"
                  "from cryptography.hazmat.primitives.asymmetric import ed25519\n"
                  "from twisted.conch.ssh import keys\n"
                  "d = tempfile.mkdtemp()\n"
                  "k = manhole.host_key(os.path.join(d, 'state', 'key'))\n"
                  "p = os.path.join(d, 'authorized_keys')\n"
                  "open(p, 'wb').write(k.public().toString('openssh') + b'\\n')\n"
                  "manhole.load_authorized_keys(p)\n")
        p = subprocess.run([sys.executable, "-c", script], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stderr, "")

    def test_own_warnings_fail_their_test(self):
        """setup.cfg makes a warning from the project's code an error, in
        trial's test cases too (trial re-emits a test's warnings by path)."""
        code, out = pytest("tests/test_quiet.py::WarningProbe",
                           "tests/test_quiet.py::SyncWarningProbe", **{PROBE: "1"})
        self.assertEqual(code, 1, out)
        self.assertIn("3 failed", out)
        self.assertIn("DeprecationWarning: probe from the tests", out)
        self.assertIn("UserWarning: probe from the server", out)
        self.assertIn("DeprecationWarning: probe from a synchronous test", out)


def trial(*names, **env_extra):
    """The README's trial command, on some test cases (in a temporary
    directory of its own: trial writes _trial_temp)."""
    import tempfile
    temp = tempfile.mkdtemp(prefix="piccolo-trial-")
    env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", **env_extra)
    env.pop("PYTHONWARNINGS", None)           # as from a shell: tests/ sets it
    try:
        p = subprocess.run([sys.executable, "-m", "twisted.trial", "--reactor=asyncio",
                            f"--temp-directory={os.path.join(temp, '_trial_temp')}",
                            *names], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env=env)
    finally:
        import shutil
        shutil.rmtree(temp, True)
    return p.returncode, p.stdout + p.stderr


class QuietTrialTests(unittest.TestCase):
    """The README's trial command printed 57 lines of conch's DSA warnings,
    and warnings from the project's code passed: setup.cfg's filters were
    pytest's alone (the outside attack on 21a, W4)."""

    def test_manhole_tests_print_no_warnings(self):
        code, out = trial("tests.test_config.ManholeKeysTests",
                          "tests.test_operations.ManholeTests")
        self.assertEqual(code, 0, out)
        self.assertIn("PASSED", out)
        self.assertNotIn("warning", out.lower(), out)
        self.assertNotIn("DSA", out)

    def test_own_warnings_fail_their_test(self):
        code, out = trial("tests.test_quiet.WarningProbe", "tests.test_quiet.SyncWarningProbe",
                          **{PROBE: "1"})
        self.assertEqual(code, 1, out)
        self.assertIn("FAILED (errors=3, successes=3)", out)
        self.assertIn("probe from the tests", out)
        self.assertIn("probe from the server", out)
        self.assertIn("probe from a synchronous test", out)

    def test_warnings_in_servers_the_tests_start(self):
        """A server or tool the tests start has the same rule (they were
        never checked): a warning from the project's code is an error."""
        from . import project_modules
        self.assertIn("piccolo_twisted.tools.deploy", project_modules())
        self.assertIn("piccolo3_cli.main", project_modules())
        script = ("import warnings\n"
                  "warnings.warn_explicit('probe', DeprecationWarning, 'x.py', 1, "
                  "module='piccolo_twisted.service')\n")
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("DeprecationWarning: probe", p.stderr)


class WarningProbe(unittest.TestCase):
    """Run by QuietRunTests with PICCOLO_WARNING_PROBE=1: each must fail."""

    def setUp(self):
        if not os.environ.get(PROBE):
            raise unittest.SkipTest("a probe, run by QuietRunTests")

    def test_from_a_test(self):
        warnings.warn("probe from the tests", DeprecationWarning)

    def test_from_the_server(self):
        from piccolo_twisted import values
        warnings.warn_explicit("probe from the server", UserWarning, values.__file__, 1,
                               module="piccolo_twisted.values")


class SyncWarningProbe(unittest.SynchronousTestCase):
    setUp = WarningProbe.setUp

    def test_from_a_synchronous_test(self):
        warnings.warn("probe from a synchronous test", DeprecationWarning)
