"""plot: spectra from .pico files as a reader of a paper needs them.

One panel per spectrometer and channel; one colour per file or sequence
(the same in every panel), light solid and dark dashed; the legend beside
the data, never over it; run, batch, sequence and UTC time in the title;
the saturation level dotted and the saturated pixels shaded; the electric
dark pixels left out (as the deployed parser's ``getData`` does); a spectrum
recorded with its cooled detector away from the set point named so in the
legend; axes in nm and counts (or counts/ms). ``--dark`` subtracts the
matching dark spectrum (same run, batch, spectrometer, channel and
integration time; the dark of the latest sequence up to the light's, else
the next one), found among the files given or beside them on disk; what
is wrong with that dark (temperature unstable, saturated pixels) is named
beside the light it was subtracted from. Only the optical pixels are
drawn: the electric dark pixels and whatever lies beyond them (a Flame's
pixels 0-5 before its dark block 6-20) are left out.
"""

import glob
import os
import re
from datetime import datetime, timezone

from .errors import CliError
from .files import read_regular
from .shape import PICO, Malformed, Mismatch, conform, parse
from .terminal import number, shown as escaped

MAX_PICO = 64 << 20         # bytes: the largest file the server serves
LINE = {False: "-", True: "--"}          # light solid, dark dashed
_NAME = re.compile(r"^b(\d+)_s(\d+)(?:_(light|dark))?\.pico$")


def read_pico(path):
    """The spectra of a .pico file, shape-checked (``shape.PICO``): a
    regular file only (never a FIFO or a device), JSON within the depth
    limit, every value plot reads of the right type; anything else is one
    line, exit 1, never a traceback."""
    try:
        data = read_regular(path, MAX_PICO)
    except OSError as e:
        raise CliError(f"{path}: {e.strerror}") from None
    try:
        value = parse(data)
        if isinstance(value, str):
            # saved from PUT .../spectra as it came (e.g. coap-client -o): a
            # JSON string holding the file's text (docs/API.md: decode twice)
            value = parse(value)
        spectra = conform(value, PICO)["Spectra"]
    except Mismatch as e:
        raise CliError(f"{path}: not a .pico file ({e.said('the file')})") from None
    except Malformed as e:
        raise CliError(f"{path}: not a .pico file ({e})") from None
    for s in spectra:
        # labels show every word of the file as the terminal does: control
        # and format characters escaped, a lone surrogate too (matplotlib
        # stopped on one)
        meta = s["Metadata"]
        for key, value in meta.items():
            if isinstance(value, str):
                meta[key] = escaped(value)
    return spectra


def wavelengths(meta, n):
    """The wavelength of every pixel, as the deployed parser computes it:
    the instrument's own calibration of the channel when there is one."""
    import numpy as np
    coeffs = (meta.get("WavelengthCalibrationCoefficientsPiccolo")
              or meta.get("WavelengthCalibrationCoefficients"))
    pixels = np.arange(n, dtype=float)
    if not coeffs:
        return pixels, "pixel"
    return np.polynomial.polynomial.polyval(pixels, [float(c) for c in coeffs]), \
        "wavelength (nm)"


def _joined(values):
    values = sorted({v for v in values if v is not None}, key=lambda v: (str(type(v)), v))
    return ", ".join(number(v) for v in values) if values else "?"


def _utc(meta):
    try:
        return datetime.strptime(meta["Datetime"], "%Y-%m-%dT%H:%M:%S.%f%z").astimezone(
            timezone.utc)
    except (KeyError, TypeError, ValueError, OverflowError):    # 9999-12-31T...-1400
        return None


def _interactive(matplotlib):
    """Whether pyplot's backend can open a window (without a display
    matplotlib falls back to Agg, whose show() does nothing)."""
    from matplotlib import backends
    backend = matplotlib.get_backend().lower()
    interactive = getattr(backends, "backend_registry", None)
    if interactive is not None:
        try:
            from matplotlib.backends import BackendFilter
            return backend in interactive.list_builtin(BackendFilter.INTERACTIVE) \
                or backend not in interactive.list_builtin()
        except (ImportError, AttributeError):
            pass
    return backend not in ("agg", "pdf", "ps", "svg", "pgf", "cairo", "template")


# -- darks ------------------------------------------------------------------

def _key(meta):
    return (meta.get("Run"), meta.get("Batch"), meta.get("SerialNumber"),
            meta.get("Direction"))


def _is_dark(meta):
    return bool(meta.get("Dark", meta.get("Type") == "dark"))


class Darks:
    """Dark spectra by run, batch, spectrometer and channel."""

    def __init__(self):
        self.found = {}
        self.read = set()

    def add_file(self, path):
        path = os.path.abspath(path)
        if path in self.read:
            return
        self.read.add(path)
        for s in read_pico(path):
            meta = s["Metadata"]
            if _is_dark(meta):
                self.found.setdefault(_key(meta), []).append(s)

    def add_beside(self, path, batch):
        """The dark files of ``batch`` in the directory of ``path``."""
        directory = os.path.dirname(os.path.abspath(path))
        for candidate in sorted(glob.glob(os.path.join(glob.escape(directory), "b*.pico"))):
            m = _NAME.match(os.path.basename(candidate))
            if m and int(m.group(1)) == batch and m.group(3) in ("dark", None):
                try:
                    self.add_file(candidate)
                except CliError:
                    pass            # not ours to judge: only the files asked for are

    def matching(self, meta):
        """The dark for a light spectrum, or None."""
        ms = meta.get("IntegrationTime")
        seq = meta.get("SequenceNumber")
        same = [d for d in self.found.get(_key(meta), ())
                if d["Metadata"].get("IntegrationTime") == ms]
        if not same or not isinstance(seq, int):
            return None
        before = [d for d in same if d["Metadata"].get("SequenceNumber", -1) <= seq]
        if before:
            return max(before, key=lambda d: d["Metadata"].get("SequenceNumber", -1))
        return min(same, key=lambda d: d["Metadata"].get("SequenceNumber", 0))


# -- the figure ---------------------------------------------------------------

def _runs(mask):
    """(first, last) index of every run of True in ``mask``."""
    import numpy as np
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1))


def _label(meta, several_runs):
    label = (f"{meta.get('Run', '?')} " if several_runs else "") + \
        f"b{number(meta.get('Batch', '?'))} s{number(meta.get('SequenceNumber', '?'))} " \
        f"{meta.get('Direction', '?')} {'dark' if _is_dark(meta) else 'light'}"
    if meta.get("IntegrationTime") is not None:
        label += f" ({number(meta['IntegrationTime'], 'g')} ms)"
    return label


def _optical(meta, n):
    """The mask of the optical pixels: between the two blocks of dark
    pixels (as the deployed parser takes them), or, where the dark pixels
    are one block, on its longer side (a Flame's dark pixels 6-20 leave
    0-5 and 21-2047: the spectrum is 21-2047)."""
    import numpy as np
    dark = sorted({i for i in meta.get("DarkPixels") or ()
                   if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n})
    mask = np.ones(n, dtype=bool)
    if not dark:
        return mask
    for a, b in zip(dark, dark[1:]):
        if b - a > 1:
            mask[:a + 1] = mask[b:] = False
            return mask
    if n - dark[-1] - 1 >= dark[0]:
        mask[:dark[-1] + 1] = False
    else:
        mask[dark[0]:] = False
    return mask


def _unstable(meta):
    """How a spectrum recorded away from its set point is named, or None."""
    if meta.get("TemperatureStable") is not False:
        return None
    t, target = meta.get("Temperature"), meta.get("TemperatureSetPoint")
    if isinstance(t, (int, float)) and isinstance(target, (int, float)):
        return f"TEMPERATURE UNSTABLE: {number(t, '.1f')} °C, set point {number(target, 'g')} °C"
    return "TEMPERATURE UNSTABLE"


def plot(files, output=None, show=False, out=None, dark=False, per_ms=False):
    spectra = [(path, s) for path in files for s in read_pico(path)]
    import numpy as np
    darks = None
    if dark:
        darks = Darks()
        for path in files:
            darks.add_file(path)
        for path, s in spectra:
            if not _is_dark(s["Metadata"]) and isinstance(s["Metadata"].get("Batch"), int):
                darks.add_beside(path, s["Metadata"]["Batch"])
        spectra = [(p, s) for p, s in spectra if not _is_dark(s["Metadata"])]
        if not spectra:
            raise CliError("plot --dark: no light spectrum among the files")
    import matplotlib
    # labels are the files' words, never TeX: "$\\frac{$" in a serial
    # stopped the plot with a parse error
    matplotlib.rcParams["text.parse_math"] = False
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if show and not _interactive(matplotlib):
        raise CliError("plot --show: no display to show a window on "
                       "(matplotlib uses the non-interactive backend "
                       f"{matplotlib.get_backend()}); write a file with -o OUT.png")

    panels = []                     # (serial, direction), in file order
    for _, s in spectra:
        meta = s["Metadata"]
        key = (meta.get("SerialNumber", "?"), meta.get("Direction", "?"))
        if key not in panels:
            panels.append(key)
    metas = [s["Metadata"] for _, s in spectra]
    several_runs = len({m.get("Run") for m in metas}) > 1
    # one colour per file or sequence, the same in every panel
    origins = []
    for path, s in spectra:
        meta = s["Metadata"]
        origin = (meta.get("Run"), meta.get("Batch"), meta.get("SequenceNumber"), path)
        if origin not in origins:
            origins.append(origin)
    colour = {o: f"C{i % 10}" for i, o in enumerate(origins)}

    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.9 * len(panels) + 0.9),
                             squeeze=False, layout="constrained")
    ax_of = {key: axes[i][0] for i, key in enumerate(panels)}
    unit = "counts/ms" if per_ms else "counts"
    ylabel = f"dark-subtracted {unit}" if dark else unit
    saturation = {}
    unstable = set()
    for path, s in spectra:
        meta = s["Metadata"]
        ax = ax_of[(meta.get("SerialNumber", "?"), meta.get("Direction", "?"))]
        raw = np.asarray(s["Pixels"], dtype=float)
        x, xlabel = wavelengths(meta, len(raw))
        y = raw.copy()
        label = _label(meta, several_runs)
        dark_notes = []
        if darks is not None:
            match = darks.matching(meta)
            if match is None:
                raise CliError(
                    f"plot --dark: no dark spectrum for {meta.get('SerialNumber')} "
                    f"{meta.get('Direction')} at {meta.get('IntegrationTime')} ms in run "
                    f"{meta.get('Run')} batch {meta.get('Batch')} (among the files given "
                    f"or beside them)")
            dark_counts = np.asarray(match["Pixels"], dtype=float)
            if len(dark_counts) != len(y):
                raise CliError(f"plot --dark: the dark spectrum of {meta.get('SerialNumber')} "
                               f"{meta.get('Direction')} has {len(dark_counts)} pixels, "
                               f"the light one {len(y)}")
            y = y - dark_counts
            dark_meta = match["Metadata"]
            label += f" − dark s{number(dark_meta.get('SequenceNumber'))}"
            # the dark's own flags: they are in the difference too
            dark_warning = _unstable(dark_meta)
            if dark_warning:
                dark_notes.append(f"dark s{number(dark_meta.get('SequenceNumber'))}: "
                                  f"{dark_warning}")
                unstable.add(ax)
            dark_level = dark_meta.get("SaturationLevel")
            if isinstance(dark_level, (int, float)):
                dark_hit = int(((dark_counts >= dark_level)
                                & _optical(dark_meta, len(dark_counts))).sum())
                if dark_hit:
                    dark_notes.append(f"dark s{number(dark_meta.get('SequenceNumber'))}: "
                                      f"{number(dark_hit)} pixels SATURATED")
        ms = meta.get("IntegrationTime")
        if per_ms:
            if not ms:
                raise CliError(f"{path}: --per-ms needs the IntegrationTime of every spectrum")
            with np.errstate(over="ignore"):    # an IntegrationTime of 5e-324: inf
                y = y / float(ms)
        warning = _unstable(meta)
        if warning:
            label += f"\n  {warning}"
            unstable.add(ax)
        for note in dark_notes:             # the subtracted dark's own flags
            label += f"\n  {note}"
        c = colour[(meta.get("Run"), meta.get("Batch"), meta.get("SequenceNumber"), path)]
        # the electric dark pixels (and what lies beyond them) are no part
        # of the spectrum
        optical = _optical(meta, len(y))
        shown = y.copy()
        shown[~optical] = np.nan
        ax.plot(x, shown, LINE[_is_dark(meta)], color=c, linewidth=0.8, label=label)
        level = meta.get("SaturationLevel")
        if isinstance(level, (int, float)):
            hit = (raw >= level) & optical
            if hit.any():
                for first, last in _runs(hit):
                    ax.axvspan(x[first], x[last], color="red", alpha=0.12, linewidth=0)
                ax.plot([], [], "s", color="red", alpha=0.3, markersize=6,
                        label=f"  saturated: {number(int(hit.sum()))} pixels (shaded)")
            if not dark:
                limit = level / float(ms) if per_ms else level
                saturation.setdefault(ax, set()).add(limit)
        ax.set_xlabel(xlabel)
    for (serial, direction), ax in ax_of.items():
        for limit in sorted(saturation.get(ax, ())):
            ax.axhline(limit, color="red", linestyle=":", linewidth=1,
                       label=f"saturation level {number(limit, 'g')}")
        ax.set_title(f"{serial} — {direction}", fontsize=10, loc="left")
        if ax in unstable:
            ax.set_title("detector temperature unstable", fontsize=9, loc="right",
                         color="red")
        ax.set_ylabel(ylabel)
        ax.grid(True, linewidth=0.3, alpha=0.5)
        ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0, frameon=False)
    times = [t for t in (_utc(m) for m in metas) if t is not None]
    when = ""
    if times:
        first, last = min(times), max(times)
        when = first.strftime("%Y-%m-%d %H:%M:%S UTC")
        if (last - first).total_seconds() >= 1:
            when += last.strftime(" to %H:%M:%S UTC" if last.date() == first.date()
                                  else " to %Y-%m-%d %H:%M:%S UTC")
    fig.suptitle(f"run {_joined(m.get('Run') for m in metas)}, "
                 f"batch {_joined(m.get('Batch') for m in metas)}, "
                 f"sequence {_joined(m.get('SequenceNumber') for m in metas)}"
                 + (f" — {when}" if when else ""), fontsize=11)
    if show:
        plt.show()
    else:
        try:
            fig.savefig(output, dpi=100)
        except OSError as e:
            raise CliError(f"{output}: {e.strerror}") from None
        if out is not None:
            print(f"wrote {output}", file=out)
    plt.close(fig)
    return 0
