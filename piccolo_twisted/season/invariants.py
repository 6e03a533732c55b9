"""The named invariants the season checks, and the violation record.

Each is stated from the outside: what a client was told (acknowledged
jobs and settings, the scheduler's history), what is on disk, what the
board's pins did, and when. The checks themselves live in
:mod:`.ledger` (what was promised and what happened) and :mod:`.checks`
(how and when they are checked)."""

from dataclasses import dataclass
from datetime import datetime, timezone

INVARIANTS = {
    "slot-accounted":
        "every scheduled slot ends as a batch on disk or as a recorded miss "
        "or failure with a reason; none vanishes, none is recorded twice, "
        "no outcome names a slot that was never scheduled",
    "never-off-under-batch":
        "the spectrometers are never powered off while a batch holds them",
    "power-follows-window":
        "outside the power window the spectrometers are on within a bounded "
        "time, inside it off; every failed power change is retried until it "
        "succeeds",
    "acked-durable":
        "no acknowledged job or setting is lost across a crash",
    "files-intact":
        "no spectrum file is overwritten or left partial; every done batch "
        "has its files",
    "device-fault-recorded":
        "no batch uses a device that is not connected without the fault "
        "being recorded (the spectrometer DROPPED with its error, or the "
        "batch failed with a reason)",
    "jobs-wait-for-ready":
        "a scheduled slot never fails for want of a spectrometer while every "
        "spectrometer is plugged in and powered (since the server started, or "
        "long enough for it to connect again)",
    "errors-handled":
        "no error is left unhandled in a Deferred (every failure of a device, "
        "a switch, a write is consumed by the code that waits for it)",
    "timers-on-wall-time":
        "scheduled batches start at their wall time, never before it and not "
        "later than the catch-up allows, across clock jumps",
    "health-matches-disk":
        "/sysinfo/health's files today and misses/failures in the last 24 h "
        "agree with the files on disk and the durable history",
}


def iso(ts):
    if ts is None:
        return "-"
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return repr(ts)


@dataclass
class Violation:
    name: str
    detail: str
    day: float           # simulated days since the start
    true_time: float     # the world's time (POSIX seconds)
    wall: float | None   # the server's wall clock then (None: server down)

    def describe(self, seed):
        wall = iso(self.wall) if self.wall is not None else "server down"
        return (f"VIOLATION {self.name} at day {self.day:.4f} "
                f"({iso(self.true_time)}; server wall clock {wall}), seed {seed}:\n"
                f"  {self.detail}\n  ({INVARIANTS[self.name]})")


def help_text():
    lines = ["invariants checked throughout:"]
    for name, text in INVARIANTS.items():
        lines.append(f"  {name}: {text}")
    return "\n".join(lines)
