"""How components declare their CoAP resources, without knowing CoAP.

A component returns a dict mapping a path (``"status"``,
``"S_QEP1/current_time"``) to a :class:`Resource`. ``coap.site`` builds the
txThings tree from it.
"""

import json
from dataclasses import dataclass
from typing import Callable, Optional


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
    #: PUT only reads (a file, a listing): a duplicate may simply be run
    #: again, it needs no entry in the dedup cache.
    put_reads: bool = False
    #: Served even when every handler slot is taken (abort, pause); the
    #: state and settings (observable resources) are served so anyway.
    urgent: bool = False
    #: For path-parsing resources: the known sub-paths, listed in
    #: /.well-known/core (e.g. the channels of ``current_time/<channel>``).
    known: tuple = ()
