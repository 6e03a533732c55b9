"""What a batch did, in one plain record: ``GET /control/last_batch``.

Control fills it in as the batch goes (every spectrum recorded, every file
written, every fault) and publishes it at the start, after every file and
at the end; the record is what a scientist needs to judge the batch
without opening its files: how many sequences and files, the integration
times used, which spectra saturated, which were recorded with a cooled
detector away from its set point, and what went wrong.
"""

from datetime import datetime, timezone


def _iso(seconds):
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


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
        self.saturated = []
        self.unstable = []
        self.faults = []
        self.aborted = False
        self.temperature_wait = None     # seconds waited for the set point

    # -- filled in by control -------------------------------------------------

    def spectrum(self, spectrometer, meta):
        """A spectrum just recorded (its metadata as it goes into the file)."""
        channel = meta.get("Direction")
        kind = "dark" if meta.get("Dark") else "light"
        where = {"spectrometer": spectrometer, "channel": channel,
                 "sequence": meta.get("SequenceNumber"), "type": kind}
        ms = meta.get("IntegrationTime")
        if ms is not None:
            self.times.setdefault(spectrometer, {}).setdefault(channel, set()).add(ms)
        saturated = meta.get("SaturatedPixels") or 0
        if saturated:
            self.saturated.append(dict(where, pixels=saturated,
                                       level=meta.get("SaturationLevel")))
        if meta.get("TemperatureStable") is False:
            self.unstable.append(dict(where, temperature=meta.get("Temperature"),
                                      set_point=meta.get("TemperatureSetPoint"),
                                      tolerance=meta.get("TemperatureTolerance")))

    def written(self, name, sequence, kind):
        self.files.append(name)
        if kind != "dark" or self.kind != "batch":
            self.sequences.add(sequence)

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
            "saturated_spectra": len(self.saturated),
            "saturated": list(self.saturated),
            "temperature_unstable_spectra": len(self.unstable),
            "temperature_unstable": list(self.unstable),
            "temperature_wait": self.temperature_wait,
            "faults": list(self.faults),
            "aborted": self.aborted,
            "start": _iso(self.start),
            "end": _iso(self.end) if self.end is not None else None,
        }
