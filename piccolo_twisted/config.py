"""Server and instrument configuration, parsed once into plain objects.

Both files are configobj files checked against a validate spec; any problem
becomes a :class:`ConfigError` whose message is one line naming the file,
the key and what is wrong, so that ``twistd`` can print it and exit.
"""

import ipaddress
import math
import os
import re
import socket
from dataclasses import dataclass, field

from configobj import ConfigObj, ConfigObjError, flatten_errors, get_extra_values
from configobj.validate import ValidateError, Validator, is_float, is_float_list

SERVER_SPEC = """
config = string(default=piccolo.config)
[coap]
address = string(default="::")
port = integer(min=0, max=65535, default=5683)
[daemon]
daemon = boolean(default=False)
pid_file = string(default=/var/run/piccolo.pid)
logfile = string(default=/var/log/piccolo.log)
[datadir]
datadir = string(default=piccolo_data)
mount = boolean(default=False)
device = string(default=/dev/sda1)
mntpnt = string(default=/mnt)
[logging]
debug = boolean(default=False)
logfile = string(default="")
[seabreeze]
backend = backend(default=None)
emulate = force_list(default=list())
[manhole]
port = integer(min=0, max=65535, default=0)
interface = string(default=127.0.0.1)
keys = string(default="")
host_key = string(default="")
[web]
port = integer(min=0, max=65535, default=8080)
address = string(default="")
hosts = force_list(default=list())
[access]
control_from = force_list(default=list("any"))
[scheduler]
catch_up = integer(min=0, max=86400, default=600)
"""

INSTRUMENT_SPEC = """
[channels]
[[__many__]]
direction = string(min=1)
reverse = boolean(default=False)
fibreDiameter = float(min=0, default=600)
open_pin = integer(min=0, max=53, default=None)
close_pin = integer(min=0, max=53, default=None)
[spectrometers]
[[__many__]]
detectorSetTemperature = float(min=-60, max=40, default=-10.0)
fan = boolean(default=True)
temperature_tolerance = float(min=0, max=100, default=2.0)
wait_for_temperature = float(min=0, max=1440, default=0)
power_switch = integer(min=-1, max=53, default=-1)
min_integration_time = integer(min=0, max=3600000, default=None)
max_integration_time = integer(min=1, max=3600000, default=None)
[[[calibration]]]
[[[[__many__]]]]
wavelengthCalibrationCoefficientsPiccolo = float_list(default=None)
[output]
clobber = boolean(default=False)
split = boolean(default=True)
"""

#: (open, close) pins of the latching shutters, by shutter section name.
DEFAULT_SHUTTER_PINS = {
    "shutter_1": (17, 18),
    "shutter_2": (27, 22),
    "shutter_3": (23, 24),
}


class ConfigError(Exception):
    """A configuration file cannot be used; the message is one line."""


#: GPIO pins the board uses whatever the instrument config says
RESERVED_PINS = {
    25: "the status LED",
    5: "the recording (yellow) LED",
    10: "the reboot button (piccolo3-reboot)",
}


#: the /shutter resource's own path words: a channel of that name would be
#: hidden behind them (``GET /shutter/shutters`` lists the channels)
RESERVED_CHANNEL_NAMES = frozenset({"shutters"})

#: the seabreeze backends ``[seabreeze] backend`` may name; empty: seabreeze's choice
BACKENDS = ("cseabreeze", "pyseabreeze")


class NotFinite(ValidateError):
    def __init__(self, value):
        super().__init__(f'the value "{value}" is not a finite number')


def _finite_float(value, min=None, max=None):
    number = is_float(value, min, max)
    if not math.isfinite(number):
        raise NotFinite(value)
    return number


def _finite_float_list(value, min=None, max=None):
    numbers = is_float_list(value, min, max)
    for number in numbers:
        if not math.isfinite(number):
            raise NotFinite(number)
    return numbers


class UnknownBackend(ValidateError):
    def __init__(self, value):
        super().__init__(f'the value "{value}" is not a seabreeze backend: '
                         f'{" or ".join(BACKENDS)}, or empty for seabreeze\'s choice')


def _backend(value):
    """``[seabreeze] backend``: one of BACKENDS, or empty (None): seabreeze's
    choice, as the README documents ``backend =``."""
    if value is None or value == "":
        return None
    if value not in BACKENDS:
        raise UnknownBackend(value)
    return value


def _validator():
    """configobj's Validator whose floats refuse NaN and infinities
    (``fibreDiameter = nan`` passes ``min=0``: every comparison is false)."""
    return Validator({"float": _finite_float, "float_list": _finite_float_list,
                      "backend": _backend})


def check_channel_name(name):
    """Why ``name`` cannot be a channel (it is a path segment of
    ``/shutter/<channel>`` and ``.../current_time/<channel>``, a word in
    status strings and log lines), or None when it can."""
    if not name or "/" in name or name.startswith("."):
        return "not one path segment (empty, '/' or a leading '.')"
    if name in RESERVED_CHANNEL_NAMES:
        return f"a fixed word of the API (/shutter/{name})"
    if any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in name):
        return "has control characters"
    if not _CHANNEL_NAME.fullmatch(name):
        # /.well-known/core, status strings ("upwelling dark"), file
        # metadata, command lines: a plain word is safe in all of them
        return ("not a plain word: ASCII letters, digits, '_', '-' and '.', at most "
                "64, starting with a letter, digit or '_'")
    return None


_CHANNEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")

_SERIAL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,63}")


def check_serial(serial):
    """Why ``serial`` cannot name a spectrometer, or None. It is a section
    of piccolo.config (which ``piccolo3-setup`` writes: ``#`` would start a
    comment there), the path word ``S_<serial>`` and file metadata: Ocean
    Optics serials are plain words (``QEP01234``, ``USB2+F01234``)."""
    if not _SERIAL.fullmatch(serial):
        return ("not a plain word: ASCII letters, digits, '_', '+', '-' and '.', "
                "at most 64, starting with a letter, digit or '_'")
    return None


#: a calibration polynomial gives pixel i (0 .. CALIBRATION_PIXELS - 1, more
#: than any Ocean Optics detector has) a wavelength within CALIBRATION_NM
CALIBRATION_PIXELS = 8192
CALIBRATION_NM = 1e6
CALIBRATION_TERMS = 8


def check_calibration(coefficients):
    """Why ``coefficients`` (c0 + c1 i + c2 i² + ..., i the pixel, nm) are
    no wavelength calibration, or None. ``1e308, ...`` was taken and
    overflowed wherever wavelengths were computed."""
    if not 1 <= len(coefficients) <= CALIBRATION_TERMS:
        return f"needs 1 to {CALIBRATION_TERMS} coefficients, not {len(coefficients)}"
    bound = sum(abs(c) * float(CALIBRATION_PIXELS - 1) ** n
                for n, c in enumerate(coefficients))
    if not bound <= CALIBRATION_NM:
        return (f"gives wavelengths beyond {CALIBRATION_NM:,.0f} nm within "
                f"{CALIBRATION_PIXELS} pixels: not a calibration in nm")
    return None


_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _host_name(value):
    """Does ``value`` read as a DNS host name (RFC 1123; the last label not
    all digits, so ``999.1.1.1`` is no name)?"""
    labels = value.rstrip(".").split(".")
    return (0 < len(value) <= 253 and all(_HOST_LABEL.match(p) for p in labels)
            and not labels[-1].isdigit())


def check_address(value, where):
    """The address to listen on: an IPv4/IPv6 literal as it is, or a host
    name resolved once at start (the legacy server accepted resolvable
    names); anything else is a ConfigError naming ``where``."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _host_name(value):
        raise ConfigError(f"{where} {value!r} is not an IP address "
                          f"(e.g. ::, 0.0.0.0, 127.0.0.1) or a host name")
    try:
        infos = socket.getaddrinfo(value, None, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"{where} cannot resolve {value!r}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
    return infos[0][4][0]


def _load(path, spec, text=None):
    """Parse and validate one configobj file; return the validated ConfigObj."""
    name = path if path is not None else "<string>"
    try:
        if text is not None:
            cfg = ConfigObj(text.splitlines(), configspec=spec.splitlines())
        else:
            if not os.path.isfile(path):
                raise ConfigError(f"{name}: no such file")
            cfg = ConfigObj(path, configspec=spec.splitlines(), file_error=True)
    except ConfigObjError as e:
        raise ConfigError(f"{name}: cannot parse: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{name}: cannot read: {e}") from None
    result = cfg.validate(_validator(), preserve_errors=True)
    if result is not True:
        for sections, key, err in flatten_errors(cfg, result):
            where = "/".join(list(sections) + ([key] if key else []))
            if err is False:
                problem = "missing value" if key else "missing section"
            else:
                problem = str(err) or type(err).__name__
            raise ConfigError(f"{name}: [{where}] {problem}")
    for sections, key in get_extra_values(cfg):
        where = "/".join(list(sections) + [key])
        # unknown keys inside validated sections are tolerated only where
        # the spec says __many__; anything else is a typo worth stopping on
        raise ConfigError(f"{name}: [{where}] unknown section or key")
    return cfg


@dataclass
class ServerConfig:
    instrument: str = "piccolo.config"
    instrument_named: bool = False   # ``config`` set in the file, not the default
    address: str = "::"
    port: int = 5683
    daemon: bool = False
    pid_file: str = "/var/run/piccolo.pid"
    daemon_logfile: str = "/var/log/piccolo.log"
    datadir: str = "piccolo_data"
    mount: bool = False
    device: str = "/dev/sda1"
    mntpnt: str = "/mnt"
    debug: bool = False
    logfile: str = ""
    manhole_port: int = 0
    manhole_interface: str = "127.0.0.1"
    manhole_keys: str = ""
    manhole_host_key: str = ""    # empty: in the state directory (statedir.py)
    seabreeze_backend: str | None = None     # None: seabreeze's own choice
    emulate: list = field(default_factory=list)  # [(model, serial)]
    web_port: int = 8080                     # 0: no web page
    web_address: str = ""                    # empty: the CoAP address
    web_hosts: tuple = ()                    # more names the page answers to
    control_from: tuple | None = None        # ip networks; None: everyone
    catch_up: int = 600                      # seconds a missed slot may still run
    source: str = "<defaults>"

    @property
    def web_interface(self):
        """Where the web page listens: ``[web] address``, else the CoAP one."""
        return self.web_address or self.address


def load_server_config(path=None, text=None):
    """Read the server config (``/etc/piccolo.cfg``); defaults when no file."""
    if path is None and text is None:
        cfg = _load(None, SERVER_SPEC, text="")
    else:
        cfg = _load(path, SERVER_SPEC, text=text)
    name = path or "<string>"
    address = check_address(cfg["coap"]["address"], f"{name}: [coap/address]")
    interface = cfg["manhole"]["interface"]
    if interface:
        interface = check_address(interface, f"{name}: [manhole/interface]")
    backend, emulate = _seabreeze(name, cfg["seabreeze"])
    web_address = cfg["web"]["address"]
    if web_address:
        web_address = check_address(web_address, f"{name}: [web/address]")
    control_from = check_control_from(cfg["access"]["control_from"],
                                      f"{name}: [access/control_from]")
    web_hosts = check_web_hosts(cfg["web"]["hosts"], f"{name}: [web/hosts]")
    # an empty path is no default: "" is the current directory, which
    # under systemd is / (every directory of the system a "run")
    for section, key, what in (("datadir", "datadir", "the data directory"),
                               (None, "config", "the instrument config")):
        value = cfg[section][key] if section else cfg[key]
        if not value.strip():
            where = f"{section}/{key}" if section else key
            raise ConfigError(f"{name}: [{where}] is empty: name {what} "
                              f"(or leave the key out for the default)")
    return ServerConfig(
        instrument=cfg["config"],
        instrument_named="config" not in cfg.defaults,
        address=address,
        port=cfg["coap"]["port"],
        daemon=cfg["daemon"]["daemon"],
        pid_file=cfg["daemon"]["pid_file"],
        daemon_logfile=cfg["daemon"]["logfile"],
        datadir=cfg["datadir"]["datadir"],
        mount=cfg["datadir"]["mount"],
        device=cfg["datadir"]["device"],
        mntpnt=cfg["datadir"]["mntpnt"],
        debug=cfg["logging"]["debug"],
        logfile=cfg["logging"]["logfile"],
        manhole_port=cfg["manhole"]["port"],
        manhole_interface=interface,
        manhole_keys=cfg["manhole"]["keys"],
        manhole_host_key=cfg["manhole"]["host_key"],
        seabreeze_backend=backend,
        emulate=emulate,
        web_port=cfg["web"]["port"],
        web_address=web_address,
        web_hosts=web_hosts,
        control_from=control_from,
        catch_up=cfg["scheduler"]["catch_up"],
        source=path or "<string>" if (path or text) else "<defaults>",
    )


def check_web_hosts(entries, where):
    """``[web] hosts``: the names (and addresses) the web page answers to
    besides its own; anything else is a ConfigError naming ``where``."""
    out = []
    for entry in entries:
        entry = str(entry).strip()
        if not entry:
            continue
        try:
            ipaddress.ip_address(entry.strip("[]").split("%", 1)[0])
        except ValueError:
            if not _host_name(entry):
                raise ConfigError(f"{where} {entry!r} is not a host name or an "
                                  f"address (e.g. piccolo.example.org, 192.168.4.1)") from None
        out.append(entry)
    return tuple(out)


def check_control_from(entries, where):
    """``[access] control_from``: addresses and networks (None: everyone);
    anything else is a ConfigError naming ``where``."""
    from .access import AccessError, parse_networks
    try:
        return parse_networks(entries)
    except AccessError as e:
        raise ConfigError(f"{where} {e}") from None


def _seabreeze(name, section):
    """[seabreeze]: the backend, and the devices to emulate (which need
    pyseabreeze: the emulated bus is a pyusb backend)."""
    from .instrument.usb_emulator.spec import EmulateError, parse_emulate
    backend = section["backend"]
    try:
        emulate = parse_emulate(section["emulate"])
    except EmulateError as e:
        raise ConfigError(f"{name}: [seabreeze/emulate] {e}") from None
    if emulate and backend == "cseabreeze":
        raise ConfigError(f"{name}: [seabreeze] emulate needs backend = "
                          f"pyseabreeze (the emulated bus is a pyusb backend)")
    return backend, emulate


@dataclass
class ChannelConfig:
    name: str            # the direction, e.g. "upwelling"
    shutter: str         # the section name, e.g. "shutter_1"
    reverse: bool
    fibre_diameter: float
    open_pin: int
    close_pin: int


@dataclass
class SpectrometerConfig:
    serial: str
    set_temperature: float
    fan: bool
    power_switch: int
    min_time: int | None
    max_time: int | None
    calibration: dict = field(default_factory=dict)  # channel -> coefficients
    #: °C from the set point beyond which a cooled spectrum is flagged
    temperature_tolerance: float = 2.0
    #: minutes a batch waits for the detector to reach its set point
    wait_for_temperature: float = 0.0

    @property
    def simulated(self):
        return self.serial.startswith(("sim_", "dummy_"))

    @property
    def name(self):
        """The CoAP name of the device: ``S_`` + its section name."""
        return "S_" + self.serial


@dataclass
class InstrumentConfig:
    channels: list
    spectrometers: list
    clobber: bool = False
    split: bool = True
    source: str = "<string>"

    @property
    def channel_names(self):
        """The channels in legacy order: sorted by name, as the legacy
        server listed and recorded them (its channels were its shutters'
        sorted keys). The dashboard's columns and a set's recording order
        follow it."""
        return sorted(c.name for c in self.channels)


def load_instrument_config(path=None, text=None):
    """Read an instrument config (``piccolo.config``) into an InstrumentConfig."""
    name = path or "<string>"
    cfg = _load(path, INSTRUMENT_SPEC, text=text)
    channels = []
    seen = set()
    pins = {}

    def use_pin(pin, key):
        """Each GPIO pin drives one thing: a second use is a config error."""
        where = f"[{key}]"
        other = RESERVED_PINS.get(pin) or pins.get(pin)
        if other is not None:
            raise ConfigError(f"{name}: {where} GPIO {pin} is already used by {other}")
        pins[pin] = where
    for section in cfg["channels"]:
        c = cfg["channels"][section]
        if section not in DEFAULT_SHUTTER_PINS and (
                c["open_pin"] is None or c["close_pin"] is None):
            raise ConfigError(
                f"{name}: [channels/{section}] unknown shutter: name it "
                f"shutter_1..shutter_3 or give open_pin and close_pin")
        direction = c["direction"]
        problem = ("used by another channel" if direction in seen
                   else check_channel_name(direction))
        if problem:
            raise ConfigError(
                f"{name}: [channels/{section}/direction] {direction!r} cannot name "
                f"a channel: {problem}")
        seen.add(direction)
        open_pin, close_pin = DEFAULT_SHUTTER_PINS.get(section, (None, None))
        if c["reverse"]:
            open_pin, close_pin = close_pin, open_pin
        if c["open_pin"] is not None:
            open_pin = c["open_pin"]
        if c["close_pin"] is not None:
            close_pin = c["close_pin"]
        if open_pin == close_pin:
            raise ConfigError(
                f"{name}: [channels/{section}] open and close pins are the same")
        use_pin(open_pin, f"channels/{section}/open_pin")
        use_pin(close_pin, f"channels/{section}/close_pin")
        channels.append(ChannelConfig(
            name=direction, shutter=section, reverse=c["reverse"],
            fibre_diameter=c["fibreDiameter"],
            open_pin=open_pin, close_pin=close_pin))
    if not channels:
        raise ConfigError(f"{name}: [channels] no channel configured")
    spectrometers = []
    for serial in cfg["spectrometers"]:
        s = cfg["spectrometers"][serial]
        problem = check_serial(serial)
        if problem:
            raise ConfigError(f"{name}: [spectrometers/{serial}] invalid serial: {problem}")
        calibration = {}
        for channel, cal in s["calibration"].items():
            if channel not in seen:
                raise ConfigError(
                    f"{name}: [spectrometers/{serial}/calibration/{channel}] "
                    f"unknown channel")
            coefficients = cal["wavelengthCalibrationCoefficientsPiccolo"]
            if coefficients is not None:
                problem = check_calibration(coefficients)
                if problem:
                    raise ConfigError(
                        f"{name}: [spectrometers/{serial}/calibration/{channel}/"
                        f"wavelengthCalibrationCoefficientsPiccolo] {problem}")
                calibration[channel] = list(coefficients)
        if s["power_switch"] >= 0:
            use_pin(s["power_switch"], f"spectrometers/{serial}/power_switch")
        lo, hi = s["min_integration_time"], s["max_integration_time"]
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(
                f"{name}: [spectrometers/{serial}] min_integration_time "
                f"{lo} > max_integration_time {hi}")
        spectrometers.append(SpectrometerConfig(
            serial=serial, set_temperature=s["detectorSetTemperature"],
            fan=s["fan"], power_switch=s["power_switch"],
            min_time=lo, max_time=hi, calibration=calibration,
            temperature_tolerance=s["temperature_tolerance"],
            wait_for_temperature=s["wait_for_temperature"]))
    return InstrumentConfig(
        channels=channels, spectrometers=spectrometers,
        clobber=cfg["output"]["clobber"], split=cfg["output"]["split"],
        source=name)


def shipped_file(name):
    """Path of a sample config shipped with the server (``pdata/<name>``).

    An installed package has them in ``piccolo_twisted/pdata/`` (copied
    there at build time, setup.py); a checkout, and the editable install
    of the README's first command, in the top-level ``pdata/`` beside the
    package. Missing is a one-line ConfigError, not a traceback."""
    package = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(package)
    places = [os.path.join(package, "pdata")]
    if os.path.isfile(os.path.join(checkout, "setup.cfg")):
        places.append(os.path.join(checkout, "pdata"))
    for place in places:
        path = os.path.join(place, name)
        if os.path.isfile(path):
            return path
    raise ConfigError(f"the shipped sample {name} is missing (looked in "
                      f"{' and '.join(places)}): the installation is incomplete; "
                      f"reinstall it")


def bundled_instrument_config():
    """Path of the embedded default instrument config shipped in the package."""
    return shipped_file("piccolo.config")
