"""The latest spectra: reduction to at most 1,024 points, the document, and
what control records while it runs batches and autointegration (on
task.Clock, with the device model of test_control); then the CoAP resource
after one batch over the wire."""

import json

from twisted.internet import defer
from twisted.trial import unittest

from piccolo_twisted.acquisition import live
from piccolo_twisted.acquisition.live import LiveSpectra, Snapshot, downsample, wavelengths

from .helpers import ServerTestCase, as_deferred
from .test_control import DARK, PIXELS, ControlTestCase

META = {"IntegrationTime": 100.0, "SaturationLevel": 1000, "Temperature": -10.0,
        "WavelengthCalibrationCoefficients": [300.0, 0.5]}


class ReductionTests(unittest.SynchronousTestCase):

    def test_small_detectors_unchanged(self):
        pixels = list(range(1024))
        self.assertEqual(downsample(pixels), pixels)
        self.assertEqual(wavelengths([300.0, 0.5], 3), [300.0, 300.5, 301.0])

    def test_2048_to_pairs_keeping_maxima(self):
        pixels = [i % 7 for i in range(2048)]
        pixels[1501] = 65535
        points = downsample(pixels)
        self.assertEqual(len(points), 1024)
        self.assertEqual(points, [max(pixels[2 * i], pixels[2 * i + 1]) for i in range(1024)])
        self.assertEqual(points[750], 65535)
        nm = wavelengths([300.0, 0.5], 2048)
        self.assertEqual((len(nm), nm[0], nm[-1]), (1024, 300.25, 300.0 + 0.5 * 2046.5))

    def test_qe_pro_1044(self):
        pixels = [10] * 1044
        pixels[1043] = 99              # the last pixel survives
        pixels[0] = 98
        points = downsample(pixels)
        self.assertEqual(len(points), 1024)
        self.assertEqual((points[0], points[-1], max(points)), (98, 99, 99))
        self.assertEqual(sum(b - a for a, b in zip(live.buckets(1044), live.buckets(1044)[1:])), 1044)
        nm = wavelengths([0.0, 1.0, 0.001], 1044)
        self.assertEqual(len(nm), 1024)
        self.assertTrue(all(a < b for a, b in zip(nm, nm[1:])))

    def test_document(self):
        pixels = [5] * 2000 + [1000] * 48
        doc = json.loads(Snapshot("S_x", "upwelling", "light", pixels, META, 0.0,
                                  run="r", batch=3, sequence=4).encode())
        self.assertEqual(doc["spectrometer"], "S_x")
        self.assertEqual(doc["channel"], "upwelling")
        self.assertEqual((doc["kind"], doc["dark"]), ("light", False))
        self.assertEqual((doc["integration_time"], doc["time"]), (100.0, "1970-01-01T00:00:00.000+00:00"))
        self.assertEqual((doc["saturated"], doc["saturation_level"], doc["peak"]), (48, 1000, 1000))
        self.assertEqual((doc["pixel_count"], len(doc["pixels"]), len(doc["wavelengths"])), (2048, 1024, 1024))
        self.assertEqual((doc["run"], doc["batch"], doc["sequence"], doc["temperature"]), ("r", 3, 4, -10.0))
        # the device's own count where its metadata has one (issue 20)
        doc = json.loads(Snapshot("S_x", "upwelling", "dark", pixels, dict(META, SaturatedPixels=3),
                                  0.0).encode())
        self.assertEqual((doc["saturated"], doc["dark"]), (3, True))
        # the instrument's calibration wins over the device's
        meta = dict(META, WavelengthCalibrationCoefficientsPiccolo=[400.0, 1.0])
        doc = json.loads(Snapshot("S_x", "upwelling", "light", [1, 2, 3], meta, 0.0).encode())
        self.assertEqual(doc["wavelengths"], [400.0, 401.0, 402.0])

    def test_encoded_once_in_a_worker_and_shared(self):
        calls = []
        pending = []

        def to_thread(fn):
            calls.append(fn)
            d = defer.Deferred()
            pending.append((d, fn))
            return d
        spectra = LiveSpectra(["S_x"], ["up"], to_thread=to_thread)
        empty = spectra.body("S_x", "up")
        self.assertEqual((empty["kind"], empty["pixels"]), (None, []))
        spectra.record("S_x", "up", "light", [1, 2, 3], META)
        d1, d2 = spectra.body("S_x", "up"), spectra.body("S_x", "up")
        self.assertEqual(len(calls), 1)
        self.assertNoResult(d1)
        d, fn = pending.pop()
        d.callback(fn())
        body = self.successResultOf(d1)
        self.assertEqual(self.successResultOf(d2), body)
        # made once: the next reader has it at once
        self.assertEqual(spectra.body("S_x", "up"), body)
        self.assertEqual(len(calls), 1)
        self.assertEqual(json.loads(spectra.body("S_x", "up"))["pixels"], [1, 2, 3])
        # a failing encode fails every waiter, and the next one asks again
        spectra.record("S_x", "up", "light", [4], META)
        d3 = spectra.body("S_x", "up")
        d, fn = pending.pop()
        d.errback(RuntimeError("boom"))
        self.failureResultOf(d3, RuntimeError)
        spectra.body("S_x", "up")
        self.assertEqual(len(calls), 3)

    def test_dark_kept_apart(self):
        spectra = LiveSpectra(["S_x"], ["up"])
        spectra.record("S_x", "up", "dark", [1], META)
        self.assertIsNone(spectra.body("S_x", "up")["kind"])     # no light yet
        spectra.record("S_x", "up", "light", [9], META)
        spectra.record("S_x", "up", "dark", [2], META)      # a batch ends with a dark
        self.assertEqual(json.loads(spectra.body("S_x", "up"))["pixels"], [9])
        self.assertEqual(json.loads(spectra.body("S_x", "up", dark=True))["pixels"], [2])
        spectra.record("S_x", "up", "autointegration", [7], META)    # a probe: light
        self.assertEqual(json.loads(spectra.body("S_x", "up"))["kind"], "autointegration")
        self.assertRaises(Exception, spectra.observable, "S_x", "sideways")


class ControlRecordsTests(ControlTestCase):
    """Control hands every spectrum it acquires to the live spectra."""

    def watch(self):
        seen = []
        live = self.control.live
        for obs in list(live.lights.values()) + list(live.darks.values()):
            obs.watch(lambda snap: seen.append(snap))
        return seen

    def test_batch(self):
        seen = self.watch()
        self.set_times(200)
        self.control.record_sequence(run="r", nsequence=2, auto=-1)
        self.run_until_idle()
        files = self.files("r")
        # every spectrum of every file went through, in the order recorded
        kinds = [(x.spectrometer, x.channel, x.kind, x.sequence) for x in seen]
        expected = []
        for name in ("b000000_s000000_dark.pico", "b000000_s000000_light.pico",
                     "b000000_s000001_light.pico", "b000000_s000001_dark.pico"):
            for sp in files[name]:
                m = sp["Metadata"]
                expected.append(("S_" + m["SerialNumber"], m["Direction"], m["Type"],
                                 m["SequenceNumber"]))
        self.assertEqual(kinds, expected)
        by_key = {}
        for x in seen:
            by_key[(x.spectrometer, x.channel, x.kind, x.sequence)] = x
        for name, spectra in files.items():
            for sp in spectra:
                m = sp["Metadata"]
                x = by_key[("S_" + m["SerialNumber"], m["Direction"], m["Type"], m["SequenceNumber"])]
                self.assertEqual(list(x.pixels), sp["Pixels"])
                doc = json.loads(x.encode())
                self.assertEqual((doc["integration_time"], doc["run"], doc["batch"]),
                                 (m["IntegrationTime"], "r", 0))
                self.assertEqual(doc["dark"], m["Dark"])
        # a batch ends with a dark set: the latest light is kept apart from
        # it (a page loaded after the batch shows what the fibre saw)
        for key, obs in self.control.live.lights.items():
            self.assertEqual((obs.value.kind, obs.value.sequence), ("light", 1))
            dark = self.control.live.darks[key].value
            self.assertEqual((dark.kind, dark.sequence), ("dark", 1))
            self.assertEqual(json.loads(self.control.live.body(*key))["kind"], "light")
        # a dark sequence changes the darks only
        lights = {k: o.value for k, o in self.control.live.lights.items()}
        self.control.record_dark(run="r")
        self.run_until_idle()
        for key, obs in self.control.live.lights.items():
            self.assertIs(obs.value, lights[key])
            self.assertEqual(self.control.live.darks[key].value.batch, 1)

    def test_autointegration_probes(self):
        seen = self.watch()
        self.control.auto(target=50)
        self.run_until_idle()
        probes = [x for x in seen if x.kind == "autointegration"]
        self.assertGreater(len(probes), 4)
        times = {x.metadata["IntegrationTime"] for x in probes}
        self.assertGreater(len(times), 1)       # the probes' own times
        self.assertEqual({x.channel for x in probes}, {"upwelling", "downwelling"})
        for x in probes:
            self.assertIsNone(x.run)
            self.assertGreater(max(x.pixels), DARK)       # shutter open: light
            self.assertEqual(len(x.pixels), PIXELS)

    def test_progress(self):
        seen = []
        self.control.progress.watch(seen.append)
        self.control.record_sequence(run="p", nsequence=3, auto=-1)
        self.run_until_idle()
        self.assertEqual(seen[0], dict(live_progress(), kind="batch"))
        self.assertIn({"kind": "batch", "run": "p", "batch": 0, "sequence": 2, "nsequence": 3}, seen)
        self.assertEqual(seen[-1], live_progress())
        seen.clear()
        self.control.record_dark(run="p")
        self.run_until_idle()
        self.assertIn({"kind": "dark sequence", "run": "p", "batch": 1, "sequence": 0,
                       "nsequence": 1}, seen)


def live_progress():
    from piccolo_twisted.acquisition.control import IDLE_PROGRESS
    return dict(IDLE_PROGRESS)


class WireTests(ServerTestCase):

    def test_last_spectrum_over_coap_after_one_batch(self):
        async def check():
            import aiocoap
            from .test_api_doc import parse_core
            r = await self.request("GET", ".well-known/core")
            links = dict(parse_core(r.payload.decode()))
            for s in ("S_sim_QEP00981", "S_sim_FLMT01234"):
                for c in ("upwelling", "downwelling"):
                    self.assertTrue(links[f"/spectrometer/{s}/last_spectrum/{c}"])
                    self.assertTrue(links[f"/spectrometer/{s}/last_dark/{c}"])
            before = await self.get("spectrometer/S_sim_QEP00981/last_spectrum/upwelling")
            self.assertEqual((before["kind"], before["pixels"]), (None, []))
            # observe one channel while a batch records
            msg = aiocoap.Message(code=aiocoap.GET, observe=0,
                                  uri=f"{self.base}/spectrometer/S_sim_FLMT01234/last_spectrum/downwelling")
            req = self.ctx.request(msg)
            first = await req.response
            self.assertIsNotNone(first.opt.observe)
            await self.put("control/record_sequence", {"run": "one", "nsequence": 1, "auto": -1})
            note = await asyncio_wait(req.observation.__aiter__().__anext__(), 10)
            self.assertIn(json.loads(note.payload)["kind"], ("dark", "light"))
            req.observation.cancel()
            await self.wait_for("control/status", lambda s: s == "idle")
            for s, n in (("S_sim_QEP00981", 1044), ("S_sim_FLMT01234", 2048)):
                for c in ("upwelling", "downwelling"):
                    doc = await self.get(f"spectrometer/{s}/last_spectrum/{c}")
                    self.assertEqual(list(doc)[:3], ["spectrometer", "channel", "kind"])
                    self.assertEqual((doc["spectrometer"], doc["channel"], doc["kind"], doc["dark"]),
                                     (s, c, "light", False))
                    self.assertEqual((doc["pixel_count"], len(doc["pixels"]), len(doc["wavelengths"])),
                                     (n, 1024, 1024))
                    self.assertEqual(doc["integration_time"], 100.0)
                    self.assertIsInstance(doc["saturated"], int)
                    self.assertEqual(doc["peak"], max(doc["pixels"]))
                    self.assertEqual((doc["run"], doc["batch"], doc["sequence"]), ("one", 0, 0))
                    self.assertTrue(doc["time"].endswith("+00:00"))
                    dark = await self.get(f"spectrometer/{s}/last_dark/{c}")
                    self.assertEqual((dark["kind"], dark["dark"]), ("dark", True))
                    self.assertLess(max(dark["pixels"]), doc["peak"])
            # the file of the batch holds the same peak
            files = self.load_run("one")
            light = files["b000000_s000000_light.pico"]["Spectra"]
            peaks = {(sp["Metadata"]["SerialNumber"], sp["Metadata"]["Direction"]): max(sp["Pixels"])
                     for sp in light}
            doc = await self.get("spectrometer/S_sim_QEP00981/last_spectrum/upwelling")
            self.assertEqual(doc["peak"], peaks[("sim_QEP00981", "upwelling")])
            # a batch of two sequences ends with a dark set: last_spectrum is
            # still the latest light one, last_dark that final dark
            await self.put("control/record_sequence", {"run": "two", "nsequence": 2, "auto": -1})
            await self.wait_for("control/status", lambda s: s == "idle")
            files = self.load_run("two")
            for s in ("S_sim_QEP00981", "S_sim_FLMT01234"):
                for c in ("upwelling", "downwelling"):
                    doc = await self.get(f"spectrometer/{s}/last_spectrum/{c}")
                    self.assertEqual((doc["kind"], doc["dark"], doc["run"], doc["sequence"]),
                                     ("light", False, "two", 1))
                    dark = await self.get(f"spectrometer/{s}/last_dark/{c}")
                    self.assertEqual((dark["kind"], dark["dark"], dark["sequence"]),
                                     ("dark", True, 1))
                    for name, got in (("b000000_s000001_light.pico", doc),
                                      ("b000000_s000001_dark.pico", dark)):
                        [sp] = [sp for sp in files[name]["Spectra"]
                                if "S_" + sp["Metadata"]["SerialNumber"] == s
                                and sp["Metadata"]["Direction"] == c]
                        self.assertEqual(got["peak"], max(sp["Pixels"]))
            r = await self.request("GET", "spectrometer/S_sim_QEP00981/last_spectrum/sideways")
            self.assertEqual(str(r.code), "4.04 Not Found")
            r = await self.request("GET", "spectrometer/S_sim_QEP00981/last_spectrum")
            self.assertEqual(str(r.code), "4.04 Not Found")
            r = await self.request("PUT", "spectrometer/S_sim_QEP00981/last_spectrum/upwelling", 1)
            self.assertEqual(str(r.code), "4.05 Method Not Allowed")
        return as_deferred(check())


class StatusPeaksTests(ServerTestCase):

    def test_status_shows_the_latest_peaks(self):
        async def check():
            import io
            import re
            from piccolo_twisted.cli.main import run
            out, err = io.StringIO(), io.StringIO()
            self.assertEqual(await run(["--server", self.base, "status"], out=out, err=err), 0)
            self.assertRegex(out.getvalue(), r"(?m)^\s+latest peak: -$")
            await self.put("spectrometer/S_sim_FLMT01234/current_time/downwelling", 500)
            await self.put("control/record_sequence", {"run": "peaks", "nsequence": 1, "auto": -1})
            await self.wait_for("control/status", lambda s: s == "idle")
            out = io.StringIO()
            self.assertEqual(await run(["--server", self.base, "status"], out=out, err=err), 0)
            lines = out.getvalue().splitlines()
            flame = lines[[i for i, l in enumerate(lines) if l.startswith("S_sim_FLMT01234")][0] + 1]
            # channels in legacy (sorted) order (issue 21)
            m = re.match(r"^\s+latest peak: downwelling (?P<down>\d+) \(light, 500 ms, "
                         r"(?P<saturated>\d+) saturated; dark (?P<ddown>\d+)\), "
                         r"upwelling (?P<up>\d+) \(light, 100 ms; dark (?P<dup>\d+)\)$", flame)
            self.assertIsNotNone(m, flame)
            light = self.load_run("peaks")["b000000_s000000_light.pico"]["Spectra"]
            files = {sp["Metadata"]["Direction"]: sp["Pixels"] for sp in light
                     if sp["Metadata"]["SerialNumber"] == "sim_FLMT01234"}
            self.assertEqual(int(m.group("up")), max(files["upwelling"]))
            self.assertEqual(int(m.group("down")), 65535)
            self.assertEqual(int(m.group("saturated")),
                             sum(1 for v in files["downwelling"] if v >= 65535))
            dark = self.load_run("peaks")["b000000_s000000_dark.pico"]["Spectra"]
            darks = {sp["Metadata"]["Direction"]: sp["Pixels"] for sp in dark
                     if sp["Metadata"]["SerialNumber"] == "sim_FLMT01234"}
            self.assertEqual(int(m.group("dup")), max(darks["upwelling"]))
            self.assertEqual(int(m.group("ddown")), max(darks["downwelling"]))
            # a batch ends with a dark set: status still shows the light peaks
            await self.put("control/record_sequence", {"run": "peaks", "nsequence": 2, "auto": -1})
            await self.wait_for("control/status", lambda s: s == "idle")
            out = io.StringIO()
            self.assertEqual(await run(["--server", self.base, "status"], out=out, err=err), 0)
            self.assertRegex(out.getvalue(), r"latest peak: downwelling 65535 \(light, 500 ms, "
                                             r"\d+ saturated; dark \d+\), upwelling \d+ \(light")
        return as_deferred(check())


def asyncio_wait(aw, timeout):
    import asyncio
    return asyncio.wait_for(aw, timeout)


class FakeClient:
    """The CLI's client interface over a dict of values; notifications on
    demand (``notify(path)``)."""

    def __init__(self, values):
        import asyncio
        self.values = values
        self.queues = {}
        self.asyncio = asyncio

    async def get(self, path):
        from piccolo_twisted.cli.errors import Refused
        if path not in self.values:
            raise Refused(f"4.04 /{path}")
        return self.values[path]

    def observe(self, path):
        client = self
        queue = self.queues.setdefault(path, self.asyncio.Queue())

        class Observation:
            async def start(self):
                return client.values.get(path)

            async def next(self, timeout=None):
                return await queue.get()

            def cancel(self):
                pass
        return Observation()

    def notify(self, path):
        self.queues[path].put_nowait(self.values.get(path))


class WatchScreensTests(unittest.TestCase):
    """status --watch prints a screen when what it shows changed, not at
    every notification (a status that changed and came back, a run set to
    the same name: the same screen again and again)."""

    def test_identical_screens_not_repeated(self):
        import asyncio
        import io
        from piccolo_twisted.cli import commands
        values = {"control/status": "idle", "control/current_sequence": -1,
                  "control/numSequences": 1, "data_dir/current_run": "r",
                  "control/fault": "", "spectrometer/spectrometers": ["S_a"],
                  "spectrometer/channels": ["up"], "shutter/shutters": [],
                  "control/scheduler/jobs": [], "control/scheduler/quietTimeEnabled": False,
                  "spectrometer/S_a/status": 6, "spectrometer/S_a/haveTEC": False,
                  "spectrometer/S_a/current_time/up": 100,
                  "spectrometer/S_a/last_spectrum/up": {"peak": 500, "kind": "light",
                                                        "integration_time": 100, "saturated": 0},
                  "spectrometer/S_a/last_dark/up": {"peak": 90}}
        client = FakeClient(values)
        out = io.StringIO()

        async def go():
            task = asyncio.ensure_future(commands.status(client, out, watch=True, updates=1,
                                                         refresh=60))
            while "control/status" not in client.queues or "S_a" not in out.getvalue():
                await asyncio.sleep(0.01)
            for _ in range(3):          # notified, nothing shown changed
                client.notify("control/status")
                client.notify("data_dir/current_run")
                await asyncio.sleep(0.1)
            self.assertEqual(out.getvalue().count("-- "), 0, out.getvalue())
            values["data_dir/current_run"] = "r2"
            client.notify("data_dir/current_run")
            self.assertEqual(await asyncio.wait_for(task, 5), 0)
        return as_deferred(go()).addCallback(lambda _: self._check(out.getvalue()))

    def _check(self, text):
        screens = text.split("\n-- ")
        self.assertEqual(len(screens), 2, text)
        self.assertIn("run r2", screens[1])
        self.assertIn("latest peak: up 500 (light, 100 ms; dark 90)", screens[0])
