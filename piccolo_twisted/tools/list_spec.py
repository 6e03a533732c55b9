"""``piccolo3-list-spec``: list the attached spectrometers (model, serial)."""

import sys


def main(argv=None):
    try:
        from ..instrument.seabreeze_driver import list_devices
        devices = list_devices()
    except ImportError as e:
        print(f"seabreeze is not available ({e}); no spectrometers can be listed")
        return 0
    except Exception as e:     # no USB backend, no libusb, permissions
        print(f"cannot list spectrometers: {e}")
        return 0
    if not devices:
        print("no spectrometers attached")
        return 0
    for model, serial in devices:
        print(f"{model}\t{serial}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
