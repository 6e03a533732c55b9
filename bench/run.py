#!/usr/bin/env python3
"""The benchmark: starts the server (``twistd -n piccolo``) on the simulated
instrument on a loopback port and prints one table of figures, each the
median of 3 runs with min-max, beside its target.

    python bench/run.py                 # the full table, ~7 minutes
    python bench/run.py --soak 600      # with the 10-minute soak
    python bench/run.py --quick         # 1 run each, short phases
    python bench/run.py --only cold-auto                # one case alone
    python bench/run.py --only cold-auto --cpu-quota    # the server on 0.25 core
    python bench/run.py --only emulated    # overhead: USB-emulated vs simulated
    python bench/run.py --only web         # the web page: 5 browsers, RSS on/off, weight
    python bench/run.py --only web-load    # CoAP latency under zips and HTTP floods, RSS after zips

``--cpu-quota`` runs every server the benchmark starts in a cgroup v1 CPU
quota of 0.25 core (``cpu.cfs_quota_us = 2500`` per ``cpu.cfs_period_us =
10000``, a Raspberry Pi-class budget; needs root and /sys/fs/cgroup/cpu).
The full table runs the cold-autointegration case both ways.

Loopback only; every phase is bounded in time; the server is stopped at
the end (and on Ctrl-C).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import struct
import sys
import tempfile
import time
from datetime import datetime

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadclient  # noqa: E402
import hostile  # noqa: E402

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
QEP, FLAME = "S_sim_QEP00981", "S_sim_FLMT01234"
CHANNELS = ("upwelling", "downwelling")


def free_port():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


CGROUP_CPU = "/sys/fs/cgroup/cpu"
QUOTA_US, PERIOD_US = 2500, 10000          # 0.25 core


class CpuQuota:
    """A cgroup v1 CPU quota for the server process (and its threads)."""

    def __init__(self, quota_us=QUOTA_US, period_us=PERIOD_US):
        self.path = os.path.join(CGROUP_CPU, f"piccolo-bench-{os.getpid()}-{time.monotonic_ns()}")
        os.mkdir(self.path)
        for name, value in (("cpu.cfs_period_us", period_us), ("cpu.cfs_quota_us", quota_us)):
            with open(os.path.join(self.path, name), "w") as f:
                f.write(str(value))

    def enter(self):
        """Move the calling process in (a preexec_fn: before exec)."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def throttled(self):
        """(periods throttled, seconds throttled) so far."""
        stat = {}
        with open(os.path.join(self.path, "cpu.stat")) as f:
            for line in f:
                k, v = line.split()
                stat[k] = int(v)
        return stat.get("nr_throttled", 0), stat.get("throttled_time", 0) / 1e9

    def remove(self):
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)       # the process is still leaving


def cpu_quota_available():
    return os.access(CGROUP_CPU, os.W_OK)


class Server:
    """The server as a child process on [::1]:<free port>; with
    ``cpu_quota`` in a 0.25-core cgroup."""

    def __init__(self, datadir=None, env=None, cpu_quota=None, args=(),
                 names=(QEP, FLAME), host="::1"):
        self.host = host
        self.port = free_port()
        self.args = list(args)
        self.names = names
        self.own_dir = datadir is None
        self.datadir = datadir or tempfile.mkdtemp(prefix="piccolo-bench-")
        self.env = dict(os.environ, GPIOZERO_PIN_FACTORY="mock", **(env or {}))
        self.proc = None
        self.cpu_quota = CpuQuota() if (cpu_quota if cpu_quota is not None
                                         else DEFAULT_QUOTA) else None

    def start(self, timeout=30.0):
        t0 = time.perf_counter()
        self.log = open(os.path.join(self.datadir, "server.log"), "ab")
        self.proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "piccolo", "--address", self.host,
                      "--port", str(self.port), "--data-dir", self.datadir]
            + (["--web", "0"] if "--web" not in self.args else [])
            + self.args,
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=self._preexec)
        while time.perf_counter() - t0 < timeout:
            try:
                code, _, _ = loadclient.fetch(self.host, self.port, "/sysinfo/version",
                                              timeout=0.2)
                if code == 0x45:
                    self.startup = time.perf_counter() - t0
                    return self
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the server exited; see " + self.log.name)
        raise RuntimeError("the server did not answer")

    def cpu_seconds(self):
        """CPU time the server process has used (user + system, all threads)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _preexec(self):
        if self.cpu_quota:
            self.cpu_quota.enter()

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return None

    def call(self, method, path, payload=None, timeout=10.0):
        raw = b"" if payload is None else json.dumps(payload).encode()
        code, body, _ = loadclient.fetch(self.host, self.port, path,
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
            if all(self.call("GET", f"/spectrometer/{s}/status") == 6 for s in self.names):
                return
            time.sleep(0.05)
        raise RuntimeError("spectrometers did not connect")

    def set_times(self, ms):
        for s in self.names:
            for ch in CHANNELS:
                self.call("PUT", f"/spectrometer/{s}/current_time/{ch}", ms)

    def stop(self):
        if getattr(self, "log", None) is not None:
            self.log.close()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.cpu_quota is not None:
            self.cpu_quota.remove()
        if self.own_dir:
            shutil.rmtree(self.datadir, ignore_errors=True)


DEFAULT_QUOTA = False       # --cpu-quota: every server in the quota
# the legacy server (piccolo3-server), GET /sysinfo/version at c=64 on this
# kind of machine (docs/BENCHMARKS.md, issue 19): the target is 10x
LEGACY_RPS_C64 = 3217
WEB_EVENT_CLIENTS = False   # --web-event-clients: Python stand-ins, not chromium
CASES = ("startup", "cold-auto", "stop", "get", "batch", "overhead", "fetch", "soak",
         "attacks", "scale", "emulated", "web", "web-load")
SERVER_CASES = ("get", "batch", "overhead", "fetch", "soak")

EMULATED_SERVER = """[seabreeze]
emulate = QEPRO:QEP01234, USB2000PLUS:FLMT05678
"""
EMULATED_INSTRUMENT = """[channels]
  [[shutter_1]]
    direction = upwelling
  [[shutter_2]]
    direction = downwelling
[spectrometers]
  [[QEP01234]]
  [[FLMT05678]]
"""


def emulated_server():
    """The server on USB-emulated devices: seabreeze (pyseabreeze, pyusb)
    and the device protocols in the path."""
    confdir = tempfile.mkdtemp(prefix="piccolo-bench-emu-")
    cfg, ins = os.path.join(confdir, "piccolo.cfg"), os.path.join(confdir, "piccolo.config")
    with open(cfg, "w") as f:
        f.write(EMULATED_SERVER)
    with open(ins, "w") as f:
        f.write(EMULATED_INSTRUMENT)
    server = Server(args=["-c", cfg, "-i", ins], names=("S_QEP01234", "S_FLMT05678"))
    server.confdir = confdir
    return server


def percentile(values, q):
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def channel_overheads(server, ms, nsequence):
    """Per-channel overheads of one batch (ms): the time from one channel's
    light spectra to the next channel's, less the integration time, from
    the files' own timestamps (each channel stamped when its last
    spectrometer delivered)."""
    run = f"chan{ms}-{time.monotonic_ns()}"
    server.set_times(ms)
    server.call("PUT", "/control/record_sequence",
                {"run": run, "nsequence": nsequence, "auto": -1, "delay": 0})
    server.wait_idle()
    rundir = os.path.join(server.datadir, run)
    stamps = []
    for name in sorted(n for n in os.listdir(rundir) if n.endswith("_light.pico")):
        with open(os.path.join(rundir, name)) as f:
            spectra = json.load(f)["Spectra"]
        per_channel = {}
        for s in spectra:
            meta = s["Metadata"]
            assert meta["IntegrationTime"] == ms, (name, meta["IntegrationTime"])
            t = datetime.strptime(meta["Datetime"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
            per_channel[meta["Direction"]] = max(per_channel.get(meta["Direction"], 0), t)
        # the channels in the order they were taken (the batch takes them
        # in sorted name order, downwelling first)
        stamps += sorted(per_channel.values())
    return [(b - a) * 1000.0 - ms for a, b in zip(stamps, stamps[1:])]


CHANNEL_TIMES = ((20, 20), (200, 10), (1000, 4))    # (ms, sequences per batch)


def emulated_rows(runs, quick):
    """Per-channel acquisition overhead on the simulator and on the USB
    emulator side by side (same integration times, same batches): the p90
    of every channel of ``runs`` batches at each time; then the driver
    alone on emulated devices, every label checked against what the device
    integrated."""
    for label, make in (("simulated", Server), ("USB-emulated", emulated_server)):
        server = make().start()
        try:
            server.wait_connected()
            for ms, n in CHANNEL_TIMES:
                per_run = [channel_overheads(server, ms, n if not quick else 3)
                           for _ in range(runs)]
                every = [v for values in per_run for v in values]
                p90 = percentile(every, 90)
                emulated = label == "USB-emulated"
                row(f"per-channel overhead at {ms} ms, {label}: p90 of {len(every)}",
                    [p90], "ms", "<= 30" if emulated else "",
                    (lambda m: m <= 30) if emulated else None)
                row(f"  per run: p90 (median of {len(per_run)} runs)",
                    [percentile(v, 90) for v in per_run], "ms")
        finally:
            server.stop()
            if hasattr(server, "confdir"):
                shutil.rmtree(server.confdir, ignore_errors=True)
    driver_rows(runs, quick)


def driver_rows(runs, quick):
    """The seabreeze driver on emulated devices in this process, in real
    time: per acquisition, its time less the integration time; and every
    label against the emulator's record of what it transmitted."""
    sys.path.insert(0, os.path.dirname(HERE))
    from piccolo_twisted.instrument import usb_emulator
    from piccolo_twisted.instrument.device import acquire_clean
    from piccolo_twisted.instrument.seabreeze_driver import SeabreezeDevice
    from piccolo_twisted.instrument.simulator import Optics
    optics = Optics()
    for model, serial in (("USB2000PLUS", "BENCHU2P"), ("QEPRO", "BENCHQEP")):
        device = usb_emulator.add_device(model, serial, optics)
        dev = SeabreezeDevice(serial)
        try:
            info = dev.open()
            dev.set_integration_time(info.min_time)
            for ms, n in CHANNEL_TIMES:
                over, wrong, reads = [], 0, 0
                for _ in range(runs):
                    for _ in range(n if not quick else 3):
                        t0 = time.monotonic()
                        reading = acquire_clean(dev, ms, info.min_time)
                        over.append((time.monotonic() - t0) * 1000.0 - ms)
                        sent = device.sent[-1]
                        wrong += (sent.micros != reading.integration_time * 1000
                                  or reading.integration_time != ms
                                  or sent.start < reading.started - 1e-6)
                        reads += reading.acquisitions > 2
                        time.sleep(0.01)          # the shutter's change
                row(f"driver {model} at {ms} ms: overhead p90 of {len(over)}",
                    [percentile(over, 90)], "ms")
                row(f"  labels wrong of {len(over)} ({reads} taken again)", [wrong], "",
                    "0", lambda m: m == 0, fmt="{:.0f}")
        finally:
            dev.close()
            usb_emulator.remove_device(device)


def status_while(server, action, rate=50, settle=0.0, duration=600.0):
    """GET /control/status at ``rate``/s (from another thread) while
    ``action()`` runs, ``settle`` seconds after the load starts; the
    open-loop latencies."""
    import threading
    out = {}
    done = threading.Event()
    t = threading.Thread(target=lambda: out.update(loadclient.open_loop(
        "::1", server.port, "/control/status", rate=rate, duration=duration, stop=done)))
    t.start()
    try:
        if settle:
            time.sleep(settle)
        action()
    finally:
        done.set()
        t.join()
    return out


def status_during(server, start_batch, rate=50):
    """GET /control/status at ``rate``/s from just before ``start_batch()``
    until the batch is over; the open-loop latencies."""
    def batch():
        start_batch()
        server.wait_idle(timeout=600.0)
    return status_while(server, batch, rate, settle=0.1)


def cold_autointegration(runs, nsequence=20, cpu_quota=None):
    """A fresh server's first batch, autointegrating once (auto = 0):
    nothing of the batch's code path (numpy, the autointegration, the
    encoder) has run before. Status latency over ``runs`` fresh starts."""
    results = []
    for _ in range(runs):
        server = Server(cpu_quota=cpu_quota).start()
        try:
            server.wait_connected()
            r = status_during(server, lambda: server.call(
                "PUT", "/control/record_sequence",
                {"run": "cold", "nsequence": nsequence, "auto": 0, "delay": 0}))
            r["rss"] = server.rss_mib()
            if server.cpu_quota is not None:
                r["throttled"] = server.cpu_quota.throttled()
            results.append(r)
        finally:
            server.stop()
    return results


def stop_times(ms=10000):
    """Abort and SIGTERM while both spectrometers are inside an ``ms``
    integration: seconds until status "idle" with every shutter closed,
    and until the process has exited."""
    server = Server().start()
    try:
        server.wait_connected()
        server.set_times(ms)

        def start_and_wait_for_the_read():
            server.call("PUT", "/control/record_sequence",
                        {"run": f"stop{time.monotonic_ns()}", "nsequence": 2, "auto": -1})
            deadline = time.monotonic() + 30
            while server.call("GET", "/control/status") != "downwelling dark":
                if time.monotonic() > deadline:
                    raise RuntimeError("the batch did not start")
                time.sleep(0.01)
            time.sleep(0.5)
        start_and_wait_for_the_read()
        t0 = time.perf_counter()
        server.call("GET", "/control/abort")
        while not (server.call("GET", "/control/status") == "idle" and all(
                server.call("GET", f"/shutter/{c}/status") == "closed" for c in CHANNELS)):
            time.sleep(0.002)
        abort = time.perf_counter() - t0
        start_and_wait_for_the_read()
        t0 = time.perf_counter()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
        return abort, time.perf_counter() - t0
    finally:
        server.stop()


def cold_rows(runs, quick, cpu_quota):
    n = 5 if quick else 20
    label = (f"cold first {n}-sequence batch, auto = 0"
             + (", server on 0.25 core" if cpu_quota else ""))
    limit = 20 if cpu_quota else 10
    results = cold_autointegration(runs, n, cpu_quota=cpu_quota)
    row(f"GET /control/status at 50/s during {label}: p99",
        [r["p99_ms"] for r in results], "ms", fmt="{:.2f}")
    row(f"GET /control/status at 50/s during {label}: max",
        [r["max_ms"] for r in results], "ms", f"<= {limit}", lambda m: m <= limit,
        fmt="{:.2f}")
    lost = sum(r["lost"] for r in results)
    if lost:
        row(f"  lost requests during {label}", lost, "", "0", lambda m: m == 0, fmt="{:.0f}")
    if cpu_quota:
        row(f"  periods throttled during {label}",
            [r["throttled"][0] for r in results], "", fmt="{:.0f}")


def make_season(root, files=100_000, runs=5000):
    """A season of data: one run of ``files`` .pico files (hard links of a
    few real ones: fast to make) and ``runs`` other runs, all recorded a
    while ago. Returns (the big run's name, seconds taken)."""
    t0 = time.perf_counter()
    big = os.path.join(root, "big")
    os.makedirs(big)
    source = None
    n = 0
    for b in range(files // 1000 + 1):
        for sq in range(500):
            for kind in ("dark", "light"):
                if n == files:
                    break
                path = os.path.join(big, f"b{b:06d}_s{sq:06d}_{kind}.pico")
                if n % 50000 == 0:          # ext4 allows 65,000 links
                    with open(path, "w") as f:
                        f.write('{"Spectra":[]}')
                    source = path
                else:
                    os.link(source, path)
                n += 1
    for i in range(runs):
        os.mkdir(os.path.join(root, f"run{i:05d}"))
    for i, name in enumerate(sorted(os.listdir(root), key=lambda x: (x == "big", x))):
        os.utime(os.path.join(root, name), (1e9 + i, 1e9 + i))
    return "big", time.perf_counter() - t0


def first_block(port, path, method=1, payload=b"", timeout=5.0):
    """Milliseconds until the first block of the answer (Block2 0, 1 KiB)."""
    sock = loadclient._socket("::1", port)
    sock.setblocking(True)
    sock.settimeout(timeout)
    mid = int.from_bytes(os.urandom(2), "big")
    try:
        t0 = time.perf_counter()
        sock.send(loadclient.encode_request(mid, path, code=method, token=b"\x51",
                                            payload=payload, block2=(0, 6)))
        while True:
            data = sock.recv(65536)
            if struct.unpack_from("!H", data, 2)[0] == mid:
                break
        ms = (time.perf_counter() - t0) * 1000
        code = data[1]
        assert code in (0x44, 0x45), f"{path}: code {code >> 5}.{code & 31:02d}"
        return ms
    finally:
        sock.close()


def index_built(server, timeout=120.0):
    """Seconds the server logged for building its index."""
    deadline = time.monotonic() + timeout
    log = os.path.join(server.datadir, "server.log")
    while time.monotonic() < deadline:
        with open(log, errors="replace") as f:
            for line in f:
                if "index of" in line and "built in" in line:
                    return float(line.rsplit("built in", 1)[1].split()[0])
        time.sleep(0.1)
    raise RuntimeError("the server never logged its index")


PULL = """if 1:
    import json, sys
    import loadclient
    for _ in range(2):
        code, body, blocks = loadclient.fetch("::1", int(sys.argv[1]), sys.argv[2], timeout=10)
        print(len(json.loads(body)))
"""


def scale_rows(runs, quick):
    """Issue 13: 100,000 files in a run and 5,000 runs."""
    files, nruns = (20_000, 1000) if quick else (100_000, 5000)
    base = Server().start()
    try:
        base.wait_connected()
        time.sleep(1.0)
        rss_empty = base.rss_mib()
    finally:
        base.stop()
    builds, rss, firsts, status, during = [], [], {}, [], []
    client = b'[[], {"alpha": false, "reverse": false, "nitems": null, "page": 0}]'
    for _ in range(runs):
        root = tempfile.mkdtemp(prefix="piccolo-bench-scale-")
        big, made = make_season(root, files, nruns)
        server = Server(datadir=root).start()
        try:
            builds.append(index_built(server))
            server.wait_connected()
            time.sleep(1.0)                 # the big listing is encoded after the build
            rss.append(server.rss_mib())
            for label, path, method, payload in (
                    ("spectra_list", f"/data_dir/runs/{big}/spectra_list", 1, b""),
                    ("current_batch", f"/data_dir/runs/{big}/current_batch", 1, b""),
                    ("all_runs", "/data_dir/all_runs", 3, client)):
                times = sorted(first_block(server.port, path, method, payload)
                               for _ in range(20))
                firsts.setdefault(label, []).append((statistics.median(times), times[-1]))
            # status at 50/s while a client pulls the whole listing, twice
            def pull_listing():
                # the puller is its own process: in this one it would take
                # the GIL from the status client and inflate its figures
                pull = subprocess.run(
                    [sys.executable, "-c", PULL, str(server.port),
                     f"/data_dir/runs/{big}/spectra_list"],
                    capture_output=True, text=True, timeout=120, cwd=HERE)
                assert pull.stdout.split() == [str(files)] * 2, pull.stdout + pull.stderr
            status.append(status_while(server, pull_listing, settle=0.2, duration=300.0))
            during.append(listing_during_batch(server, big, files))
        finally:
            server.stop()
            shutil.rmtree(root, ignore_errors=True)
    what = f"{files // 1000}k files in a run, {nruns} runs"
    row(f"index build at start ({what})", [b * 1000 for b in builds], "ms")
    row(f"RSS at start ({what})", rss, "MiB")
    row(f"  index + listings over an empty server ({rss_empty:.1f} MiB)",
        [r - rss_empty for r in rss], "MiB", "<= 15", lambda m: m <= 15)
    for label, values in firsts.items():
        row(f"first block of {label} ({what}): median",
            [m for m, _ in values], "ms", "<= 20", lambda m: m <= 20, fmt="{:.2f}")
        row(f"first block of {label} ({what}): max of 20",
            [x for _, x in values], "ms", fmt="{:.2f}")
    row(f"GET /control/status at 50/s while pulling the {files // 1000}k listing: p99",
        [r["p99_ms"] for r in status], "ms", fmt="{:.2f}")
    row(f"GET /control/status at 50/s while pulling the {files // 1000}k listing: max",
        [r["max_ms"] for r in status], "ms", "<= 10", lambda m: m <= 10, fmt="{:.2f}")
    lost = sum(r["lost"] for r in status)
    if lost:
        row("  lost requests while pulling the listing", lost, "", "0", lambda m: m == 0,
            fmt="{:.0f}")
    for label in ("current_batch", "spectra_list"):
        for i, what in enumerate(("median", "p90", "max")):
            row(f"first block of {label} during a batch into the {files // 1000}k run: {what}",
                [d[label][i] for d in during], "ms", fmt="{:.2f}")
    row("  requests answered during each such batch", [d["n"] for d in during], "",
        fmt="{:.0f}")


def listing_during_batch(server, big, files, nsequence=40):
    """A batch writes into the big run (10 ms integrations, no delay: a
    file every ~50 ms) while a client asks its current_batch and the first
    block of its spectra_list back to back: every answer is checked
    against the disk (each save moves the run's mtime: a request after a
    save waits for it to land and compares the run's names once, issue
    20), the first-block times (median, p90, max) are returned."""
    server.set_times(10)
    server.call("PUT", "/control/record_sequence",
                {"run": big, "nsequence": nsequence, "auto": -1, "delay": 0})
    times = {"current_batch": [], "spectra_list": []}
    while server.call("GET", "/control/status") != "idle":
        for label in times:
            times[label].append(first_block(server.port, f"/data_dir/runs/{big}/{label}"))
    # the listing is the directory's: the files before, the batch's dark,
    # lights and final dark
    code, body, _ = loadclient.fetch("::1", server.port, f"/data_dir/runs/{big}/spectra_list",
                                     timeout=30)
    names = json.loads(body)
    on_disk = [n for n in os.listdir(os.path.join(server.datadir, big)) if n.endswith(".pico")]
    assert sorted(names) == sorted(on_disk) and len(names) == files + nsequence + 2, \
        (len(names), len(on_disk))
    out = {"n": len(times["spectra_list"])}
    for label, values in times.items():
        values.sort()
        out[label] = ((statistics.median(values), values[int(len(values) * 0.9)], values[-1])
                      if values else (None, None, None))
    return out


def free_tcp_port():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.bind(("::1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-proxy-server",
                 "--disable-dev-shm-usage", "--window-size=1280,900")


def chromium_available():
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)


class Browsers:
    """``n`` headless chromium browsers (Debian's, through its chromedriver)
    with the live page open."""

    def __init__(self, url, n):
        self.url, self.n = url, n
        self.drivers, self.profiles = [], []

    def __enter__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        for _ in range(self.n):
            profile = tempfile.mkdtemp(prefix="piccolo-bench-chromium-")
            self.profiles.append(profile)
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in BROWSER_FLAGS + (f"--user-data-dir={profile}",):
                options.add_argument(flag)
            driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
            self.drivers.append(driver)
            driver.get(self.url)
        deadline = time.monotonic() + 60
        for driver in self.drivers:
            while driver.execute_script("return document.getElementById('link').textContent") != "live":
                if time.monotonic() > deadline:
                    raise RuntimeError("a browser did not get the live page")
                time.sleep(0.1)
        return self

    def updates(self):
        """Plot updates each browser has drawn so far."""
        return [sum(int(v) for v in d.execute_script(
            "return [...document.querySelectorAll('#plots canvas')].map(c => c.dataset.updates)"))
            for d in self.drivers]

    def __exit__(self, *exc):
        for driver in self.drivers:
            try:
                driver.quit()
            except Exception:
                pass
        for profile in self.profiles:
            shutil.rmtree(profile, ignore_errors=True)


class EventClients:
    """Stand-ins for browsers where there is no chromium: each loads the
    page and its assets and reads /events, as the page does."""

    def __init__(self, url, n):
        self.url, self.n = url, n
        self.socks, self.threads, self.events = [], [], [0] * n

    def __enter__(self):
        import threading
        import urllib.request
        page = urllib.request.urlopen(self.url).read().decode()
        for i in range(self.n):
            for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
                urllib.request.urlopen(self.url.rstrip("/") + asset).read()
            from urllib.parse import urlsplit
            where = urlsplit(self.url)
            sock = socket.create_connection((where.hostname, where.port))
            sock.sendall(b"GET /events HTTP/1.1\r\nHost: %s\r\n\r\n"
                         % where.netloc.encode("ascii"))
            self.socks.append(sock)

            def read(i=i, sock=sock):
                try:
                    while True:
                        data = sock.recv(65536)
                        if not data:
                            return
                        self.events[i] += data.count(b"\n\n")
                except OSError:
                    return
            t = threading.Thread(target=read, daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def updates(self):
        return list(self.events)

    def __exit__(self, *exc):
        for sock in self.socks:
            sock.close()


def page_weight(url):
    """Bytes of the page and everything it loads."""
    import urllib.request
    page = urllib.request.urlopen(url).read()
    total = len(page)
    for asset in set(re.findall(r'(?:src|href)="(/[^"#]+)"', page.decode())):
        total += len(urllib.request.urlopen(url.rstrip("/") + asset).read())
    return total


def web_rows(runs, quick, nbrowsers=5):
    """The web page: RSS with it off and on, its weight, and CoAP status
    latency during a 20-sequence batch with browsers on the live page."""
    clients = Browsers if chromium_available() and not WEB_EVENT_CLIENTS else EventClients
    kind = "chromium browsers" if clients is Browsers else "event-stream clients (no chromium)"
    rss = {"off": [], "on": []}
    for _ in range(runs):
        for mode in ("off", "on"):
            args = ["--web", str(free_tcp_port())] if mode == "on" else []
            s = Server(args=args).start()
            time.sleep(2.0)
            rss[mode].append(s.rss_mib())
            s.stop()
    row("RSS after start, web page off", rss["off"], "MiB")
    row("RSS after start, web page on", rss["on"], "MiB")
    row("  web on - web off (after start)", [b - a for a, b in zip(rss["off"], rss["on"])], "MiB",
        "<= 8", lambda m: m <= 8)
    nseq = 20 if not quick else 5
    after = {"off": [], "on": []}
    cpu = {"off": [], "on": []}
    for mode in ("off", "on"):
        wport = free_tcp_port()
        server = Server(args=["--web", str(wport)] if mode == "on" else []).start()
        try:
            server.wait_connected()
            server.set_times(200)
            url = f"http://[::1]:{wport}/"
            if mode == "on":
                row("page weight (HTML, script, style, icon)", page_weight(url) / 1024, "KB",
                    "<= 250", lambda m: m <= 250)
            results = []
            for i in range(runs):
                def batch(i=i):
                    server.call("PUT", "/control/record_sequence",
                                {"run": f"web{mode}{i}", "nsequence": nseq, "auto": -1, "delay": 0})
                    server.wait_idle()
                if mode == "on":
                    with clients(url, nbrowsers) as browsers:
                        before = browsers.updates()
                        c0 = server.cpu_seconds()
                        results.append(status_while(server, batch, duration=300.0))
                        cpu[mode].append(server.cpu_seconds() - c0)
                        drawn = [b - a for a, b in zip(before, browsers.updates())]
                    row(f"  updates drawn per browser during the batch (run {i + 1})",
                        statistics.median(drawn), "", fmt="{:.0f}")
                else:
                    c0 = server.cpu_seconds()
                    results.append(status_while(server, batch, duration=300.0))
                    cpu[mode].append(server.cpu_seconds() - c0)
            label = (f"with {nbrowsers} {kind} on the live page" if mode == "on"
                     else "web page off")
            row(f"GET /control/status at 50/s during a {nseq}-sequence batch at 200 ms, "
                f"{label}: p99", [r["p99_ms"] for r in results], "ms", "<= 2",
                lambda m: m <= 2, fmt="{:.2f}")
            row(f"GET /control/status ... {label}: max", [r["max_ms"] for r in results], "ms",
                "<= 20", lambda m: m <= 20, fmt="{:.2f}")
            lost = sum(r["lost"] for r in results)
            if lost:
                row(f"  lost requests ({label})", lost, "", "0", lambda m: m == 0, fmt="{:.0f}")
            row(f"  server CPU during the batch ({label})", cpu[mode], "s", fmt="{:.2f}")
            after[mode].append(server.rss_mib())
        finally:
            server.stop()
    row("RSS after the batches, web page off", after["off"], "MiB")
    row(f"RSS after the batches, web page on ({nbrowsers} {kind})", after["on"], "MiB")
    row("  web on - web off (after the batches)", after["on"][0] - after["off"][0], "MiB",
        "<= 8", lambda m: m <= 8)


WEB_LOAD_CFG = """[web]
address = 127.0.0.1
"""


def make_big_run(root, name, files, seed=22):
    """A run of ``files`` spectrum files (~120 KB of .pico-like JSON each,
    as compressible as real ones) in ``root``."""
    import random
    rng = random.Random(seed)
    run = os.path.join(root, name)
    os.makedirs(run, exist_ok=True)
    for i in range(files):
        pixels = ",".join(str(1000 + rng.randrange(60000)) for _ in range(2048))
        meta = '{"Direction": "upwelling", "IntegrationTime": 100.0, "SerialNumber": "x"}'
        body = '{"Spectra": [%s]}' % ",".join(
            '{"Metadata": %s, "Pixels": [%s]}' % (meta, pixels) for _ in range(9))
        with open(os.path.join(run, f"b000000_s{i:06d}_light.pico"), "w") as f:
            f.write(body)
    return run


class WebLoad:
    """Background web traffic on 127.0.0.1:``port`` until ``stop()``:
    ``zips`` readers downloading /zip/<run> over and over, and/or ``hosts``
    x ``conns`` connections (from 127.0.3.x) pipelining GET
    /api/control/status as fast as they are answered."""

    def __init__(self, port, run="big", zips=0, hosts=0, conns=8):
        import threading
        self.port, self.run = port, run
        self.stopping = threading.Event()
        self.answers = 0
        self.zipped = 0
        self.threads = []
        for _ in range(zips):
            self.threads.append(threading.Thread(target=self._zip, daemon=True))
        for h in range(hosts):
            for _ in range(conns):
                self.threads.append(threading.Thread(target=self._flood, args=(f"127.0.3.{h + 1}",),
                                                     daemon=True))

    def __enter__(self):
        self.t0 = time.monotonic()
        for t in self.threads:
            t.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join(10)
        self.seconds = time.monotonic() - self.t0

    def _zip(self):
        while not self.stopping.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                s.sendall(b"GET /zip/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                          % self.run.encode())
                while not self.stopping.is_set():
                    data = s.recv(1 << 16)
                    if not data:
                        self.zipped += 1
                        break
                s.close()
            except OSError:
                time.sleep(0.2)

    def _flood(self, source):
        request = b"GET /api/control/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        while not self.stopping.is_set():
            try:
                s = socket.socket()
                s.bind((source, 0))
                s.settimeout(2)
                s.connect(("127.0.0.1", self.port))
                s.sendall(request * 64)
                pending = 64
                while not self.stopping.is_set():
                    try:
                        data = s.recv(1 << 16)
                    except socket.timeout:
                        continue
                    if not data:
                        break
                    n = data.count(b"HTTP/1.1 ")
                    self.answers += n
                    pending -= n
                    if pending < 32:
                        s.sendall(request * 32)
                        pending += 32
                s.close()
            except OSError:
                time.sleep(0.1)


def web_load_rows(runs, quick):
    """CoAP GET /control/status latency while the web page is under load
    (zips of a large run, a flood of pipelined requests from one host and
    from eight), and RSS with the web off and on after rounds of zips."""
    files = 300 if quick else 1500
    seconds = 5.0 if quick else 10.0
    root = tempfile.mkdtemp(prefix="piccolo-bench-webload-")
    confdir = tempfile.mkdtemp(prefix="piccolo-bench-webcfg-")
    cfg = os.path.join(confdir, "piccolo.cfg")
    with open(cfg, "w") as f:
        f.write(WEB_LOAD_CFG)
    try:
        make_big_run(root, "big", files)
        rss_off = []
        for _ in range(runs):
            s = Server(datadir=root, args=["-c", cfg]).start()
            s.own_dir = False
            time.sleep(2.0)
            rss_off.append(s.rss_mib())
            s.stop()
        wport = free_tcp_port()
        server = Server(datadir=root, args=["-c", cfg, "--web", str(wport)]).start()
        server.own_dir = False
        try:
            server.wait_connected()
            time.sleep(1.0)
            rss_on = server.rss_mib()
            cases = [("no web traffic", {}), ("one zip download", {"zips": 1}),
                     ("four zip downloads", {"zips": 4}),
                     ("HTTP flood, 1 host x 8 pipelining connections", {"hosts": 1}),
                     ("HTTP flood, 8 hosts x 8 pipelining connections", {"hosts": 8})]
            for label, load in cases:
                results, rates = [], []
                for _ in range(runs):
                    with WebLoad(wport, **load) as w:
                        results.append(status_while(server, lambda: time.sleep(seconds),
                                                    duration=seconds + 5))
                    rates.append(w.answers / w.seconds)
                row(f"GET /control/status at 50/s, {label}: p99",
                    [r["p99_ms"] for r in results], "ms", fmt="{:.2f}")
                if load.get("hosts"):
                    row("  web answers/s to the flood (paced: 30/s a host, 150/s in all)",
                        rates, "/s", fmt="{:.0f}")
            for _ in range(3):
                with WebLoad(wport, zips=4) as w:
                    deadline = time.monotonic() + 120
                    while w.zipped < 4 and time.monotonic() < deadline:
                        time.sleep(0.2)
            time.sleep(2.0)
            rss_zips = server.rss_mib()
        finally:
            server.stop()
        row("RSS after start, web page off", rss_off, "MiB")
        row("RSS after start, web page on", rss_on, "MiB")
        row(f"RSS after 3 rounds of 4 parallel zips of a {files}-file run, web on", rss_zips,
            "MiB")
        row("  web on after zips - web off", rss_zips - statistics.median(rss_off), "MiB",
            "<= 8", lambda m: m <= 8)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(confdir, ignore_errors=True)


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
        # the channels in the order they were taken (the batch takes them
        # in sorted name order, downwelling first)
        stamps += sorted(per_channel.values())
    cycle = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return (cycle - ms / 1000.0) * 1000.0


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--load-seconds", type=float, default=5.0)
    p.add_argument("--soak", type=float, default=180.0, help="soak seconds (600 = the long form)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", action="append", choices=CASES, metavar="CASE",
                   help="run only this case (repeatable): " + ", ".join(CASES))
    p.add_argument("--cpu-quota", action="store_true",
                   help="run every server in a 0.25-core cgroup v1 CPU quota")
    p.add_argument("--web-event-clients", action="store_true",
                   help="web case: page-like Python clients instead of chromium browsers "
                        "(the browsers' own CPU then stays off the machine)")
    a = p.parse_args()
    global WEB_EVENT_CLIENTS
    WEB_EVENT_CLIENTS = a.web_event_clients
    if a.quick:
        a.runs, a.load_seconds, a.soak = 1, 2.0, 20.0
    runs = a.runs
    global DEFAULT_QUOTA
    if a.cpu_quota:
        if not cpu_quota_available():
            p.error(f"--cpu-quota needs a writable {CGROUP_CPU} (cgroup v1, root)")
        DEFAULT_QUOTA = True
    wanted = set(a.only or CASES)

    def want(case):
        return case in wanted
    print(f"piccolo-twisted benchmark  {datetime.now().isoformat(timespec='seconds')}  "
          f"{platform.node()}  {platform.processor() or platform.machine()}  "
          f"{os.cpu_count()} cores  Python {platform.python_version()}")
    print(f"  {'figure':<58} {'median (min-max)':>26} {'unit':<6} {'target':<16}"
          + ("   [every server on 0.25 core]" if a.cpu_quota else ""))

    # -- start-up ------------------------------------------------------------
    if want("startup"):
        startups, rss_start = [], []
        for _ in range(runs):
            s = Server().start()
            time.sleep(2.0)
            startups.append(s.startup)
            rss_start.append(s.rss_mib())
            s.stop()
        row("start-up to first CoAP answer", [x * 1000 for x in startups], "ms")
        row("RSS after start", rss_start, "MiB", "<= 45", lambda m: m <= 45)

    # -- a cold server's first autointegrating batch ---------------------------
    if want("cold-auto"):
        cold_rows(runs, a.quick, cpu_quota=a.cpu_quota)
        if not a.cpu_quota and a.only is None:
            if cpu_quota_available():
                cold_rows(runs, a.quick, cpu_quota=True)
            else:
                print(f"  (no writable {CGROUP_CPU}: the 0.25-core case is skipped)")

    # -- abort and SIGTERM inside a 10 s integration ---------------------------
    if want("stop"):
        times = [stop_times() for _ in range(runs)]
        row("abort inside a 10 s integration: to idle, shutters closed",
            [a * 1000 for a, _ in times], "ms", "<= 1000", lambda m: m <= 1000)
        row("SIGTERM inside a 10 s integration: to exit", [t for _, t in times], "s",
            "<= 5", lambda m: m <= 5, fmt="{:.2f}")

    if wanted & set(SERVER_CASES):
        server_cases(a, runs, want)
    if want("attacks"):
        attack_rows(runs, a.quick)
    if want("scale"):
        scale_rows(runs, a.quick)
    if want("emulated"):
        emulated_rows(runs, a.quick)
    if want("web"):
        web_rows(runs, a.quick)
    if want("web-load"):
        web_load_rows(runs, a.quick)
    missed = [r for r in ROWS if r[4] == "MISSED"]
    print(f"{len(ROWS)} figures, {len(missed)} targets missed")
    return 1 if missed else 0


def attack_rows(runs, quick):
    """Issue 19b: the outside attacks on issue 19's CoAP layer all at once
    (bench/hostile.py ``attack_mix``: dedup floods from 17 and 300
    addresses, slow reads of a recording spectrometer from 8, 2,100 spoofed
    observers, a power_on flood, a Block2 hog), against a server on
    127.0.0.1 recording a batch, while a second client GETs /control/status
    at 50/s; then that client's abort must be answered."""
    import multiprocessing
    seconds = 10.0 if quick else 30.0
    mp = multiprocessing.get_context("fork")

    def attack(dst, stop, out):
        out.put(hostile.attack_mix(dst, stop, {}))
    p99s, maxes, aborted, sent, cpu = [], [], [], [], []
    for _ in range(runs):
        server = Server(host="127.0.0.1").start()
        try:
            server.wait_connected()
            server.set_times(1000)
            server.call("PUT", "/control/record_sequence",
                        {"run": "attacked", "nsequence": 500, "auto": -1, "delay": 0})
            # the attackers in a process of their own (not this one's GIL)
            stop, out = mp.Event(), mp.Queue()
            attacking = mp.Process(target=attack, args=(("127.0.0.1", server.port), stop, out))
            cpu0 = server.cpu_seconds()
            attacking.start()
            try:
                time.sleep(2.0)
                status = loadclient.open_loop("127.0.0.1", server.port, "/control/status",
                                              rate=50, duration=seconds)
                code, _, _ = loadclient.fetch("127.0.0.1", server.port, "/control/abort",
                                              timeout=5.0)
            finally:
                stop.set()
                counts = out.get(timeout=60)
                attacking.join(60)
            cpu.append((server.cpu_seconds() - cpu0) / (seconds + 2.0) * 100)
            p99s.append(status["p99_ms"])
            maxes.append(status["max_ms"])
            aborted.append(1 if code == 0x45 else 0)
            sent.append(sum(counts.values()) / (seconds + 2.0))
        finally:
            server.stop()
    row("attack datagrams/s sent meanwhile", sent, "/s", fmt="{:.0f}")
    row("server CPU during the attacks", cpu, "%", fmt="{:.0f}")
    row("GET /control/status at 50/s during the attacks: p99", p99s, "ms", "<= 20",
        lambda m: m <= 20, fmt="{:.2f}")
    row("GET /control/status at 50/s during the attacks: max", maxes, "ms", fmt="{:.2f}")
    row("abort during the attacks answered 2.05", aborted, "of 1", "1",
        lambda m: m == 1, fmt="{:.0f}")


def server_cases(a, runs, want):
    """The cases that share one long-running server."""
    server = Server().start()
    try:
        server.wait_connected()
        # -- GET throughput ------------------------------------------------------
        if want('get'):
            for c in (1, 8, 64):
                results = [loadclient.closed_loop("::1", server.port, "/sysinfo/version",
                                                  concurrency=c, duration=a.load_seconds)
                           for _ in range(runs)]
                failed = sum(r["lost"] + sum(v for k, v in r["codes"].items() if k != "2.05")
                             for r in results)
                row(f"GET /sysinfo/version c={c}: requests/s", [r["rps"] for r in results], "req/s",
                    f">= {10 * LEGACY_RPS_C64} (10x)" if c == 64 else "",
                    (lambda m: m >= 10 * LEGACY_RPS_C64) if c == 64 else None,
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
        if want('batch'):
            def during_batch(ms, nsequence):
                server.set_times(ms)
                server.call("PUT", "/control/record_sequence",
                            {"run": f"busy{ms}", "nsequence": nsequence, "auto": -1, "delay": 0})
                return status_while(server, server.wait_idle, duration=300.0)
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
        if want('overhead'):
            for ms, n in ((20, 20), (200, 10), (1000, 4)):
                values = [sequence_overhead(server, ms, n if not a.quick else 3) for _ in range(runs)]
                row(f"sequence overhead per channel at {ms} ms", values, "ms",
                    "<= 15 + 8 (min t)", lambda m: m <= 23)

        # -- a 140 kB .pico over CoAP --------------------------------------------------
        if want('fetch'):
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
        if want('soak'):
            warm = server.rss_mib()
            loadclient.open_loop("::1", server.port, "/control/status", rate=200, duration=a.soak)
            after = server.rss_mib()
            row(f"RSS after a {a.soak / 60:.0f}-minute soak (200 req/s)", after, "MiB", "<= 64",
                lambda m: m <= 64)
            row("RSS growth over the soak", (after - warm) / warm * 100, "%", "<= 5",
                lambda m: m <= 5)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
