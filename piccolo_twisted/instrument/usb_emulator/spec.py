"""The ``[seabreeze] emulate`` setting: which devices to emulate."""

#: the models the emulator has, by the name seabreeze gives them
MODEL_NAMES = ("QEPRO", "USB2000PLUS", "FLAMES")


class EmulateError(ValueError):
    """An ``emulate`` setting that names no known model or is malformed."""


def parse_emulate(text):
    """``"QEPRO:QEP01234, USB2000PLUS:FLMT05678"`` -> [(model, serial)]."""
    if isinstance(text, (list, tuple)):
        items = [str(t) for t in text]
    else:
        items = str(text).split(",")
    devices, serials = [], set()
    for item in items:
        item = item.strip()
        if not item:
            continue
        model, sep, serial = item.partition(":")
        model, serial = model.strip().upper(), serial.strip()
        if not sep or not serial:
            raise EmulateError(f"{item!r}: expected MODEL:SERIAL")
        if model not in MODEL_NAMES:
            raise EmulateError(f"{item!r}: unknown model {model!r} (known: "
                               f"{', '.join(MODEL_NAMES)})")
        if serial in serials or len(serial) > 15 or not serial.isprintable():
            raise EmulateError(f"{item!r}: duplicate or invalid serial")
        serials.add(serial)
        devices.append((model, serial))
    return devices
