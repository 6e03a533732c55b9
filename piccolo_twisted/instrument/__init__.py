"""The instrument: GPIO, shutters and spectrometers, real or simulated."""

from twisted.internet import defer
from twisted.logger import Logger

from .gpio import GPIO, StatusLEDs
from .lease import Lease
from .shutter import Shutter, Shutters
from .simulator import SimulatedBus
from .spectrometer import DROPPED, Spectrometer, Spectrometers


class Instrument:
    log = Logger()
    emulated = {}     # serial -> emulated USB device (``[seabreeze] emulate``)

    def __init__(self, config, gpio, shutters, spectrometers, bus, clock):
        self.config = config
        self.gpio = gpio
        self.shutters = shutters
        self.spectrometers = spectrometers
        self.bus = bus
        self.clock = clock
        self.tried = None
        #: one owner of the spectrometers at a time (batches, power changes)
        self.lease = Lease()
        self.leds = None
        try:
            self.leds = StatusLEDs(gpio, clock)
        except Exception as e:      # a pin already in use, ...
            self.log.warn("status LEDs unavailable: {e}", e=e)
        for s in spectrometers:
            s.status.watch(self._status_changed)

    @property
    def channels(self):
        return self.config.channel_names

    def _status_changed(self, _value):
        if self.leds is not None and self.leds._loop is not None:
            self.leds.serving(fault=any(s.status.value == DROPPED
                                        for s in self.spectrometers))

    def start(self):
        """Close every shutter, connect every spectrometer, blink."""
        for s in self.spectrometers:
            s.start_pool()
        if self.leds is not None:
            self.leds.serving()
        d1 = self.shutters.close_all()
        d2 = self.spectrometers.connect_all()
        #: fires once every spectrometer has been tried (connected or not)
        self.tried = d2
        return defer.gatherResults([d1, d2], consumeErrors=True)

    @defer.inlineCallbacks
    def stop(self):
        try:
            yield self.shutters.close_all()
        finally:
            if self.leds is not None:
                self.leds.stop()
                self.leds.recording(False)
            yield self.spectrometers.disconnect_all()
            for s in self.spectrometers:
                s.stop_pool()
            if self.emulated:
                from .usb_emulator import remove_device
                for device in self.emulated.values():
                    remove_device(device)


def select_backend(backend=None, emulate=()):
    """Apply ``[seabreeze]``: emulate devices on the USB-level emulator
    (pyseabreeze on the emulated bus, no network discovery), or use the
    named backend; with neither, seabreeze chooses. Returns the emulator
    module when emulating."""
    if emulate:
        from . import usb_emulator
        usb_emulator.install()
        return usb_emulator
    if backend:
        import seabreeze
        seabreeze.use(backend)
    return None


def build_instrument(config, clock, gpio=None, bus=None, time_scale=1.0,
                     to_thread=None, emulate=(), seabreeze_backend=None):
    """An Instrument from an InstrumentConfig; simulated devices share ``bus``.

    Each spectrometer runs its device calls in its own one-thread pool
    unless ``to_thread`` is given (tests)."""
    gpio = gpio or GPIO()
    bus = bus or SimulatedBus(time_scale=time_scale)
    optics = bus.optics
    shutters = Shutters([Shutter(c, gpio, clock, optics=optics)
                         for c in config.channels])
    emulated = {}
    if emulate or seabreeze_backend:
        emulator = select_backend(seabreeze_backend, emulate)
        for model, serial in emulate:
            emulated[serial] = emulator.add_device(model, serial, optics,
                                                   time_scale=time_scale)
    devices = []
    for sc in config.spectrometers:
        # the light of each channel reaches the detector at the wavelengths
        # its calibration says (simulated and emulated devices)
        if sc.serial in emulated:
            emulated[sc.serial].detector.sim.calibrations = dict(sc.calibration)
        if sc.simulated:
            device = bus.device(sc.serial)
            device.calibrations = dict(sc.calibration)
        else:
            from .seabreeze_driver import SeabreezeDevice
            device = SeabreezeDevice(
                sc.serial, time_scale=time_scale if sc.serial in emulated else 1.0)
        devices.append(Spectrometer(sc, config.channel_names, device, clock,
                                    gpio=gpio, to_thread=to_thread))
    spectrometers = Spectrometers(devices, config.channel_names, clock)
    instrument = Instrument(config, gpio, shutters, spectrometers, bus, clock)
    instrument.emulated = emulated
    return instrument
