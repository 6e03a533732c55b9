"""``piccolo3-list-spec [-c CFG]``: list the attached spectrometers (model,
serial). With a server config, its ``[seabreeze]`` section applies: the
backend it names, or the devices it emulates."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="piccolo3-list-spec",
        description="List the attached Ocean Optics spectrometers.")
    parser.add_argument("-c", "--config", metavar="CFG",
                        help="server configuration file ([seabreeze] backend, emulate)")
    args = parser.parse_args(argv)
    emulate, backend = [], None
    if args.config:
        from ..config import ConfigError, load_server_config
        try:
            settings = load_server_config(args.config)
        except ConfigError as e:
            print(f"piccolo3-list-spec: {e}", file=sys.stderr)
            return 2
        emulate, backend = settings.emulate, settings.seabreeze_backend
    devices, problem = find_spectrometers(backend, emulate)
    if problem:
        print(problem)
        return 0
    if not devices:
        print("no spectrometers attached")
        return 0
    for model, serial in devices:
        print(f"{model}\t{serial}")
    return 0


def find_spectrometers(backend=None, emulate=()):
    """((model, serial), ...) of the attached spectrometers, and None; or
    (), and a line saying why none could be listed. ``emulate``: the
    (model, serial) pairs of ``[seabreeze] emulate``."""
    try:
        from ..instrument import select_backend
        emulator = select_backend(backend, list(emulate))
        if emulator is not None:
            from ..instrument.simulator import Optics
            optics = Optics()
            for model, serial in emulate:
                emulator.add_device(model, serial, optics)
        from ..instrument.seabreeze_driver import list_devices
        return list(list_devices()), None
    except ImportError as e:
        return (), f"seabreeze is not available ({e}); no spectrometers can be listed"
    except Exception as e:     # no USB backend, no libusb, permissions
        return (), f"cannot list spectrometers: {e}"


if __name__ == "__main__":
    sys.exit(main())
