"""The manhole's host key lives out of the data directory, which is copied
off the Pi whole (issue 21): where it goes, and how an existing
installation's key is moved out at start."""

import errno
import os

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from piccolo_twisted import statedir
from piccolo_twisted.config import ConfigError, load_server_config

from .helpers import make_ssh_key as make_key


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, dirs, names in os.walk(root) for n in names + dirs)


class WhereTests(unittest.SynchronousTestCase):

    def test_default_state_dir(self):
        d = statedir.default_state_dir
        self.assertEqual(d({"STATE_DIRECTORY": "/var/lib/piccolo", "HOME": "/root"}),
                         "/var/lib/piccolo")
        self.assertEqual(d({"STATE_DIRECTORY": "/var/lib/piccolo:/var/lib/other"}),
                         "/var/lib/piccolo")
        self.assertEqual(d({"XDG_STATE_HOME": "/home/pi/.st", "HOME": "/home/pi"}),
                         "/home/pi/.st/piccolo")
        self.assertEqual(d({"XDG_STATE_HOME": "relative", "HOME": "/home/pi"}),
                         "/home/pi/.local/state/piccolo")
        self.assertEqual(d({"HOME": "/home/pi"}), "/home/pi/.local/state/piccolo")

    def test_configured_path_wins(self):
        settings = load_server_config(text="[manhole]\nhost_key = /etc/piccolo/hk\n")
        self.assertEqual(statedir.host_key_path(settings, {"HOME": "/x"}), "/etc/piccolo/hk")
        settings = load_server_config()
        self.assertEqual(statedir.host_key_path(settings, {"HOME": "/x"}),
                         "/x/.local/state/piccolo/manhole_host_key")

    def test_host_key_inside_the_data_is_refused(self):
        from piccolo_twisted import tap
        data = os.path.abspath(self.mktemp())
        keys = os.path.abspath(self.mktemp())
        make_key(keys)
        cfg = os.path.abspath(self.mktemp())
        with open(cfg, "w") as f:
            f.write(f"[datadir]\ndatadir = {data}\n[manhole]\nport = 2299\n"
                    f"keys = {keys}\nhost_key = {data}/.piccolo/manhole_host_key\n")
        options = tap.Options()
        e = self.assertRaises(SystemExit, options.parseOptions, ["-c", cfg])
        self.assertEqual(str(e), f"twistd piccolo: {cfg}: [manhole/host_key] "
                                 f"{data}/.piccolo/manhole_host_key is inside the data "
                                 f"directory {data}, which is copied off the Pi")
        # the manhole off: still refused, as the README says (a key an
        # earlier version left in the data could not be moved out to it)
        e = self.assertRaises(SystemExit, tap.Options().parseOptions,
                              ["-c", cfg, "--manhole", "0"])
        self.assertIn("[manhole/host_key]", str(e))
        # the default place inside the data with the manhole off: unused
        options = tap.Options()
        self.patch(os, "environ", dict(os.environ, STATE_DIRECTORY=data))
        options.parseOptions(["-o", data])

    def test_resolved_once_at_start(self):
        from piccolo_twisted import tap
        options = tap.Options()
        options.parseOptions(["-o", os.path.abspath(self.mktemp())])
        self.assertTrue(os.path.isabs(options.settings.manhole_host_key))
        self.assertTrue(options.settings.manhole_host_key.endswith("/manhole_host_key"))
        self.assertNotIn(options.settings.datadir, options.settings.manhole_host_key)
        self.assertRaises(ConfigError, load_server_config, text="[manhole]\nhostkey = x\n")


class MigrationTests(unittest.TestCase):
    """An installation of an earlier version has its key in
    <datadir>/.piccolo (or in the data directory itself): the start moves
    it out, says so, and the manhole keeps the same key."""

    def setUp(self):
        from cryptography.hazmat.primitives.asymmetric import ed25519
        from twisted.conch.ssh import keys
        self.root = os.path.abspath(self.mktemp())
        self.data = os.path.join(self.root, "data")
        self.key_path = os.path.join(self.root, "var", "lib", "piccolo", "manhole_host_key")
        self.keys_file = os.path.join(self.root, "authorized_keys")
        os.makedirs(self.data)
        with open(self.keys_file, "wb") as f:
            f.write(keys.Key(ed25519.Ed25519PrivateKey.generate()).public()
                    .toString("openssh") + b"\n")
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def service(self, manhole=True):
        """The service as makeService builds it (not started: the manhole's
        key is read when it is built)."""
        from .helpers import make_service
        return make_service(self.data, server_text=(
            f"[manhole]\nport = {2299 if manhole else 0}\nkeys = {self.keys_file}\n"
            f"host_key = {self.key_path}\n"))

    def lines(self):
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace", "").startswith("piccolo_twisted")]

    def test_key_moved_out_and_kept(self):
        old = os.path.join(self.data, ".piccolo", "manhole_host_key")
        key = make_key(old)
        service = self.service()
        self.assertFalse(os.path.exists(old))
        self.assertEqual(files_under(self.data), [".piccolo"])
        self.assertEqual(os.stat(self.key_path).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(os.path.dirname(self.key_path)).st_mode & 0o777, 0o700)
        self.assertIsNotNone(service.manhole)
        # the same host key: ssh clients see no "host key changed"
        from twisted.conch.ssh import keys
        self.assertEqual(keys.Key.fromFile(self.key_path), key)
        self.assertIn(f"moved the manhole host key {old} to {self.key_path}, out of "
                      f"the data directory", self.lines())
        self.assertNotIn("generated SSH host key", " ".join(self.lines()))

    def test_oldest_layout_and_manhole_off(self):
        """A key in the data directory itself (before .piccolo existed) goes
        too, manhole on or off: the copy would leak either way."""
        old = os.path.join(self.data, "manhole_host_key")
        key = make_key(old)
        self.service(manhole=False)
        self.assertFalse(os.path.exists(old))
        from twisted.conch.ssh import keys
        self.assertEqual(keys.Key.fromFile(self.key_path), key)

    def test_stale_copy_removed_when_the_key_is_already_out(self):
        old = os.path.join(self.data, ".piccolo", "manhole_host_key")
        make_key(old)
        key = make_key(self.key_path)
        self.service()
        self.assertFalse(os.path.exists(old))
        from twisted.conch.ssh import keys
        self.assertEqual(keys.Key.fromFile(self.key_path), key)
        self.assertIn(f"removed the old manhole host key {old}: the host key is "
                      f"{self.key_path}, out of the data directory", self.lines())

    def test_runs_named_like_the_key_are_left(self):
        run = os.path.join(self.data, "manhole_host_key")
        os.makedirs(run)
        self.service(manhole=False)
        self.assertTrue(os.path.isdir(run))
        self.assertFalse(os.path.exists(self.key_path))

    def test_across_file_systems(self):
        """The data is on a USB stick, the state on the SD card: rename
        fails with EXDEV, the key is copied (0600) and then removed."""
        old = os.path.join(self.data, ".piccolo", "manhole_host_key")
        key = make_key(old)
        real_rename = os.rename

        def rename(src, dst):
            if src == old:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
            return real_rename(src, dst)
        self.patch(os, "rename", rename)
        statedir.migrate_host_key(self.data, self.key_path)
        self.assertFalse(os.path.exists(old))
        from twisted.conch.ssh import keys
        self.assertEqual(keys.Key.fromFile(self.key_path), key)
        self.assertEqual(os.stat(self.key_path).st_mode & 0o777, 0o600)
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.key_path))),
                         ["manhole_host_key"])

    def test_a_key_that_cannot_move_is_a_fault(self):
        old = os.path.join(self.data, ".piccolo", "manhole_host_key")
        make_key(old)
        blocker = os.path.join(self.root, "file")
        with open(blocker, "w"):
            pass
        notes = []
        statedir.migrate_host_key(self.data, os.path.join(blocker, "key"), note=notes.append)
        self.assertTrue(os.path.exists(old))
        self.assertEqual(len(notes), 1)
        self.assertIn(f"manhole host key {old} is still in the data directory", notes[0])
        self.assertEqual(len(self.flushLoggedErrors()), 0)
