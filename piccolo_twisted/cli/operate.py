"""The operator's commands: abort, pause, resume, set, clock, schedule.

Each sends what the deployed piccolo3 client sends (``[[value], {}]`` for a
setting or a job id, ``[[], {keywords}]`` for record_sequence and the
power jobs), then reads back what the server now holds and says it in one
line; a refusal is one line too (the server's reason), exit 1.

Order matters where the server's state can change between two requests:

- ``pause``/``resume`` use ``PUT /control/paused true|false``, which pauses
  or resumes in one step on the server and answers whether it changed
  anything; the legacy ``GET /control/pause`` toggles, so a resume that
  looked first ("paused?") and then toggled would pause a batch another
  client had resumed meanwhile.
- ``schedule quiet`` turns flags off first, then sets the times and the
  delay, and turns flags on last: a window is never on with half its new
  times.
- ``schedule suspend|resume|delete`` look the job up first (the server
  answers 2.04 for an unknown id, as legacy did) and read the listing back
  after, so the confirmation says what the server holds.
"""

import asyncio
import re
import time
from datetime import datetime, timezone

from .errors import CliError, NotFound, Refused
from .commands import _every, _when, describe_job, next_run
from .terminal import emit, shown

USAGE = 2
AUTO_WORDS = {-1: "never", 0: "once at the start of each batch"}


def add_parsers(sub, nested=None):
    """The operator's commands on ``sub`` (argparse subparsers);
    ``nested(parser)`` is called for every parser made below them (the
    settings of ``set``, the actions of ``schedule``), e.g. to give them
    the global options."""

    def parser(group, name, **kw):
        p = group.add_parser(name, **kw)
        if group is not sub and nested is not None:
            nested(p)
        return p

    parser(sub, "abort", help="stop the running batch, dark sequence or autointegration")
    parser(sub, "pause", help="pause the running batch at its next step")
    parser(sub, "resume", help="resume a paused batch")

    p = parser(sub, "set", help="autointegration, target, delay, sequences, integration times")
    settings = p.add_subparsers(dest="setting", required=True, metavar="SETTING")
    q = parser(settings, "auto", help="autointegration: -1 never, 0 once per batch, "
                                      "n before every n-th sequence")
    q.add_argument("value", type=int, help="below -1 counts as -1, as the legacy server did")
    q = parser(settings, "target", help="autointegration target, percent of saturation (10-90)")
    q.add_argument("value", type=float)
    q = parser(settings, "delay", help="seconds between the sequences of a batch")
    q.add_argument("value", type=float)
    q = parser(settings, "sequences", help="sequences per batch")
    q.add_argument("value", type=int)
    q = parser(settings, "time", help="a channel's integration time, ms")
    q.add_argument("channel")
    q.add_argument("value", type=int, metavar="MS")
    q.add_argument("-s", "--spectrometer", action="append", metavar="SPEC",
                   help="only this spectrometer (repeatable; default: every one)")

    p = parser(sub, "clock", help="set the instrument's clock from this computer's")
    p.add_argument("--check", action="store_true",
                   help="only say how far apart the two clocks are")

    p = parser(sub, "schedule", help="add, suspend, resume or delete jobs; the quiet time")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = parser(actions, "record", help="a batch at a given time, optionally repeating")
    q.add_argument("--run", required=True, help="run name")
    q.add_argument("-n", "--nsequence", type=int, required=True, help="number of sequences")
    q.add_argument("--at", required=True, metavar="WHEN",
                   help="first time: HH:MM (today), YYYY-MM-DD HH:MM[:SS] or ISO 8601; "
                        "without an offset, this computer's local time")
    q.add_argument("--every", metavar="INTERVAL", help="repeat: seconds, or 90s, 15m, 1h, 1d")
    q.add_argument("--until", metavar="WHEN", help="no repeat after this time")
    q.add_argument("--auto", type=int, help="autointegrate: -1 never, 0 once, n every n-th")
    q.add_argument("--delay", type=float, help="seconds between sequences")
    q.add_argument("--target", type=float, help="autointegration target, percent")
    for kind in ("power-on", "power-off"):
        q = parser(actions, kind, help=f"switch the spectrometers {kind[6:]} daily")
        q.add_argument("--at", required=True, metavar="WHEN", help="first time (as for record)")
    q = parser(actions, "quiet", help="the nightly quiet time (no scheduled batch runs in "
                                      "it) and switching the spectrometers off in it")
    q.add_argument("state", nargs="?", choices=("on", "off"), help="turn the quiet time on or off")
    q.add_argument("--start", metavar="HH:MM[:SS][+zzzz]",
                   help="start (without an offset: this computer's local time)")
    q.add_argument("--end", metavar="HH:MM[:SS][+zzzz]", help="end")
    q.add_argument("--power-off", choices=("on", "off"),
                   help="switch the spectrometers off during the quiet time")
    q.add_argument("--power-delay", type=int, metavar="SECONDS",
                   help="power off this long after the start, on this long before the end")
    for action, words in (("suspend", "keep a job but do not run it"),
                          ("resume", "run a suspended job again"),
                          ("delete", "remove a job")):
        q = parser(actions, action, help=words)
        q.add_argument("id", type=int, help="job id (piccolo3 jobs lists them)")


async def run(client, args, out):
    """Run one of this module's commands (``args.command``); exit status."""
    command = args.command
    if command == "abort":
        return await abort(client, out)
    if command in ("pause", "resume"):
        return await pause(client, out, command == "pause")
    if command == "set":
        return await set_value(client, args, out)
    if command == "clock":
        return await clock(client, out, args.check)
    if command == "schedule":
        return await schedule(client, args, out)
    raise AssertionError(command)


COMMANDS = ("abort", "pause", "resume", "set", "clock", "schedule")


# -- abort, pause, resume -----------------------------------------------------

async def abort(client, out):
    await _refusal("abort", client.get("control/abort"))
    # the server stops at once (a shutter pulse); say when it is idle
    deadline = time.monotonic() + client.timeout
    status = await client.get("control/status")
    while status != "idle" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        status = await client.get("control/status")
    if status == "idle":
        emit(out, "aborted: piccolo is idle, every shutter closed")
    else:
        emit(out, f"abort sent: piccolo still reports {shown(status)}")
    return 0


async def pause(client, out, paused):
    word = "pause" if paused else "resume"
    try:
        changed = await _refusal(word, client.put("control/paused", [[paused], {}]))
    except NotFound:
        raise CliError(f"{word}: this server has no /control/paused (an older "
                       f"version); its GET /control/pause toggles") from None
    if paused:
        emit(out, "paused: the batch stops at its next step (piccolo3 resume goes on)"
             if changed else "already paused")
    else:
        emit(out, "resumed" if changed else "not paused: nothing to resume")
    return 0


async def _refusal(word, request):
    """The request's answer; a refusal becomes ``word: <server's reason>``."""
    try:
        return await request
    except NotFound:
        raise
    except Refused as e:
        reason = str(e).split(": ", 1)[-1]
        raise CliError(f"{word}: {reason}") from None


# -- set ----------------------------------------------------------------------

SETTINGS = {
    # name: (path, what, unit)
    "auto": ("control/autointegration", "autointegration", ""),
    "target": ("control/target", "target", " % of saturation"),
    "delay": ("control/delay", "delay", " s between sequences"),
    "sequences": ("control/numSequences", "sequences per batch", ""),
}


def _number(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


async def set_value(client, args, out):
    if args.setting == "time":
        return await set_time(client, args, out)
    path, what, unit = SETTINGS[args.setting]
    await _refusal(f"set {args.setting}", client.put(path, [[args.value], {}]))
    now = await client.get(path)
    line = f"{what} {_number(now)}{unit}"
    if args.setting == "auto":
        line += f" ({AUTO_WORDS.get(now, f'before every {now}-th sequence')})"
    if now != args.value:
        line += f"; {_number(args.value)} was taken as {_number(now)}"
    emit(out, line)
    return 0


async def set_time(client, args, out):
    channels, specs = await asyncio.gather(client.get("spectrometer/channels"),
                                           client.get("spectrometer/spectrometers"))
    if args.channel not in channels:
        raise CliError(f"set time: no channel {shown(repr(args.channel))} "
                       f"(channels: {', '.join(map(shown, channels))})")
    chosen = specs
    if args.spectrometer:
        unknown = [s for s in args.spectrometer if s not in specs]
        if unknown:
            raise CliError(f"set time: no spectrometer {shown(repr(unknown[0]))} "
                           f"(spectrometers: {', '.join(map(shown, specs))})")
        chosen = list(dict.fromkeys(args.spectrometer))
    failed = []
    for spec in chosen:
        path = f"spectrometer/{spec}/current_time/{args.channel}"
        try:
            await _refusal(spec, client.put(path, [[args.value], {}]))
        except CliError as e:
            failed.append(str(e))
            continue
        emit(out, f"{shown(spec)} {shown(args.channel)} {_number(await client.get(path))} ms")
    if failed:
        raise CliError(f"set time: {failed[0]}"
                       + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
    return 0


# -- clock --------------------------------------------------------------------

async def _offset(client):
    """(server time, seconds the server is ahead of this computer)."""
    before = time.time()
    text = await client.get("sysinfo/clock")
    after = time.time()
    try:
        server = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        from .shape import BadAnswer
        raise BadAnswer(f"GET /sysinfo/clock: malformed answer from the server: "
                        f"not an ISO 8601 time: {text[:40]!r}") from None
    if server.tzinfo is None:
        server = server.replace(tzinfo=timezone.utc)
    return server, server.timestamp() - (before + after) / 2


def _apart(seconds):
    if abs(seconds) < 0.05:
        return "in step with this computer"
    return f"{abs(seconds):.1f} s {'ahead of' if seconds > 0 else 'behind'} this computer"


async def clock(client, out, check_only=False):
    _, offset = await _offset(client)
    if check_only:
        emit(out, f"the instrument's clock is {_apart(offset)}")
        return 0
    # the server sets whole seconds (date -s): send just after a second
    # turns, so what it drops is a few ms, not up to a second
    await asyncio.sleep(1.0 - time.time() % 1.0 + 0.01)
    sent = datetime.now(timezone.utc).replace(microsecond=0)
    await _refusal("clock", client.put("sysinfo/clock", [[sent.isoformat()], {}]))
    _, now = await _offset(client)
    emit(out, f"clock set to {sent:%Y-%m-%d %H:%M:%S} UTC: it was {_apart(offset)}, "
              f"now {_apart(now)}")
    return 0


# -- schedule -----------------------------------------------------------------

_INTERVAL = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)", re.ASCII)
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?\s*(Z|UTC|[+-]\d{2}:?\d{2})?",
                    re.ASCII | re.IGNORECASE)


def parse_interval(text):
    m = _INTERVAL.fullmatch(text.strip())
    if not m:
        raise CliError(f"not an interval: {text!r} (seconds, or e.g. 90s, 15m, 1h, 1d)",
                       USAGE)
    return float(m.group(1)) * _UNIT[m.group(2)]


def _local(now=None):
    return (now or datetime.now(timezone.utc)).astimezone().tzinfo


def parse_when(text, now=None, tz=None):
    """A time a person types -> an aware datetime. ``HH:MM[:SS]`` is today;
    without an offset, the time is this computer's local time (``tz``)."""
    now = now or datetime.now(timezone.utc)
    tz = tz or _local(now)
    text = text.strip()
    m = _CLOCK.fullmatch(text)
    if m and not m.group(4):
        h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        try:
            return now.astimezone(tz).replace(hour=h, minute=mi, second=s, microsecond=0)
        except ValueError:
            pass
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            pass
        else:
            return when if when.tzinfo else when.replace(tzinfo=tz)
    raise CliError(f"not a time: {text!r} (HH:MM, YYYY-MM-DD HH:MM[:SS] or ISO 8601)", USAGE)


def parse_clock(text, now=None, tz=None):
    """A daily time for the quiet window -> ``HH:MM:SS+zzzz`` (without an
    offset: this computer's UTC offset now)."""
    m = _CLOCK.fullmatch(text.strip())
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59 or int(m.group(3) or 0) > 59:
        raise CliError(f"not a time of day: {text!r} (HH:MM[:SS], optionally +zzzz)",
                       USAGE)
    offset = m.group(4)
    if offset is None:
        delta = (now or datetime.now(timezone.utc)).astimezone(tz or _local(now)).utcoffset()
        minutes = int(delta.total_seconds() // 60)
        offset = f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    elif offset.upper() in ("Z", "UTC"):
        offset = "+0000"
    offset = offset.replace(":", "")
    return f"{int(m.group(1)):02d}:{m.group(2)}:{m.group(3) or '00'}{offset}"


def _iso(when):
    return when.astimezone(timezone.utc).isoformat()


async def schedule(client, args, out):
    action = args.action
    if action == "record":
        return await schedule_record(client, args, out)
    if action in ("power-on", "power-off"):
        kind = action.replace("-", "_")
        at = parse_when(args.at)
        return await _add_job(client, out, f"control/{kind}",
                              [[], {"at_time": _iso(at)}], kind)
    if action == "quiet":
        return await quiet(client, args, out)
    return await job_state(client, args, out)


async def schedule_record(client, args, out):
    at = parse_when(args.at)
    until = parse_when(args.until) if args.until else None
    interval = parse_interval(args.every) if args.every else None
    payload = [[], {"run": args.run, "nsequence": args.nsequence, "auto": args.auto,
                    "delay": args.delay, "target": args.target, "at_time": _iso(at),
                    "interval": interval, "end_time": _iso(until) if until else None}]
    return await _add_job(client, out, "control/record_sequence", payload, "record",
                          args.run)


async def _add_job(client, out, path, payload, kind, run=None):
    """PUT a job, then find it in the listing (the id is the new one of
    that kind) and say it the way ``piccolo3 jobs`` does."""
    before = {row[0] for row in await client.get("control/scheduler/jobs")}
    await _refusal("schedule", client.put(path, payload))
    new = [row for row in await client.get("control/scheduler/jobs")
           if row[0] not in before and row[1][0] == kind
           and (run is None or (len(row[1]) > 1 and row[1][1][:1] == [run]))]
    if not new:
        emit(out, f"scheduled: {describe_job([kind] + ([[run]] if run else []))}")
        return 0
    emit(out, "scheduled " + describe_row(new[-1]))
    return 0


def describe_row(row, now=None):
    """``#id what: first/next time, how often [until], [state]``."""
    job_id, job, start_time, end_time, interval, state = row[:6]
    nxt = next_run(start_time, end_time, interval, now)
    when = f"next {_when(nxt)}" if nxt else f"no run left (since {_when(start_time)})"
    line = f"job #{job_id}: {describe_job(job)}: {when}, {_every(interval)}"
    if end_time:
        line += f" until {_when(end_time)}"
    return f"{line} [{shown(state)}]"


JOB_ACTIONS = {"suspend": ("suspend", "suspended"), "resume": ("unsuspend", "active"),
               "delete": ("delete", None)}


async def job_state(client, args, out):
    resource, wanted = JOB_ACTIONS[args.action]
    jobs = {row[0]: row for row in await client.get("control/scheduler/jobs")}
    if args.id not in jobs:
        raise CliError(f"schedule {args.action}: no job #{args.id} "
                       f"(piccolo3 jobs lists them)")
    await _refusal(f"schedule {args.action}",
                   client.put(f"control/scheduler/{resource}", [[args.id], {}]))
    after = {row[0]: row for row in await client.get("control/scheduler/jobs")}
    row = after.get(args.id)
    if wanted is None:
        if row is not None:
            raise CliError(f"schedule delete: job #{args.id} is still listed")
        emit(out, f"deleted job #{args.id}: {describe_job(jobs[args.id][1])}")
        return 0
    if row is None:
        raise CliError(f"schedule {args.action}: job #{args.id} is gone (done or "
                       f"deleted meanwhile)")
    if row[5] != wanted:
        raise CliError(f"schedule {args.action}: job #{args.id} is {shown(row[5])}")
    emit(out, ("suspended " if wanted == "suspended" else "resumed ") + describe_row(row))
    return 0


QUIET = ("quietTimeEnabled", "quietStart", "quietEnd", "powerOffEnabled", "powerDelay")


async def quiet(client, args, out):
    """Change what is asked for, in a safe order, then show all of it."""
    changes = []                            # (resource, value) in order
    if args.state == "off":
        changes.append(("quietTimeEnabled", False))
    if args.power_off == "off":
        changes.append(("powerOffEnabled", False))
    if args.start:
        changes.append(("quietStart", parse_clock(args.start)))
    if args.end:
        changes.append(("quietEnd", parse_clock(args.end)))
    if args.power_delay is not None:
        changes.append(("powerDelay", args.power_delay))
    if args.power_off == "on":
        changes.append(("powerOffEnabled", True))
    if args.state == "on":
        changes.append(("quietTimeEnabled", True))
    done = []
    for resource, value in changes:
        try:
            await _refusal(resource, client.put(f"control/scheduler/{resource}",
                                                [[value], {}]))
        except CliError as e:
            kept = f" ({', '.join(done)} already set)" if done else ""
            raise CliError(f"schedule quiet: {e}{kept}") from None
        done.append(resource)
    enabled, start, end, power_off, delay = await asyncio.gather(
        *(client.get(f"control/scheduler/{r}") for r in QUIET))
    line = (f"quiet time {'on' if enabled else 'off'}: {shown(start)} to {shown(end)}; "
            f"spectrometers {'switched off' if power_off else 'left on'} in it")
    if power_off:
        line += f" ({_number(delay)} s after its start, on {_number(delay)} s before its end)"
    emit(out, line)
    return 0

