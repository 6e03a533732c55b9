"""The whole server on emulated USB spectrometers (``[seabreeze] emulate``):
the real driver path -- seabreeze, pyseabreeze, pyusb, the device
protocols -- under batches with autointegration, over the wire; and a
device unplugged mid-batch, then re-enumerating."""

import asyncio
import os
import threading
import zlib
from collections import deque

import numpy as np
from twisted.trial import unittest

from piccolo_twisted.instrument import spectrometer as sp
from piccolo_twisted.instrument.seabreeze_driver import OBP_GET_BUFFERED_SPECTRUM_META

from .helpers import ServerTestCase
from .test_wire import coro

QEP, FLAME = "QEP01234", "FLMT05678"
SERVER = f"[seabreeze]\nemulate = QEPRO:{QEP}, USB2000PLUS:{FLAME}\n"
INSTRUMENT = f"""
[channels]
  [[shutter_1]]
    direction = upwelling
  [[shutter_2]]
    direction = downwelling
[spectrometers]
  [[{QEP}]]
  [[{FLAME}]]
"""
LONG = os.environ.get("PICCOLO_LONG") == "1"


class EmulatedServerTests(ServerTestCase):
    server_text = SERVER
    instrument_text = INSTRUMENT

    @coro
    async def test_batch_with_autointegration(self):
        """The .pico metadata come from seabreeze; every spectrum's
        IntegrationTime is the time the emulated device integrated it at."""
        emulated = self.service.instrument.emulated
        self.assertEqual(await self.get(f"spectrometer/S_{QEP}/min_time"), 8)
        self.assertEqual(await self.get(f"spectrometer/S_{FLAME}/min_time"), 1)
        # seabreeze's maxima (1600 s, 655.35 s) are exclusive in pyseabreeze
        self.assertEqual(await self.get(f"spectrometer/S_{QEP}/max_time"), 1599999)
        self.assertEqual(await self.get(f"spectrometer/S_{FLAME}/max_time"), 655349)
        self.assertIs(await self.get(f"spectrometer/S_{QEP}/haveTEC"), False)
        for device in emulated.values():
            device.sent = deque(maxlen=4096)      # every exposure read out
        await self.put("control/record_sequence",
                       {"run": "emu", "nsequence": 2, "auto": 0, "target": 60})
        await self.wait_for("control/status", lambda s: s == "idle", timeout=30)
        files = self.load_run("emu")
        self.assertIn("b000000_s000000_dark.pico", files)
        self.assertIn("b000000_s000001_light.pico", files)
        expect = {QEP: ("QEPRO", 1044, [0, 1, 2, 3, 1040, 1041, 1042, 1043]),
                  FLAME: ("USB2000PLUS", 2048, list(range(6, 21)))}
        for name, doc in files.items():
            self.assertEqual(len(doc["Spectra"]), 4)
            for s in doc["Spectra"]:
                meta = s["Metadata"]
                model, pixels, dark = expect[meta["SerialNumber"]]
                self.assertEqual((meta["Model"], len(s["Pixels"]), meta["DarkPixels"]),
                                 (model, pixels, dark))
                # the exposure these counts came from, by content: a
                # USB2000+'s counts are seabreeze's, raw x 65535 / its EEPROM
                # saturation level, rounded (one to one: the factor is > 1)
                counts = np.asarray(s["Pixels"], dtype=np.int64)
                device = emulated[meta["SerialNumber"]]
                if meta["Model"] == "USB2000PLUS":
                    counts = np.rint(counts * device.saturation() / 65535.0).astype(np.int64)
                crc = zlib.crc32(counts.tobytes())
                micros = [e.micros for e in emulated[meta["SerialNumber"]].sent
                          if e.crc == crc]
                self.assertEqual(micros, [meta["IntegrationTime"] * 1000], name)
        light = files["b000000_s000000_light.pico"]["Spectra"]
        dark = files["b000000_s000000_dark.pico"]["Spectra"]
        for l_spec, d_spec in zip(light, dark):
            self.assertEqual(l_spec["Metadata"]["SerialNumber"],
                             d_spec["Metadata"]["SerialNumber"])
            self.assertGreater(max(l_spec["Pixels"]), 3 * max(d_spec["Pixels"]))
        # autointegration chose times other than the start value
        times = {s["Metadata"]["IntegrationTime"] for s in light}
        self.assertNotEqual(times, {float(sp.DEFAULT_TIME)})

    @coro
    async def test_unplug_mid_batch_and_recovery(self):
        sp.RECONNECT_INTERVAL, saved = 0.15, sp.RECONNECT_INTERVAL
        self.addCleanup(setattr, sp, "RECONNECT_INTERVAL", saved)
        device = self.service.instrument.emulated[QEP]
        await self.put(f"spectrometer/S_{QEP}/current_time/upwelling", 4000)
        # the QE Pro vanishes once the batch has asked it for a spectrum and
        # before the answer (mid-read), whatever the load on the host: on
        # the host's clock (50 ms after RECORDING was seen) the batch could
        # be over before the unplug
        length, get_spectrum = device.handlers[OBP_GET_BUFFERED_SPECTRUM_META]
        asked = threading.Event()

        def unplug_when_asked(payload):
            answer = get_spectrum(payload)
            if not asked.is_set():
                asked.set()
                device.unplug()
            return answer
        device.handlers[OBP_GET_BUFFERED_SPECTRUM_META] = (length, unplug_when_asked)
        await self.put("control/record_sequence", {"run": "gone", "nsequence": 1,
                                                   "auto": -1})
        await self.wait_for(f"spectrometer/S_{QEP}/status", lambda s: s == sp.DROPPED,
                            timeout=5, interval=0.02)
        self.assertTrue(asked.is_set())
        await self.wait_for("control/status", lambda s: s == "idle", timeout=20)
        # it stays away while unplugged (a reconnect attempt may be under
        # way when asked: CONNECTING, then DROPPED again); back when it
        # re-enumerates
        await asyncio.sleep(1.5 * sp.RECONNECT_INTERVAL)
        self.assertEqual(await self.wait_for(f"spectrometer/S_{QEP}/status",
                                             lambda s: s != sp.CONNECTING,
                                             timeout=5, interval=0.02), sp.DROPPED)
        device.replug()
        await self.wait_for(f"spectrometer/S_{QEP}/status", lambda s: s == sp.IDLE,
                            timeout=10, interval=0.05)
        await self.put(f"spectrometer/S_{QEP}/current_time/upwelling", 20)
        await self.put("control/record_sequence", {"run": "back", "nsequence": 1,
                                                   "auto": -1})
        await self.wait_for("control/status", lambda s: s == "idle", timeout=20)
        serials = {s["Metadata"]["SerialNumber"]
                   for s in self.load_run("back")["b000000_s000000_light.pico"]["Spectra"]}
        self.assertEqual(serials, {QEP, FLAME})


class ListSpecTests(unittest.TestCase):
    """``piccolo3-list-spec -c CFG`` lists the emulated devices."""

    def test_list_spec(self):
        import contextlib
        import io
        import tempfile
        from piccolo_twisted.tools import list_spec
        with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as f:
            f.write(SERVER)
        self.addCleanup(os.unlink, f.name)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(list_spec.main(["-c", f.name]), 0)
        from piccolo_twisted.instrument import usb_emulator
        for serial in (QEP, FLAME):
            usb_emulator.remove_device(usb_emulator.BUS.device(serial))
        self.assertEqual(out.getvalue().splitlines(),
                         [f"QEPRO\t{QEP}", f"USB2000PLUS\t{FLAME}"])
