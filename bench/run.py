#!/usr/bin/env python3
"""The benchmark: starts the server (``twistd -n piccolo``) on the simulated
instrument on a loopback port and prints one table of figures, each the
median of 3 runs with min-max, beside its target.

    python bench/run.py                 # the full table, ~7 minutes
    python bench/run.py --soak 600      # with the 10-minute soak
    python bench/run.py --quick         # 1 run each, short phases

Loopback only; every phase is bounded in time; the server is stopped at
the end (and on Ctrl-C).
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadclient  # noqa: E402

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
QEP, FLAME = "S_sim_QEP00981", "S_sim_FLMT01234"
CHANNELS = ("upwelling", "downwelling")


def free_port():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """The server as a child process on [::1]:<free port>."""

    def __init__(self, datadir=None, env=None):
        self.port = free_port()
        self.own_dir = datadir is None
        self.datadir = datadir or tempfile.mkdtemp(prefix="piccolo-bench-")
        self.env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", **(env or {}))
        self.proc = None

    def start(self, timeout=30.0):
        t0 = time.perf_counter()
        self.log = open(os.path.join(self.datadir, "server.log"), "ab")
        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "piccolo", "--address", "::1",
                      "--port", str(self.port), "--data-dir", self.datadir],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        while time.perf_counter() - t0 < timeout:
            try:
                code, _, _ = loadclient.fetch("::1", self.port, "/sysinfo/version", timeout=0.2)
                if code == 0x45:
                    self.startup = time.perf_counter() - t0
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited; see " + self.log.name)
        raise RuntimeError("the server did not answer")

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return None

    def call(self, method, path, payload=None, timeout=10.0):
        raw = b"" if payload is None else json.dumps(payload).encode()
        code, body, _ = loadclient.fetch("::1", self.port, path,
                                         method={"GET": 1, "PUT": 3}[method],
                                         payload=raw, timeout=timeout)
        if not 0x40 <= code < 0x60:
            raise RuntimeError(f"{method} {path}: {code >> 5}.{code & 31:02d} {body!r}")
        return json.loads(body) if body else None

    def wait_idle(self, timeout=300.0):
        deadline = time.monotonic() + timeout
        time.sleep(0.2)
        while time.monotonic() < deadline:
            if self.call("GET", "/control/status") == "idle":
                return
            time.sleep(0.1)
        raise RuntimeError("the batch did not end")

    def wait_connected(self):
        for _ in range(200):
            if all(self.call("GET", f"/spectrometer/{s}/status") == 6 for s in (QEP, FLAME)):
                return
            time.sleep(0.05)
        raise RuntimeError("spectrometers did not connect")

    def set_times(self, ms):
        for s in (QEP, FLAME):
            for ch in CHANNELS:
                self.call("PUT", f"/spectrometer/{s}/current_time/{ch}", ms)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.own_dir:
            shutil.rmtree(self.datadir, ignore_errors=True)


def med(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


ROWS = []


def row(name, values, unit, target=None, ok=None, fmt="{:.1f}"):
    values = values if isinstance(values, list) else [values]
    m, lo, hi = med(values)
    if m is None:
        text = "n/a"
    else:
        text = fmt.format(m) + (f"  ({fmt.format(lo)}-{fmt.format(hi)})" if len(values) > 1 else "")
    verdict = "" if ok is None else ("met" if ok(m) else "MISSED")
    ROWS.append((name, text, unit, target or "", verdict))
    print(f"  {name:<58} {text:>26} {unit:<6} {target or '':<16} {verdict}", flush=True)


def sequence_overhead(server, ms, nsequence):
    """Per-channel cycle time minus the integration floor, from the files."""
    run = f"ovh{ms}-{time.monotonic_ns()}"
    server.set_times(ms)
    server.call("PUT", "/control/record_sequence",
                {"run": run, "nsequence": nsequence, "auto": -1, "delay": 0})
    server.wait_idle()
    stamps = []
    rundir = os.path.join(server.datadir, run)
    for name in sorted(n for n in os.listdir(rundir) if n.endswith("_light.pico")):
        with open(os.path.join(rundir, name)) as f:
            spectra = json.load(f)["Spectra"]
        per_channel = {}
        for s in spectra:
            meta = s["Metadata"]
            t = datetime.strptime(meta["Datetime"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
            per_channel[meta["Direction"]] = max(per_channel.get(meta["Direction"], 0), t)
        stamps += [per_channel[ch] for ch in CHANNELS]
    cycle = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return (cycle - ms / 1000.0) * 1000.0


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--load-seconds", type=float, default=5.0)
    p.add_argument("--soak", type=float, default=180.0, help="soak seconds (600 = the long form)")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.runs, a.load_seconds, a.soak = 1, 2.0, 20.0
    runs = a.runs
    print(f"piccolo-twisted benchmark  {datetime.now().isoformat(timespec='seconds')}  "
          f"{platform.node()}  {platform.processor() or platform.machine()}  "
          f"{os.cpu_count()} cores  Python {platform.python_version()}")
    print(f"  {'figure':<58} {'median (min-max)':>26} {'unit':<6} {'target':<16}")

    # -- start-up ------------------------------------------------------------
    startups, rss_start = [], []
    for _ in range(runs):
        s = Server().start()
        time.sleep(2.0)
        startups.append(s.startup)
        rss_start.append(s.rss_mib())
        s.stop()
    row("start-up to first CoAP answer", [x * 1000 for x in startups], "ms")
    row("RSS after start", rss_start, "MiB", "<= 45", lambda m: m <= 45)

    server = Server().start()
    try:
        server.wait_connected()
        # -- GET throughput ------------------------------------------------------
        for c in (1, 8, 64):
            results = [loadclient.closed_loop("::1", server.port, "/sysinfo/version",
                                              concurrency=c, duration=a.load_seconds)
                       for _ in range(runs)]
            failed = sum(r["lost"] + sum(v for k, v in r["codes"].items() if k != "2.05")
                         for r in results)
            row(f"GET /sysinfo/version c={c}: requests/s", [r["rps"] for r in results], "req/s",
                ">= 6600" if c == 64 else "", (lambda m: m >= 6600) if c == 64 else None,
                fmt="{:.0f}")
            row(f"GET /sysinfo/version c={c}: p50 latency", [r["p50_ms"] for r in results], "ms",
                fmt="{:.2f}")
            row(f"GET /sysinfo/version c={c}: p99 latency", [r["p99_ms"] for r in results], "ms",
                fmt="{:.2f}")
            row(f"GET /sysinfo/version c={c}: max latency", [r["max_ms"] for r in results], "ms",
                "<= 20", lambda m: m <= 20, fmt="{:.2f}")
            if failed:
                row(f"GET c={c}: failed requests", failed, "", "0", lambda m: m == 0, fmt="{:.0f}")
        # 60 s of load at c=64, then RSS
        loadclient.closed_loop("::1", server.port, "/sysinfo/version", concurrency=64,
                               duration=20.0 if a.quick else 60.0)
        rss_load = server.rss_mib()
        row("RSS after 60 s of GET load (c=64)", rss_load, "MiB", "<= 64", lambda m: m <= 64)

        # -- responsiveness during batches ----------------------------------------
        import threading

        def during_batch(ms, nsequence):
            server.set_times(ms)
            server.call("PUT", "/control/record_sequence",
                        {"run": f"busy{ms}", "nsequence": nsequence, "auto": -1, "delay": 0})
            out = {}
            done = threading.Event()
            t = threading.Thread(target=lambda: out.update(loadclient.open_loop(
                "::1", server.port, "/control/status", rate=50, duration=300.0, stop=done)))
            t.start()
            try:
                server.wait_idle()
            finally:
                done.set()
                t.join()
            return out
        for label, ms, n in (("20-sequence batch at 200 ms", 200, 20),
                             ("batch, two devices integrating 1 s", 1000, 10)):
            results = [during_batch(ms, n if not a.quick else 3) for _ in range(runs)]
            row(f"GET /control/status at 50/s during {label}: p99",
                [r["p99_ms"] for r in results], "ms", "<= 2", lambda m: m <= 2, fmt="{:.2f}")
            row(f"GET /control/status at 50/s during {label}: max",
                [r["max_ms"] for r in results], "ms", "<= 20", lambda m: m <= 20, fmt="{:.2f}")
            lost = sum(r["lost"] for r in results)
            if lost:
                row(f"  lost requests during {label}", lost, "", "0", lambda m: m == 0, fmt="{:.0f}")
        rss_batch = server.rss_mib()
        row("RSS after the batches", rss_batch, "MiB", "<= 64", lambda m: m <= 64)

        # -- sequence overhead ------------------------------------------------------
        for ms, n in ((20, 20), (200, 10), (1000, 4)):
            values = [sequence_overhead(server, ms, n if not a.quick else 3) for _ in range(runs)]
            row(f"sequence overhead per channel at {ms} ms", values, "ms",
                "<= 15 + 8 (min t)", lambda m: m <= 23)

        # -- a 140 kB .pico over CoAP --------------------------------------------------
        run = "fetch"
        os.makedirs(os.path.join(server.datadir, run), exist_ok=True)
        doc = {"Spectra": [{"Metadata": {"Direction": "upwelling", "Dark": False},
                            "Pixels": [123456] * 2048} for _ in range(10)]}
        with open(os.path.join(server.datadir, run, "b000000_s000000_light.pico"), "w") as f:
            f.write(json.dumps(doc))
        times = []
        for _ in range(max(runs, 3)):
            t0 = time.perf_counter()
            code, payload, blocks = loadclient.fetch(
                "::1", server.port, f"/data_dir/runs/{run}/spectra", method=3,
                payload=b'"b000000_s000000_light.pico"')
            times.append((time.perf_counter() - t0) * 1000)
            assert json.loads(payload) == json.dumps(doc), "fetched file differs"
        size = os.path.getsize(os.path.join(server.datadir, run, "b000000_s000000_light.pico"))
        row(f"fetch a {size / 1000:.0f} kB .pico (PUT spectra, {blocks} blocks of 1 KiB)",
            times, "ms")

        # -- soak -----------------------------------------------------------------------
        warm = server.rss_mib()
        loadclient.open_loop("::1", server.port, "/control/status", rate=200, duration=a.soak)
        after = server.rss_mib()
        row(f"RSS after a {a.soak / 60:.0f}-minute soak (200 req/s)", after, "MiB", "<= 64",
            lambda m: m <= 64)
        row("RSS growth over the soak", (after - warm) / warm * 100, "%", "<= 5",
            lambda m: m <= 5)
    finally:
        server.stop()
    missed = [r for r in ROWS if r[4] == "MISSED"]
    print(f"{len(ROWS)} figures, {len(missed)} targets missed")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
