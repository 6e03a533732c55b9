"""A job due at a restart, over the wire (issue 18, "done when").

The server runs as twistd runs it, on emulated USB spectrometers (QE Pro
and USB2000+: opening them takes the real driver path, as long as on a
Pi). A job is scheduled 6 s ahead with the deployed client's exact
payload; the server is killed with SIGKILL at once and started again 12 s
later, after the slot. With the default catch-up (10 min) the slot runs
once the spectrometers are connected and the history says ``done``; with
``[scheduler] catch_up = 0`` the history says ``missed``, with a reason.
On the server before issue 18 the job ran before any spectrometer was
connected: the batch failed, nothing was written, nothing recorded it.
"""

import json
import os
import signal
import sys
import time
from datetime import datetime, timedelta, timezone

from twisted.trial import unittest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "bench"))
from run import Server  # noqa: E402

QEP, USB = "QEP01234", "USB2K0042"
INSTRUMENT = f"""
[channels]
  [[shutter_1]]
    direction = upwelling
  [[shutter_2]]
    direction = downwelling
[spectrometers]
  [[{QEP}]]
  [[{USB}]]
"""


class RestartAtASlotTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.datadir = os.path.join(self.dir, "data")
        os.makedirs(self.datadir)
        self.instrument = os.path.join(self.dir, "piccolo.config")
        with open(self.instrument, "w") as f:
            f.write(INSTRUMENT)
        self.server = None

    def start(self, catch_up=None):
        config = os.path.join(self.dir, "piccolo.cfg")
        with open(config, "w") as f:
            f.write(f"[seabreeze]\nemulate = QEPRO:{QEP}, USB2000PLUS:{USB}\n")
            if catch_up is not None:
                f.write(f"[scheduler]\ncatch_up = {catch_up}\n")
        port = self.server.port if self.server is not None else None
        self.server = Server(datadir=self.datadir, cpu_quota=False,
                             env={"PICCOLO_TIME_SCALE": "0.05"},
                             args=["-c", config, "-i", self.instrument])
        if port is not None:
            self.server.port = port
        self.server.start()
        self.addCleanup(self.server.stop)
        return self.server

    def put_job(self, seconds):
        """What ``piccolo3.client``'s record_sequence sends (a_put with
        [args, kwargs])."""
        at = (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat()
        payload = [[], {"run": "restart", "nsequence": 1, "auto": -1, "at_time": at}]
        from run import loadclient
        code, body, _ = loadclient.fetch("::1", self.server.port, "/control/record_sequence",
                                         method=3, payload=json.dumps(payload).encode(),
                                         timeout=10)
        self.assertEqual(code, 0x44, body)          # 2.04: stored

    def kill_and_restart(self, catch_up=None, down=12.0):
        os.kill(self.server.proc.pid, signal.SIGKILL)
        self.server.proc.wait()
        time.sleep(down)
        return self.start(catch_up)

    def until(self, check, limit, what):
        end = time.monotonic() + limit
        while time.monotonic() < end:
            value = check()
            if value:
                return value
            time.sleep(0.2)
        self.fail(f"{what} not within {limit} s; server log:\n{self.log()}")

    def log(self):
        with open(os.path.join(self.datadir, "server.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")[-6000:]

    def files(self):
        run = os.path.join(self.datadir, "restart")
        return sorted(os.listdir(run)) if os.path.isdir(run) else []

    def history(self):
        return self.server.call("GET", "/control/scheduler/history")

    def test_job_due_at_a_restart_runs_once_the_spectrometers_are_connected(self):
        self.start()
        self.put_job(6)
        self.kill_and_restart()
        # the batch, on disk
        self.until(lambda: any(n.endswith("_light.pico") for n in self.files()), 60,
                   "the slot's batch")
        self.until(lambda: self.history(), 20, "the slot's outcome")
        [entry] = self.history()
        self.assertEqual(entry["outcome"], "done", entry)
        self.assertEqual((entry["job"], entry["run"], entry["batch"]), (1, "restart", 0))
        self.assertIsNone(entry["reason"])
        self.assertIn("+00:00", entry["slot"])
        for name in self.files():
            with open(os.path.join(self.datadir, "restart", name)) as f:
                serials = {s["Metadata"]["SerialNumber"] for s in json.load(f)["Spectra"]}
            self.assertEqual(serials, {QEP, USB}, name)
        self.assertEqual(self.server.call("GET", "/control/scheduler/jobs"), [])

    def test_with_no_catch_up_the_slot_is_missed_with_a_reason(self):
        self.start(catch_up=0)
        self.put_job(6)
        self.kill_and_restart(catch_up=0)
        entry = self.until(lambda: self.history(), 30, "the slot's outcome")[0]
        self.assertEqual(entry["outcome"], "missed", entry)
        self.assertEqual(entry["reason"], "the server was not running")
        self.assertEqual((entry["job"], entry["run"], entry["batch"]), (1, "restart", None))
        # health counts it (its figures are cached a few seconds)
        self.until(lambda: self.server.call("GET", "/sysinfo/health")["slots_missed_24h"] == 1,
                   20, "health's count of missed slots")
        self.assertEqual(self.server.call("GET", "/sysinfo/health")["slots_failed_24h"], 0)
        time.sleep(2)
        self.assertEqual(self.files(), [])
        self.assertEqual(self.server.call("GET", "/control/scheduler/jobs"), [])
