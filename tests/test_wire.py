"""The CoAP API over real UDP on loopback, with aiocoap as the client."""

import asyncio
import json
import os

from .helpers import ServerTestCase, as_deferred


def coro(fn):
    def wrapper(self):
        return as_deferred(fn(self))
    wrapper.__name__ = fn.__name__
    return wrapper


class FoundationWireTests(ServerTestCase):

    @coro
    async def test_version_and_content_format(self):
        import aiocoap
        r = await self.request("GET", "sysinfo/version")
        self.assertEqual(r.code, aiocoap.CONTENT)
        self.assertEqual(r.opt.content_format, 50)
        from piccolo_twisted import __version__
        self.assertEqual(json.loads(r.payload), __version__)

    @coro
    async def test_sysinfo(self):
        cpu = await self.get("sysinfo/cpu")
        mem = await self.get("sysinfo/mem")
        self.assertTrue(0.0 <= cpu <= 100.0)
        self.assertTrue(0.0 < mem <= 100.0)
        import socket
        self.assertEqual(await self.get("sysinfo/host"), socket.gethostname())
        from datetime import datetime
        clock = datetime.fromisoformat(await self.get("sysinfo/clock"))
        self.assertIsNotNone(clock.tzinfo)

    @coro
    async def test_clock_put_refuses_garbage(self):
        import aiocoap
        for bad in ("yesterday", 12, "", "2026-13-45T99:00:00"):
            r = await self.request("PUT", "sysinfo/clock", bad)
            self.assertEqual(r.code, aiocoap.BAD_REQUEST, bad)
            self.assertTrue(r.payload)

    @coro
    async def test_well_known_core(self):
        import aiocoap
        r = await self.request("GET", ".well-known/core")
        self.assertEqual(r.code, aiocoap.CONTENT)
        self.assertEqual(r.opt.content_format, 40)
        links = r.payload.decode().split(",")
        self.assertIn("</control/status>;obs", links)
        self.assertIn("</data_dir/current_run>;obs", links)
        self.assertIn("</sysinfo/version>", links)
        self.assertIn("</spectrometer/S_sim_QEP00981/current_time/upwelling>;obs", links)
        self.assertIn("</spectrometer/S_sim_FLMT01234/autointegration/downwelling>;obs", links)
        self.assertIn("</data_dir/runs>", links)
        # longer than one block: the client reassembled it (Block2)
        self.assertGreater(len(r.payload), 1024)

    @coro
    async def test_unknown_path_and_method(self):
        import aiocoap
        r = await self.request("GET", "no/such/path")
        self.assertEqual(r.code, aiocoap.NOT_FOUND)
        r = await self.request("PUT", "sysinfo/version", "x")
        self.assertEqual(r.code, aiocoap.METHOD_NOT_ALLOWED)
        r = await self.request("DELETE", "sysinfo/version")
        self.assertEqual(r.code, aiocoap.METHOD_NOT_ALLOWED)
        r = await self.request("GET", "control/record_sequence")
        self.assertEqual(r.code, aiocoap.METHOD_NOT_ALLOWED)

    @coro
    async def test_bad_json(self):
        import aiocoap
        for raw in (b"{bad", b"[1,", b"NaN", b"Infinity", b"\xff\xfe"):
            r = await self.request("PUT", "control/numSequences", raw=raw)
            self.assertEqual(r.code, aiocoap.BAD_REQUEST, raw)
        self.assertEqual(await self.get("control/numSequences"), 1)

    @coro
    async def test_put_argument_conventions(self):
        # an object -> kwargs; a list -> args; a value -> one arg;
        # [[args], {kwargs}] -> both
        await self.put("data_dir/current_run", "alpha")
        await self.put("data_dir/current_run", ["beta"])
        await self.put("data_dir/current_run", {"run": "gamma"})
        await self.put("data_dir/current_run", [[], {"run": "delta"}])
        self.assertEqual(await self.get("data_dir/current_run"), "delta")
        runs = await self.put("data_dir/all_runs", [[], {"alpha": True}])
        self.assertEqual(runs, sorted(runs))
        for run in ("alpha", "beta", "gamma", "delta"):
            self.assertIn(run, runs)

    @coro
    async def test_wrong_arguments(self):
        import aiocoap
        r = await self.request("PUT", "data_dir/current_run", [1, 2, 3])
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        r = await self.request("PUT", "data_dir/current_run", {"bogus": 1})
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        r = await self.request("PUT", "data_dir/current_run", 42)
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)

    @coro
    async def test_run_name_tricks_create_nothing(self):
        import aiocoap
        before = sorted(os.listdir(self.datadir))
        parent = sorted(os.listdir(os.path.dirname(self.datadir)))
        for bad in ("../x", "..", ".", "", ".hidden", "a/b", "/etc", "x\x00y"):
            r = await self.request("PUT", "data_dir/current_run", bad)
            self.assertEqual(r.code, aiocoap.BAD_REQUEST, bad)
        self.assertEqual(sorted(os.listdir(self.datadir)), before)
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.datadir))), parent)
        self.assertEqual(await self.get("data_dir/current_run"), "spectra")

    @coro
    async def test_spectra_path_tricks(self):
        import aiocoap
        await self.put("data_dir/current_run", "r1")
        for bad in ("../../../../etc/passwd", "/etc/passwd", "..", "../r1",
                    "scheduler.sqlite", "b000000_s000000_light.pico"):
            r = await self.request("PUT", "data_dir/runs/r1/spectra", bad)
            self.assertTrue(128 <= int(r.code) < 160, (bad, r.code))
            self.assertNotIn(b"root:", r.payload)
            self.assertNotIn(self.datadir.encode(), r.payload)
        r = await self.request("GET", "data_dir/runs/..%2F..%2Fetc/name")
        self.assertTrue(128 <= int(r.code) < 160)
        r = await self.request("GET", "data_dir/runs/nosuchrun/name")
        self.assertEqual(r.code, aiocoap.NOT_FOUND)

    @coro
    async def test_data_dir_resources(self):
        self.assertEqual(await self.get("data_dir/datadir"), os.path.abspath(self.datadir))
        self.assertIn(await self.get("data_dir/mount"), (True, False))
        await self.put("data_dir/current_run", "r2")
        self.assertEqual(await self.get("data_dir/runs/r2/name"), "r2")
        self.assertEqual(await self.get("data_dir/runs/r2/current_batch"), -1)
        self.assertEqual(await self.get("data_dir/runs/r2/spectra_list"), [])
        self.assertEqual(await self.put("data_dir/all_runs", {"alpha": True}),
                         ["r2", "spectra"])
        self.assertEqual(await self.put("data_dir/all_runs",
                                        {"alpha": True, "reverse": True}),
                         ["spectra", "r2"])
        page = await self.put("data_dir/all_runs", {"alpha": True, "nitems": 1, "page": 1})
        self.assertEqual(page, ["spectra"])

    @coro
    async def test_observe_current_run(self):
        import aiocoap
        msg = aiocoap.Message(code=aiocoap.GET, uri=f"{self.base}/data_dir/current_run",
                              observe=0)
        req = self.ctx.request(msg)
        first = await asyncio.wait_for(req.response, 5)
        self.assertEqual(json.loads(first.payload), "spectra")
        self.assertIsNotNone(first.opt.observe)
        seen = []

        async def collect():
            async for n in req.observation:
                seen.append(json.loads(n.payload))
                if len(seen) == 2:
                    return
        task = asyncio.ensure_future(collect())
        await self.put("data_dir/current_run", "obs1")
        await self.put("data_dir/current_run", "obs2")
        await asyncio.wait_for(task, 5)
        self.assertEqual(seen, ["obs1", "obs2"])
        req.observation.cancel()
        # the cancel reaches the server (Observe deregistration or RST)
        protocol = self.service.coap.protocol
        for _ in range(100):
            if protocol.observer_count() == 0:
                break
            await self.put("data_dir/current_run", f"x{_}")
            await asyncio.sleep(0.05)
        self.assertEqual(protocol.observer_count(), 0)

    @coro
    async def test_blockwise_put(self):
        import aiocoap
        # 5 kB of JSON arrives whole through Block1 (and is then refused as
        # the wrong arguments, by the handler, not by the transport)
        big = ["x" * 100] * 50
        r = await self.request("PUT", "data_dir/current_run", big)
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        self.assertIn(b"argument", r.payload)
        # over the limit: 4.13
        huge = "y" * (70 * 1024)
        r = await self.request("PUT", "data_dir/current_run", huge)
        self.assertEqual(r.code, aiocoap.REQUEST_ENTITY_TOO_LARGE)
        self.assertEqual(await self.get("data_dir/current_run"), "spectra")
