"""/control/scheduler over real CoAP: scheduled batches, quiet time, restart."""

import asyncio
import json
import os
from datetime import datetime, timedelta, timezone

from .helpers import ServerTestCase, make_service
from .test_wire import coro


def iso_in(seconds):
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()


class SchedulerWireTests(ServerTestCase):

    def light_files(self, run):
        d = self.run_dir(run)
        if not os.path.isdir(d):
            return []
        return sorted(n for n in os.listdir(d) if n.endswith("_light.pico"))

    async def until(self, predicate, timeout=5.0):
        for _ in range(int(timeout / 0.05)):
            if predicate():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("condition not met in time")

    @coro
    async def test_scheduled_batch_runs_on_time(self):
        due = datetime.now(timezone.utc) + timedelta(seconds=1)
        await self.put("control/record_sequence",
                       {"run": "later", "nsequence": 1, "auto": -1, "at_time": due.isoformat()})
        jobs = await self.get("control/scheduler/jobs")
        self.assertEqual(len(jobs), 1)
        self.assertEqual(jobs[0][1], ["record", ["later", 1, -1, 0.0, 80]])
        # the current run does not change until the job runs
        self.assertEqual(await self.get("data_dir/current_run"), "spectra")
        await self.until(lambda: self.light_files("later"))
        # not before its time: when the batch began, not what a look 0.6 s
        # after the request saw (on a loaded machine the requests before
        # it took the rest of the second, and the job had rightly run)
        started = (await self.get("control/last_batch"))["start"]
        self.assertGreaterEqual(datetime.fromisoformat(started), due)
        self.assertEqual(self.light_files("later"), ["b000000_s000000_light.pico"])
        self.assertEqual(await self.get("data_dir/current_run"), "later")
        self.assertEqual(await self.get("control/scheduler/jobs"), [])

    @coro
    async def test_repeating_job_stops_at_end(self):
        # runs at +0.3 s and +1.3 s; the next slot (+2.3 s) is after the end
        await self.put("control/record_sequence",
                       {"run": "rep", "nsequence": 1, "auto": -1, "at_time": iso_in(0.3),
                        "interval": 1, "end_time": iso_in(1.8)})
        await self.wait_for("control/scheduler/jobs", lambda j: j == [], timeout=5)
        await self.wait_for("control/status", lambda s: s == "idle")
        n = len(self.light_files("rep"))
        self.assertEqual(n, 2)
        await asyncio.sleep(0.6)
        self.assertEqual(len(self.light_files("rep")), n)

    @coro
    async def test_quiet_time_blocks_jobs(self):
        now = datetime.now(timezone.utc)
        start = (now - timedelta(minutes=1)).strftime("%H:%M:%S+0000")
        end = (now + timedelta(minutes=30)).strftime("%H:%M:%S+0000")
        await self.put("control/scheduler/quietStart", start)
        await self.put("control/scheduler/quietEnd", end)
        await self.put("control/scheduler/quietTimeEnabled", True)
        await self.put("control/record_sequence",
                       {"run": "quiet", "nsequence": 1, "auto": -1, "at_time": iso_in(0.2)})
        await asyncio.sleep(1.0)
        self.assertEqual(self.light_files("quiet"), [])
        jobs = await self.get("control/scheduler/jobs")
        self.assertEqual(jobs[0][5], "active")
        # and it runs as soon as the quiet time is over
        await self.put("control/scheduler/quietTimeEnabled", False)
        await self.until(lambda: self.light_files("quiet"))

    @coro
    async def test_bad_values(self):
        import aiocoap
        cases = {
            "control/scheduler/quietTimeEnabled": ["abc", 3],
            "control/scheduler/quietStart": ["abc", "25:00:00+0000", 7],
            "control/scheduler/powerDelay": ["abc", -5, "Infinity"],
            "control/scheduler/suspend": ["x", 2.5],
        }
        for path, values in cases.items():
            for v in values:
                r = await self.request("PUT", path, v)
                self.assertEqual(r.code, aiocoap.BAD_REQUEST, (path, v))
        for raw in (b"Infinity", b"NaN"):
            r = await self.request("PUT", "control/scheduler/powerDelay", raw=raw)
            self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        for job in ({"at_time": "tomorrow"},
                    {"at_time": iso_in(-3600)},
                    {"at_time": iso_in(60), "interval": -1},
                    {"at_time": iso_in(60), "end_time": iso_in(30), "interval": 10}):
            r = await self.request("PUT", "control/record_sequence", job)
            self.assertEqual(r.code, aiocoap.BAD_REQUEST, job)
        self.assertEqual(await self.get("control/scheduler/jobs"), [])
        # still running: a good job is accepted and listed
        await self.put("control/power_off", {"at_time": iso_in(3600)})
        jobs = await self.get("control/scheduler/jobs")
        self.assertEqual([j[1] for j in jobs], [["power_off"]])
        self.assertEqual(jobs[0][4], 86400)

    @coro
    async def test_unknown_job_ids_are_done_as_the_legacy_server_answered(self):
        """The deployed client (piccolo3.client PiccoloScheduler.suspend,
        unsuspend, delete: a_put(verb, jid), i.e. ``[[jid], {}]``) raises on
        anything but success; the legacy server answered 2.04 for an id no
        job has. So does this one, and logs it."""
        import aiocoap
        from twisted.logger import formatEvent, globalLogPublisher
        said = []

        def observe(event):
            said.append(formatEvent(event))
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await self.put("control/record_sequence",
                       {"run": "legacy", "nsequence": 1, "at_time": iso_in(3600),
                        "interval": 600})
        [job] = await self.get("control/scheduler/jobs")
        for verb in ("suspend", "unsuspend", "delete"):
            r = await self.request("PUT", f"control/scheduler/{verb}", raw=b"[[4711], {}]")
            self.assertEqual(r.code, aiocoap.CHANGED, (verb, r.payload))
            self.assertEqual(r.payload, b"")
            self.assertTrue(any(f"{verb} job 4711: no such job" in line for line in said),
                            said)
        self.assertEqual(await self.get("control/scheduler/jobs"), [job])
        # a known id, the same payloads
        raw = f"[[{job[0]}], {{}}]".encode()
        for verb, status in (("suspend", "suspended"), ("unsuspend", "active")):
            r = await self.request("PUT", f"control/scheduler/{verb}", raw=raw)
            self.assertEqual(r.code, aiocoap.CHANGED)
            self.assertEqual((await self.get("control/scheduler/jobs"))[0][5], status)
        r = await self.request("PUT", "control/scheduler/delete", raw=raw)
        self.assertEqual(r.code, aiocoap.CHANGED)
        self.assertEqual(await self.get("control/scheduler/jobs"), [])
        # deleted now: as unknown as 4711
        r = await self.request("PUT", "control/scheduler/delete", raw=raw)
        self.assertEqual(r.code, aiocoap.CHANGED)
        # not a job id at all is still a client error
        r = await self.request("PUT", "control/scheduler/delete", raw=b'[["x"], {}]')
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)

    @coro
    async def test_history_is_observable_and_durable(self):
        async def schedule():
            await self.put("control/record_sequence",
                           {"run": "watched", "nsequence": 1, "auto": -1,
                            "at_time": iso_in(0.5)})
        first, seen = await self.observe_changes("control/scheduler/history", 1, schedule,
                                                 timeout=15)
        self.assertEqual(first, [])
        [[entry]] = seen
        self.assertEqual(set(entry), {"job", "slot", "outcome", "reason", "run", "batch"})
        self.assertEqual((entry["outcome"], entry["run"], entry["batch"], entry["reason"]),
                         ("done", "watched", 0, None))
        datetime.fromisoformat(entry["slot"])
        self.assertTrue(entry["slot"].endswith("+00:00"))
        await self.service.stopService().asFuture(asyncio.get_event_loop())
        self.service = make_service(self.datadir, time_scale=self.time_scale)
        self.service.privilegedStartService()
        self.service.startService()
        self.base = f"coap://[::1]:{self.service.coap._port.getHost().port}"
        self.assertEqual(await self.get("control/scheduler/history"), [entry])
        health = await self.get("sysinfo/health")
        self.assertEqual((health["slots_missed_24h"], health["slots_failed_24h"]), (0, 0))

    @coro
    async def test_survives_restart(self):
        await self.put("control/record_sequence",
                       {"run": "keep", "nsequence": 2, "at_time": iso_in(3600), "interval": 600})
        await self.put("control/power_on", {"at_time": iso_in(7200)})
        jobs = await self.get("control/scheduler/jobs")
        await self.put("control/scheduler/suspend", jobs[1][0])
        await self.put("control/scheduler/quietStart", "21:00:00+0100")
        await self.put("control/scheduler/quietTimeEnabled", True)
        before = await self.get("control/scheduler/jobs")
        await self.service.stopService().asFuture(asyncio.get_event_loop())
        self.service = make_service(self.datadir, time_scale=self.time_scale)
        self.service.privilegedStartService()
        self.service.startService()
        self.base = f"coap://[::1]:{self.service.coap._port.getHost().port}"
        self.assertEqual(await self.get("control/scheduler/jobs"), before)
        self.assertEqual(before[1][5], "suspended")
        self.assertEqual(await self.get("control/scheduler/quietStart"), "21:00:00+0100")
        self.assertIs(await self.get("control/scheduler/quietTimeEnabled"), True)


class SchedulerSettingsWireTests(ServerTestCase):
    """Exact payloads of the deployed piccolo3 client; defaults; the fault."""

    @coro
    async def test_defaults_as_the_legacy_server(self):
        for path, value in (("quietTimeEnabled", False), ("quietStart", "22:00:00+0000"),
                            ("quietEnd", "04:00:00+0000"), ("powerOffEnabled", False),
                            ("powerDelay", 600), ("fault", "")):
            self.assertEqual(await self.get(f"control/scheduler/{path}"), value, path)

    @coro
    async def test_quiet_times_as_the_piccolo3_client_sends_them(self):
        import aiocoap
        # PiccoloSchedulerClient.set_quietStart: a_put(json.dumps([args, kwargs]))
        # of time.strftime("%H:%M:%S%z"), empty %z for a naive time
        for path, raw, back in (
                ("quietStart", b'[["21:00:00"], {}]', "21:00:00+0000"),
                ("quietEnd", b'[["05:30:00"], {}]', "05:30:00+0000"),
                ("quietStart", b'[["21:00:00+0100"], {}]', "21:00:00+0100"),
                ("quietEnd", b'[["05:30:00-0230"], {}]', "05:30:00-0230"),
                ("quietStart", b'"20:15:00"', "20:15:00+0000")):
            r = await self.request("PUT", f"control/scheduler/{path}", raw=raw)
            self.assertEqual(r.code, aiocoap.CHANGED, (raw, r.payload))
            self.assertEqual(await self.get(f"control/scheduler/{path}"), back)
        for raw in (b'[["21:00"], {}]', b'[["21:00:00Z"], {}]', b'[["21:00:00+01:00"], {}]',
                    b'[["9:00:00"], {}]', b'[["21:00:00.000001"], {}]', b'[[210000], {}]',
                    b'[["24:00:00"], {}]', b'[[""], {}]', b'[["21:00:00 UTC"], {}]'):
            r = await self.request("PUT", "control/scheduler/quietStart", raw=raw)
            self.assertEqual(r.code, aiocoap.BAD_REQUEST, raw)
        self.assertEqual(await self.get("control/scheduler/quietStart"), "20:15:00+0000")

    @coro
    async def test_power_window_over_a_short_real_window(self):
        from piccolo_twisted.instrument import spectrometer
        from piccolo_twisted.instrument.spectrometer import POWERED_OFF
        self.patch(spectrometer, "POWER_SETTLE", 0.1)
        spectrometers = self.service.instrument.spectrometers
        spectrometers.POWER_STAGGER = 0.1
        names = await self.get("spectrometer/spectrometers")
        # the scheduler's wall clock (injected) stands still inside the
        # window until the test moves it past the window's end: on the
        # machine's clock the window ended 0.5 to 1.5 s after the test
        # began, and five requests, the power-off and its look fitted in
        # that on a loaded machine or not
        wall = [float(int(datetime.now(timezone.utc).timestamp())) + 0.2]
        self.patch(self.service.scheduler, "wall", lambda: wall[0])
        now = datetime.fromtimestamp(wall[0], timezone.utc)
        # the window ends on a whole second, 9.8 s of the scheduler's time on
        end = (now + timedelta(seconds=10)).replace(microsecond=0)
        await self.put("control/scheduler/powerDelay", 0)
        await self.put("control/scheduler/powerOffEnabled", True)
        await self.put("control/scheduler/quietStart",
                       (now - timedelta(minutes=1)).strftime("%H:%M:%S+0000"))
        await self.put("control/scheduler/quietEnd", end.strftime("%H:%M:%S+0000"))
        await self.put("control/scheduler/quietTimeEnabled", True)
        for name in names:
            await self.wait_for(f"spectrometer/{name}/status",
                                lambda s: s == POWERED_OFF, timeout=10)
        # off for as long as the window lasts: the scheduler ticks (every
        # 0.1 s here) and keeps them off
        wall[0] = end.timestamp() - 0.5
        await asyncio.sleep(0.5)
        for name in names:
            self.assertEqual(await self.get(f"spectrometer/{name}/status"), POWERED_OFF)
        # the window's end: on again
        wall[0] = end.timestamp() + 0.1
        for name in names:
            await self.wait_for(f"spectrometer/{name}/status",
                                lambda s: s != POWERED_OFF, timeout=10)
        self.assertEqual(await self.get("control/scheduler/fault"), "")
        await self.wait_connected(timeout=3).asFuture(asyncio.get_event_loop())

    @coro
    async def test_job_cap_and_listing_time_at_the_cap(self):
        import aiocoap
        import time
        from twisted.internet import defer
        s = self.service.scheduler
        job = {"run": "capped", "nsequence": 1, "auto": -1, "delay": 0.0, "target": 80}
        await defer.gatherResults([s.add("record", job, iso_in(3600 + i), 3600)
                                   for i in range(999)]).asFuture(asyncio.get_event_loop())
        r = await self.request("PUT", "control/record_sequence",
                               {"run": "last", "at_time": iso_in(60)})
        self.assertEqual(r.code, aiocoap.CHANGED, r.payload)
        r = await self.request("PUT", "control/power_off", {"at_time": iso_in(60)})
        self.assertEqual(r.code, aiocoap.BAD_REQUEST)
        self.assertIn(b"at most 1000", r.payload)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            jobs = await self.get("control/scheduler/jobs")
            times.append(time.perf_counter() - t0)
        self.assertEqual(len(jobs), 1000)
        self.assertEqual(jobs[-1][1][1][0], "last")
        print(f"\n  GET /control/scheduler/jobs with 1000 jobs: "
              f"{min(times) * 1000:.0f} ms (best of 3, {len(r.payload)} B error; "
              f"listing {len(json.dumps(jobs))} B)")

    @coro
    async def test_unusable_database_starts_degraded_and_says_so(self):
        import aiocoap
        await self.service.stopService().asFuture(asyncio.get_event_loop())
        path = self.service.scheduler.path
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
        os.mkdir(path)                                   # a directory where it goes
        self.service = make_service(self.datadir, time_scale=self.time_scale)
        self.service.privilegedStartService()
        self.service.startService()
        self.base = f"coap://[::1]:{self.service.coap._port.getHost().port}"
        fault = await self.get("control/scheduler/fault")
        self.assertIn("in memory only", fault)
        r = await self.request("PUT", "control/record_sequence",
                               {"run": "mem", "at_time": iso_in(3600)})
        self.assertEqual(r.code, aiocoap.CHANGED)
        self.assertEqual(len(await self.get("control/scheduler/jobs")), 1)
        self.assertEqual(await self.get("sysinfo/version") is not None, True)

    @coro
    async def test_job_out_of_range_in_an_older_database_is_dropped(self):
        """An older server stored 9999-12-31T23:59:59.999999Z (which rounds
        into year 10000): the listing still answers 2.05 with the other
        jobs; the bad job is purged, logged and named in the fault."""
        import sqlite3
        import aiocoap
        await self.service.stopService().asFuture(asyncio.get_event_loop())
        path = self.service.scheduler.path
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
        late = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc).timestamp()
        soon = datetime.now(timezone.utc).timestamp() + 3600
        rec = json.dumps({"run": "r", "nsequence": 1, "auto": -1, "delay": 0.0,
                          "target": 80})
        db = sqlite3.connect(path)
        db.executescript("""
            CREATE TABLE jobs (id INTEGER PRIMARY KEY, kind TEXT NOT NULL,
                args TEXT NOT NULL, start_time REAL NOT NULL, next_time REAL NOT NULL,
                end_time REAL, interval REAL, ignore_quiet INTEGER NOT NULL DEFAULT 0,
                status TEXT NOT NULL);
            CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            PRAGMA user_version = 2;""")
        db.executemany("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?)", [
            (1, "record", rec, soon, soon, None, None, 0, "active"),
            (2, "power_on", "null", late, late, None, None, 1, "active"),
            (3, "power_off", "null", soon, soon, late, 600.0, 1, "suspended"),
            (4, "record", rec, soon, soon, soon + 7200, 600.0, 0, "active"),
        ])
        db.execute("INSERT INTO state VALUES ('next_id', '5')")
        db.commit()
        db.close()
        self.service = make_service(self.datadir, time_scale=self.time_scale)
        self.service.privilegedStartService()
        self.service.startService()
        self.base = f"coap://[::1]:{self.service.coap._port.getHost().port}"
        r = await self.request("GET", "control/scheduler/jobs")
        self.assertEqual(r.code, aiocoap.CONTENT, r.payload)
        jobs = json.loads(r.payload)
        self.assertEqual([j[0] for j in jobs], [1, 4])
        self.assertEqual(jobs[1][1], ["record", ["r", 1, -1, 0.0, 80]])
        fault = await self.get("control/scheduler/fault")
        self.assertIn("job 2 ", fault)
        self.assertIn("job 3 ", fault)
        db = sqlite3.connect(path)
        try:
            ids = [i for (i,) in db.execute("SELECT id FROM jobs ORDER BY id")]
        finally:
            db.close()
        self.assertEqual(ids, [1, 4])
