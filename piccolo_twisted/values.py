"""The one vocabulary for values that arrive over the wire; errors are 4.00.

Every resource checks its arguments with these functions, so the same
spelling of a value is accepted or refused the same way everywhere:

- booleans: JSON ``true``/``false`` or the strings ``"true"``/``"false"``
  (any case, surrounding blanks ignored); nothing else (not 0/1, not
  ``"yes"``);
- numbers: JSON numbers or strings holding a decimal number (``"20"``,
  ``" 2.5 "``, ``"2e1"``, as the web dashboard sends form fields); never a
  boolean, NaN or an infinity (``"nan"``, ``1e999``), hexadecimal,
  ``1_000`` or digits other than ASCII (``"١٢"``, ``"１２"``). An integer setting takes any spelling of an integral value
  (``20``, ``20.0``, ``"20"``, ``"20.0"``) and refuses ``20.5``;
- date-times: ISO 8601 strings (``Z`` or an offset; none means UTC) from
  1970 to the year 9999 once converted to UTC.
"""

import math
import re
from datetime import datetime, timezone

from .errors import PiccoloError

#: a decimal number as a person types it: no "nan", "inf", "0x", "1_000"
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$", re.ASCII)
_MAX_NUMBER_TEXT = 64
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: the first float timestamp past 9999 (``9999-12-31T23:59:59.999999Z``
#: rounds to it, and no datetime can be made of it again)
END_TIMESTAMP = datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp() + 1


def _number(value, name, what):
    """A JSON number or a numeric string -> int or float (bool refused)."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) > _MAX_NUMBER_TEXT or not _NUMBER.match(text):
            raise PiccoloError(f"{name} must be {what}, not {value[:40]!r}")
        try:
            return int(text)
        except ValueError:
            return float(text)      # may overflow to inf: refused by callers
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PiccoloError(f"{name} must be {what}, not {_short(value)}")
    return value


def to_int(value, name, lo=None, hi=None):
    """An integral number (or a string holding one)."""
    number = _number(value, name, "an integer")
    if isinstance(number, float):
        if not math.isfinite(number) or number != int(number):
            raise PiccoloError(f"{name} must be an integer, not {_short(value)}")
        number = int(number)
    _check_range(number, name, lo, hi)
    return number


def to_float(value, name, lo=None, hi=None):
    """A finite number (or a string holding one); NaN and Infinity refused."""
    number = float(_number(value, name, "a number"))
    if not math.isfinite(number):
        raise PiccoloError(f"{name} must be a finite number")
    _check_range(number, name, lo, hi)
    return number


def to_bool(value, name):
    """``true``/``false`` as JSON or as strings; nothing else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise PiccoloError(f"{name} must be true or false, not {_short(value)}")


def to_datetime(value, name="date-time"):
    """An ISO 8601 date-time string (naive means UTC) -> aware UTC datetime.

    Dates that fall outside 1970 .. 9999 once converted to UTC (e.g.
    ``9999-12-31T23:59:59-14:00``) are refused like any other bad value.
    """
    if not isinstance(value, str) or not value.strip():
        raise PiccoloError(f"{name} must be an ISO 8601 date-time string, "
                           f"not {_short(value)}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise PiccoloError(f"{name}: not an ISO 8601 date-time: {value[:40]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    try:
        when = when.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        when = None
    if when is None or when < EPOCH or when.timestamp() >= END_TIMESTAMP:
        raise PiccoloError(f"{name} {value[:40]!r} is out of range "
                           f"(1970 to 9999 in UTC)")
    return when


def _short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_range(value, name, lo, hi):
    if lo is not None and value < lo:
        raise PiccoloError(f"{name} must be at least {lo}, not {value}")
    if hi is not None and value > hi:
        raise PiccoloError(f"{name} must be at most {hi}, not {value}")
