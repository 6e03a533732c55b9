"""How the deployed parser reads a .pico file, for tests.

The deployed clients (the piccolo3 client, the web dashboard) read spectra
with ``piccolo3.common.PiccoloSpectra`` from TeamPiccolo/piccolo3-common
(last commit 6bdba8f, "make sure wavelength coefficients are floats"). It
is not on PyPI, so it cannot be a test dependency. What it does with a
file, as read from its source (facts, our own code):

- ``PiccoloSpectraList(data=text)``: ``json.loads``, then one
  ``PiccoloSpectrum`` per entry of ``Spectra``; the list's sequence number
  is the last spectrum's ``SequenceNumber`` (a missing one is a KeyError).
- ``PiccoloSpectrum(data=entry)``: every ``Metadata`` key is copied as it
  is (unknown keys are kept, so new keys are harmless); ``Pixels`` becomes
  ``numpy.array(values, dtype=numpy.int)`` -- whole numbers: a float
  pixel is silently truncated (65534.9 -> 65534), a null raises.
- ``opticalPixelRange``: from ``DarkPixels`` (ascending): the optical
  pixels lie between the first two dark indices more than one apart;
  without such a gap, all pixels.
- ``isSaturated``: any optical pixel ``>= 0.999 * SaturationLevel``
  (a number in the pixels' units).
- ``dark_pixels`` masks the dark pixels equal to ``SaturationLevel``;
  ``corrected_pixels`` applies ``NonlinearityCorrectionCoefficients``
  (ascending) when there are dark pixels.
- ``getWavelengths``: ``WavelengthCalibrationCoefficientsPiccolo`` when
  present and not null, else ``WavelengthCalibrationCoefficients``, as
  floats, ascending.

``parse_spectrum`` does the same and refuses (``Lossy``) what the parser
would read wrongly. With ``PICCOLO3_COMMON`` set to a checkout of
piccolo3-common, ``real_parser()`` loads the real module (with the two
aliases modern Python and numpy dropped: ``collections.MutableMapping``
and ``MutableSequence`` -- now in ``collections.abc`` -- and
``numpy.int``, which was ``int`` itself) and ``parse_spectrum`` runs it
too and checks that both agree.
"""

import json
import os
import sys

import numpy as np


class Lossy(ValueError):
    """The deployed parser would read this spectrum wrongly."""


def optical_range(dark, n):
    for a, b in zip(dark, dark[1:]):
        if b - a > 1:
            return a + 1, b
    return 0, n


def parse_spectrum(entry):
    meta = dict(entry["Metadata"])
    values = entry["Pixels"]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Lossy(f"pixel {v!r} is not a number")
        if isinstance(v, float) and v != int(v):
            raise Lossy(f"pixel {v!r} would be truncated to {int(v)}")
    pixels = np.array(values, dtype=int)
    level = meta["SaturationLevel"]
    if isinstance(level, bool) or not isinstance(level, (int, float)):
        raise Lossy(f"SaturationLevel {level!r} is not a number")
    start, end = optical_range(list(meta.get("DarkPixels", [])), len(pixels))
    coefficients = meta.get("WavelengthCalibrationCoefficientsPiccolo")
    if coefficients is None:
        coefficients = meta["WavelengthCalibrationCoefficients"]
    wavelengths = np.polynomial.polynomial.polyval(
        np.arange(len(pixels), dtype=float), [float(c) for c in coefficients])
    result = {"metadata": meta, "pixels": pixels, "wavelengths": wavelengths,
              "optical": (start, end),
              "isSaturated": bool(np.any(pixels[start:end] >= 0.999 * level))}
    real = real_parser()
    if real is not None:
        spectrum = real.PiccoloSpectrum(data=json.loads(json.dumps(entry)))
        if spectrum.pixels.tolist() != pixels.tolist():
            raise AssertionError("the real parser read other pixels")
        if bool(spectrum.isSaturated) != result["isSaturated"]:
            raise AssertionError("the real parser disagrees about saturation")
        _, w = spectrum.getWavelengths()
        if not np.allclose(w, wavelengths):
            raise AssertionError("the real parser computes other wavelengths")
        if not np.allclose(spectrum.corrected_pixels, corrected_pixels(meta, pixels)):
            raise AssertionError("the real parser corrects the pixels otherwise")
        for key, value in meta.items():
            if spectrum[key] != value:
                raise AssertionError(f"the real parser read {key} as {spectrum[key]!r}")
    return result


def corrected_pixels(meta, pixels):
    """The deployed parser's ``corrected_pixels``: the mean ``dark`` of the
    pixels outside its optical range (those equal to ``SaturationLevel``
    left out), then ``dark + (p - dark) / poly(p - dark)`` with
    ``NonlinearityCorrectionCoefficients`` (ascending); without such
    pixels (a single block of ``DarkPixels`` leaves none outside the
    range) the pixels as they are."""
    pixels = np.asarray(pixels)
    start, end = optical_range(list(meta.get("DarkPixels", [])), len(pixels))
    outside = np.concatenate((pixels[:start], pixels[end:]))
    outside = outside[outside != meta["SaturationLevel"]]
    if not len(outside):
        return pixels.astype(float)
    dark = outside.mean()
    poly = np.polynomial.polynomial.polyval(pixels - dark,
                                            meta["NonlinearityCorrectionCoefficients"])
    return dark + (pixels - dark) / poly


def parse_file(text):
    """Every spectrum of a file's text; with the real parser, the file as
    the clients open it (PiccoloSpectraList) too."""
    doc = json.loads(text)
    spectra = [parse_spectrum(s) for s in doc["Spectra"]]
    real = real_parser()
    if real is not None:
        listing = real.PiccoloSpectraList(data=text)
        if len(listing) != len(spectra):
            raise AssertionError("the real parser found another number of spectra")
        listing.directions                              # noqa: B018
        listing.isSaturated                             # noqa: B018
    return spectra


_real = None


def real_parser():
    """piccolo3.common.PiccoloSpectra from $PICCOLO3_COMMON, or None."""
    global _real
    path = os.environ.get("PICCOLO3_COMMON")
    if not path:
        return None
    if _real is None:
        import collections
        import collections.abc
        import importlib.util
        import logging
        import types
        for name in ("MutableMapping", "MutableSequence"):
            if not hasattr(collections, name):
                setattr(collections, name, getattr(collections.abc, name))
        if not hasattr(np, "int"):
            np.int = int
        if "pytz" not in sys.modules:
            try:
                import pytz  # noqa: F401
            except ImportError:             # used for datetime.now(tz=pytz.utc) only
                from datetime import timezone
                sys.modules["pytz"] = types.SimpleNamespace(utc=timezone.utc)
        source = os.path.join(path, "piccolo3", "common", "PiccoloSpectra.py")
        spec = importlib.util.spec_from_file_location("legacy_PiccoloSpectra", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        logging.getLogger("piccolo").setLevel(logging.WARNING)
        _real = module
    return _real
