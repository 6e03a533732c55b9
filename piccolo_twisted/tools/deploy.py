"""``piccolo3-setup [--root DIR] [--emulate MODEL:SERIAL,...] [--replace WHAT]``:
set up a new Pi, and check an installed one against this version.

Writes, each only when it is not there yet (an existing file is kept, and
said so):

- ``/etc/piccolo.cfg``, the server configuration (the shipped sample,
  ``pdata/piccolo.cfg``);
- ``/etc/piccolo/piccolo.config``, the instrument configuration, with the
  spectrometers found as ``piccolo3-list-spec`` finds them; when none is
  found, the simulated default (``pdata/piccolo.config``), saying so;
- ``/etc/systemd/system/piccolo.service``, the unit (``pdata/piccolo.service``)
  running the ``twistd`` of this installation.

A kept file is checked: a config that does not load, an instrument config
without the spectrometers found (e.g. the simulated default written before
they were plugged in), a unit other than this version's (after an upgrade)
are each a warning on stderr with the command that fixes it, and exit
status 1. ``--replace instrument`` / ``--replace unit`` (or both,
comma-separated) writes those anew, the old file kept beside as
``<name>.<UTC time>.bak``.

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

SERVER_CONFIG = "/etc/piccolo.cfg"
INSTRUMENT_CONFIG = "/etc/piccolo/piccolo.config"
UNIT = "/etc/systemd/system/piccolo.service"
SHIPPED_TWISTD = "/opt/piccolo/bin/twistd"

#: models with a thermo-electric cooler: cooled and fan on by default
COOLED = {"QEPRO": -10.0}


def sample(name):
    """The text of a file shipped in ``pdata/``."""
    from ..config import shipped_file
    with open(shipped_file(name), encoding="utf-8") as f:
        return f.read()


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
    temporary = _temporary(path, text, mode)
    try:
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    return True


def replace(path, text, now=None, mode=0o644):
    """Write ``path`` anew; the old file stays beside it as
    ``<path>.<UTC time>.bak`` (a name systemd does not load). Returns the
    backup's path. The new file is complete before it takes the name."""
    now = now or datetime.now(timezone.utc)
    backup = f"{path}.{now:%Y%m%dT%H%M%SZ}.bak"
    temporary = _temporary(path, text, mode)
    try:
        n = 1
        while True:
            try:
                os.link(path, backup)
                break
            except FileExistsError:
                n += 1
                backup = f"{path}.{now:%Y%m%dT%H%M%SZ}-{n}.bak"
        os.replace(temporary, path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
    return backup


def _temporary(path, text, mode):
    directory = os.path.dirname(path)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def warm_plugin_cache():
    """Twisted caches its plugin list beside the plugins; a daemon user
    that cannot write there logs a permission error at every start."""
    from twisted.plugin import IPlugin, getPlugins
    list(getPlugins(IPlugin))


#: what --replace may name, and the file it means
REPLACEABLE = {"instrument": INSTRUMENT_CONFIG, "unit": UNIT}


def _replace_list(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in REPLACEABLE]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: name {' and/or '.join(REPLACEABLE)} (comma-separated)")
    return names


def main(argv=None, out=None, err=None):
    out = out or sys.stdout
    err = err or sys.stderr
    parser = argparse.ArgumentParser(
        prog="piccolo3-setup",
        description="Set up a Pi: /etc/piccolo.cfg, /etc/piccolo/piccolo.config with "
                    "the spectrometers found, and the systemd unit. Existing files "
                    "are kept and checked against what this version would write.")
    parser.add_argument("--root", default="/", metavar="DIR",
                        help="write under DIR instead of / (default /)")
    parser.add_argument("--emulate", default="", metavar="MODEL:SERIAL,...",
                        help="rehearse: find these emulated spectrometers "
                             "([seabreeze] emulate)")
    parser.add_argument("--replace", default=[], type=_replace_list, metavar="WHAT",
                        help="write these anew, the old file kept as <name>.<time>.bak: "
                             "instrument (the spectrometers found), unit (this "
                             "version's), or instrument,unit")
    args = parser.parse_args(argv)

    from ..config import ConfigError, check_serial
    from ..instrument.usb_emulator.spec import EmulateError, parse_emulate
    from .list_spec import find_spectrometers
    try:
        emulate = parse_emulate(args.emulate)
    except EmulateError as e:
        parser.error(f"--emulate: {e}")
    root = os.path.abspath(args.root)
    again = [os.path.join(os.path.dirname(os.path.abspath(sys.executable)),
                          "piccolo3-setup")]
    if root != "/":
        again += ["--root", root]

    def place(path):
        return os.path.join(root, path.lstrip("/"))

    def warn(text):
        print(f"piccolo3-setup: warning: {text}", file=err)

    found, problem = find_spectrometers(None, emulate)
    devices = []
    for model, serial in found:
        why = check_serial(serial)
        if why:
            warn(f"the {model} with serial {serial!r} is left out of "
                 f"{INSTRUMENT_CONFIG}: its serial is {why}")
        else:
            devices.append((model, serial))
    try:
        if devices:
            print("spectrometers found: " + ", ".join(f"{m} {s}" for m, s in devices),
                  file=out)
            instrument = instrument_config(devices)
        else:
            print(f"no spectrometers found ({problem or 'none attached'}): "
                  f"{INSTRUMENT_CONFIG} is the simulated default; put your serials "
                  f"in its [spectrometers] (piccolo3-list-spec lists them)", file=out)
            instrument = sample("piccolo.config")
        files = ((SERVER_CONFIG, server_config(", ".join(f"{m}:{s}" for m, s in emulate))),
                 (INSTRUMENT_CONFIG, instrument),
                 (UNIT, unit()))
    except ConfigError as e:           # a shipped sample missing: a broken install
        print(f"piccolo3-setup: {e}", file=err)
        return 1

    status = 0
    done = {}
    for path, text in files:
        target = place(path)
        wanted = [k for k, v in REPLACEABLE.items() if v == path and k in args.replace]
        try:
            if write_new(target, text):
                done[path] = "wrote"
                print(f"wrote {target}", file=out)
            elif wanted and read(target) == text:
                print(f"kept {target} (already as this version writes it)", file=out)
            elif wanted:
                backup = replace(target, text)
                done[path] = "replaced"
                print(f"replaced {target} (the old one is {backup})", file=out)
            else:
                print(f"kept {target} (it exists; not overwritten)", file=out)
                for warning in check_kept(path, target, text, devices, again):
                    warn(warning)
                    status = 1
        except OSError as e:
            print(f"piccolo3-setup: cannot write {target}: {e.strerror or e}", file=err)
            status = 1
    try:
        warm_plugin_cache()
    except OSError as e:
        print(f"piccolo3-setup: cannot write Twisted's plugin cache: {e}", file=err)
        status = 1
    if root == "/" and done:
        if done.get(UNIT) == "wrote":
            print("next: sudo systemctl daemon-reload && sudo systemctl enable --now "
                  "piccolo", file=out)
        elif done.get(UNIT) == "replaced":
            print("next: sudo systemctl daemon-reload && sudo systemctl restart piccolo",
                  file=out)
        else:
            print("next: sudo systemctl restart piccolo", file=out)
    return status


def check_kept(path, target, text, devices, again):
    """Warnings about a file that was kept: it does not load, or it is not
    what this setup would write where that matters (the spectrometers
    found; the unit of this version)."""
    import difflib
    import shlex
    from ..config import ConfigError, load_instrument_config, load_server_config
    if path == SERVER_CONFIG:
        try:
            load_server_config(target)
        except ConfigError as e:
            yield f"kept, but it does not load: {e}"
        return
    if path == INSTRUMENT_CONFIG:
        try:
            serials = {s.serial for s in load_instrument_config(target).spectrometers}
        except ConfigError as e:
            yield f"kept, but it does not load: {e}"
            return
        missing = [(m, s) for m, s in devices if s not in serials]
        if missing:
            command = shlex.join(again + ["--replace", "instrument"])
            yield (f"{target} (kept) does not name the spectrometers found: "
                   f"{', '.join(f'{m} {s}' for m, s in missing)}; the server will not "
                   f"record with them. Write it anew with every spectrometer found (the "
                   f"old one kept beside it): sudo {command}; or add "
                   f"{' '.join(f'[[{s}]]' for _, s in missing)} under [spectrometers] "
                   f"yourself; then sudo systemctl restart piccolo")
        return
    if path == UNIT:
        installed = read(target)
        if installed != text:
            command = shlex.join(again + ["--replace", "unit"])
            changes = [line.rstrip("\n") for line in difflib.unified_diff(
                installed.splitlines(keepends=True), text.splitlines(keepends=True),
                fromfile=f"{target} (installed)", tofile="this version's unit")]
            yield (f"{target} (kept) is not this version's unit; to install it (the "
                   f"old one kept beside it): sudo {command} && sudo systemctl "
                   f"daemon-reload && sudo systemctl restart piccolo. The difference:\n"
                   + "\n".join(changes))


if __name__ == "__main__":
    sys.exit(main())
