"""``piccolo3-setup [--root DIR] [--emulate MODEL:SERIAL,...]``: set up a
new Pi.

Writes, each only when it is not there yet (an existing file is never
touched, and said so):

- ``/etc/piccolo.cfg``, the server configuration (the shipped sample,
  ``pdata/piccolo.cfg``);
- ``/etc/piccolo/piccolo.config``, the instrument configuration, with the
  spectrometers found as ``piccolo3-list-spec`` finds them; when none is
  found, the simulated default (``pdata/piccolo.config``), saying so;
- ``/etc/systemd/system/piccolo.service``, the unit (``pdata/piccolo.service``)
  running the ``twistd`` of this installation.

``--root DIR`` writes them under DIR instead of ``/`` (an SD card mounted
elsewhere, a rehearsal); the files' contents still name the final paths.
``--emulate`` rehearses without hardware: the spectrometers are found on
the emulated USB bus and ``[seabreeze] emulate`` is set.
Then it warms Twisted's plugin cache, which the daemon user may not write.
"""

import argparse
import os
import sys
from datetime import datetime, timezone
from importlib import resources

SERVER_CONFIG = "/etc/piccolo.cfg"
INSTRUMENT_CONFIG = "/etc/piccolo/piccolo.config"
UNIT = "/etc/systemd/system/piccolo.service"
SHIPPED_TWISTD = "/opt/piccolo/bin/twistd"

#: models with a thermo-electric cooler: cooled and fan on by default
COOLED = {"QEPRO": -10.0}


def sample(name):
    """The text of a file shipped in ``pdata/``."""
    return (resources.files("piccolo_twisted") / "pdata" / name).read_text()


def server_config(emulate_text=""):
    text = sample("piccolo.cfg")
    if emulate_text:
        lines = []
        for line in text.splitlines(keepends=True):
            if line.startswith("emulate ="):
                line = f"emulate = {emulate_text}\n"
            lines.append(line)
        text = "".join(lines)
    return text


def instrument_config(devices, now=None):
    """piccolo.config for the (model, serial) found: two channels on the
    default shutters, one section per spectrometer."""
    now = now or datetime.now(timezone.utc)
    found = ", ".join(f"{model} {serial}" for model, serial in devices)
    out = [
        f"# Piccolo instrument configuration, written by piccolo3-setup on "
        f"{now:%Y-%m-%d}\n",
        f"# for the spectrometers found: {found}.\n",
        "# Channels: the shutter that looks up and the one that looks down (GPIO\n",
        "# pins of shutter_1..3: README); edit to match the wiring.\n",
        "\n[channels]\n",
        "  [[shutter_1]]\n    direction = upwelling\n    reverse = False\n"
        "    fibreDiameter = 600\n",
        "  [[shutter_2]]\n    direction = downwelling\n    reverse = False\n"
        "    fibreDiameter = 600\n",
        "\n[spectrometers]\n",
    ]
    for model, serial in devices:
        out.append(f"  [[{serial}]]                # {model}\n")
        if model in COOLED:
            out.append(f"    detectorSetTemperature = {COOLED[model]}\n    fan = True\n")
    out.append("\n[output]\n  clobber = False\n  split = True\n")
    return "".join(out)


def unit():
    """The systemd unit, running the twistd beside this Python."""
    twistd = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "twistd")
    return sample("piccolo.service").replace(SHIPPED_TWISTD, twistd)


def write_new(path, text, mode=0o644):
    """Write ``path`` whole, unless something is there: True if written.
    (A temporary file linked into place: never half a file, never over one.)"""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    if os.path.lexists(path):
        return False
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
    finally:
        os.unlink(temporary)
    return True


def warm_plugin_cache():
    """Twisted caches its plugin list beside the plugins; a daemon user
    that cannot write there logs a permission error at every start."""
    from twisted.plugin import IPlugin, getPlugins
    list(getPlugins(IPlugin))


def main(argv=None, out=None):
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="piccolo3-setup",
        description="Set up a Pi: /etc/piccolo.cfg, /etc/piccolo/piccolo.config with "
                    "the spectrometers found, and the systemd unit. Existing files "
                    "are kept.")
    parser.add_argument("--root", default="/", metavar="DIR",
                        help="write under DIR instead of / (default /)")
    parser.add_argument("--emulate", default="", metavar="MODEL:SERIAL,...",
                        help="rehearse: find these emulated spectrometers "
                             "([seabreeze] emulate)")
    args = parser.parse_args(argv)

    from ..instrument.usb_emulator.spec import EmulateError, parse_emulate
    from .list_spec import find_spectrometers
    try:
        emulate = parse_emulate(args.emulate)
    except EmulateError as e:
        parser.error(f"--emulate: {e}")
    root = os.path.abspath(args.root)

    def place(path):
        return os.path.join(root, path.lstrip("/"))

    devices, problem = find_spectrometers(None, emulate)
    if devices:
        print("spectrometers found: " + ", ".join(f"{m} {s}" for m, s in devices),
              file=out)
        instrument = instrument_config(devices)
    else:
        print(f"no spectrometers found ({problem or 'none attached'}): "
              f"{INSTRUMENT_CONFIG} is the simulated default; put your serials "
              f"in its [spectrometers] (piccolo3-list-spec lists them)", file=out)
        instrument = sample("piccolo.config")

    status = 0
    for path, text in ((SERVER_CONFIG, server_config(", ".join(
                            f"{m}:{s}" for m, s in emulate))),
                       (INSTRUMENT_CONFIG, instrument),
                       (UNIT, unit())):
        target = place(path)
        try:
            written = write_new(target, text)
        except OSError as e:
            print(f"piccolo3-setup: cannot write {target}: {e.strerror or e}",
                  file=sys.stderr)
            status = 1
            continue
        print(f"{'wrote' if written else 'kept'} {target}"
              f"{'' if written else ' (it exists; not overwritten)'}", file=out)
    try:
        warm_plugin_cache()
    except OSError as e:
        print(f"piccolo3-setup: cannot write Twisted's plugin cache: {e}", file=sys.stderr)
        status = 1
    if status == 0 and root == "/":
        print("next: sudo systemctl daemon-reload && sudo systemctl enable --now piccolo",
              file=out)
    return status


if __name__ == "__main__":
    sys.exit(main())
