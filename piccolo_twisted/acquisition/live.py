"""The latest spectra of every spectrometer and channel, as they are recorded.

Control hands every spectrum it acquires here -- the dark and light sets
of batches and dark sequences, and every probe of an autointegration --
and each (spectrometer, channel) has two Observables holding a
:class:`Snapshot`: of the latest light spectrum (batches' light spectra
and autointegration probes) and of the latest dark one. Both faces of the
server read them: ``/spectrometer/<spec>/last_spectrum/<channel>`` (light)
and ``.../last_dark/<channel>`` over CoAP (observable), and the web
page's live plot.

Recording costs the acquisition nothing: a snapshot keeps references to
the pixels and metadata the batch has anyway. The JSON document (at most
1,024 points, the saturated-pixel count, the peak) is made only when
someone asks for it, once per snapshot, in a worker thread; the
wavelengths of a calibration are computed and encoded once.
"""

import json
import time
from collections import OrderedDict
from datetime import datetime, timezone

from twisted.internet import defer
from twisted.python.failure import Failure

from ..api import EncodedJSON, Resource
from ..errors import NotFoundError
from ..observable import Observable

MAX_POINTS = 1024
KINDS = ("dark", "light", "autointegration")

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def buckets(n, limit=MAX_POINTS):
    """Bucket boundaries that cut ``n`` pixels into at most ``limit``
    consecutive groups (all of one pixel when ``n <= limit``)."""
    if n <= limit:
        return None
    return [i * n // limit for i in range(limit + 1)]


def downsample(pixels, limit=MAX_POINTS):
    """At most ``limit`` values (a list of int): each the maximum of its
    bucket of consecutive pixels, so peaks and saturation survive the
    reduction. ``pixels`` is a sequence or a numpy array."""
    import numpy as np     # loaded with the acquisition (Control.prepare)
    values = np.asarray(pixels)
    bounds = buckets(len(values), limit)
    if bounds is not None:
        values = np.maximum.reduceat(values, bounds[:-1])
    return values.astype(np.int64).tolist()


def wavelengths(coefficients, n, limit=MAX_POINTS):
    """The wavelength (nm, 2 decimals) of every point ``downsample`` gives
    for ``n`` pixels: the calibration polynomial (ascending coefficients)
    at each bucket's centre."""
    bounds = buckets(n, limit)
    if bounds is None:
        centres = range(n)
    else:
        centres = [(a + b - 1) / 2.0 for a, b in zip(bounds, bounds[1:])]
    coefficients = list(coefficients) or [0.0, 1.0]
    out = []
    for x in centres:
        value = 0.0
        for c in reversed(coefficients):
            value = value * x + c
        out.append(round(value, 2))
    return out


class _Wavelengths:
    """Encoded wavelength lists by (coefficients, pixels): a calibration
    rarely changes, so each is computed and encoded once."""

    SIZE = 16

    def __init__(self):
        self._cache = OrderedDict()

    def encoded(self, coefficients, n):
        key = (tuple(coefficients), n)
        body = self._cache.get(key)
        if body is None:
            body = _encode(wavelengths(coefficients, n)).encode("ascii")
            self._cache[key] = body
            while len(self._cache) > self.SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return body


_WAVELENGTHS = _Wavelengths()


def iso_time(seconds):
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


class Snapshot:
    """One spectrum as recorded: references only, until it is encoded."""

    __slots__ = ("spectrometer", "channel", "kind", "pixels", "metadata", "when",
                 "run", "batch", "sequence", "_body")

    def __init__(self, spectrometer, channel, kind, pixels, metadata, when,
                 run=None, batch=None, sequence=None):
        self.spectrometer = spectrometer
        self.channel = channel
        self.kind = kind
        self.pixels = pixels
        self.metadata = metadata
        self.when = when
        self.run = run
        self.batch = batch
        self.sequence = sequence
        self._body = None

    @property
    def encoded_body(self):
        """The document if it has been made already, else None."""
        return self._body

    def saturated(self, values=None):
        """The count of saturated pixels: the device's own where its
        metadata has it (``SaturatedPixels``), else the pixels at or above
        the saturation level (``values``: the pixels as a numpy array)."""
        meta = self.metadata
        given = meta.get("SaturatedPixels")
        if isinstance(given, int) and not isinstance(given, bool):
            return given
        level = meta.get("SaturationLevel")
        if not isinstance(level, (int, float)):
            return None
        import numpy as np
        values = np.asarray(self.pixels) if values is None else values
        return int(np.count_nonzero(values >= level))

    def encode(self):
        """The JSON document as bytes (worker side; the result is kept)."""
        if self._body is not None:
            return self._body
        import numpy as np
        meta = self.metadata
        pixels = np.asarray(self.pixels)
        coefficients = (meta.get("WavelengthCalibrationCoefficientsPiccolo")
                        or meta.get("WavelengthCalibrationCoefficients") or ())
        points = downsample(pixels)      # bucket maxima: the peak survives
        head = {
            "spectrometer": self.spectrometer,
            "channel": self.channel,
            "kind": self.kind,
            "dark": self.kind == "dark",
            "integration_time": meta.get("IntegrationTime"),
            "time": iso_time(self.when),
            "saturated": self.saturated(pixels),
            "saturation_level": meta.get("SaturationLevel"),
            "peak": max(points) if points else None,
            "pixel_count": len(pixels),
            "temperature": meta.get("Temperature"),
            "run": self.run,
            "batch": self.batch,
            "sequence": self.sequence,
        }
        body = b"".join((
            _encode(head).encode("utf-8")[:-1],
            b',"wavelengths":', _WAVELENGTHS.encoded(coefficients, len(pixels)),
            b',"pixels":', _encode(points).encode("ascii"), b"}"))
        self._body = EncodedJSON(body)
        return self._body


def empty_document(spectrometer, channel):
    """What ``last_spectrum`` (``last_dark``) answers before the first
    light (dark) spectrum."""
    return {"spectrometer": spectrometer, "channel": channel, "kind": None,
            "dark": None, "integration_time": None, "time": None, "saturated": None,
            "saturation_level": None, "peak": None, "pixel_count": 0,
            "temperature": None, "run": None, "batch": None, "sequence": None,
            "wavelengths": [], "pixels": []}


class LiveSpectra:
    """The latest light and the latest dark spectrum per (spectrometer,
    channel), each an Observable of a :class:`Snapshot` (None before the
    first). Kept apart because a batch ends with a dark set: "the latest
    spectrum" alone would show a dark one after every batch, never what
    the fibre sees. Light: a batch's light spectra and every
    autointegration probe (shutter open); dark: batches' and dark
    sequences' dark spectra."""

    def __init__(self, spectrometers, channels, to_thread=None, wall=time.time):
        self.spectrometers = list(spectrometers)
        self.channels = list(channels)
        self.to_thread = to_thread
        self.wall = wall
        self.lights = {(s, c): Observable(None)
                       for s in self.spectrometers for c in self.channels}
        self.darks = {key: Observable(None) for key in self.lights}
        self._encoding = {}         # snapshot -> [Deferred] waiting for its body

    def observable(self, spectrometer, channel, dark=False):
        try:
            return (self.darks if dark else self.lights)[(spectrometer, channel)]
        except KeyError:
            raise NotFoundError(f"no spectrometer {spectrometer!r} with a channel "
                                f"{channel!r}") from None

    def record(self, spectrometer, channel, kind, pixels, metadata, run=None,
               batch=None, sequence=None):
        """A spectrum was acquired (reactor side; costs references only)."""
        key = (spectrometer, channel)
        if key not in self.lights:
            return
        snapshot = Snapshot(spectrometer, channel, kind, pixels, metadata, self.wall(),
                            run=run, batch=batch, sequence=sequence)
        (self.darks if kind == "dark" else self.lights)[key].set(snapshot)

    def body(self, spectrometer, channel, dark=False):
        """The latest light (dark) spectrum's JSON document: EncodedJSON, or a
        Deferred firing with it while it is made in a worker (shared by
        everyone asking for the same snapshot meanwhile)."""
        snapshot = self.observable(spectrometer, channel, dark).value
        if snapshot is None:
            return empty_document(spectrometer, channel)
        if snapshot.encoded_body is not None or self.to_thread is None:
            return snapshot.encode()
        d = defer.Deferred()
        waiting = self._encoding.get(snapshot)
        if waiting is not None:
            waiting.append(d)
            return d
        self._encoding[snapshot] = [d]

        def done(result):
            for w in self._encoding.pop(snapshot):
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)
        self.to_thread(snapshot.encode).addBoth(done)
        return d

    def resources(self):
        """``<spec>/last_spectrum/<channel>`` and ``<spec>/last_dark/<channel>``
        for every spectrometer."""
        res = {}
        for s in self.spectrometers:
            for name, dark in (("last_spectrum", False), ("last_dark", True)):
                def get(channel=None, *extra, s=s, name=name, dark=dark):
                    if channel is None or extra:
                        raise NotFoundError(f"use {name}/<channel>")
                    return self.body(s, channel, dark)

                def lookup(channel=None, *extra, s=s, name=name, dark=dark):
                    if channel is None or extra:
                        raise NotFoundError(f"use {name}/<channel>")
                    return self.observable(s, channel, dark)
                res[f"{s}/{name}"] = Resource(get=get, parse_path=True, observe=lookup,
                                              known=tuple(self.channels))
        return res
