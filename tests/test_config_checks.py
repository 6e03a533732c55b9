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
