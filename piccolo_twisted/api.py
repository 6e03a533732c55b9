"""How components declare their CoAP resources, without knowing CoAP.

A component returns a dict mapping a path (``"status"``,
``"S_QEP1/current_time"``) to a :class:`Resource`. ``coap.site`` builds the
txThings tree from it.
"""

import json
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import PiccoloError


class EncodedJSON(bytes):
    """A GET result already encoded as JSON: the CoAP layer sends these
    bytes as they are, so a large value that changes rarely (the scheduler's
    job listing) is encoded once per change, not once per request."""

    @classmethod
    def encode(cls, value):
        return cls(json.dumps(value, allow_nan=False, separators=(",", ":")).encode("utf-8"))


@dataclass
class Resource:
    #: GET handler: called with the path arguments; returns a JSON-able value.
    get: Optional[Callable] = None
    #: PUT handler: called with path args, then the payload's args and kwargs.
    put: Optional[Callable] = None
    #: An Observable, or (for path-parsing resources) a callable mapping path
    #: args to an Observable; makes the resource observable.
    observe: object = None
    #: Remaining path segments become the first positional arguments.
    parse_path: bool = False
    #: GET acts (abort, pause, connect, power_on, ...): a duplicate of such a
    #: request must be answered from the cache, never run twice.
    get_acts: bool = False
    #: PUT only reads (a file, a listing: the legacy API's reads with
    #: arguments): a duplicate may simply be run again, it needs no entry in
    #: the dedup cache, and it is open to every client like a GET, whatever
    #: ``[access] control_from`` says.
    put_reads: bool = False
    #: PUT sets a value (a setting, a suspended job, the current run): run
    #: again it leaves the same state and gives the same answer, so a
    #: duplicate may simply be run again (RFC 7252 4.5 allows it for
    #: idempotent requests) and it needs no entry in the dedup cache. Still
    #: a change: ``[access] control_from`` guards it like any PUT.
    idempotent: bool = False
    #: Served even when every handler slot is taken (abort, pause); the
    #: state and settings (observable resources) are served so anyway.
    urgent: bool = False
    #: For path-parsing resources: the known sub-paths, listed in
    #: /.well-known/core (e.g. the channels of ``current_time/<channel>``).
    known: tuple = ()

    def changes(self, method):
        """Whether a request with ``method`` ("GET" or "PUT") may change
        anything: what the access policy guards."""
        if method == "GET":
            return self.get_acts
        return not (method == "PUT" and self.put_reads)


# -- payloads -> call arguments (every face of the API: CoAP and the web) --

MAX_DEPTH = 32          # nesting of arrays/objects accepted in a payload


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def _finite(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _depth_ok(value):
    """True when ``value`` nests at most MAX_DEPTH levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children
                         if isinstance(c, (list, dict)))
    return True


def parse_arguments(payload):
    """Turn a PUT payload (bytes) into (args, kwargs) following API.md:
    ``[[args], {kwargs}]``, a list, an object, or one value.

    Whatever the parser cannot take -- bad UTF-8, bad JSON, NaN/Infinity,
    numbers out of range, nesting deeper than the interpreter's recursion
    limit -- is a ``PiccoloError`` (4.00), never an exception that escapes
    the request path; nesting over ``MAX_DEPTH`` is refused too.
    """
    if not payload:
        return (), {}
    try:
        value = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant,
                           parse_float=_finite)
    except (ValueError, UnicodeDecodeError) as e:
        raise PiccoloError(f"payload is not valid JSON: {e}") from None
    except (RecursionError, MemoryError):
        raise PiccoloError("payload is not valid JSON: nested too deeply") from None
    if not _depth_ok(value):
        raise PiccoloError(f"payload nests deeper than {MAX_DEPTH} levels")
    if (isinstance(value, list) and len(value) == 2
            and isinstance(value[0], list) and isinstance(value[1], dict)):
        return tuple(value[0]), value[1]
    if isinstance(value, list):
        return tuple(value), {}
    if isinstance(value, dict):
        return (), value
    return (value,), {}


MAX_MESSAGE = 400


def error_text(error):
    """An error's text for the wire: one readable line, never a huge echo
    of the bad input."""
    text = " ".join(str(error).split())
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE - 1] + "\u2026"
    return text
