"""Ocean Optics spectrometers emulated at the USB level, for seabreeze.

pyseabreeze (seabreeze's pure-Python backend) talks to devices through
pyusb, and pyusb through a backend implementing ``usb.backend.IBackend``.
This package is such a backend: a bus of emulated devices (``bus.py``)
speaking their own protocols (``obp.py``: the QE Pro over OBP; ``ooi.py``:
the USB2000+ and Flame-S over the OOI protocol), with photons from the
physical simulator. Everything between ``Spectrometer.from_serial_number()``
and the wire is seabreeze's own code.

``install()`` registers the bus as the pyusb backend named
``piccolo_emulator`` (``usb.backend.piccolo_emulator``), selects pyseabreeze
with it, and replaces pyseabreeze's IPv4 multicast discovery with none: an
emulated instrument sends nothing to the network.
"""

import sys
import threading
import types

from .bus import EmulatedBus
from .spec import MODEL_NAMES, EmulateError, parse_emulate  # noqa: F401
from .obp import QEPro
from .ooi import FlameS, USB2000Plus

#: emulated models by the name seabreeze gives them
MODELS = {"QEPRO": QEPro, "USB2000PLUS": USB2000Plus, "FLAMES": FlameS}
assert set(MODELS) == set(MODEL_NAMES)

BACKEND_NAME = "piccolo_emulator"

#: the one emulated bus of this process
BUS = EmulatedBus()

_lock = threading.Lock()
_installed = False
#: pyseabreeze's own IPv4 discovery, kept for tests that show it is not run
original_discovery = None


def _no_discovery(cls, **kwargs):
    return iter(())


def install():
    """Make seabreeze use pyseabreeze on the emulated bus (idempotent)."""
    global _installed, original_discovery
    with _lock:
        if _installed:
            return BUS
        module = types.ModuleType(f"usb.backend.{BACKEND_NAME}")
        module.get_backend = lambda find_library=None: BUS
        sys.modules[module.__name__] = module
        import seabreeze
        from seabreeze.pyseabreeze import transport
        original_discovery = transport.IPv4Transport.__dict__["list_devices"]
        transport.IPv4Transport.list_devices = classmethod(_no_discovery)
        seabreeze.use("pyseabreeze", pyusb_backend=BACKEND_NAME)
        _installed = True
        return BUS


def add_device(model, serial, optics, time_scale=1.0):
    """Plug an emulated ``model`` with ``serial`` into the bus."""
    install()
    with BUS.lock:
        same = [d for d in BUS.devices if d.serial == serial]
    for old in same:             # a serial number is one device
        remove_device(old)
    return BUS.attach(MODELS[model](serial, optics, time_scale=time_scale))


def remove_device(device):
    """Unplug a device for good and take it off the bus."""
    device.unplug()
    with BUS.lock:
        if device in BUS.devices:
            BUS.devices.remove(device)
