"""status, record, jobs and health."""

import asyncio
import signal
import sys
from datetime import datetime

from .client import CliError, Refused, Unreachable

STATUS_WORDS = {1: "no worker", 2: "powered off", 3: "dropped", 4: "connecting",
                5: "disconnected", 6: "idle", 7: "recording", 8: "autointegrating"}


BUSY = (7, 8)                 # recording, autointegrating: the device is in use
TEMPERATURE_TIMEOUT = 1.0


async def _maybe(coro, default=None):
    """A value that may be missing (e.g. no TEC, no such run yet)."""
    try:
        return await coro
    except Refused:
        return default


# -- status ---------------------------------------------------------------

async def _spectrometer(client, name, channels):
    base = f"spectrometer/{name}"
    status, tec, *times = await asyncio.gather(
        client.get(f"{base}/status"), _maybe(client.get(f"{base}/haveTEC"), False),
        *(_maybe(client.get(f"{base}/current_time/{c}")) for c in channels))
    temperature = None
    if tec and status not in BUSY:
        # a reading waits for the device; never let it hold the screen up
        try:
            temperature = await client.get(f"{base}/current_temperature",
                                           timeout=TEMPERATURE_TIMEOUT)
        except (Refused, Unreachable):      # busy, no cooler, or slow: "-"
            temperature = None
    return {"name": name, "status": status, "tec": tec, "temperature": temperature,
            "times": dict(zip(channels, times))}


async def gather_status(client):
    (control, sequence, nseq, run, fault, specs, channels, shutters,
     jobs, quiet) = await asyncio.gather(
        client.get("control/status"), client.get("control/current_sequence"),
        client.get("control/numSequences"), client.get("data_dir/current_run"),
        _maybe(client.get("control/fault"), ""),
        client.get("spectrometer/spectrometers"), client.get("spectrometer/channels"),
        client.get("shutter/shutters"),
        _maybe(client.get("control/scheduler/jobs"), []),
        _maybe(client.get("control/scheduler/quietTimeEnabled")))
    batch = await _maybe(client.get(f"data_dir/runs/{run}/current_batch")) if run else None
    spectrometers = await asyncio.gather(*(_spectrometer(client, s, channels) for s in specs))
    shutter_states = await asyncio.gather(*(client.get(f"shutter/{c}/status") for c in shutters))
    return {"control": control, "sequence": sequence, "nsequence": nseq, "run": run,
            "batch": batch, "fault": fault, "spectrometers": spectrometers,
            "shutters": dict(zip(shutters, shutter_states)), "jobs": jobs or [],
            "quiet": quiet}


def format_status(s):
    width = max([12] + [len(spec["name"]) for spec in s["spectrometers"]])
    lines = [f"{'control':<{width}} {s['control']}"]
    where = f"run {s['run'] or '-'}"
    if s["batch"] is not None and s["batch"] >= 0:
        where += f", batch {s['batch']}"
    if s["sequence"] is not None and s["sequence"] >= 0:
        where += f", sequence {s['sequence'] + 1} of {s['nsequence']}"
    lines.append(f"{'current':<{width}} {where}")
    for spec in s["spectrometers"]:
        words = STATUS_WORDS.get(spec["status"], f"status {spec['status']}")
        times = ", ".join(f"{c} {t} ms" for c, t in spec["times"].items() if t is not None)
        line = f"{spec['name']:<{width}} {words}; integration {times or '-'}"
        if spec["tec"]:
            t = spec["temperature"]
            line += "; temperature " + (f"{t:.1f} °C" if isinstance(t, (int, float)) else "-")
        lines.append(line)
    lines.append(f"{'shutters':<{width}} " + (", ".join(f"{c} {v}" for c, v in s["shutters"].items())
                                    or "none"))
    active = [j for j in s["jobs"] if j[5] == "active"]
    suspended = [j for j in s["jobs"] if j[5] == "suspended"]
    summary = f"{len(active)} active, {len(suspended)} suspended"
    upcoming = sorted(j[2] for j in active if j[2])
    if upcoming:
        summary += f"; next at {_when(upcoming[0])}"
    if s["quiet"]:
        summary += "; quiet time on"
    lines.append(f"{'scheduler':<{width}} {summary}")
    lines.append(f"{'last fault':<{width}} {s['fault'] or 'none'}")
    return "\n".join(lines)


WATCHED = ("control/status", "control/fault", "data_dir/current_run",
           "control/scheduler/jobs")


async def status(client, out, watch=False, updates=None):
    print(format_status(await gather_status(client)), file=out, flush=True)
    if not watch:
        return 0
    specs = await client.get("spectrometer/spectrometers")
    observations = [client.observe(p) for p in
                    WATCHED + tuple(f"spectrometer/{s}/status" for s in specs)]
    changed = asyncio.Event()
    try:
        for obs in observations:
            await obs.start()
        tasks = [asyncio.ensure_future(_pump(obs, changed)) for obs in observations]
        seen = 0
        try:
            while updates is None or seen < updates:
                await changed.wait()
                changed.clear()
                await asyncio.sleep(0.05)       # let a burst of changes settle
                changed.clear()
                seen += 1
                stamp = datetime.now().strftime("%H:%M:%S")
                print(f"\n-- {stamp}", file=out)
                print(format_status(await gather_status(client)), file=out, flush=True)
        finally:
            for t in tasks:
                t.cancel()
    finally:
        for obs in observations:
            obs.cancel()
    return 0


async def _pump(obs, changed):
    while True:
        await obs.next()
        changed.set()


# -- record ---------------------------------------------------------------

class _Interrupts:
    """Ctrl-C while recording: counted instead of ending the program."""

    def __init__(self, install):
        self.event = asyncio.Event()
        self.installed = False
        if install:
            try:
                asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self.event.set)
                self.installed = True
            except (NotImplementedError, RuntimeError, ValueError):
                pass

    def remove(self):
        if self.installed:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGINT)
            self.installed = False


async def ask(question, interrupts):
    """Ask on the terminal; a second Ctrl-C counts as yes. EOF counts as no."""
    print(question, end=" ", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    interrupts.event.clear()
    reading = loop.run_in_executor(None, sys.stdin.readline)
    again = asyncio.ensure_future(interrupts.event.wait())
    done, _ = await asyncio.wait({reading, again}, return_when=asyncio.FIRST_COMPLETED)
    again.cancel()
    interrupts.event.clear()
    if reading in done:
        return reading.result().strip().lower() in ("y", "yes")
    print(file=sys.stderr)
    return True


async def record(client, args, out, err, interactive=False, confirm=ask):
    from tqdm import tqdm
    if args.nsequence < 1:
        raise CliError("record: -n must be at least 1", 2)
    kwargs = {"run": args.run, "nsequence": args.nsequence}
    for key in ("auto", "delay", "target"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    status_obs = client.observe("control/status")
    current = await status_obs.start()
    if current != "idle":
        status_obs.cancel()
        raise CliError(f"record: piccolo is busy ({current})")
    interrupts = _Interrupts(interactive)
    bar = tqdm(total=args.nsequence, unit="seq", file=err, leave=True,
               dynamic_ncols=True, desc=f"{args.run}")
    aborted = False
    try:
        await client.put("control/record_sequence", kwargs)
        current = "waiting"
        while True:
            if current == "idle":
                break
            await _show(client, bar, current, args.nsequence)
            get_next = asyncio.ensure_future(status_obs.next())
            stop = asyncio.ensure_future(interrupts.event.wait())
            done, _ = await asyncio.wait({get_next, stop}, timeout=2.0,
                                         return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if get_next in done:
                current = get_next.result()
                continue
            get_next.cancel()
            if stop in done:
                bar.clear()
                if await confirm("abort the batch? [y/N]", interrupts):
                    aborted = True
                    await _maybe(client.get("control/abort"))
                bar.refresh()
            # no news for a while (or after a question): ask directly
            current = await client.get("control/status")
        fault = await _maybe(client.get("control/fault"), "")
        if not fault and not aborted:
            bar.n = args.nsequence
            bar.set_postfix_str("done")
        bar.close()
    finally:
        interrupts.remove()
        status_obs.cancel()
        bar.close()
    batch = await _maybe(client.get(f"data_dir/runs/{args.run}/current_batch"))
    if fault:
        raise CliError(f"record: run {args.run} batch {batch} stopped: {fault}", 3)
    if aborted:
        raise CliError(f"record: run {args.run} batch {batch} aborted", 4)
    plural = "s" if args.nsequence != 1 else ""
    print(f"run {args.run} batch {batch}: {args.nsequence} sequence{plural} recorded",
          file=out)
    return 0


async def _show(client, bar, status, total):
    sequence = await _maybe(client.get("control/current_sequence"), -1)
    if isinstance(sequence, int) and 0 <= sequence <= total:
        bar.n = sequence
    shown = min(sequence + 1, total) if isinstance(sequence, int) and sequence >= 0 else "-"
    bar.set_postfix_str(f"sequence {shown}/{total}: {status}", refresh=False)
    bar.refresh()


# -- jobs -----------------------------------------------------------------

def _when(iso):
    if not iso:
        return "-"
    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    return t.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _every(seconds):
    if not seconds:
        return "once"
    seconds = int(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            n = seconds // size
            return f"every {unit}" if n == 1 else f"every {n} {unit}s"
    return f"every {seconds} s"


def describe_job(job):
    what = job[0] if isinstance(job, list) and job else job
    args = job[1] if isinstance(job, list) and len(job) > 1 else []
    if what == "record" and isinstance(args, list) and len(args) >= 2:
        text = f"record run {args[0]}, {args[1]} sequence{'s' if args[1] != 1 else ''}"
        extra = []
        for label, value in zip(("autointegration", "delay", "target"), args[2:5]):
            if value is not None:
                shown = f"{value:g}" if isinstance(value, (int, float)) else value
                extra.append(f"{label} {shown}{' s' if label == 'delay' else ''}"
                             f"{' %' if label == 'target' else ''}")
        return text + (f" ({', '.join(extra)})" if extra else "")
    if what in ("power_on", "power_off"):
        return "switch the spectrometers " + ("on" if what == "power_on" else "off")
    return str(what)


async def jobs(client, out):
    listing, quiet, start, end = await asyncio.gather(
        client.get("control/scheduler/jobs"),
        _maybe(client.get("control/scheduler/quietTimeEnabled")),
        _maybe(client.get("control/scheduler/quietStart")),
        _maybe(client.get("control/scheduler/quietEnd")))
    if not listing:
        print("no scheduled jobs", file=out)
    for job_id, job, start_time, end_time, interval, state in listing:
        line = (f"#{job_id} {describe_job(job)}: next {_when(start_time)}, "
                f"{_every(interval)}")
        if end_time:
            line += f" until {_when(end_time)}"
        print(f"{line} [{state}]", file=out)
    if quiet is not None:
        print(f"quiet time {'on' if quiet else 'off'}"
              + (f" ({start} to {end})" if quiet else ""), file=out)
    return 0


# -- health ---------------------------------------------------------------

def _bytes(n):
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0


def _duration(seconds):
    if seconds is None:
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    return (f"{days} d " if days else "") + f"{hours} h {rest // 60} min"


def format_health(h):
    free, total = h.get("disk_free"), h.get("disk_total")
    disk = f"{_bytes(free)} free of {_bytes(total)}"
    if free is not None and total:
        disk += f" ({100.0 * free / total:.0f} %)"
    days = h.get("days_left")
    disk += "; " + (f"{days:.1f} days left at the recent rate" if days is not None
                    else "days left unknown (no recent recording)")
    lines = [f"disk         {disk}",
             f"files today  {h.get('files_today')}",
             f"last batch   {_when(h.get('last_batch')) if h.get('last_batch') else 'none'}",
             "clock        " + {True: "synchronised", False: "NOT synchronised",
                                None: "unknown"}[h.get("clock_synchronised")],
             f"uptime       {_duration(h.get('uptime'))}"
             + (f" (server {_duration(h['server_uptime'])})" if "server_uptime" in h else "")]
    for serial, s in sorted((h.get("spectrometers") or {}).items()):
        line = f"{serial:<12} {str(s.get('status', '?')).lower().replace('_', ' ')}"
        line += f", {s.get('errors', 0)} error{'s' if s.get('errors') != 1 else ''}"
        if s.get("last_error"):
            line += f" (last: {s['last_error']})"
        if "temperature" in s:
            t = s["temperature"]
            line += ", " + (f"{t:.1f} °C" if isinstance(t, (int, float)) else "temperature ?")
        lines.append(line)
    lines.append(f"fault        {h.get('fault') or 'none'}")
    for source, fault in sorted((h.get("faults") or {}).items()):
        lines.append(f"{source + ' fault':<12} {fault}")
    return "\n".join(lines)


async def health(client, out):
    print(format_health(await client.get("sysinfo/health")), file=out)
    return 0
