"""Schedule arithmetic: pure functions of their arguments, no clock.

Times are POSIX seconds (wall clock, UTC); quiet times are the wire's
``"HH:MM:SS+zzzz"`` strings.
"""

import functools
import re
from datetime import datetime, time as dtime, timedelta, timezone

from ..errors import PiccoloError

DAY = 24 * 3600
QUIET_TIME = re.compile(r"^(\d{2}):(\d{2}):(\d{2})(?:([+-])(\d{2})(\d{2}))?$", re.ASCII)


def parse_quiet_time(value):
    """ "HH:MM:SS+zzzz" (or "HH:MM:SS", taken as UTC) -> an aware
    ``datetime.time``; PiccoloError for anything else."""
    if not isinstance(value, str):
        raise PiccoloError("quiet times are strings like '22:00:00+0000'")
    return _parse_quiet_time(value)


@functools.lru_cache(maxsize=64)
def _parse_quiet_time(value):
    m = QUIET_TIME.match(value.strip())
    if not m:
        raise PiccoloError(f"not a time like '22:00:00+0000' or '22:00:00': {value!r}")
    hh, mm, ss, sign, oh, om = m.groups()
    hh, mm, ss = int(hh), int(mm), int(ss)
    oh, om = (int(oh), int(om)) if sign else (0, 0)
    if hh > 23 or mm > 59 or ss > 59 or oh > 14 or om > 59:
        raise PiccoloError(f"time out of range: {value!r}")
    offset = timedelta(hours=oh, minutes=om) * (-1 if sign == "-" else 1)
    return dtime(hh, mm, ss, tzinfo=timezone(offset))


def normalise_quiet_time(value):
    """The form read back: "HH:MM:SS+zzzz" (no offset given means +0000)."""
    parse_quiet_time(value)
    text = value.strip()
    return text if len(text) > 8 else text + "+0000"


_windows = {}


def quiet_window(now, start, end):
    """The quiet window (UTC epoch start, end) containing ``now`` or the
    next one after it. Windows are built as full date-times day by day, so
    a window across midnight (22:00 to 04:00) is one window.

    The scheduler asks several times a minute: the answer for the last
    ``now`` holds until the window's end (and back to that ``now``)."""
    cached = _windows.get((start, end))
    if cached is not None and cached[0] <= now < cached[2]:
        return cached[1], cached[2]
    s, e = _quiet_window(now, start, end)
    if len(_windows) > 64:
        _windows.clear()
    _windows[(start, end)] = (now, s, e)
    return s, e


def _quiet_window(now, start, end):
    start_t, end_t = parse_quiet_time(start), parse_quiet_time(end)
    tz = start_t.tzinfo
    local_day = datetime.fromtimestamp(now, tz).date()
    for shift in (-1, 0, 1):
        day = local_day + timedelta(days=shift)
        w_start = datetime.combine(day, start_t.replace(tzinfo=None), tz)
        w_end = datetime.combine(day, end_t.replace(tzinfo=None), end_t.tzinfo)
        while w_end <= w_start:
            w_end += timedelta(days=1)
        s, e = w_start.timestamp(), w_end.timestamp()
        if now < e:
            return s, e
    raise AssertionError("no quiet window found")  # pragma: no cover


def in_quiet(now, start, end):
    s, e = quiet_window(now, start, end)
    return s <= now < e


def power_window(now, start, end, delay):
    """``(off_from, on_at)`` of the power window of the quiet window
    containing ``now`` or the next one, or None when that quiet window is
    too short for the delay (``end - start <= 2 * delay``)."""
    s, e = quiet_window(now, start, end)
    if e - s <= 2 * delay:
        return None
    return s + delay, e - delay


def next_run(next_time, interval, now):
    """The first slot after ``now`` on the grid ``next_time + k*interval``,
    or None for a job that does not repeat."""
    if not interval:
        return None
    if next_time > now:
        return next_time
    k = int((now - next_time) // interval) + 1
    return next_time + k * interval


def due_slots(next_time, interval, end_time, now):
    """The slots of a job from ``next_time`` up to ``now`` (inclusive),
    oldest first, as ``(first, count, last)``; ``count`` 0 when none is
    due. Counted, not listed: a job every second left alone for a year
    has 31 million of them."""
    if next_time > now:
        return next_time, 0, None
    if not interval:
        if end_time is not None and next_time > end_time:
            return next_time, 0, None
        return next_time, 1, next_time
    last_index = int((now - next_time) // interval)
    if end_time is not None and end_time >= next_time:
        last_index = min(last_index, int((end_time - next_time) // interval))
    elif end_time is not None:
        return next_time, 0, None
    return next_time, last_index + 1, next_time + last_index * interval


def iso(ts):
    """ISO 8601 UTC with offset, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat()
