"""Text from the server reaches the terminal escaped.

A server's string can hold ESC sequences (clear the screen, set the window
title, recolour or hide what follows), a carriage return (overwrite the
line), a newline (forge a line of output) or bidirectional overrides (show
text in another order than it is). ``shown`` writes every such character
as a visible escape (``\\x1b``, ``\\u202e``); ``emit`` prints our own lines
(joined by newlines) with every other control character escaped, as the
last guard.
"""

import re

#: C0 and C1 controls, DEL, and the invisible characters that reorder or
#: break lines: bidi embeddings, overrides and isolates, marks, line and
#: paragraph separators
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_BUT_NEWLINE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match):
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(value):
    """``value`` as one line of safe text (any value: str() first)."""
    text = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub(_escape, text)


def emit(out, text="", **kw):
    """print() our own (possibly multi-line) text, every control character
    but the newlines between lines escaped."""
    print(_UNSAFE_BUT_NEWLINE.sub(_escape, text), file=out, **kw)
