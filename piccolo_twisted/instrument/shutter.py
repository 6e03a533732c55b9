"""Latching optical shutters: two coils, each pulsed for 5 ms."""

from twisted.internet import defer, task
from twisted.logger import Logger

from ..api import Resource
from ..errors import NotFoundError
from ..values import to_bool

PULSE = 0.005


class Shutter:
    """One latching shutter. Operations queue on a DeferredLock, each a
    pulse timed by the injected clock (never ``time.sleep``)."""

    log = Logger()

    def __init__(self, config, gpio, clock, optics=None, pulse=PULSE):
        self.config = config
        self.channel = config.name
        self.clock = clock
        self.pulse = pulse
        self.optics = optics
        self.open_pin = gpio.output(config.open_pin)
        self.close_pin = gpio.output(config.close_pin)
        self.lock = defer.DeferredLock()
        self.state = "closed"          # unknown at power-up: closed at start

    def _pulse(self, open_):
        pin = self.open_pin if open_ else self.close_pin
        other = self.close_pin if open_ else self.open_pin
        other.off()
        pin.on()

        def end():
            pin.off()
            self.state = "open" if open_ else "closed"
            if self.optics is not None:
                self.optics.set_lit(self.channel, open_)
        return task.deferLater(self.clock, self.pulse, end)

    def open(self):
        return self.lock.run(self._pulse, True)

    def close(self):
        return self.lock.run(self._pulse, False)

    def set_open(self, open_):
        return self.open() if open_ else self.close()


class Shutters:
    def __init__(self, shutters):
        self.by_channel = {s.channel: s for s in shutters}

    def __iter__(self):
        return iter(self.by_channel.values())

    def __getitem__(self, channel):
        return self.by_channel[channel]

    def names(self):
        return sorted(self.by_channel)

    def close_all(self):
        return defer.gatherResults([s.close() for s in self], consumeErrors=True)

    def only(self, channel):
        """Close every other shutter and open ``channel`` (None: all closed).

        The pulses of different shutters run at the same time, and
        shutters already in the wanted state are not pulsed again: moving
        from one channel to the next costs one 5 ms pulse. The Deferred
        fires when every pulse is over, so nothing integrates before the
        previous channel is dark.
        """
        ds = [s.close() for s in self if s.channel != channel and s.state != "closed"]
        if channel is not None and self.by_channel[channel].state != "open":
            ds.append(self.by_channel[channel].open())
        return defer.gatherResults(ds, consumeErrors=True)

    # -- /shutter ---------------------------------------------------------

    def _get(self, channel):
        try:
            return self.by_channel[channel]
        except KeyError:
            raise NotFoundError(f"no such shutter channel: {channel}") from None

    def resources(self):
        res = {"shutters": Resource(get=self.names)}
        for channel, shutter in self.by_channel.items():
            res.update({f"{channel}/{k}": v
                        for k, v in self._channel_resources(shutter).items()})
        return res

    def _channel_resources(self, s):
        def open_shutter(open=True):
            return s.set_open(to_bool(open, "open")).addCallback(lambda _: None)

        def close_shutter(close=True):
            return s.set_open(not to_bool(close, "close")).addCallback(lambda _: None)
        return {
            "status": Resource(get=lambda: s.state),
            "reverse": Resource(get=lambda: s.config.reverse),
            "fibre_diameter": Resource(get=lambda: s.config.fibre_diameter),
            "open_shutter": Resource(put=open_shutter),
            "close_shutter": Resource(put=close_shutter),
        }
