"""status, record, jobs and health."""

import asyncio
import math
import os
import re
import signal
import sys
import threading
from datetime import datetime, timedelta, timezone

from .errors import CliError, Refused
from .terminal import emit, number, printable, shown

STATUS_WORDS = {1: "no worker", 2: "powered off", 3: "dropped", 4: "connecting",
                5: "disconnected", 6: "idle", 7: "recording", 8: "autointegrating"}


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
    # the latest light and dark spectrum of each channel (a server without
    # last_spectrum: none)
    latest = await asyncio.gather(
        *(_maybe(client.get(f"{base}/last_spectrum/{c}")) for c in channels))
    darks = await asyncio.gather(
        *(_maybe(client.get(f"{base}/last_dark/{c}")) for c in channels))
    temperature = age = stable = target = None
    if tec:
        # the spectrometer's last reading (taken between integrations while
        # it records): never a device call, so never held up by one
        last = await _maybe(client.get(f"{base}/last_temperature"))
        if isinstance(last, dict):
            temperature, age = last.get("temperature"), last.get("age")
            stable, target = last.get("stable"), last.get("target")
    return {"name": name, "status": status, "tec": tec, "temperature": temperature,
            "temperature_age": age, "temperature_stable": stable,
            "temperature_target": target, "read_at": datetime.now(),
            "times": dict(zip(channels, times)),
            "peaks": {c: _peak(doc, dark)
                      for c, doc, dark in zip(channels, latest, darks)}}


def _peak(doc, dark=None):
    """What status shows of a channel's latest light spectrum (and the
    latest dark one beside it), or None before either."""
    light = isinstance(doc, dict) and doc.get("peak") is not None
    dark_peak = dark.get("peak") if isinstance(dark, dict) else None
    if not light and dark_peak is None:
        return None
    out = {k: doc.get(k) if light else None
           for k in ("peak", "kind", "integration_time", "saturated")}
    out["dark"] = dark_peak
    return out


def format_peaks(peaks):
    """``upwelling 56132 (light, 100 ms; dark 1020), downwelling 65535
    (light, 100 ms, 1304 saturated; dark 1017)``, or "-" before anything
    was recorded."""
    parts = []
    for channel, p in peaks.items():
        if p is None:
            continue
        what = []
        if p["peak"] is not None:
            t = p["integration_time"]
            what.append(shown(p["kind"] or "?"))
            if t is not None:
                what.append(f"{number(t, 'g')} ms")
            if p["saturated"]:
                what.append(f"{number(p['saturated'])} saturated")
        text = ", ".join(what)
        if p.get("dark") is not None:
            text += ("; " if text else "") + f"dark {number(p['dark'])}"
        peak = number(p["peak"]) if p["peak"] is not None else "-"
        parts.append(f"{shown(channel)} {peak} ({text})")
    return ", ".join(parts) or "-"


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


def format_status(s, now=None, watching=False):
    """The status screen; every value from the server shown escaped.
    ``watching``: a screen that stays up (--watch) gives the clock time of
    a temperature reading, not its age, which the screen would soon
    belie."""
    width = max([12] + [len(shown(spec["name"])) for spec in s["spectrometers"]])
    lines = [f"{'control':<{width}} {shown(s['control'])}"]
    where = f"run {shown(s['run'] or '-')}"
    if s["batch"] is not None and s["batch"] >= 0:
        where += f", batch {number(s['batch'])}"
    if s["sequence"] is not None and s["sequence"] >= 0:
        where += f", sequence {number(s['sequence'] + 1)} of {number(s['nsequence'])}"
    lines.append(f"{'current':<{width}} {where}")
    for spec in s["spectrometers"]:
        words = STATUS_WORDS.get(spec["status"], f"status {number(spec['status'])}")
        times = ", ".join(f"{shown(c)} {number(t)} ms" for c, t in spec["times"].items()
                          if t is not None)
        line = f"{shown(spec['name']):<{width}} {words}; integration {times or '-'}"
        if spec["tec"]:
            age = spec.get("temperature_age")
            read = None
            if watching and isinstance(age, (int, float)) and spec.get("read_at"):
                try:
                    read = spec["read_at"] - timedelta(seconds=age)
                except (OverflowError, ValueError):      # an age of 1e308 s
                    read = None
            line += "; temperature " + _temperature(spec.get("temperature"), age, read)
            target = spec.get("temperature_target")
            if spec.get("temperature_stable") is False and isinstance(target, (int, float)):
                line += f" (set point {number(target, 'g')} °C: not stable)"
        lines.append(line)
        if spec.get("peaks"):
            lines.append(f"{'':<{width}}   latest peak: {format_peaks(spec['peaks'])}")
    lines.append(f"{'shutters':<{width}} " + (", ".join(f"{shown(c)} {shown(v)}"
                                                        for c, v in s["shutters"].items())
                                              or "none"))
    active = [j for j in s["jobs"] if j[5] == "active"]
    suspended = [j for j in s["jobs"] if j[5] == "suspended"]
    summary = f"{len(active)} active, {len(suspended)} suspended"
    upcoming = sorted(filter(None, (next_run(j[2], j[3], j[4], now) for j in active)))
    if upcoming:
        summary += f"; next at {_when(upcoming[0])}"
    if s["quiet"]:
        summary += "; quiet time on"
    lines.append(f"{'scheduler':<{width}} {summary}")
    lines.append(f"{'last fault':<{width}} {shown(s['fault'] or 'none')}")
    return "\n".join(lines)


WATCHED = ("control/status", "control/fault", "data_dir/current_run",
           "control/scheduler/jobs")


REFRESH = 10.0     # seconds without a notification before --watch asks itself


def _unchanging(s):
    """What --watch compares: the screen's state, temperatures as shown
    (to 0.1 °C, and whether stable), not their age."""
    def on_screen(spec):
        t = spec.get("temperature")
        return {**{k: v for k, v in spec.items()
                   if k not in ("temperature", "temperature_age", "read_at")},
                "temperature": round(t, 1) if isinstance(t, (int, float)) else t}
    return {**s, "spectrometers": [on_screen(spec) for spec in s["spectrometers"]]}


def _temperature(t, age, read=None):
    """"-11.9 °C (4 s ago)", "-11.9 °C (read 12:03:04)" given the clock
    time of the reading, or "-" before the first reading."""
    if not isinstance(t, (int, float)):
        return "-"
    text = f"{number(t, '.1f')} °C"
    if read is not None:
        text += f" (read {read.strftime('%H:%M:%S')})"
    elif isinstance(age, (int, float)):
        text += f" ({number(age, '.0f')} s ago)"
    return text


async def status(client, out, watch=False, updates=None, refresh=None):
    screen = await gather_status(client)
    emit(out, format_status(screen, watching=watch), flush=True)
    if not watch:
        return 0
    refresh = REFRESH if refresh is None else refresh
    specs = await client.get("spectrometer/spectrometers")
    # and every cooled detector's readings: a screen that stays up follows
    # the temperature (it froze at the first screen's)
    paths = WATCHED + tuple(f"spectrometer/{s}/status" for s in specs) + tuple(
        f"spectrometer/{spec['name']}/last_temperature" for spec in screen["spectrometers"]
        if spec["tec"])
    changed = asyncio.Event()
    observations, tasks = [], []
    # the first malformed update: it ends the watch with its line (exit 2),
    # never a pump dying unseen and its resource no longer followed
    failed = asyncio.get_running_loop().create_future()

    async def follow():
        for obs in observations:
            obs.cancel()
        for t in tasks:
            t.cancel()
        observations[:] = [client.observe(p) for p in paths]
        started = []
        for obs in observations:
            try:
                await obs.start()
            except Refused:
                continue            # a resource this server lacks (an older one)
            started.append(obs)
        tasks[:] = [asyncio.ensure_future(_pump(obs, changed, failed)) for obs in started]

    async def news():
        waiting = asyncio.ensure_future(changed.wait())
        try:
            await asyncio.wait({waiting, failed}, timeout=refresh,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if failed.done():
            raise failed.result()
        if not changed.is_set():
            raise asyncio.TimeoutError()

    try:
        await follow()
        seen = 0
        while updates is None or seen < updates:
            try:
                await news()
            except asyncio.TimeoutError:
                # quiet for a while: is the server still there, and did it
                # forget the observations (a restart)? An unreachable server
                # ends the watch with one line instead of a stale screen.
                now = await gather_status(client)
                if _unchanging(now) == _unchanging(screen):
                    continue
                await follow()
            else:
                changed.clear()
                await asyncio.sleep(0.05)       # let a burst of changes settle
                changed.clear()
                now = await gather_status(client)
                if _unchanging(now) == _unchanging(screen):
                    continue        # changed and back, or nothing shown changed
            seen += 1
            screen = now
            stamp = datetime.now().strftime("%H:%M:%S")
            emit(out, f"\n-- {stamp}")
            emit(out, format_status(screen, watching=True), flush=True)
    finally:
        for t in tasks:
            t.cancel()
        for obs in observations:
            obs.cancel()
    return 0


async def _pump(obs, changed, failed):
    """Wait for notifications of ``obs``; set ``changed`` for each, and
    ``failed`` (with the error) for a malformed one. An observation the
    server ended (or never took) ends quietly: the watch then asks itself
    every REFRESH seconds, and follows again when something changed."""
    from .shape import BadAnswer
    while True:
        try:
            await obs.next()
        except BadAnswer as e:
            if not failed.done():
                failed.set_result(e)
            return
        except CliError:
            return
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


def _read_line(fd, answer, loop):
    """In a daemon thread: one line from the terminal, read from the file
    descriptor itself (never through sys.stdin's buffer, whose lock a thread
    left reading would hold at exit). Nobody waits for this thread: when a
    second Ctrl-C answers the question, the program ends without it."""
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk = os.read(fd, 1024)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    loop.call_soon_threadsafe(lambda: answer.done() or answer.set_result(data))


async def ask(question, interrupts):
    """Ask on the terminal; a second Ctrl-C counts as yes. EOF counts as no."""
    emit(sys.stderr, question, end=" ", flush=True)
    loop = asyncio.get_running_loop()
    interrupts.event.clear()
    reading = loop.create_future()
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:
        reading.set_result(b"")
    else:
        threading.Thread(target=_read_line, args=(fd, reading, loop), daemon=True,
                         name="piccolo3-answer").start()
    again = asyncio.ensure_future(interrupts.event.wait())
    try:
        done, _ = await asyncio.wait({reading, again}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        again.cancel()
    interrupts.event.clear()
    if reading in done:
        answer = reading.result().decode("utf-8", "replace")
        return answer.strip().lower() in ("y", "yes")
    print(file=sys.stderr)
    return True


_NAME = re.compile(r"b(\d+)_s(\d+)(?:_(light|dark))?\.pico")


def sequences_on_disk(names, batch):
    """How many sequences of ``batch`` the run's files hold (a sequence
    counts once its light spectra, or its unsplit file, are written)."""
    done = set()
    for name in names or ():
        m = _NAME.fullmatch(name) if isinstance(name, str) else None
        if m and int(m.group(1)) == batch and m.group(3) != "dark":
            done.add(int(m.group(2)))
    return len(done)


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
        raise CliError(f"record: piccolo is busy ({shown(current)})")
    # the batch's number: the run's next (what the files will be called)
    before = await _maybe(client.get(f"data_dir/runs/{args.run}/current_batch"), -1)
    batch = before + 1 if before >= 0 else 0
    interrupts = _Interrupts(interactive)
    bar = None
    asked_abort = False
    try:
        await client.put("control/record_sequence", kwargs)
        bar = tqdm(total=args.nsequence, unit="seq", file=err, leave=True,
                   dynamic_ncols=True, desc=printable(args.run, err))
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
                # the question stands until answered or the batch ends
                answer = asyncio.ensure_future(confirm("abort the batch? [y/N]", interrupts))
                ended = asyncio.ensure_future(_until_idle(status_obs))
                done, _ = await asyncio.wait({answer, ended},
                                             return_when=asyncio.FIRST_COMPLETED)
                if answer in done:
                    ended.cancel()
                    if answer.result():
                        asked_abort = True
                        await _maybe(client.get("control/abort"))
                else:
                    answer.cancel()
                    emit(err, "\nthe batch has ended", flush=True)
                bar.refresh()
            # no news for a while (or after a question): ask directly
            current = await client.get("control/status")
        fault = await _maybe(client.get("control/fault"), "")
        recorded, unknown = await _recorded(client, args.run, batch)
        bar.n = recorded or 0
        if not fault and recorded is not None and recorded >= args.nsequence:
            bar.set_postfix_str("done")
        bar.close()
    finally:
        interrupts.remove()
        status_obs.cancel()
        if bar is not None:
            bar.close()
    plural = "s" if args.nsequence != 1 else ""
    how_many = (f"{recorded} of {args.nsequence} sequence{plural} recorded"
                if recorded is not None else
                f"how many of {args.nsequence} sequence{plural} were recorded is "
                f"unknown: {unknown}")
    late = " (it had ended before the abort)" if asked_abort else ""
    if not fault and recorded is not None and recorded >= args.nsequence:
        emit(out, f"run {args.run} batch {batch}: {args.nsequence} sequence{plural} "
                  f"recorded{late}")
    # the summary and its warnings on every ending: a batch stopped by a
    # full disk or aborted holds saturated or unstable spectra too
    summary = await _maybe(client.get("control/last_batch"))
    if isinstance(summary, dict) and summary.get("run") == args.run \
            and summary.get("batch") == batch:
        emit(out, format_summary(summary), flush=True)
        for line in summary_warnings(summary):
            emit(err, f"warning: {line}")
    if fault:
        raise CliError(f"record: run {args.run} batch {batch} stopped: {shown(fault)} "
                       f"({how_many})", 3)
    if recorded is None:
        raise CliError(f"record: run {args.run} batch {batch} ended; {how_many}")
    if recorded < args.nsequence:
        who = "" if asked_abort else " (by another client)"
        raise CliError(f"record: run {args.run} batch {batch}: {how_many}, aborted{who}", 4)
    return 0


async def _recorded(client, run, batch):
    """``(sequences of the batch on disk, None)``, or ``(None, why not)``.
    What the run's files hold counts (the batch may have been aborted by
    another client, or have ended before our abort came); when the server
    cannot list them (a pulled stick: 5.03) the batch's summary says how
    many it wrote; with neither, nobody can tell -- never "0 recorded"."""
    try:
        names = await client.get(f"data_dir/runs/{run}/spectra_list")
    except Refused as e:
        why = str(e).split(": ", 1)[-1]
    else:
        return sequences_on_disk(names, batch), None
    summary = await _maybe(client.get("control/last_batch"))
    if (isinstance(summary, dict) and summary.get("run") == run
            and summary.get("batch") == batch and summary.get("sequences") is not None):
        return summary["sequences"], None
    return None, f"the server cannot list the run's files ({shown(why)})"


def format_summary(s):
    """The batch summary (GET /control/last_batch, ``shape.SUMMARY``) in a
    few lines, every value from the server shown escaped."""
    lines = [f"batch {number(s.get('batch'))} of run {shown(s.get('run'))}: "
             f"{number(s.get('sequences'))} "
             f"sequence{'s' if s.get('sequences') != 1 else ''}, "
             f"{len(s.get('files') or [])} files, {_when(s.get('start'))} to "
             f"{_when(s.get('end')) if s.get('end') else '(running)'}"
             f"{' (aborted)' if s.get('aborted') else ''}"]
    for spec, channels in sorted((s.get("integration_times") or {}).items()):
        times = ", ".join(f"{shown(c)} {'/'.join(number(t, 'g') for t in ts)} ms"
                          for c, ts in channels.items())
        lines.append(f"  {shown(spec)}: {times}")
    lines.append(f"  saturated spectra: {number(s.get('saturated_spectra') or 0)}; "
                 f"temperature-unstable spectra: "
                 f"{number(s.get('temperature_unstable_spectra') or 0)}")
    if s.get("temperature_wait"):
        lines.append(f"  waited {number(s['temperature_wait'], 'g')} s for the detector "
                     f"temperature")
    for fault in s.get("faults") or []:
        lines.append(f"  fault: {shown(fault)}")
    return "\n".join(lines)


def _ranges(ranges):
    """[[0, 4], [7, 7]] -> "sequences 0-4, 7"; [[3, 3]] -> "sequence 3"."""
    parts = [number(a) if a == b else f"{number(a)}-{number(b)}" for a, b in ranges or ()]
    single = len(ranges or ()) == 1 and ranges[0][0] == ranges[0][1]
    return ("sequence " if single else "sequences ") + (", ".join(parts) or "?")


def _span(low, high, spec="", sep="-"):
    values = [v for v in (low, high) if v is not None]
    if not values:
        return "?"
    low, high = min(values), max(values)
    return (number(low, spec) if low == high
            else f"{number(low, spec)}{sep}{number(high, spec)}")


def summary_warnings(s):
    """One line per spectrometer, channel and type with saturated or
    temperature-unstable spectra, naming the sequences."""
    for e in s.get("saturated") or []:
        where = " ".join(shown(e.get(k)) for k in ("spectrometer", "channel", "type"))
        yield (f"{where}, {_ranges(e.get('sequences'))}: "
               f"{_span(e.get('pixels_min'), e.get('pixels_max'))} pixels saturated "
               f"(at or above {number(e.get('level'))})")
    for e in s.get("temperature_unstable") or []:
        target = e.get("set_point")
        t = _span(e.get("temperature_min"), e.get("temperature_max"), ".1f", " to ")
        where = " ".join(shown(e.get(k)) for k in ("spectrometer", "channel", "type"))
        yield (f"{where}, {_ranges(e.get('sequences'))}: detector at {t} °C, set point "
               f"{number(target, 'g')} °C "
               f"(tolerance {number(e.get('tolerance'))} °C): temperature not stable")


async def _until_idle(observation):
    while await observation.next() != "idle":
        pass


async def _show(client, bar, status, total):
    sequence = await _maybe(client.get("control/current_sequence"), -1)
    if isinstance(sequence, int) and 0 <= sequence <= total:
        bar.n = sequence
    at = number(min(sequence + 1, total)) if sequence >= 0 else "-"
    bar.set_postfix_str(printable(f"sequence {at}/{total}: {shown(status)}", bar.fp),
                        refresh=False)
    bar.refresh()


# -- jobs -----------------------------------------------------------------

def _when(iso):
    if not iso:
        return "-"
    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return shown(iso)
    return t.strftime("%Y-%m-%d %H:%M:%S %Z").strip()


def _every(seconds):
    if not seconds:
        return "once"
    if seconds == math.floor(seconds):
        whole = int(seconds)
        for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
            if whole % size == 0:
                n = whole // size
                return f"every {unit}" if n == 1 else f"every {n} {unit}s"
    return f"every {number(seconds, 'g')} s"


def _parse(iso):
    try:
        t = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def next_run(start_time, end_time, interval, now=None):
    """When a job runs next, as an ISO string, or None when it will not run
    again. ``start_time`` is when it was first due: a repeating job runs on
    the grid start + k * interval (a missed slot is not made up), so the
    next run is the first slot not before now; a job whose time has come
    is due now (it runs when the control is idle)."""
    start = _parse(start_time)
    if start is None:
        return start_time
    now = now or datetime.now(timezone.utc)
    if start >= now or not interval:
        return start.isoformat()
    try:
        slots = math.ceil((now - start).total_seconds() / interval)
        nxt = start + timedelta(seconds=slots * interval)
    except (OverflowError, ValueError):     # past the year 9999: never again
        return None
    end = _parse(end_time) if end_time else None
    if end is not None and nxt > end:
        return None
    return nxt.isoformat()


def describe_job(job):
    """A job (``shape.JOB``: ``[kind, args]``) in words, escaped."""
    what = job[0]
    args = job[1] if len(job) > 1 else []
    if what == "record" and len(args) >= 2:
        text = (f"record run {shown(args[0])}, {number(args[1])} "
                f"sequence{'s' if args[1] != 1 else ''}")
        extra = []
        for label, value in zip(("autointegration", "delay", "target"), args[2:5]):
            if value is not None:
                value = number(value, "g")
                extra.append(f"{label} {value}{' s' if label == 'delay' else ''}"
                             f"{' %' if label == 'target' else ''}")
        return text + (f" ({', '.join(extra)})" if extra else "")
    if what in ("power_on", "power_off"):
        return "switch the spectrometers " + ("on" if what == "power_on" else "off")
    return shown(what)


def last_outcome(entry):
    """A job's last slot, from /control/scheduler/history, in a few words."""
    slot = entry.get("slot")
    text = (f"last: {shown(entry.get('outcome'))} at "
            f"{_when(slot) if isinstance(slot, str) else shown(slot)}")
    if entry.get("batch") is not None:
        text += f" (batch {number(entry['batch'])})"
    if entry.get("reason"):
        text += f" ({shown(entry['reason'])})"
    return text


async def jobs(client, out):
    listing, quiet, start, end, history = await asyncio.gather(
        client.get("control/scheduler/jobs"),
        _maybe(client.get("control/scheduler/quietTimeEnabled")),
        _maybe(client.get("control/scheduler/quietStart")),
        _maybe(client.get("control/scheduler/quietEnd")),
        # servers before the history have none (4.04)
        _maybe(client.get("control/scheduler/history"), []))
    last = {}
    for entry in history if isinstance(history, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("job"), int):
            last[entry["job"]] = entry
    if not listing:
        emit(out, "no scheduled jobs")
    now = datetime.now(timezone.utc)
    for job_id, job, start_time, end_time, interval, state, *_ in listing:
        nxt = next_run(start_time, end_time, interval, now)
        if nxt is None:
            when = f"no run left (since {_when(start_time)})"
        elif _parse(start_time) is not None and _parse(start_time) < now and not interval:
            when = f"due since {_when(start_time)}"
        else:
            when = f"next {_when(nxt)}"
        line = f"#{number(job_id)} {describe_job(job)}: {when}, {_every(interval)}"
        if end_time:
            line += f" until {_when(end_time)}"
        if job_id in last:
            emit(out, f"{line} [{shown(state)}]; {last_outcome(last[job_id])}")
        else:
            emit(out, f"{line} [{shown(state)}]")
    if quiet is not None:
        emit(out, f"quiet time {'on' if quiet else 'off'}"
             + (f" ({shown(start)} to {shown(end)})" if quiet else ""))
    return 0


# -- health ---------------------------------------------------------------

def _bytes(n):
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{number(n, '.0f' if unit == 'B' else '.1f')} {unit}"
        n /= 1000.0


def _duration(seconds):
    if seconds is None:
        return "?"
    seconds = int(seconds)          # a finite number (shape.HEALTH)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    return (f"{days} d " if days else "") + f"{hours} h {rest // 60} min"


def format_health(h):
    free, total = h.get("disk_free"), h.get("disk_total")
    disk = f"{_bytes(free)} free of {_bytes(total)}"
    if free is not None and total:
        disk += f" ({number(100.0 * free / total, '.0f')} %)"
    days = h.get("days_left")
    disk += "; " + (f"{number(days, '.1f')} days left at the recent rate" if days is not None
                    else "days left unknown (no recent recording)")
    lines = [f"disk         {disk}",
             f"files today  {number(h.get('files_today'))}",
             f"last batch   {_when(h.get('last_batch')) if h.get('last_batch') else 'none'}",
             "clock        " + {True: "synchronised", False: "NOT synchronised",
                                None: "unknown"}[h.get("clock_synchronised")],
             f"uptime       {_duration(h.get('uptime'))}"
             + (f" (server {_duration(h['server_uptime'])})" if "server_uptime" in h else "")]
    for serial, s in sorted((h.get("spectrometers") or {}).items()):
        status = shown(s.get("status") or "?").lower().replace("_", " ")
        line = f"{shown(serial):<12} {status}"
        errors = s.get("errors") or 0
        line += f", {number(errors)} error{'s' if errors != 1 else ''}"
        if s.get("last_error"):
            line += f" (last: {shown(s['last_error'])})"
        if "temperature" in s:
            line += ", temperature " + _temperature(s["temperature"], s.get("temperature_age"))
            if s.get("temperature_stable") is False:
                target = s.get("temperature_target")
                line += (f" (set point {number(target, 'g')} °C: not stable)"
                         if target is not None else " (not stable)")
        lines.append(line)
    if "slots_missed_24h" in h:
        lines.append(f"slots 24 h   {number(h.get('slots_missed_24h'))} missed, "
                     f"{number(h.get('slots_failed_24h'))} failed (piccolo3 jobs: the "
                     "last of each)")
    summary = h.get("last_batch_summary")
    if summary is not None:
        lines.append("last batch   " + format_summary(summary).replace("\n", "\n             "))
    lines.append(f"fault        {shown(h.get('fault') or 'none')}")
    for source, fault in sorted((h.get("faults") or {}).items()):
        lines.append(f"{shown(source) + ' fault':<12} {shown(fault)}")
    return "\n".join(lines)


async def health(client, out):
    emit(out, format_health(await client.get("sysinfo/health")))
    return 0
