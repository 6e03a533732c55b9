"""``twistd piccolo``: command-line options and makeService."""

import os

from twisted.python import usage

from .config import (ConfigError, bundled_instrument_config, check_address,
                     load_instrument_config, load_server_config)
from .errors import PiccoloError


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run the Piccolo spectrometer server. With no options it runs "
                "on the embedded default: simulated spectrometers, mock GPIO, "
                "data in ./piccolo_data, CoAP on [::]:5683.")
    optParameters = [
        ["config", "c", None, "server configuration file (e.g. /etc/piccolo.cfg)"],
        ["instrument", "i", None, "instrument configuration file (piccolo.config)"],
        ["address", None, None, "address to listen on (default ::)"],
        ["port", None, None, "UDP port to listen on (default 5683)"],
        ["data-dir", "o", None, "data directory (default ./piccolo_data)"],
        ["manhole", None, None, "SSH manhole port (off unless given)"],
        ["manhole-keys", None, None, "authorized_keys file for the manhole"],
        ["web", None, None, "TCP port of the web page (default 8080, 0: off)"],
    ]
    optFlags = [
        ["mount", "m", "mount the data device before use"],
        ["debug", "d", "log at debug level"],
    ]

    def postOptions(self):
        try:
            self.settings, self.instrument, self.notes = resolve(self)
            self.instrument_note = self.notes[-1]
        except ConfigError as e:
            # one line, no usage dump and no traceback: what a person can act
            # on; also in the unit's log file, where the operator looks
            from .logs import log_start_failure
            log_start_failure(f"twistd piccolo: {e}")
            raise SystemExit(f"twistd piccolo: {e}") from None


def _port(value, option):
    """A port number from the command line, decimal digits as in the config
    file (``1e3`` and ``5683.0`` are refused there too); one line when not."""
    if not (value.isascii() and value.isdigit()) or int(value) > 65535:
        raise ConfigError(f"{option}: {value!r} is not a port number (0 to 65535)")
    return int(value)


def resolve(options):
    """Server settings, instrument config and notes for the log, from the
    options and files."""
    notes = []
    path = options.get("config")
    settings = load_server_config(path) if path else load_server_config()
    if options.get("address") is not None:
        settings.address = check_address(options["address"], "--address")
    if options.get("port") is not None:
        settings.port = _port(options["port"], "--port")
    if options.get("data-dir") is not None:
        if not options["data-dir"].strip():
            raise ConfigError("--data-dir: empty: name the data directory")
        settings.datadir = options["data-dir"]
    if options.get("mount"):
        settings.mount = True
    if options.get("debug"):
        settings.debug = True
    if options.get("manhole") is not None:
        settings.manhole_port = _port(options["manhole"], "--manhole")
    if options.get("web") is not None:
        settings.web_port = _port(options["web"], "--web")
    if options.get("manhole-keys"):
        settings.manhole_keys = options["manhole-keys"]
    if settings.mount:
        notes.append(mount_data_device(settings, options.get("mount")))
    settings.datadir = os.path.abspath(settings.datadir)
    if settings.manhole_port and not settings.manhole_keys.strip():
        where = ("the server config (-c)" if settings.source == "<defaults>"
                 else settings.source)
        raise ConfigError(f"the manhole (port {settings.manhole_port}) needs an "
                          f"authorized_keys file: [manhole] keys = FILE in {where}, "
                          f"or --manhole-keys FILE")
    check_host_key(settings)
    if settings.logfile:
        check_log_file(settings)
    if options.get("instrument"):
        ipath = options["instrument"]
        check_named_instrument(ipath, "--instrument:")
        note = f"instrument config {ipath} (from the command line)"
    else:
        candidate = settings.instrument
        if not os.path.isabs(candidate):
            candidate = os.path.join(settings.datadir, candidate)
        if settings.instrument_named:
            # named explicitly: never fall back to the simulated instrument
            check_named_instrument(candidate, f"{settings.source}: [config]")
        if os.path.isfile(candidate):
            ipath = candidate
            origin = (f"{settings.source}: [config]" if settings.instrument_named
                      else "the data directory")
            note = f"instrument config {ipath} (from {origin})"
        else:
            ipath = bundled_instrument_config()
            note = (f"instrument config {candidate} not found; using the embedded "
                    f"default {ipath} (simulated instrument)")
    instrument = load_instrument_config(ipath)
    check_emulated(settings, instrument, ipath)
    return settings, instrument, notes + [note]


def check_named_instrument(path, where):
    """An instrument config that was named must be there: falling back to
    the bundled one would record simulated spectra on a real instrument."""
    if not os.path.exists(path):
        problem = "not found"
    elif not os.path.isfile(path):
        problem = "is not a file"
    elif not os.access(path, os.R_OK):
        problem = "is not readable"
    else:
        return
    raise ConfigError(f"{where} instrument config {path} {problem}")


def check_emulated(settings, instrument, ipath):
    """Under ``[seabreeze] emulate`` the emulated bus is the only one
    seabreeze sees: every spectrometer the instrument config opens through
    seabreeze must be emulated, or it can never connect."""
    if not settings.emulate:
        return
    emulated = {serial for _, serial in settings.emulate}
    missing = [sc.serial for sc in instrument.spectrometers
               if not sc.simulated and sc.serial not in emulated]
    if missing:
        raise ConfigError(
            f"{ipath}: [spectrometers/{missing[0]}] is not emulated, and under "
            f"{settings.source}: [seabreeze] emulate no other device can be "
            f"seen (emulated: {', '.join(sorted(emulated))})")


def check_host_key(settings):
    """The manhole's host key is a secret: never under the data directory,
    which is copied off the Pi whole (statedir.py). A ``host_key`` set
    there is refused whether or not the manhole is on (the key an earlier
    version left in the data could not be moved out to it)."""
    from .statedir import host_key_path, inside
    path = host_key_path(settings)
    if (settings.manhole_port or settings.manhole_host_key) and inside(path,
                                                                        settings.datadir):
        where = (f"{settings.source}: [manhole/host_key]" if settings.manhole_host_key
                 else "the manhole host key")
        raise ConfigError(f"{where} {path} is inside the data directory "
                          f"{settings.datadir}, which is copied off the Pi")
    settings.manhole_host_key = path


def check_log_file(settings):
    """``[logging] logfile`` must be writable: one line now rather than a
    traceback when the service opens it."""
    path = settings.logfile
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise ConfigError(f"{settings.source}: [logging/logfile] cannot write "
                          f"{path}: {e.strerror or e}") from None


def mount_data_device(settings, from_command_line):
    """``-m``/``[datadir] mount``: mount the device before anything looks
    at the data directory (the instrument config may live there); a
    relative ``datadir`` is taken relative to the mount point."""
    from .mount import data_path, mount_at_start
    where = "--mount" if from_command_line else f"{settings.source}: [datadir/mount]"
    if not os.path.isabs(settings.mntpnt):
        raise ConfigError(f"{where}: the mount point {settings.mntpnt!r} "
                          f"is not an absolute path")
    settings.datadir = data_path(settings.datadir, settings.mntpnt)
    try:
        return mount_at_start(settings.device, settings.mntpnt)
    except PiccoloError as e:
        raise ConfigError(f"{where}: cannot mount {settings.device} at "
                          f"{settings.mntpnt}: {e}") from None


def makeService(options):
    from twisted.internet import reactor
    from .service import PiccoloService
    from .timers import monotonic_timers
    # before anything schedules: wall-clock jumps must not move timers
    monotonic_timers(reactor)
    # PICCOLO_TIME_SCALE speeds simulated integrations up (tests, benchmarks)
    scale = float(os.environ.get("PICCOLO_TIME_SCALE", "1") or 1)
    try:
        return PiccoloService(options.settings, options.instrument,
                              notes=options.notes, time_scale=scale)
    except SystemExit as e:     # one-line start-up errors (the manhole's keys)
        if isinstance(e.code, str):
            from .logs import log_start_failure
            log_start_failure(e.code)
        raise
