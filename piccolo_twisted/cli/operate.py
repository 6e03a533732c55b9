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
- ``schedule quiet`` checks every value here first (as the server would),
  reads what the server holds, then turns flags off first, sets the times
  and the delay, and turns flags on last. When the window stays on and
  more than one of its times changes, the writes go in an order whose every
  step acts now (and in the next minute) as the old or the new window does;
  with no such order the quiet time is switched off around them. A refusal
  half way puts back what was written (``quiet``): a window is never left
  on with half its new times.
- ``schedule suspend|resume|delete`` look the job up first (an unknown id
  is an error here, whatever the server answers: the legacy server answered
  2.04) and read the listing back after, so the confirmation says what the
  server holds; a job already so is said to be, nothing sent.
"""

import asyncio
import itertools
import re
import time
from datetime import datetime, time as dtime, timedelta, timezone

from .errors import CliError, NotFound, Refused
from .commands import _every, _when, describe_job, next_run
from .shape import BadAnswer
from .terminal import emit, number, shown

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
    return number(value, "g" if isinstance(value, float) else "")


async def set_value(client, args, out):
    if args.setting == "time":
        return await set_time(client, args, out)
    path, what, unit = SETTINGS[args.setting]
    await _refusal(f"set {args.setting}", client.put(path, [[args.value], {}]))
    now = await client.get(path)
    line = f"{what} {_number(now)}{unit}"
    if args.setting == "auto":
        line += f" ({AUTO_WORDS.get(now, f'before every {number(now)}-th sequence')})"
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
        raise BadAnswer(f"GET /sysinfo/clock: malformed answer from the server: "
                        f"not an ISO 8601 time: {text[:40]!r}") from None
    if server.tzinfo is None:
        server = server.replace(tzinfo=timezone.utc)
    try:
        return server, server.timestamp() - (before + after) / 2
    except (OverflowError, ValueError):
        raise BadAnswer(f"GET /sysinfo/clock: malformed answer from the server: "
                        f"a time out of range: {text[:40]!r}") from None


def _apart(seconds):
    if abs(seconds) < 0.05:
        return "in step with this computer"
    return (f"{number(abs(seconds), '.1f')} s {'ahead of' if seconds > 0 else 'behind'} "
            f"this computer")


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


def _local_now(now, tz):
    return now.astimezone(tz) if tz is not None else now.astimezone()


EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc)


def _localise(naive, tz, text):
    """A wall-clock time here -> aware, with the UTC offset of *that*
    date (daylight saving), not today's; a time the clocks skip is an
    error. ``tz``: a tzinfo, or None for this computer's zone."""
    try:
        if tz is None:
            when = naive.astimezone()               # the system's rules for that date
            back = when.astimezone().replace(tzinfo=None)
        else:
            when = naive.replace(tzinfo=tz)
            back = when.astimezone(timezone.utc).astimezone(tz).replace(tzinfo=None)
    except (OverflowError, ValueError, OSError):
        raise CliError(f"{text!r} is out of range (1970 to 9999 in UTC)", USAGE) from None
    if back != naive:
        raise CliError(f"{text!r} does not exist in this computer's time zone (the clocks "
                       f"skip it); give an offset, e.g. +01:00", USAGE)
    return when


def _in_range(when, text):
    try:
        utc = when.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        utc = None
    if utc is None or not EARLIEST <= utc <= LATEST:
        raise CliError(f"{text!r} is out of range (1970 to 9999 in UTC)", USAGE)
    return utc


def parse_when(text, now=None, tz=None):
    """A time a person types -> an aware datetime in UTC. ``HH:MM[:SS]`` is
    today; without an offset, the time is this computer's local time on
    that date (``tz``: another zone), with that date's daylight saving.
    Times outside 1970 to 9999 (in UTC) are refused, as the server does."""
    now = now or datetime.now(timezone.utc)
    text = text.strip()
    m = _CLOCK.fullmatch(text)
    naive = None
    if m and not m.group(4):
        h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
        try:
            naive = datetime.combine(_local_now(now, tz).date(), dtime(h, mi, s))
        except ValueError:
            pass
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            pass
        else:
            if when.tzinfo is not None:
                return _in_range(when, text)
            naive = when
    if naive is None:
        raise CliError(f"not a time: {text!r} (HH:MM, YYYY-MM-DD HH:MM[:SS] or ISO 8601)",
                       USAGE)
    return _in_range(_localise(naive, tz, text), text)


def parse_clock(text, now=None, tz=None):
    """A daily time for the quiet window -> ``HH:MM:SS+zzzz`` (without an
    offset: this computer's UTC offset now -- a daily time keeps one
    offset), as the server takes it: an offset of at most 14 hours."""
    m = _CLOCK.fullmatch(text.strip())
    offset = m.group(4) if m else None
    if offset and offset.upper() not in ("Z", "UTC"):
        digits = offset[1:].replace(":", "")
        bad_offset = int(digits[:2]) > 14 or int(digits[2:]) > 59
    else:
        bad_offset = False
    if (not m or int(m.group(1)) > 23 or int(m.group(2)) > 59 or int(m.group(3) or 0) > 59
            or bad_offset):
        raise CliError(f"not a time of day: {text!r} (HH:MM[:SS], optionally +zzzz "
                       f"of at most 14 hours)", USAGE)
    if offset is None:
        delta = _local_now(now or datetime.now(timezone.utc), tz).utcoffset()
        minutes = int(delta.total_seconds() // 60)
        offset = (f"{'+' if minutes >= 0 else '-'}{number(abs(minutes) // 60, '02d')}"
                  f"{number(abs(minutes) % 60, '02d')}")
    elif offset.upper() in ("Z", "UTC"):
        offset = "+0000"
    offset = offset.replace(":", "")
    return f"{number(int(m.group(1)), '02d')}:{m.group(2)}:{m.group(3) or '00'}{offset}"


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
    line = f"job #{number(job_id)}: {describe_job(job)}: {when}, {_every(interval)}"
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
    if wanted is not None and jobs[args.id][5] == wanted:
        emit(out, f"job #{args.id} is {shown(wanted)} already: {describe_row(jobs[args.id])}")
        return 0
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
TIMES = ("quietStart", "quietEnd", "powerDelay")
MAX_POWER_DELAY = 12 * 3600         # as the server takes it
LOOKAHEAD = (0, 60)                 # seconds from now a step must be safe at


def _daily(text):
    """``HH:MM:SS+zzzz`` (as the server keeps a quiet time) -> an aware
    time, or None."""
    m = re.fullmatch(r"(\d{2}):(\d{2}):(\d{2})([+-])(\d{2})(\d{2})", text or "", re.ASCII)
    if not m:
        return None
    hh, mm, ss, sign, oh, om = m.groups()
    offset = timedelta(hours=int(oh), minutes=int(om)) * (-1 if sign == "-" else 1)
    try:
        return dtime(int(hh), int(mm), int(ss), tzinfo=timezone(offset))
    except ValueError:
        return None


def _window(now, start, end):
    """The quiet window (start, end) holding ``now`` or the next one, as
    the server builds it (day by day in the start's offset; one that ends
    at or before its start ends the day after)."""
    local_day = now.astimezone(start.tzinfo).date()
    for shift in (-1, 0, 1):
        day = local_day + timedelta(days=shift)
        w_start = datetime.combine(day, start.replace(tzinfo=None), start.tzinfo)
        w_end = datetime.combine(day, end.replace(tzinfo=None), end.tzinfo)
        while w_end <= w_start:
            w_end += timedelta(days=1)
        if now < w_end:
            return w_start, w_end
    raise AssertionError("no quiet window")


def effect(state, now):
    """What a quiet-time setting does at ``now``: (batches held, spectrometers
    off); None when a value is not understood."""
    if not state["quietTimeEnabled"]:
        return (False, False)
    start, end = _daily(state["quietStart"]), _daily(state["quietEnd"])
    delay = state["powerDelay"]
    if start is None or end is None or not isinstance(delay, (int, float)):
        return None
    try:
        w_start, w_end = _window(now, start, end)
        gap = timedelta(seconds=delay)
    except (OverflowError, ValueError):         # a clock in 9999, a delay of 1e308 s
        return None
    quiet = w_start <= now < w_end
    off = bool(state["powerOffEnabled"] and quiet and w_end - w_start > 2 * gap
               and w_start + gap <= now < w_end - gap)
    return (quiet, off)


def safe_order(old, new, changing, now):
    """An order of writing ``changing`` (resources of TIMES) in which every
    state on the way does, now and in the next minute, what the old
    settings do until it does what the new ones do; None if there is none."""
    for order in itertools.permutations(changing):
        states, state = [], dict(old)
        for resource in order:
            state = {**state, resource: new[resource]}
            states.append(state)
        try:
            steady = all(_steady(old, states, new, now + timedelta(seconds=ahead))
                         for ahead in LOOKAHEAD)
        except (OverflowError, ValueError):     # an instrument clock in 9999
            return None
        if steady:
            return list(order)
    return None


def _steady(old, states, new, when):
    before, after = effect(old, when), effect(new, when)
    if before is None or after is None:
        return False
    effects = [effect(s, when) for s in states]
    switched = False
    for e in effects:
        if e == after and (switched or e != before):
            switched = True
        elif e != before or switched:
            return False
    return True


def quiet_plan(args):
    """The values asked for, checked here as the server would check them
    (nothing is sent when one is wrong)."""
    wanted = {}
    if args.start:
        wanted["quietStart"] = parse_clock(args.start)
    if args.end:
        wanted["quietEnd"] = parse_clock(args.end)
    if args.power_delay is not None:
        if not 0 <= args.power_delay <= MAX_POWER_DELAY:
            raise CliError(f"schedule quiet: powerDelay: must be 0 to {MAX_POWER_DELAY} s, "
                           f"not {args.power_delay}")
        wanted["powerDelay"] = args.power_delay
    if args.power_off is not None:
        wanted["powerOffEnabled"] = args.power_off == "on"
    if args.state is not None:
        wanted["quietTimeEnabled"] = args.state == "on"
    return wanted


async def quiet(client, args, out):
    """Change what is asked for, in a safe order, then show all of it."""
    wanted = quiet_plan(args)
    if wanted:
        old = dict(zip(QUIET, await asyncio.gather(
            *(client.get(f"control/scheduler/{r}") for r in QUIET))))
        await _apply_quiet(client, old, wanted)
    enabled, start, end, power_off, delay = await asyncio.gather(
        *(client.get(f"control/scheduler/{r}") for r in QUIET))
    line = (f"quiet time {'on' if enabled else 'off'}: {shown(start)} to {shown(end)}; "
            f"spectrometers {'switched off' if power_off else 'left on'} in it")
    if power_off:
        line += f" ({_number(delay)} s after its start, on {_number(delay)} s before its end)"
    emit(out, line)
    return 0


async def _apply_quiet(client, old, wanted):
    times = [r for r in TIMES if r in wanted]
    changing = [r for r in times if wanted[r] != old[r]]
    # the times are written after the flags that go off, before those that
    # go on: between those, the window is ``first`` turning into ``then``
    first = {**old, **{f: False for f in ("quietTimeEnabled", "powerOffEnabled")
                       if wanted.get(f) is False}}
    then = {**first, **{r: wanted[r] for r in times}}
    hold = False
    if first["quietTimeEnabled"] and len(changing) > 1:
        order = None
        try:
            now, _ = await _offset(client)       # the instrument's time: its windows
        except CliError:
            now = None
        if now is not None:
            order = safe_order(first, then, changing, now)
        if order is None:
            hold = True                         # off around the writes
        else:
            times = order + [r for r in times if r not in order]
    steps = []                                  # (resource, value) in order
    if wanted.get("quietTimeEnabled") is False or hold:
        steps.append(("quietTimeEnabled", False))
    if wanted.get("powerOffEnabled") is False:
        steps.append(("powerOffEnabled", False))
    steps += [(r, wanted[r]) for r in times]
    if wanted.get("powerOffEnabled"):
        steps.append(("powerOffEnabled", True))
    if wanted.get("quietTimeEnabled") or hold:
        steps.append(("quietTimeEnabled", True))
    done, state = [], dict(old)
    for resource, value in steps:
        try:
            await _refusal(resource, client.put(f"control/scheduler/{resource}",
                                                [[value], {}]))
        except CliError as e:
            raise CliError(f"schedule quiet: {e}; " + await _undo(client, done)) from None
        done.append((resource, state[resource]))
        state[resource] = value


async def _undo(client, done):
    """Put back what ``done`` changed (newest first); in words, what holds."""
    if not done:
        return "nothing changed"
    for resource, before in reversed(done):
        try:
            await _refusal(resource, client.put(f"control/scheduler/{resource}",
                                                [[before], {}]))
        except CliError as e:
            try:
                await _refusal("quietTimeEnabled", client.put(
                    "control/scheduler/quietTimeEnabled", [[False], {}]))
            except CliError:
                return (f"putting the old settings back failed too ({e}): check "
                        f"piccolo3 schedule quiet")
            return (f"putting the old settings back failed ({e}): quiet time "
                    f"switched off")
    return "the old settings are back: nothing changed"
