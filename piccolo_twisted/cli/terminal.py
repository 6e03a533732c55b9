"""Text and numbers from the server reach the terminal through here.

A server's string can hold ESC sequences (clear the screen, set the window
title, recolour or hide what follows), a carriage return (overwrite the
line), a newline (forge a line of output), bidirectional overrides and
other invisible format characters (show text in another order than it is,
or names that look alike), or a lone surrogate (a ``\\ud800`` JSON escape:
it cannot be encoded, and under the C locale Python writes ``\\udc9b`` as
the raw byte 0x9b, an 8-bit CSI). ``shown`` writes every character that is
not printable -- Unicode's "Other" and "Separator" categories (Cc, Cf, Cs,
Co, Cn, Zl, Zp, Zs) but the ASCII space, exactly what ``str.isprintable``
refuses -- as a visible escape (``\\x1b``, ``\\u202e``, ``\\ud800``).
``emit`` prints our own lines (joined by newlines) with every such
character but the newlines escaped, as the last guard, and in what the
output's encoding can hold (``\\xe9`` on an ASCII terminal, never a
UnicodeEncodeError).

``number`` is the one way a number becomes text: whatever the server sent
(an integer of 400 digits, 5e-324, a string where a number belongs) it
returns text and never raises.
"""

import math


def _escape(char):
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def shown(value):
    """``value`` as one line of safe text (any value: str() first)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def printable(text, stream=None):
    """Our own (possibly multi-line) ``text``: every character but the
    newlines that ``shown`` would escape, escaped; then made to fit the
    encoding of ``stream`` (when it has one)."""
    text = "\n".join(map(shown, text.split("\n")))
    encoding = getattr(stream, "encoding", None)
    if encoding:
        try:
            text.encode(encoding)
        except UnicodeEncodeError:
            text = text.encode(encoding, "backslashreplace").decode(encoding)
        except LookupError:
            pass
    return text


def emit(out, text="", **kw):
    """print() our own text safely (see ``printable``)."""
    print(printable(text, out), file=out, **kw)


_FLOAT_TYPES = "eEfFgG%"


def number(value, spec=""):
    """A number as text, formatted by ``spec`` (as in ``format``); never
    raises: an integer beyond a float is ``~1e+400``, anything not a number
    is shown escaped."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return shown(value)
    try:
        if isinstance(value, int) and spec and spec[-1] in _FLOAT_TYPES:
            value = float(value)
        return format(value, spec)
    except (OverflowError, ValueError):
        pass
    if isinstance(value, int):
        digits = int(value.bit_length() * math.log10(2))
        return f"{'-' if value < 0 else ''}~1e+{digits}"
    return shown(repr(value))
