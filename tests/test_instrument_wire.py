"""/shutter and /spectrometer over real CoAP on the embedded default."""

import asyncio
import json
import time

from piccolo_twisted.instrument import spectrometer as sp

from .helpers import ServerTestCase
from .test_wire import coro

QEP = "S_sim_QEP00981"
FLAME = "S_sim_FLMT01234"


class ShutterWireTests(ServerTestCase):

    @coro
    async def test_shutter_resources(self):
        self.assertEqual(await self.get("shutter/shutters"), ["downwelling", "upwelling"])
        for ch in ("upwelling", "downwelling"):
            self.assertEqual(await self.get(f"shutter/{ch}/status"), "closed")
            self.assertIs(await self.get(f"shutter/{ch}/reverse"), False)
        self.assertEqual(await self.get("shutter/upwelling/fibre_diameter"), 600.0)
        await self.put("shutter/upwelling/open_shutter")
        self.assertEqual(await self.get("shutter/upwelling/status"), "open")
        await self.put("shutter/upwelling/open_shutter", False)
        self.assertEqual(await self.get("shutter/upwelling/status"), "closed")
        await self.put("shutter/upwelling/close_shutter", False)
        self.assertEqual(await self.get("shutter/upwelling/status"), "open")
        await self.put("shutter/upwelling/close_shutter")
        self.assertEqual(await self.get("shutter/upwelling/status"), "closed")

    @coro
    async def test_bad_shutter_values(self):
        import aiocoap
        for bad in ("yes", 3, [1, 2], {"x": 1}):
            r = await self.request("PUT", "shutter/upwelling/open_shutter", bad)
            self.assertEqual(r.code, aiocoap.BAD_REQUEST, bad)
        self.assertEqual(await self.get("shutter/upwelling/status"), "closed")
        r = await self.request("GET", "shutter/sideways/status")
        self.assertEqual(r.code, aiocoap.NOT_FOUND)


class SpectrometerWireTests(ServerTestCase):

    @coro
    async def test_lists_and_status(self):
        self.assertEqual(await self.get("spectrometer/spectrometers"), sorted([QEP, FLAME]))
        # legacy order: sorted (issue 21)
        self.assertEqual(await self.get("spectrometer/channels"), ["downwelling", "upwelling"])
        self.assertEqual(await self.get(f"spectrometer/{QEP}/status"), sp.IDLE)
        self.assertIs(await self.get(f"spectrometer/{QEP}/haveTEC"), True)
        self.assertIs(await self.get(f"spectrometer/{FLAME}/haveTEC"), False)
        t = await self.get(f"spectrometer/{QEP}/current_temperature")
        self.assertIsInstance(t, float)
        import aiocoap
        r = await self.request("GET", f"spectrometer/{FLAME}/current_temperature")
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)

    @coro
    async def test_connect_disconnect_power(self):
        self.assertEqual(await self.get(f"spectrometer/{QEP}/disconnect"), "ok")
        self.assertEqual(await self.get(f"spectrometer/{QEP}/status"), sp.DISCONNECTED)
        self.assertEqual(await self.get(f"spectrometer/{QEP}/connect"), "ok")
        self.assertEqual(await self.get(f"spectrometer/{QEP}/status"), sp.IDLE)
        self.assertEqual(await self.get("spectrometer/disconnect"), "ok")
        self.assertEqual(await self.get("spectrometer/connect"), "ok")
        self.assertEqual(await self.get(f"spectrometer/{FLAME}/power_off"), "ok")
        self.assertEqual(await self.get(f"spectrometer/{FLAME}/status"), sp.POWERED_OFF)
        self.assertIn("powered off", await self.get("spectrometer/connect"))

    @coro
    async def test_times_validated_and_observed(self):
        import aiocoap
        base = f"spectrometer/{QEP}"
        lo, hi = await self.get(f"{base}/min_time"), await self.get(f"{base}/max_time")
        self.assertEqual((lo, hi), (8, 10000))
        first, seen = await self.observe_changes(
            f"{base}/current_time/upwelling", 1,
            lambda: self.put(f"{base}/current_time/upwelling", 250))
        self.assertEqual(seen, [250])
        self.assertNotEqual(first, 250)
        for bad in (7, 10001, "fast", 12.5, None, True, [1]):
            r = await self.request("PUT", f"{base}/current_time/upwelling", bad)
            self.assertEqual(r.code, aiocoap.BAD_REQUEST, bad)
        self.assertEqual(await self.get(f"{base}/current_time/upwelling"), 250)
        r = await self.request("PUT", f"{base}/current_time/sideways", 100)
        self.assertEqual(r.code, aiocoap.NOT_FOUND)
        # bounds
        await self.put(f"{base}/max_time", 200)
        self.assertEqual(await self.get(f"{base}/current_time/upwelling"), 200)
        r = await self.request("PUT", f"{base}/min_time", 300)
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        self.assertEqual(await self.get(f"{base}/min_time"), 8)
        r = await self.request("PUT", f"{base}/max_time", "Infinity")
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        self.assertEqual(await self.get(f"{base}/autointegration/upwelling"), "n")

    @coro
    async def test_tec_values_observed(self):
        import aiocoap
        base = f"spectrometer/{QEP}"
        self.assertIs(await self.get(f"{base}/TECenabled"), True)
        _, got = await self.observe_changes(
            f"{base}/target_temperature", 1,
            lambda: self.put(f"{base}/target_temperature", -15))
        self.assertEqual(got, [-15.0])
        for bad in (-100, 99, "warm", "NaN"):
            r = await self.request("PUT", f"{base}/target_temperature", bad)
            self.assertEqual(r.code, aiocoap.BAD_REQUEST, bad)
        self.assertEqual(await self.get(f"{base}/target_temperature"), -15.0)
        await self.put(f"{base}/TECenabled", False)
        self.assertIs(await self.get(f"{base}/TECenabled"), False)
        r = await self.request("PUT", f"spectrometer/{FLAME}/TECenabled", True)
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)

    @coro
    async def test_device_unplugged_mid_acquisition(self):
        """DROPPED within 1 s, the server keeps answering, IDLE again after
        the device reappears, without a restart."""
        import aiocoap
        sp.RECONNECT_INTERVAL, saved = 1.0, sp.RECONNECT_INTERVAL
        self.addCleanup(setattr, sp, "RECONNECT_INTERVAL", saved)
        device = self.service.instrument.bus.devices["sim_QEP00981"]
        msg = aiocoap.Message(code=aiocoap.GET,
                              uri=f"{self.base}/spectrometer/{QEP}/status", observe=0)
        req = self.ctx.request(msg)
        await asyncio.wait_for(req.response, 5)
        statuses = []

        async def collect():
            async for n in req.observation:
                statuses.append((time.monotonic(), json.loads(n.payload)))
                if statuses[-1][1] == sp.IDLE and any(s == sp.DROPPED for _, s in statuses):
                    return
        task = asyncio.ensure_future(collect())
        await self.put(f"spectrometer/{QEP}/current_time/upwelling", 2000)
        device.fail_next_read = True
        t0 = time.monotonic()
        await self.put("control/record_sequence", {"nsequence": 1, "auto": -1})
        while not any(s == sp.DROPPED for _, s in statuses):
            self.assertLess(time.monotonic() - t0, 1.0)
            self.assertEqual(await self.get("sysinfo/version"), self.service.sysinfo.version())
            await asyncio.sleep(0.02)
        self.assertEqual(await self.get(f"spectrometer/{QEP}/status"), sp.DROPPED)
        await self.wait_for("control/status", lambda s: s == "idle")
        for ch in ("upwelling", "downwelling"):
            self.assertEqual(await self.get(f"shutter/{ch}/status"), "closed")
        device.replug()
        await asyncio.wait_for(task, 10)
        req.observation.cancel()
        self.assertEqual(await self.get(f"spectrometer/{QEP}/status"), sp.IDLE)
