"""Config values outside their range are errors, never silent replacements
(issue 21): integration-time limits, channel names that the API's own path
words would hide, the empty seabreeze backend, the port bound for ``port = 0``."""

import os
import subprocess
import sys

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from piccolo_twisted.config import (ConfigError, load_instrument_config,
                                    load_server_config)

from .helpers import as_deferred, asyncio_reactor, make_service

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

CHANNELS = """
[channels]
  [[shutter_1]]
    direction = upwelling
  [[shutter_2]]
    direction = downwelling
"""


def spectrometer(**keys):
    return (CHANNELS + "[spectrometers]\n  [[sim_QEP1]]\n"
            + "".join(f"    {k} = {v}\n" for k, v in keys.items()))


class LogCapture:
    def __init__(self, case):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        case.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, namespace="piccolo_twisted"):
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace", "").startswith(namespace)]


class InstrumentValueTests(unittest.SynchronousTestCase):

    def assertRefused(self, text, *words):
        e = self.assertRaises(ConfigError, load_instrument_config, text=text)
        for word in words:
            self.assertIn(word, str(e))
        self.assertNotIn("\n", str(e))
        return str(e)

    def test_integration_times_out_of_range_are_errors(self):
        """``1e15`` ms (as digits: 10**15) was taken, then silently replaced
        by the device's limits at connect."""
        huge = 10 ** 15
        self.assertRefused(spectrometer(min_integration_time=huge),
                           "[spectrometers/sim_QEP1/min_integration_time]", "too big")
        self.assertRefused(spectrometer(max_integration_time=huge),
                           "[spectrometers/sim_QEP1/max_integration_time]", "too big")
        self.assertRefused(spectrometer(max_integration_time="1e15"),
                           "[spectrometers/sim_QEP1/max_integration_time]")
        self.assertRefused(spectrometer(min_integration_time=-1),
                           "[spectrometers/sim_QEP1/min_integration_time]", "too small")
        # an hour is the longest integration any Ocean Optics device offers
        cfg = load_instrument_config(text=spectrometer(min_integration_time=8,
                                                       max_integration_time=3600000))
        self.assertEqual((cfg.spectrometers[0].min_time, cfg.spectrometers[0].max_time),
                         (8, 3600000))

    def test_channel_named_like_a_path_word(self):
        """A channel named ``shutters`` was accepted and unreachable: 4.04,
        /shutter/shutters is the list of channels."""
        from piccolo_twisted.config import RESERVED_CHANNEL_NAMES
        self.assertEqual(RESERVED_CHANNEL_NAMES, {"shutters"})
        self.assertRefused(CHANNELS.replace("downwelling", "shutters"),
                           "[channels/shutter_2/direction]", "'shutters'",
                           "/shutter/shutters")

    def test_channel_names_without_control_characters(self):
        for bad in ("up\x1b[31m", "up\x7f", "up\x9b31m", "up\x07"):
            self.assertRefused(CHANNELS.replace("upwelling", bad),
                               "[channels/shutter_1/direction]", "control characters")
        self.assertRefused(CHANNELS.replace("downwelling", "upwelling"),
                           "[channels/shutter_2/direction]", "used by another channel")
        for bad in (".hidden", "a/b"):
            self.assertRefused(CHANNELS.replace("upwelling", bad),
                               "[channels/shutter_1/direction]", "path segment")

    def test_calibration_that_is_no_calibration(self):
        """Nit 9 of the attack on 21a: ``1e308, ...`` was accepted and the
        simulator overflowed rendering it."""
        def calibrated(values):
            return (spectrometer() + "    [[[calibration]]]\n      [[[[upwelling]]]]\n"
                    f"        wavelengthCalibrationCoefficientsPiccolo = {values}\n")
        where = ("[spectrometers/sim_QEP1/calibration/upwelling/"
                 "wavelengthCalibrationCoefficientsPiccolo]")
        for bad in ("1e308, 0.45, 0, 0", "345, 0.45, 1e-3, 1", "1e300, 1e300",
                    "1, 2, 3, 4, 5, 6, 7, 8, 9"):
            self.assertRefused(calibrated(bad), where)
        cfg = load_instrument_config(text=calibrated("345.2, 0.4543, -1.12e-5, -1.3e-9"))
        self.assertEqual(cfg.spectrometers[0].calibration["upwelling"],
                         [345.2, 0.4543, -1.12e-5, -1.3e-9])

    def test_channel_names_are_plain_words(self):
        """Nit 6 of the attack on 21a: ``a>,<b`` broke /.well-known/core's
        link format, a blank name was accepted."""
        for bad in ('"a>,<b"', '"  "', '"up welling"', "-up", "up;rt=x", '"up\"x"',
                    "aufwärts", "x" * 65):
            self.assertRefused(CHANNELS.replace("upwelling", bad),
                               "[channels/shutter_1/direction]", "plain word")
        for good in ("Upwelling", "up_2", "down-1", "ch.1", "x" * 64, "_1"):
            cfg = load_instrument_config(text=CHANNELS.replace("upwelling", good))
            self.assertIn(good, cfg.channel_names)

    def test_reserved_names_are_the_shutter_resource_words(self):
        """The reserved list is the /shutter resource's own children: a new
        fixed word there must be added to it."""
        from piccolo_twisted.config import RESERVED_CHANNEL_NAMES
        from piccolo_twisted.config import bundled_instrument_config
        from piccolo_twisted.instrument import build_instrument
        from twisted.internet.task import Clock
        instrument = build_instrument(load_instrument_config(bundled_instrument_config()),
                                      Clock())
        names = set(instrument.shutters.resources())
        channels = set(load_instrument_config(bundled_instrument_config()).channel_names)
        fixed = {n.split("/")[0] for n in names} - channels
        self.assertEqual(fixed, set(RESERVED_CHANNEL_NAMES))


class ServerValueTests(unittest.SynchronousTestCase):

    def test_empty_backend_is_seabreezes_choice(self):
        """``backend =`` is documented as "empty: seabreeze's choice"; it was
        refused with 'the value "" is unacceptable'."""
        settings = load_server_config(text="[seabreeze]\nbackend =\nemulate =\n")
        self.assertIsNone(settings.seabreeze_backend)
        self.assertEqual(settings.emulate, [])
        for name in ("cseabreeze", "pyseabreeze"):
            settings = load_server_config(text=f"[seabreeze]\nbackend = {name}\n")
            self.assertEqual(settings.seabreeze_backend, name)
        e = self.assertRaises(ConfigError, load_server_config,
                              text="[seabreeze]\nbackend = libusb\n")
        self.assertIn("[seabreeze/backend]", str(e))
        self.assertIn("cseabreeze or pyseabreeze, or empty", str(e))


class BoundPortTests(unittest.TestCase):
    """``port = 0`` logged ``serving CoAP on [::1]:0``: the log says the
    port the system chose, which is where the clients must go."""

    def test_port_zero_logs_the_bound_port(self):
        if not asyncio_reactor():
            raise unittest.SkipTest("needs --reactor=asyncio")
        log = LogCapture(self)
        datadir = os.path.abspath(self.mktemp())
        service = make_service(datadir, port=0, address="127.0.0.1")
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        port = service.coap._port.getHost().port
        self.assertNotEqual(port, 0)
        serving = [line for line in log.lines() if "serving CoAP" in line]
        self.assertEqual(serving, [f"piccolo serving CoAP on [127.0.0.1]:{port}"])

    def test_limits_beyond_the_device_are_said(self):
        """The config's limits outside what the device can do are replaced
        at connect by the device's: with a warning naming the key."""
        if not asyncio_reactor():
            raise unittest.SkipTest("needs --reactor=asyncio")
        log = LogCapture(self)
        datadir = os.path.abspath(self.mktemp())
        # the simulated QE Pro integrates 8 ms .. 1 h
        service = make_service(datadir, port=0, address="127.0.0.1",
                               instrument_text=spectrometer(min_integration_time=2))
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)

        async def connected():
            import asyncio
            for _ in range(500):
                if next(iter(service.instrument.spectrometers)).min_time.value == 8:
                    return
                await asyncio.sleep(0.01)
        d = as_deferred(connected())

        def check(_):
            self.assertEqual(next(iter(service.instrument.spectrometers)).min_time.value, 8)
            warned = [line for line in log.lines() if "outside the device's range" in line]
            self.assertEqual(warned, ["S_sim_QEP1: min_integration_time = 2 ms is outside "
                                      "the device's range 8..3600000 ms: using 8 ms"])
        return d.addCallback(check)


class TwistdRefusesTests(unittest.TestCase):

    def test_one_line_from_twistd(self):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "piccolo.config")
        with open(path, "w") as f:
            f.write(CHANNELS.replace("downwelling", "shutters"))
        p = subprocess.run(TWISTD + ["-n", "--pidfile=", "piccolo", "--port", "0",
                                     "-o", d, "-i", path],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, GPIOZERO_PIN_FACTORY="mock"))
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertEqual(p.stderr.strip(), f"twistd piccolo: {path}: "
                         "[channels/shutter_2/direction] 'shutters' cannot name a "
                         "channel: a fixed word of the API (/shutter/shutters)")


class EmptyAndSloppyValuesTests(unittest.SynchronousTestCase):
    """An empty path is no default, and the command line takes what the
    config file takes (issue 21's outside attack on 21a: W1, nits 4, 5, 7)."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def cfg(self, text):
        path = os.path.join(self.dir, "piccolo.cfg")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_empty_datadir_is_refused_not_the_working_directory(self):
        """``datadir =`` became the current directory: ``/`` under the
        unit's WorkingDirectory, every system directory a "run"."""
        root = os.path.join(self.dir, "root")       # stands in for systemd's /
        os.makedirs(os.path.join(root, "etc"))
        cfg = self.cfg("[datadir]\ndatadir =\n")
        try:
            p = subprocess.run(TWISTD + ["-n", "--pidfile=", "piccolo", "-c", cfg,
                                         "--address", "127.0.0.1", "--port", "0",
                                         "--web", "0"],
                               cwd=root, capture_output=True, text=True, timeout=30,
                               env=dict(os.environ, GPIOZERO_PIN_FACTORY="mock"))
        except subprocess.TimeoutExpired as e:
            self.fail(f"the server ran on the working directory: {e.stdout!r}")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertEqual(p.stderr.strip(), f"twistd piccolo: {cfg}: [datadir/datadir] "
                         "is empty: name the data directory (or leave the key out "
                         "for the default)")
        self.assertEqual(os.listdir(root), ["etc"])
        for text in ('[datadir]\ndatadir = "  "\n', "config =\n"):
            self.assertRaises(ConfigError, load_server_config, text=text)
        self.assertEqual(load_server_config(text="[datadir]\n").datadir, "piccolo_data")
        from piccolo_twisted import tap
        e = self.assertRaises(SystemExit, tap.Options().parseOptions, ["-o", ""])
        self.assertEqual(str(e), "twistd piccolo: --data-dir: empty: name the data "
                                 "directory")

    def test_ports_on_the_command_line_as_in_the_file(self):
        """``--port 1e3`` bound 1000 and ``--port 5683.0`` 5683, where the
        config file calls both "of the wrong type"."""
        from piccolo_twisted import tap
        for value in ("1e3", "5683.0", "0x10", " 80", "+80", "-1", "65536", "٣"):
            for option in ("--port", "--manhole", "--web"):
                e = self.assertRaises(SystemExit, tap.Options().parseOptions,
                                      [option, value])
                self.assertEqual(str(e), f"twistd piccolo: {option}: {value!r} is not "
                                         f"a port number (0 to 65535)")
        for value in ("1e3", "5683.0", "0x10", "-1", "65536"):
            self.assertRaises(ConfigError, load_server_config,
                              text=f"[coap]\nport = {value}\n")
        options = tap.Options()
        options.parseOptions(["--port", "5684", "--web", "0", "-o", self.dir])
        self.assertEqual((options.settings.port, options.settings.web_port), (5684, 0))

    def test_where_an_absolute_config_came_from(self):
        """``config = /etc/piccolo/piccolo.config`` was logged as "(from the
        data directory)"."""
        from piccolo_twisted import tap
        instrument = os.path.join(self.dir, "instrument.config")
        with open(instrument, "w") as f:
            f.write(CHANNELS)
        cfg = self.cfg(f"config = {instrument}\n")
        options = tap.Options()
        options.parseOptions(["-c", cfg, "-o", os.path.join(self.dir, "data")])
        self.assertEqual(options.instrument_note,
                         f"instrument config {instrument} (from {cfg}: [config])")
        os.makedirs(os.path.join(self.dir, "data"))
        with open(os.path.join(self.dir, "data", "piccolo.config"), "w") as f:
            f.write(CHANNELS)
        options = tap.Options()
        options.parseOptions(["-o", os.path.join(self.dir, "data")])
        self.assertEqual(options.instrument_note,
                         f"instrument config {self.dir}/data/piccolo.config "
                         f"(from the data directory)")


class ManholeWordingTests(unittest.SynchronousTestCase):
    """Nits 8 and 13: the error names the file and key that would fix it;
    the log shows an IPv6 interface in brackets."""

    def test_keys_missing_names_the_config_key(self):
        from piccolo_twisted import tap
        cfg = os.path.abspath(self.mktemp())
        with open(cfg, "w") as f:
            f.write("[manhole]\nport = 2299\nkeys =\n")
        e = self.assertRaises(SystemExit, tap.Options().parseOptions,
                              ["-c", cfg, "-o", os.path.abspath(self.mktemp())])
        self.assertEqual(str(e), f"twistd piccolo: the manhole (port 2299) needs an "
                                 f"authorized_keys file: [manhole] keys = FILE in {cfg}, "
                                 f"or --manhole-keys FILE")

    def test_ipv6_interface_in_brackets(self):
        from piccolo_twisted import manhole
        from .helpers import make_ssh_key
        d = os.path.abspath(self.mktemp())
        key = make_ssh_key(os.path.join(d, "admin"))
        keys = os.path.join(d, "authorized_keys")
        with open(keys, "wb") as f:
            f.write(key.public().toString("openssh") + b"\n")
        settings = load_server_config(text=f"[manhole]\nport = 2299\ninterface = ::1\n"
                                           f"keys = {keys}\nhost_key = {d}/state/hk\n")

        class Piccolo:
            def namespace(self):
                return {}
        Piccolo.settings = settings
        log = LogCapture(self)
        manhole.manhole_service(Piccolo())
        self.assertIn(f"manhole: SSH on [::1]:2299, user admin, keys from {keys}",
                      log.lines())
