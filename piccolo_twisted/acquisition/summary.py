"""What a batch did, in one plain record: ``GET /control/last_batch``.

Control fills it in as the batch goes (every file written, with the
spectra in it, and every fault) and publishes it at the start, after every
file and at the end; the record is what a scientist needs to judge the
batch without opening its files: how many sequences and files, the
integration times used, which spectra saturated, which were recorded with
a cooled detector away from its set point, and what went wrong.

It describes what is on disk: a spectrum counts when the write of its
file has completed (fsync'd), never when it was acquired -- a batch that
stops at a full disk, or is aborted with files still queued, has acquired
spectra that no file holds.
"""

from datetime import datetime, timezone


def _iso(seconds):
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


class _Flagged:
    """Spectra of one spectrometer, channel and type that share a flag:
    their sequences as ranges (a batch has up to a million), the extremes
    of the measure (saturated pixels, temperatures)."""

    __slots__ = ("where", "ranges", "count", "low", "high", "extra")

    def __init__(self, where, extra):
        self.where = where
        self.ranges = []
        self.count = 0
        self.low = self.high = None
        self.extra = extra

    def add(self, sequence, *values):
        self.count += 1
        if self.ranges and sequence == self.ranges[-1][1] + 1:
            self.ranges[-1][1] = sequence
        elif not (self.ranges and self.ranges[-1][0] <= sequence <= self.ranges[-1][1]):
            self.ranges.append([sequence, sequence])
        for value in values:
            if value is not None:
                self.low = value if self.low is None else min(self.low, value)
                self.high = value if self.high is None else max(self.high, value)

    def as_dict(self, measure):
        return dict(self.where, sequences=[list(r) for r in self.ranges], spectra=self.count,
                    **{f"{measure}_min": self.low, f"{measure}_max": self.high},
                    **self.extra)


class BatchSummary:
    """One batch (or dark sequence) of one run; reactor side only."""

    def __init__(self, kind, run, start):
        self.kind = kind                 # "batch" or "dark sequence"
        self.run = run
        self.batch = None
        self.start = start               # wall seconds
        self.end = None
        self.sequences = set()           # sequences whose light (or whole) file is written
        self.files = []
        self.times = {}                  # spectrometer -> channel -> {ms}
        self.saturated = {}              # (spectrometer, channel, type) -> _Flagged
        self.unstable = {}
        self.faults = []
        self.aborted = False
        self.temperature_wait = None     # seconds waited for the set point

    # -- filled in by control -------------------------------------------------

    def spectrum(self, spectrometer, meta):
        """A spectrum written (its metadata as it is in the file)."""
        channel = meta.get("Direction")
        kind = "dark" if meta.get("Dark") else "light"
        key = (spectrometer, channel, kind)
        where = {"spectrometer": spectrometer, "channel": channel, "type": kind}
        sequence = meta.get("SequenceNumber")
        ms = meta.get("IntegrationTime")
        if ms is not None:
            self.times.setdefault(spectrometer, {}).setdefault(channel, set()).add(ms)
        saturated = meta.get("SaturatedPixels") or 0
        if saturated:
            flagged = self.saturated.get(key)
            if flagged is None:
                flagged = self.saturated[key] = _Flagged(
                    where, {"level": meta.get("SaturationLevel")})
            flagged.add(sequence, saturated)
        if meta.get("TemperatureStable") is False:
            flagged = self.unstable.get(key)
            if flagged is None:
                flagged = self.unstable[key] = _Flagged(
                    where, {"set_point": meta.get("TemperatureSetPoint"),
                            "tolerance": meta.get("TemperatureTolerance")})
            # the readings before and after the integration
            flagged.add(sequence, meta.get("TemperatureBefore"), meta.get("Temperature"))

    def written(self, name, sequence, kind, spectra=()):
        """The file ``name`` is durably written, holding ``spectra``
        ([(spectrometer, metadata)])."""
        self.files.append(name)
        if kind != "dark" or self.kind != "batch":
            self.sequences.add(sequence)
        for spectrometer, meta in spectra:
            self.spectrum(spectrometer, meta)

    def fault(self, text):
        if text and text not in self.faults:
            self.faults.append(text)

    def finish(self, end, aborted):
        self.end = end
        self.aborted = aborted

    # -- the wire ---------------------------------------------------------

    def as_dict(self):
        return {
            "kind": self.kind,
            "run": self.run,
            "batch": self.batch,
            "sequences": len(self.sequences),
            "files": list(self.files),
            "integration_times": {spec: {channel: sorted(times)
                                         for channel, times in channels.items()}
                                  for spec, channels in self.times.items()},
            "saturated_spectra": sum(f.count for f in self.saturated.values()),
            "saturated": [f.as_dict("pixels") for f in self.saturated.values()],
            "temperature_unstable_spectra": sum(f.count for f in self.unstable.values()),
            "temperature_unstable": [f.as_dict("temperature")
                                     for f in self.unstable.values()],
            "temperature_wait": self.temperature_wait,
            "faults": list(self.faults),
            "aborted": self.aborted,
            "start": _iso(self.start),
            "end": _iso(self.end) if self.end is not None else None,
        }
