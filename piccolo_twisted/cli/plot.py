"""plot: counts against wavelength from .pico files (matplotlib, Agg)."""

from .errors import CliError
from .files import read_regular
from .shape import PICO, Malformed, Mismatch, conform, parse
from .terminal import shown

MAX_PICO = 64 << 20         # bytes: the largest file the server serves

LINE = {False: "-", True: "--"}          # light solid, dark dashed


def read_pico(path):
    """The spectra of a .pico file, shape-checked (``shape.PICO``): a
    regular file only, JSON within the depth limit, every value plot reads
    of the right type; anything else is one line, exit 1."""
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
        # labels show control characters escaped, as the terminal does
        meta = s["Metadata"]
        for key in ("SerialNumber", "Direction", "Run", "Type"):
            if isinstance(meta.get(key), str):
                meta[key] = shown(meta[key])
    return spectra


def wavelengths(meta, n):
    import numpy as np
    coeffs = (meta.get("WavelengthCalibrationCoefficientsPiccolo")
              or meta.get("WavelengthCalibrationCoefficients"))
    pixels = np.arange(n, dtype=float)
    if not coeffs:
        return pixels, "pixel"
    return np.polynomial.polynomial.polyval(pixels, [float(c) for c in coeffs]), \
        "wavelength (nm)"


def _joined(values):
    values = sorted({str(v) for v in values if v is not None})
    return ", ".join(values) if values else "?"


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


def plot(files, output=None, show=False, out=None):
    spectra = [(path, s) for path in files for s in read_pico(path)]
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

    serials = []
    for _, s in spectra:
        serial = s["Metadata"].get("SerialNumber", "?")
        if serial not in serials:
            serials.append(serial)
    fig, axes = plt.subplots(len(serials), 1, figsize=(9, 3.2 * len(serials) + 0.8),
                             squeeze=False)
    panels = {serial: axes[i][0] for i, serial in enumerate(serials)}
    # files of several runs, batches or sequences: say which line is which
    origins = {(s["Metadata"].get("Run"), s["Metadata"].get("Batch"),
                s["Metadata"].get("SequenceNumber")) for _, s in spectra}
    several_runs = len({o[0] for o in origins}) > 1
    saturation = {}
    colours = {}            # one colour per direction, in every panel
    for path, s in spectra:
        meta = s["Metadata"]
        serial = meta.get("SerialNumber", "?")
        ax = panels[serial]
        x, xlabel = wavelengths(meta, len(s["Pixels"]))
        dark = bool(meta.get("Dark", meta.get("Type") == "dark"))
        label = f"{meta.get('Direction', '?')} {'dark' if dark else 'light'}"
        if len(origins) > 1:
            label = (f"{meta.get('Run', '?')} " if several_runs else "") + \
                f"b{meta.get('Batch', '?')} s{meta.get('SequenceNumber', '?')} {label}"
        if meta.get("IntegrationTime") is not None:
            label += f" ({meta['IntegrationTime']:g} ms)"
        colour = colours.setdefault(meta.get("Direction"), f"C{len(colours)}")
        ax.plot(x, s["Pixels"], LINE[dark], color=colour, linewidth=0.8, label=label)
        ax.set_xlabel(xlabel)
        if meta.get("SaturationLevel") is not None:
            saturation[serial] = meta["SaturationLevel"]
    for serial, ax in panels.items():
        if serial in saturation:
            ax.axhline(saturation[serial], color="red", linestyle=":", linewidth=1,
                       label=f"saturation {saturation[serial]}")
        ax.set_title(serial, fontsize=10)
        ax.set_ylabel("counts")
        ax.legend(fontsize=8, loc="upper right")
    metas = [s["Metadata"] for _, s in spectra]
    fig.suptitle(f"run {_joined(m.get('Run') for m in metas)}, "
                 f"batch {_joined(m.get('Batch') for m in metas)}, "
                 f"sequence {_joined(m.get('SequenceNumber') for m in metas)}")
    fig.tight_layout()
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
