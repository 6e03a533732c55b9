"""What the command line accepts from a server: every answer decoded with a
depth limit and checked against the shape the API gives it, before any
command looks inside.

A server may be spoofed or hostile: an answer of the wrong type, a short
row or a list nested a hundred thousand deep must end the command with
one line (exit 2), never a traceback, and a name must never lead outside
the directory it is meant for. The shapes are small values::

    JOBS = ListOf(Row(INT, JOB, Nullable(TEXT), Nullable(TEXT),
                      Nullable(Num(0, MAX_INTERVAL)), TEXT))

and ``check(value, JOBS, "GET /control/scheduler/jobs")`` returns the value
or raises :class:`BadAnswer`. ``answer_shape(method, path)`` is the
catalogue: the shape of every resource the command line reads, by path
(the client looks every answer up there; a command reading a new
resource adds its shape here). Rows may grow (a newer server adds a
column): items past the known ones are not looked at, and neither are
unknown keys of an object.
"""

import json
import re
import sys

from .errors import CliError
from .names import SPECTRUM_FILE, run_name_problem
from .terminal import number

MAX_DEPTH = 32          # as the server's own limit for request payloads
MAX_TEXT = 4096         # characters of one free-text value (a message)
MAX_WORD = 100          # a spectrometer, channel or key name
MAX_INTERVAL = 366 * 86400.0
MAX_FILE_TEXT = 64 << 20        # characters of a spectrum file (the server serves 64 MiB)
MAX_FILE_BODY = MAX_FILE_TEXT + (MAX_FILE_TEXT >> 2)    # ... as a JSON string, escaped
MAX_INT = 2 ** 63 - 1   # no integer of the API is larger
MAX_FLOAT = sys.float_info.max
MAX_NUMBER_TEXT = 100   # characters of one number in an answer (a float needs 24)
#: bytes of an answer, unless the catalogue says otherwise
MAX_ANSWER = 64 << 10


class BadAnswer(CliError):
    """The server's answer is not what the API says: exit 2."""

    def __init__(self, message):
        super().__init__(message, 2)


class Malformed(ValueError):
    """Not JSON, or not of the shape wanted (the reason in words)."""


class Mismatch(Malformed):
    """Where in a value the shape did not fit, and how."""

    def __init__(self, where, problem):
        super().__init__(where, problem)
        self.where, self.problem = where, problem

    def __str__(self):
        return self.said("the answer")

    def said(self, root):
        """In words, the value itself called ``root``."""
        return f"{self.where or root} {self.problem}"


def describe(value):
    """A value's kind in words (never its content: that may be huge)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class Shape:
    expected = "a value"

    def check(self, value, where):
        return value

    def fail(self, where, value, why=None):
        raise Mismatch(where, why or f"is {describe(value)}, not {self.expected}")


class _Anything(Shape):
    """Any JSON value (only for answers nobody reads)."""


class _Ignored(Shape):
    """An answer nobody reads: whatever it is, the command sees None."""

    def check(self, value, where):
        return None


ANYTHING, IGNORED = _Anything(), _Ignored()


class Text(Shape):
    """A string, at most ``max_len`` characters; ``rule(value)`` returns
    None or what is wrong with it."""

    def __init__(self, max_len=MAX_TEXT, rule=None, expected="a string"):
        self.max_len = max_len
        self.rule = rule
        self.expected = expected

    def check(self, value, where):
        if not isinstance(value, str):
            self.fail(where, value)
        if len(value) > self.max_len:
            self.fail(where, value, f"is {len(value)} characters long, at most "
                                    f"{self.max_len}")
        if self.rule is not None:
            problem = self.rule(value)
            if problem:
                self.fail(where, value, f"is not {self.expected} ({problem}): {value[:60]!r}")
        return value


class Int(Shape):
    """An integer (of at most 63 bits: nothing of the API is larger)."""
    expected = "an integer"

    def __init__(self, lo=None, hi=None):
        self.lo, self.hi = lo, hi

    def check(self, value, where):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, value)
        if abs(value) > MAX_INT:
            self.fail(where, value, "is too large an integer")
        return _in_range(self, value, where)


class Num(Shape):
    """A finite number: an integer too large for a float (10**400) is no
    more a number to calculate with than 1e400 (which JSON reads as
    infinity)."""
    expected = "a number"

    def __init__(self, lo=None, hi=None):
        self.lo, self.hi = lo, hi

    def check(self, value, where):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, value)
        if not (-MAX_FLOAT <= value <= MAX_FLOAT):      # NaN fails this too
            self.fail(where, value, "is not a finite number")
        return _in_range(self, value, where)


class Interval(Num):
    """A job's repeat interval in seconds: 0 (once), or 1 s to 366 days,
    as the server accepts it."""
    expected = "an interval"

    def __init__(self):
        super().__init__(0, MAX_INTERVAL)

    def check(self, value, where):
        value = super().check(value, where)
        if 0 < value < 1:
            self.fail(where, value, f"is {number(value, 'g')} s, below 1 s")
        return value


def _in_range(shape, value, where):
    if shape.lo is not None and value < shape.lo:
        shape.fail(where, value, f"is {number(value, 'g')}, below {number(shape.lo, 'g')}")
    if shape.hi is not None and value > shape.hi:
        shape.fail(where, value, f"is {number(value, 'g')}, above {number(shape.hi, 'g')}")
    return value


class _Bool(Shape):
    expected = "true or false"

    def check(self, value, where):
        if not isinstance(value, bool):
            self.fail(where, value)
        return value


class Scalar(Shape):
    """A string (at most MAX_TEXT), a finite number, true/false or null."""
    expected = "a plain value"

    def check(self, value, where):
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            return Num().check(value, where)
        if isinstance(value, str):
            return Text().check(value, where)
        self.fail(where, value)


class Nullable(Shape):
    def __init__(self, shape):
        self.shape = shape
        self.expected = f"{shape.expected} or null"

    def check(self, value, where):
        return None if value is None else self.shape.check(value, where)


class ListOf(Shape):
    def __init__(self, shape, max_items=None, min_items=0):
        self.shape = shape
        self.max_items = max_items
        self.min_items = min_items
        self.expected = f"a list of {shape.expected}"

    def check(self, value, where):
        if not isinstance(value, list):
            self.fail(where, value)
        if self.max_items is not None and len(value) > self.max_items:
            self.fail(where, value, f"has {len(value)} items, at most {self.max_items}")
        if len(value) < self.min_items:
            self.fail(where, value, f"has {len(value)} items, at least {self.min_items}")
        return [self.shape.check(v, f"{where}[{i}]") for i, v in enumerate(value)]


class Row(Shape):
    """A list whose items have their own shapes; the last ``optional`` of
    them may be missing; items past the known ones are kept unchecked
    (``grows=False``: refused -- a pair that code unpacks)."""

    def __init__(self, *shapes, optional=0, grows=True):
        self.shapes = shapes
        self.required = len(shapes) - optional
        self.grows = grows
        self.expected = f"a row of {self.required}"

    def check(self, value, where):
        if not isinstance(value, list):
            self.fail(where, value)
        if len(value) < self.required:
            self.fail(where, value, f"is a row of {len(value)}, not at least {self.required}")
        if not self.grows and len(value) > len(self.shapes):
            self.fail(where, value, f"is a row of {len(value)}, not at most {len(self.shapes)}")
        checked = [s.check(v, f"{where}[{i}]") for i, (s, v) in enumerate(zip(self.shapes, value))]
        return checked + value[len(checked):]


class Obj(Shape):
    """An object: the keys of ``fields`` checked where present (``required``
    must be), other keys kept unchecked."""
    expected = "an object"

    def __init__(self, fields, required=()):
        self.fields = fields
        self.required = tuple(required)

    def check(self, value, where):
        if not isinstance(value, dict):
            self.fail(where, value)
        for key in self.required:
            if key not in value:
                self.fail(where, value, f"lacks {key!r}")
        checked = dict(value)
        for key, shape in self.fields.items():
            if key in value:
                checked[key] = shape.check(value[key], f"{where}.{key}" if where else key)
        return checked


class MapOf(Shape):
    """An object of any keys (each ``keys``) with values of one shape."""
    expected = "an object"

    def __init__(self, keys, values, max_items=None):
        self.keys, self.values, self.max_items = keys, values, max_items

    def check(self, value, where):
        if not isinstance(value, dict):
            self.fail(where, value)
        if self.max_items is not None and len(value) > self.max_items:
            self.fail(where, value, f"has {len(value)} keys, at most {self.max_items}")
        return {self.keys.check(k, f"{where} key"): self.values.check(v, f"{where}[{k!r}]")
                for k, v in value.items()}


def _word_problem(text):
    if not text:
        return "empty"
    if "/" in text:
        return "holds '/'"
    if re.search("[\x00-\x1f\x7f-\x9f]", text):
        return "holds a control character"
    return None


def _spectrum_file_problem(text):
    return None if SPECTRUM_FILE.match(text) else "not b<batch>_s<sequence>[_light|_dark].pico"


BOOL = _Bool()
INT = Int()
NUM = Num()
TEXT = Text()
#: a spectrometer, channel or shutter name: one path word
WORD = Text(MAX_WORD, _word_problem, "a name")
RUN_NAME = Text(400, run_name_problem, "a run name")
SPECTRUM_FILE_NAME = Text(40, _spectrum_file_problem, "a spectrum file name")
NAMES = ListOf(WORD, max_items=64)

#: ``[kind, args]``: "record" with [run, nsequence, auto, delay, target],
#: or ["power_on"] / ["power_off"]
JOB = Row(TEXT, ListOf(Scalar(), max_items=16), optional=1)
#: ``[id, job, start_time, end_time, interval_seconds, status]``
JOB_ROW = Row(INT, JOB, Nullable(TEXT), Nullable(TEXT), Nullable(Interval()), TEXT)
JOBS = ListOf(JOB_ROW, max_items=1000)
#: one slot's outcome: GET /control/scheduler/history
HISTORY = ListOf(Obj({
    "job": INT, "slot": Nullable(TEXT), "outcome": Nullable(Text(16)),
    "reason": Nullable(TEXT), "run": Nullable(TEXT), "batch": Nullable(INT)},
    required=("job",)), max_items=1000)

#: a batch's summary (GET /control/last_batch, health's last_batch_summary)
_FLAGGED = Obj({
    "spectrometer": Nullable(TEXT), "channel": Nullable(TEXT), "type": Nullable(TEXT),
    "sequences": Nullable(ListOf(Row(INT, INT, grows=False), max_items=100000)),
    "spectra": Nullable(INT), "level": Nullable(NUM), "set_point": Nullable(NUM),
    "tolerance": Nullable(NUM),
    **{f"{m}_{end}": Nullable(NUM) for m in ("pixels", "temperature") for end in ("min", "max")}})
SUMMARY = Obj({
    "kind": Nullable(TEXT), "run": Nullable(TEXT), "batch": Nullable(INT),
    "sequences": Nullable(Int(0)), "files": Nullable(ListOf(TEXT, max_items=1 << 22)),
    "integration_times": Nullable(MapOf(TEXT, MapOf(TEXT, ListOf(NUM, max_items=1000),
                                                    max_items=64), max_items=64)),
    "saturated_spectra": Nullable(Int(0)), "saturated": Nullable(ListOf(_FLAGGED, 10000)),
    "temperature_unstable_spectra": Nullable(Int(0)),
    "temperature_unstable": Nullable(ListOf(_FLAGGED, 10000)),
    "temperature_wait": Nullable(Num(0)), "faults": Nullable(ListOf(TEXT, max_items=1000)),
    "aborted": Nullable(BOOL), "start": Nullable(TEXT), "end": Nullable(TEXT)})
#: GET /spectrometer/<spec>/last_spectrum/<channel> (what status reads of it)
LAST_SPECTRUM = Nullable(Obj({
    "peak": Nullable(NUM), "kind": Nullable(Text(40)), "integration_time": Nullable(NUM),
    "saturated": Nullable(Int(0)), "spectrometer": Nullable(TEXT),
    "channel": Nullable(TEXT)}))
#: GET /spectrometer/<spec>/last_temperature
LAST_TEMPERATURE = Nullable(Obj({
    "temperature": Nullable(NUM), "age": Nullable(Num(0)), "target": Nullable(NUM),
    "enabled": Nullable(BOOL), "stable": Nullable(BOOL)}))

HEALTH = Obj({
    "disk_free": Nullable(Num(0)), "disk_total": Nullable(Num(0)),
    "days_left": Nullable(Num(0)), "files_today": Nullable(Int(0)),
    "last_batch": Nullable(TEXT), "clock_synchronised": Nullable(BOOL),
    "uptime": Nullable(Num(0, 1e10)), "server_uptime": Nullable(Num(0, 1e10)),
    "spectrometers": Nullable(MapOf(WORD, Obj({
        "name": Nullable(TEXT), "status": Nullable(TEXT), "status_code": Nullable(INT),
        "errors": Nullable(Int(0)), "last_error": Nullable(TEXT),
        "temperature": Nullable(NUM), "temperature_age": Nullable(Num(0)),
        "temperature_target": Nullable(NUM), "temperature_stable": Nullable(BOOL)}),
        max_items=64)),
    "fault": Nullable(TEXT), "faults": Nullable(MapOf(WORD, TEXT, max_items=64)),
    "last_batch_summary": Nullable(SUMMARY), "time": Nullable(TEXT),
    "slots_missed_24h": Nullable(Int(0)), "slots_failed_24h": Nullable(Int(0))})

#: a .pico document: what ``plot`` reads of it
_COEFFICIENTS = Nullable(ListOf(Num(-1e9, 1e9), max_items=16))
PICO = Obj({"Spectra": ListOf(Obj({
    "Metadata": Obj({
        "SerialNumber": Nullable(TEXT), "Direction": Nullable(TEXT),
        "Dark": Nullable(BOOL), "Type": Nullable(TEXT), "Run": Nullable(TEXT),
        "Batch": Nullable(INT), "SequenceNumber": Nullable(INT),
        "IntegrationTime": Nullable(Num(0, 1e9)), "SaturationLevel": Nullable(Num(-1e15, 1e15)),
        "WavelengthCalibrationCoefficients": _COEFFICIENTS,
        "WavelengthCalibrationCoefficientsPiccolo": _COEFFICIENTS,
        "DarkPixels": Nullable(ListOf(Int(0), max_items=1 << 20)),
        "Datetime": Nullable(TEXT), "Temperature": Nullable(NUM),
        "TemperatureSetPoint": Nullable(NUM), "TemperatureStable": Nullable(BOOL)}),
    "Pixels": ListOf(Num(-1e15, 1e15), max_items=1 << 20)}, required=("Metadata", "Pixels")),
    min_items=1, max_items=256)}, required=("Spectra",))

_SPEC = r"spectrometer/[^/]+"
_RUN = r"data_dir/runs/[^/]+"
#: (method, path pattern, shape[, bytes]): every answer the command line
#: reads, and the most bytes it takes of it (MAX_ANSWER unless given; the
#: client stops a transfer beyond it, block by block)
CATALOGUE = [
    ("GET", r"control/(status|fault)", TEXT),
    ("GET", r"control/(current_sequence|numSequences|autointegration)", INT),
    ("GET", r"control/(delay|target)", NUM),
    ("GET", r"control/paused", BOOL),
    ("GET", r"control/last_batch", Nullable(SUMMARY), 16 << 20),
    ("GET", r"control/(abort|pause)", IGNORED),
    ("GET", r"control/scheduler/jobs", JOBS, 1 << 20),
    ("GET", r"control/scheduler/history", HISTORY, 4 << 20),
    ("GET", r"control/scheduler/(quietTimeEnabled|powerOffEnabled)", BOOL),
    ("GET", r"control/scheduler/(quietStart|quietEnd|fault)", TEXT),
    ("GET", r"control/scheduler/powerDelay", NUM),
    ("GET", r"data_dir/current_run", RUN_NAME),
    ("GET", r"data_dir/datadir", TEXT),
    ("GET", _RUN + r"/current_batch", Int(-1)),
    ("GET", _RUN + r"/name", RUN_NAME),
    ("GET", _RUN + r"/spectra_list", ListOf(SPECTRUM_FILE_NAME), 16 << 20),
    ("GET", r"(spectrometer/spectrometers|spectrometer/channels|shutter/shutters)", NAMES),
    ("GET", _SPEC + r"/status", INT),
    ("GET", _SPEC + r"/(haveTEC|TECenabled)", BOOL),
    ("GET", _SPEC + r"/(current_temperature|target_temperature|min_time|max_time)", NUM),
    ("GET", _SPEC + r"/current_time/[^/]+", NUM),
    ("GET", _SPEC + r"/last_temperature", LAST_TEMPERATURE),
    ("GET", _SPEC + r"/(last_spectrum|last_dark)/[^/]+", LAST_SPECTRUM),
    ("GET", _SPEC + r"/autointegration/[^/]+", Text(8)),
    ("GET", r"shutter/[^/]+/status", Text(16)),
    ("GET", r"sysinfo/health", HEALTH, 16 << 20),
    ("GET", r"sysinfo/(clock|host|version)", Text(200)),
    ("GET", r"sysinfo/(cpu|mem)", NUM),
    ("PUT", r"data_dir/all_runs", ListOf(RUN_NAME), 8 << 20),
    ("PUT", _RUN + r"/spectra", Text(MAX_FILE_TEXT), MAX_FILE_BODY),
    ("PUT", r"control/paused", BOOL),
    ("PUT", r".*", IGNORED),
]
_COMPILED = [(m, re.compile(p), s, rest[0] if rest else MAX_ANSWER)
             for m, p, s, *rest in CATALOGUE]


def _lookup(method, path):
    for m, pattern, shape, limit in _COMPILED:
        if m == method and pattern.fullmatch(path):
            return shape, limit
    raise LookupError(f"no answer shape for {method} /{path}: add it to shape.CATALOGUE")


def answer_shape(method, path):
    """The shape of the answer to ``method`` (GET/PUT) on ``path``."""
    return _lookup(method, path)[0]


def answer_limit(method, path):
    """The most bytes the command line takes of that answer."""
    return _lookup(method, path)[1]


def conform(value, shape):
    """``value`` if it has ``shape``, else Mismatch (``said(root)`` words
    it: "Spectra[0].Pixels is a string, not a list of a number")."""
    try:
        return shape.check(value, "")
    except RecursionError:
        raise Mismatch("", "nests too deeply") from None


def check(value, shape, what):
    """``value`` if it has ``shape``, else BadAnswer naming ``what``."""
    try:
        return conform(value, shape)
    except Mismatch as e:
        raise BadAnswer(f"{what}: malformed answer from the server: {e}") from None


#: a JSON string with its escapes, or what is left of one at the end of
#: the text: no string is ever scanned twice (a string that never closed
#: was scanned again from every quote in it: seconds for a 60 kB answer)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")
_OPENERS = re.compile(r"[\[{]*")


def depth(text, limit):
    """How deep ``text``'s JSON nests, counted up to ``limit + 1`` (exact
    for JSON; for text that is not, json.loads says what is wrong). Linear
    in the text: its strings and everything but brackets are removed in
    one pass each, then the innermost pairs, once per level."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    level = 0
    while brackets and level <= limit:
        inner = _INNERMOST.sub("", brackets)
        if len(inner) == len(brackets):
            # not JSON (brackets that do not match): json.loads would go
            # as deep as the openers before the first mismatch
            level += len(_OPENERS.match(brackets).group())
            break
        level += 1
        brackets = inner
    return min(level, limit + 1)


def _number_text(kind):
    def convert(text):
        if len(text) > MAX_NUMBER_TEXT:
            raise ValueError(f"a number of {len(text)} characters")
        return kind(text)
    return convert


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse(data, max_depth=MAX_DEPTH):
    """JSON (bytes or str) -> value; Malformed for anything that is not
    UTF-8 JSON within ``max_depth`` levels (NaN and Infinity refused)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("not UTF-8") from None
    if depth(data, max_depth) > max_depth:
        raise Malformed(f"nests deeper than {max_depth} levels")
    try:
        return json.loads(data, parse_constant=_no_constant,
                          parse_int=_number_text(int), parse_float=_number_text(float))
    except (ValueError, RecursionError) as e:
        raise Malformed(f"not JSON: {e}") from None


def loads(data, what, max_depth=MAX_DEPTH):
    """An answer's JSON -> value; BadAnswer (exit 2) naming ``what``."""
    try:
        return parse(data, max_depth)
    except Malformed as e:
        raise BadAnswer(f"{what}: malformed answer from the server: {e}") from None
