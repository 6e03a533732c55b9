#!/usr/bin/env python3
"""Scheduler at the job cap: fills 1000 jobs over CoAP, checks the 1001st
is refused, then times ``GET /control/scheduler/jobs`` (a blockwise body of
~107 kB) and the server CPU it costs.

    python bench/jobs_listing.py [--gets 30]

Starts its own server (``twistd -n piccolo``) on a loopback port and stops
it at the end.
"""

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loadclient  # noqa: E402
from run import Server  # noqa: E402

CAP = 1000


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gets", type=int, default=30)
    a = p.parse_args()
    server = Server().start()
    try:
        def add(i):
            return server.call("PUT", "/control/record_sequence",
                               {"run": f"cap{i}", "nsequence": 1,
                                "at_time": "2099-01-01T00:00:00+00:00", "interval": 3600})
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(add, range(CAP)))
        fill = time.perf_counter() - t0
        code, body, _ = loadclient.fetch("::1", server.port, "/control/record_sequence",
                                         method=3, payload=json.dumps(
                                             {"run": "over", "at_time": "2099-01-01T00:00:00Z"}
                                         ).encode())
        refused = f"{code >> 5}.{code & 31:02d} {body.decode()}"
        times = []
        cpu0 = cpu_seconds(server.proc.pid)
        for _ in range(a.gets):
            t = time.perf_counter()
            code, body, blocks = loadclient.fetch("::1", server.port, "/control/scheduler/jobs")
            times.append((time.perf_counter() - t) * 1000)
        cpu = (cpu_seconds(server.proc.pid) - cpu0) / a.gets * 1000
        jobs = json.loads(body)
        assert len(jobs) == CAP, len(jobs)
        print(f"jobs stored: {CAP} in {fill:.1f} s ({CAP / fill:.0f} acknowledged PUTs/s, "
              "16 clients)")
        print(f"job {CAP + 1}: {refused}")
        print(f"GET /control/scheduler/jobs at the cap: {len(body)} B in {blocks} blocks; "
              f"median {statistics.median(times):.1f} ms, max {max(times):.1f} ms over "
              f"{a.gets}; server CPU {cpu:.1f} ms per listing")
        print(f"RSS with {CAP} jobs: {server.rss_mib():.1f} MiB")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
