"""Data a scientist can trust (issue 20): saturation and the detector
temperature flagged in every spectrum and in the batch's summary, the
legacy detector defaults, the simulator honouring each channel's
calibration, and the files still read by the deployed piccolo3-common
parser."""

import asyncio
import json
import os

import numpy as np
from twisted.trial import unittest

from piccolo_twisted.config import bundled_instrument_config, load_instrument_config
from piccolo_twisted.instrument.device import acquire_clean
from piccolo_twisted.instrument.simulator import Optics, SimulatedSpectrometer

from . import legacy_pico
from .helpers import ServerTestCase
from .test_wire import coro

LEGACY_CONFIG = """
[channels]
  [[shutter_1]]
    direction = upwelling
[spectrometers]
  [[QEP00981]]
"""


class LegacyDefaultsTests(unittest.SynchronousTestCase):
    """A legacy piccolo.config that omits them: the legacy server's defaults
    (piccolo3-server's PiccoloConfig spec: ``detectorSetTemperature =
    float(default=-10.0)``, ``fan = boolean(default=True)``): a QE Pro is
    cooled to -10 °C, not left uncooled at 0."""

    def test_detector_defaults(self):
        cfg = load_instrument_config(text=LEGACY_CONFIG)
        [s] = cfg.spectrometers
        self.assertEqual((s.set_temperature, s.fan), (-10.0, True))
        self.assertEqual((s.temperature_tolerance, s.wait_for_temperature), (2.0, 0.0))

    def test_tolerance_and_wait_per_spectrometer(self):
        cfg = load_instrument_config(text=LEGACY_CONFIG + "    temperature_tolerance = 0.5\n"
                                     "    wait_for_temperature = 10\n")
        [s] = cfg.spectrometers
        self.assertEqual((s.temperature_tolerance, s.wait_for_temperature), (0.5, 10.0))


class FlagTests(unittest.SynchronousTestCase):

    def test_saturated_pixels_in_the_same_units(self):
        from piccolo_twisted.instrument.spectrometer import saturated_pixels
        self.assertEqual(saturated_pixels([0, 65534, 65535, 70000], 65535), 2)
        self.assertEqual(saturated_pixels([], 65535), 0)

    def test_temperature_stable(self):
        from piccolo_twisted.instrument.spectrometer import temperature_stable
        self.assertTrue(temperature_stable(True, -9.0, -10.0, 2.0))
        self.assertTrue(temperature_stable(True, -8.0, -10.0, 2.0))
        self.assertFalse(temperature_stable(True, 0.5, -10.0, 2.0))
        self.assertFalse(temperature_stable(True, None, -10.0, 2.0))
        self.assertTrue(temperature_stable(False, 16.0, -10.0, 2.0))   # no cooling asked


class CalibrationTests(unittest.SynchronousTestCase):
    """The default sim_QEP00981 has its own calibration for upwelling
    (``wavelengthCalibrationCoefficientsPiccolo``, 345-805 nm) and the
    device's for downwelling (195-1000 nm). The same sky seen through each
    channel puts the O2-A band (760.5 nm) and H-alpha (656.3 nm) at the
    same wavelength by each channel's calibration (they were at ~770 and
    ~670 nm by the upwelling one)."""

    def line(self, pixels, wavelengths, centre):
        near = (wavelengths > centre - 8) & (wavelengths < centre + 8)
        i = np.argmin(np.where(near, pixels, np.inf))
        return wavelengths[i]

    def test_lines_at_their_wavelength_in_every_channel(self):
        cfg = load_instrument_config(bundled_instrument_config())
        sc = next(s for s in cfg.spectrometers if s.serial == "sim_QEP00981")
        self.assertIn("upwelling", sc.calibration)
        self.assertNotIn("downwelling", sc.calibration)
        for channel in ("upwelling", "downwelling"):
            optics = Optics()
            optics.set_lit(channel, True, when=0.0)
            dev = SimulatedSpectrometer(sc.serial, optics, time_scale=0.01)
            dev.calibrations = dict(sc.calibration)
            info = dev.open()
            reading = acquire_clean(dev, 20, info.min_time)
            coefficients = sc.calibration.get(channel, info.wavelength_coefficients)
            nm = np.polynomial.polynomial.polyval(np.arange(info.pixels), coefficients)
            pixels = np.asarray(reading.pixels, float)
            for centre in (656.3, 760.5):
                self.assertLess(abs(self.line(pixels, nm, centre) - centre), 1.0,
                                (channel, centre))


class TrustWireTests(ServerTestCase):
    """A batch on the embedded default at 100 ms without autointegration:
    the downwelling channel saturates (the issue found 595 QE Pro and 1,302
    Flame pixels, and `record` said only "1 sequence recorded"); the QE
    Pro's set point is moved so that its detector is far from it."""

    @coro
    async def test_saturated_and_unstable_spectra_flagged(self):
        qep, flame = "S_sim_QEP00981", "S_sim_FLMT01234"
        await self.put(f"spectrometer/{qep}/target_temperature", 35.0)
        await self.put("control/record_sequence", {"run": "sat", "nsequence": 1, "auto": -1})
        await self.wait_for("control/status", lambda s: s == "idle")
        files = self.load_run("sat")
        self.assertEqual(sorted(files), ["b000000_s000000_dark.pico",
                                         "b000000_s000000_light.pico"])
        for name in files:
            with open(os.path.join(self.run_dir("sat"), name)) as f:
                legacy_pico.parse_file(f.read())            # the deployed parser reads it
        saturated, unstable = [], []
        for name, doc in files.items():
            for s in doc["Spectra"]:
                meta, pixels = s["Metadata"], s["Pixels"]
                self.assertEqual(meta["SaturatedPixels"],
                                 sum(p >= meta["SaturationLevel"] for p in pixels))
                spec = "S_" + meta["SerialNumber"]
                if meta["SaturatedPixels"]:
                    saturated.append((spec, meta["Direction"], meta["Type"]))
                if spec == qep:
                    self.assertIs(meta["TemperatureEnabled"], True)
                    self.assertEqual(meta["TemperatureSetPoint"], 35.0)
                    self.assertEqual(meta["TemperatureTolerance"], 2.0)
                    self.assertIsInstance(meta["Temperature"], float)
                    self.assertGreater(abs(meta["Temperature"] - 35.0), 2.0)
                    self.assertIs(meta["TemperatureStable"], False)
                    unstable.append((spec, meta["Direction"], meta["Type"]))
                else:
                    self.assertIsNone(meta["Temperature"])
                    self.assertIsNone(meta["TemperatureSetPoint"])
                    self.assertIs(meta["TemperatureStable"], True)
                # the deployed parser agrees about saturation
                legacy = legacy_pico.parse_spectrum(s)
                start, end = legacy["optical"]
                optical = sum(p >= meta["SaturationLevel"] for p in pixels[start:end])
                self.assertTrue(legacy["isSaturated"] or not optical)
                self.assertEqual(legacy["metadata"]["SaturatedPixels"], meta["SaturatedPixels"])
        self.assertIn((qep, "downwelling", "light"), saturated)
        self.assertIn((flame, "downwelling", "light"), saturated)
        self.assertNotIn((qep, "upwelling", "dark"), saturated)
        # the batch's summary says it all without opening a file
        summary = await self.get("control/last_batch")
        self.assertEqual((summary["kind"], summary["run"], summary["batch"],
                          summary["sequences"]), ("batch", "sat", 0, 1))
        self.assertEqual(sorted(summary["files"]), sorted(files))
        self.assertEqual(summary["saturated_spectra"], len(saturated))
        self.assertEqual(sorted((e["spectrometer"], e["channel"], e["type"])
                                for e in summary["saturated"]), sorted(saturated))
        self.assertTrue(all(e["sequences"] == [[0, 0]] and e["spectra"] == 1
                            and e["pixels_min"] > 0 for e in summary["saturated"]))
        self.assertEqual(summary["temperature_unstable_spectra"], len(unstable))
        self.assertEqual(sorted((e["spectrometer"], e["channel"], e["type"])
                                for e in summary["temperature_unstable"]), sorted(unstable))
        for e in summary["temperature_unstable"]:
            self.assertEqual((e["set_point"], e["tolerance"]), (35.0, 2.0))
            self.assertGreater(abs(e["temperature_max"] - 35.0), 2.0)
        self.assertEqual(summary["integration_times"],
                         {qep: {"upwelling": [100.0], "downwelling": [100.0]},
                          flame: {"upwelling": [100.0], "downwelling": [100.0]}})
        self.assertEqual((summary["faults"], summary["aborted"]), ([], False))
        self.assertLessEqual(summary["start"], summary["end"])
        health = await self.get("sysinfo/health")
        self.assertEqual(health["last_batch_summary"], summary)

    @coro
    async def test_temperature_known_while_recording(self):
        """During a batch health and status showed no temperature ("?" and
        "-") while the detector answered 11.55 °C; the spectrometer reads
        it between integrations on its own thread and everyone shows that
        reading with its age."""
        qep = "S_sim_QEP00981"
        await self.put("control/record_sequence",
                       {"run": "t", "nsequence": 3, "auto": -1, "delay": 1.0})
        await self.wait_for("control/status", lambda s: s != "idle")
        seen = await self.wait_for(
            "sysinfo/health",
            lambda h: h["spectrometers"]["sim_QEP00981"]["temperature"] is not None)
        entry = seen["spectrometers"]["sim_QEP00981"]
        self.assertIsInstance(entry["temperature_age"], (int, float))
        self.assertEqual(entry["temperature_target"], -10.0)
        self.assertIn(entry["status"], ("RECORDING", "IDLE"))
        self.assertNotEqual(await self.get("control/status"), "idle")
        last = await self.get(f"spectrometer/{qep}/last_temperature")
        self.assertIsInstance(last["temperature"], float)
        self.assertGreaterEqual(last["age"], 0.0)
        self.assertEqual((last["target"], last["enabled"], last["tolerance"]),
                         (-10.0, True, 2.0))
        r = await self.request("GET", "spectrometer/S_sim_FLMT01234/last_temperature")
        self.assertEqual(r.code.dotted, "4.00")
        await self.get("control/abort")


class WaitForTemperatureTests(ServerTestCase):
    """``wait_for_temperature``: the batch waits (status "waiting for
    temperature") until the detector is within its tolerance, up to that
    many minutes, then records."""

    instrument_text = """
[channels]
  [[shutter_1]]
    direction = upwelling
[spectrometers]
  [[sim_QEP00981]]
    detectorSetTemperature = 30.0
    temperature_tolerance = 3.0
    wait_for_temperature = 0.5
"""

    @coro
    async def test_batch_waits_for_the_set_point(self):
        statuses = []
        obs_task = asyncio.ensure_future(self._collect_status(statuses))
        try:
            await self.put("control/record_sequence", {"run": "w", "nsequence": 1, "auto": -1})
            await self.wait_for("control/status", lambda s: s == "idle", timeout=40)
        finally:
            obs_task.cancel()
        summary = await self.get("control/last_batch")
        self.assertIn("waiting for temperature", statuses)
        self.assertGreater(summary["temperature_wait"], 0)
        files = self.load_run("w")
        for doc in files.values():
            for s in doc["Spectra"]:
                meta = s["Metadata"]
                self.assertLessEqual(abs(meta["Temperature"] - 30.0), 3.0 + 0.5)

    async def _collect_status(self, statuses):
        while True:
            statuses.append(await self.get("control/status"))
            await asyncio.sleep(0.02)


class LegacyParserTests(unittest.SynchronousTestCase):
    """What the deployed parser needs of a file (tests/legacy_pico.py says
    how it parses, line by line); with PICCOLO3_COMMON set to a checkout of
    piccolo3-common, the real parser is run on the same file."""

    def spectrum(self, pixels, **meta):
        base = {"Direction": "downwelling", "Dark": False, "Type": "light",
                "Datetime": "2026-11-25T12:50:40.000802+0000", "SerialNumber": "QEP00981",
                "SaturationLevel": 65535, "SaturatedPixels": 0, "DarkPixels": [0, 1, 8, 9],
                "NonlinearityCorrectionCoefficients": [1.0, 0.0, 0.0, 0.0],
                "WavelengthCalibrationCoefficients": [300.0, 1.0, 0.0, 0.0],
                "TemperatureStable": True, "SequenceNumber": 0, "Batch": 0, "Run": "r"}
        base.update(meta)
        return {"Metadata": base, "Pixels": pixels}

    def test_a_float_pixel_would_be_truncated(self):
        """The parser makes the pixels ``numpy.array(values, dtype=int)``:
        a pixel of 65534.9 becomes 65534, below the saturation level."""
        ok = legacy_pico.parse_spectrum(self.spectrum([10] * 8 + [65535, 10]))
        self.assertTrue(ok["isSaturated"] is False)     # the sample is a dark pixel
        bad = self.spectrum([10, 10, 65534.9] + [10] * 7)
        self.assertRaises(legacy_pico.Lossy, legacy_pico.parse_spectrum, bad)
        sat = legacy_pico.parse_spectrum(self.spectrum([10, 10, 65535] + [10] * 7))
        self.assertTrue(sat["isSaturated"])


class SummaryTests(unittest.SynchronousTestCase):
    """A long batch's summary stays small: flagged spectra by spectrometer,
    channel and type, their sequences as ranges."""

    def test_grouped_with_sequence_ranges(self):
        from piccolo_twisted.acquisition.summary import BatchSummary
        s = BatchSummary("batch", "r", 1.0e9)
        s.batch = 4
        for seq in list(range(0, 1000)) + [1002]:
            s.spectrum("S_a", {"Direction": "downwelling", "Dark": False, "SequenceNumber": seq,
                               "IntegrationTime": 100.0, "SaturatedPixels": 500 + seq % 3,
                               "SaturationLevel": 65535, "TemperatureStable": True})
        s.finish(1.0e9 + 60, False)
        d = s.as_dict()
        self.assertEqual(d["saturated_spectra"], 1001)
        [e] = d["saturated"]
        self.assertEqual((e["sequences"], e["pixels_min"], e["pixels_max"]),
                         ([[0, 999], [1002, 1002]], 500, 502))
        self.assertLess(len(json.dumps(d)), 1000)
        self.assertEqual(d["integration_times"], {"S_a": {"downwelling": [100.0]}})


class PlotTests(unittest.SynchronousTestCase):
    """``piccolo3 plot`` as a reader of a paper needs it."""

    def write(self, directory, name, spectra):
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            json.dump({"Spectra": spectra}, f)
        return path

    def spectrum(self, seq, dark, pixels, ms=100.0, **extra):
        meta = {"SerialNumber": "QEP1", "Direction": "upwelling", "Dark": dark,
                "Type": "dark" if dark else "light", "Run": "r", "Batch": 2,
                "SequenceNumber": seq, "IntegrationTime": ms, "SaturationLevel": 1000,
                "DarkPixels": [0], "Datetime": "2026-11-25T12:50:40.000802+0000",
                "WavelengthCalibrationCoefficients": [400.0, 1.0, 0.0, 0.0]}
        meta.update(extra)
        return {"Metadata": meta, "Pixels": pixels}

    def plot(self, *argv):
        import io
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from piccolo_twisted.cli.main import run
        figures = []
        real_close = plt.close
        self.patch(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
        out, err = io.StringIO(), io.StringIO()
        # a loop of its own, never installed (asyncio.run would leave the
        # thread without the reactor's loop for the tests after this)
        loop = asyncio.new_event_loop()
        try:
            code = loop.run_until_complete(run(list(argv), out=out, err=err))
        finally:
            loop.close()
        return code, err.getvalue(), figures

    def test_dark_subtracted_saturation_and_temperature(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        self.write(tmp, "b000002_s000000_dark.pico", [self.spectrum(0, True, [5, 100, 100, 100])])
        self.write(tmp, "b000002_s000000_dark.pico".replace("s000000", "s000003"),
                   [self.spectrum(3, True, [5, 120, 120, 120], ms=50.0)])
        light = self.write(tmp, "b000002_s000002_light.pico", [self.spectrum(
            2, False, [5, 600, 1000, 700], TemperatureStable=False, Temperature=4.5,
            TemperatureSetPoint=-10.0)])
        png = os.path.join(tmp, "p.png")
        code, err, figures = self.plot("plot", "--dark", light, "-o", png)
        self.assertEqual(code, 0, err)
        [ax] = figures[0].axes
        line = ax.get_lines()[0]
        # the dark of sequence 0 at the same 100 ms, found beside the file;
        # the electric dark pixel 0 left out
        self.assertTrue(np.isnan(line.get_ydata()[0]))
        self.assertEqual(list(line.get_ydata()[1:]), [500.0, 900.0, 600.0])
        self.assertEqual(list(line.get_xdata()), [400.0, 401.0, 402.0, 403.0])
        self.assertEqual(ax.get_ylabel(), "dark-subtracted counts")
        self.assertEqual(ax.get_xlabel(), "wavelength (nm)")
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        self.assertIn("b2 s2 upwelling light (100 ms) − dark s0\n"
                      "  TEMPERATURE UNSTABLE: 4.5 °C, set point -10 °C", legend)
        self.assertIn("  saturated: 1 pixels (shaded)", legend)
        title = figures[0].get_suptitle()
        self.assertIn("run r, batch 2, sequence 2", title)
        self.assertIn("2026-11-25 12:50:40 UTC", title)
        # the legend is beside the data, not over it
        self.assertGreaterEqual(ax.get_legend().get_bbox_to_anchor().x0,
                                ax.get_window_extent().x1)

    def test_no_matching_dark_is_one_line(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        light = self.write(tmp, "b000002_s000002_light.pico",
                           [self.spectrum(2, False, [5, 600, 900, 700], ms=30.0)])
        code, err, _ = self.plot("plot", "--dark", light, "-o", os.path.join(tmp, "p.png"))
        self.assertEqual(code, 1)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        self.assertIn("no dark spectrum for QEP1 upwelling at 30.0 ms", err)

    def test_per_ms(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        light = self.write(tmp, "b000002_s000002_light.pico",
                           [self.spectrum(2, False, [5, 600, 900, 700], ms=50.0)])
        code, err, figures = self.plot("plot", "--per-ms", light, "-o",
                                       os.path.join(tmp, "p.png"))
        self.assertEqual(code, 0, err)
        ax = figures[0].axes[0]
        self.assertEqual(ax.get_ylabel(), "counts/ms")
        self.assertEqual(list(ax.get_lines()[0].get_ydata()[1:]), [12.0, 18.0, 14.0])
