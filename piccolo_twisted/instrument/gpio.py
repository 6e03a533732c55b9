"""GPIO through gpiozero: pin factory choice, outputs and status LEDs."""

import os
import warnings

from twisted.internet import task
from twisted.logger import Logger

STATUS_LED_PIN = 25
RECORDING_LED_PIN = 5

log = Logger()


def choose_pin_factory():
    """Return a gpiozero pin factory.

    gpiozero picks it (``GPIOZERO_PIN_FACTORY`` names one, else its
    preferred order). Where no GPIO chip exists, or the named factory cannot
    be loaded, gpiozero raises ``BadPinFactory`` (or the library's own
    error): fall back to ``MockFactory`` with one warning, never crash.
    """
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory
    if os.environ.get("GPIOZERO_PIN_FACTORY") == "mock":
        return MockFactory()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            factory = Device._default_pin_factory()
            # constructing a pin is where a missing chip shows up
            factory.pin(STATUS_LED_PIN).close()
        return factory
    except Exception as e:
        log.warn("no usable GPIO ({error}); using gpiozero's MockFactory: "
                 "shutters and LEDs are simulated", error=e)
        return MockFactory()


class GPIO:
    """The board's pins; one factory for every device."""

    def __init__(self, factory=None):
        self.factory = factory if factory is not None else choose_pin_factory()
        self.mock = type(self.factory).__name__ == "MockFactory"
        self._devices = []

    def output(self, pin, initial=False):
        from gpiozero import DigitalOutputDevice
        device = DigitalOutputDevice(pin, initial_value=initial,
                                     pin_factory=self.factory)
        self._devices.append(device)
        return device

    def input(self, pin):
        from gpiozero import Button
        device = Button(pin, pin_factory=self.factory)
        self._devices.append(device)
        return device

    def close(self):
        for device in self._devices:
            try:
                device.close()
            except Exception:
                pass
        self._devices = []


class StatusLEDs:
    """Status LED patterns: serving slow blink, a device dropped fast blink;
    the yellow LED is on while recording. Driven by the reactor clock."""

    SLOW, FAST = 1.0, 0.15

    def __init__(self, gpio, clock):
        self.status = gpio.output(STATUS_LED_PIN)
        self.recording_led = gpio.output(RECORDING_LED_PIN)
        self.clock = clock
        self._loop = None
        self._period = None

    def _toggle(self):
        self.status.toggle()

    def serving(self, fault=False):
        period = self.FAST if fault else self.SLOW
        if period == self._period and self._loop is not None and self._loop.running:
            return
        self.stop()
        self._period = period
        self._loop = task.LoopingCall(self._toggle)
        self._loop.clock = self.clock
        self._loop.start(period / 2, now=True)

    def recording(self, on):
        if on:
            self.recording_led.on()
        else:
            self.recording_led.off()

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self._period = None
        self.status.off()
