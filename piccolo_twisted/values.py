"""Checking values that arrive over the wire; errors become 4.00."""

import math

from .errors import PiccoloError


def to_int(value, name, lo=None, hi=None):
    """An int (or a string holding one, as the web dashboard sends)."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise PiccoloError(f"{name} must be an integer, not {value!r}") from None
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PiccoloError(f"{name} must be an integer, not {value!r}")
    _check_range(value, name, lo, hi)
    return value


def to_float(value, name, lo=None, hi=None):
    """A finite number (or a string holding one); NaN and Infinity refused."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise PiccoloError(f"{name} must be a number, not {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PiccoloError(f"{name} must be a number, not {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise PiccoloError(f"{name} must be a finite number")
    _check_range(value, name, lo, hi)
    return value


def to_bool(value, name):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise PiccoloError(f"{name} must be true or false, not {value!r}")


def _check_range(value, name, lo, hi):
    if lo is not None and value < lo:
        raise PiccoloError(f"{name} must be at least {lo}, not {value}")
    if hi is not None and value > hi:
        raise PiccoloError(f"{name} must be at most {hi}, not {value}")
