"""The ``[seabreeze] emulate`` setting: which devices to emulate."""

#: the models the emulator has, by the name seabreeze gives them
MODEL_NAMES = ("QEPRO", "USB2000PLUS", "FLAMES")


#: serials the instrument config gives to the simulator, not to seabreeze
SIMULATOR_PREFIXES = ("sim_", "dummy_")


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
        if serial in serials:
            raise EmulateError(f"{item!r}: duplicate serial {serial!r}")
        from ...config import check_serial
        if len(serial) > 15 or check_serial(serial):
            raise EmulateError(f"{item!r}: invalid serial {serial!r}: "
                               f"{check_serial(serial) or 'more than 15 characters'}")
        if serial.startswith(SIMULATOR_PREFIXES):
            raise EmulateError(f"{item!r}: {serial!r} names the simulator "
                               f"(serials starting {' or '.join(SIMULATOR_PREFIXES)})")
        serials.add(serial)
        devices.append((model, serial))
    return devices
