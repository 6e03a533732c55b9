"""``twistd piccolo``: command-line options and makeService."""

import os

from twisted.python import usage

from .config import (ConfigError, bundled_instrument_config,
                     load_instrument_config, load_server_config)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Run the Piccolo spectrometer server. With no options it runs "
                "on the embedded default: simulated spectrometers, mock GPIO, "
                "data in ./piccolo_data, CoAP on [::]:5683.")
    optParameters = [
        ["config", "c", None, "server configuration file (e.g. /etc/piccolo.cfg)"],
        ["instrument", "i", None, "instrument configuration file (piccolo.config)"],
        ["address", None, None, "address to listen on (default ::)"],
        ["port", None, None, "UDP port to listen on (default 5683)", int],
        ["data-dir", "o", None, "data directory (default ./piccolo_data)"],
        ["manhole", None, None, "SSH manhole port (off unless given)", int],
        ["manhole-keys", None, None, "authorized_keys file for the manhole"],
    ]
    optFlags = [
        ["mount", "m", "mount the data device before use"],
        ["debug", "d", "log at debug level"],
    ]

    def postOptions(self):
        try:
            self.settings, self.instrument, self.instrument_note = resolve(self)
        except ConfigError as e:
            # one line, no usage dump and no traceback: what a person can act on
            raise SystemExit(f"twistd piccolo: {e}") from None


def resolve(options):
    """Server settings and instrument config from the options and files."""
    path = options.get("config")
    settings = load_server_config(path) if path else load_server_config()
    if options.get("address"):
        settings.address = options["address"]
    if options.get("port") is not None:
        if not 0 <= options["port"] <= 65535:
            raise ConfigError(f"--port: {options['port']} is not a port number")
        settings.port = options["port"]
    if options.get("data-dir"):
        settings.datadir = options["data-dir"]
    if options.get("mount"):
        settings.mount = True
    if options.get("debug"):
        settings.debug = True
    if options.get("manhole") is not None:
        settings.manhole_port = options["manhole"]
    if options.get("manhole-keys"):
        settings.manhole_keys = options["manhole-keys"]
    settings.datadir = os.path.abspath(settings.datadir)
    if options.get("instrument"):
        ipath = options["instrument"]
        note = f"instrument config {ipath} (from the command line)"
    else:
        candidate = settings.instrument
        if not os.path.isabs(candidate):
            candidate = os.path.join(settings.datadir, candidate)
        if os.path.isfile(candidate):
            ipath = candidate
            note = f"instrument config {ipath} (from the data directory)"
        else:
            ipath = bundled_instrument_config()
            note = (f"instrument config {candidate} not found; using the embedded "
                    f"default {ipath} (simulated instrument)")
    instrument = load_instrument_config(ipath)
    return settings, instrument, note


def makeService(options):
    from .service import PiccoloService
    # PICCOLO_TIME_SCALE speeds simulated integrations up (tests, benchmarks)
    scale = float(os.environ.get("PICCOLO_TIME_SCALE", "1") or 1)
    return PiccoloService(options.settings, options.instrument,
                          notes=[options.instrument_note], time_scale=scale)
