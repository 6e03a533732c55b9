"""The reactor-side front of a spectrometer: state, settings, and every
blocking device call sent to a worker thread, one at a time per device.

All state lives here, in the reactor thread. Worker threads run the
device's blocking methods and return values; they never touch this object.
"""

import threading

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from ..api import Resource
from ..errors import NotFoundError, PiccoloError
from ..observable import Observable
from ..values import to_bool, to_float, to_int
from .device import DeviceError, acquire_clean

NO_WORKER, POWERED_OFF, DROPPED, CONNECTING, DISCONNECTED, IDLE, RECORDING, \
    AUTOINTEGRATING = range(1, 9)
STATUS_NAMES = {1: "NO_WORKER", 2: "POWERED_OFF", 3: "DROPPED", 4: "CONNECTING",
                5: "DISCONNECTED", 6: "IDLE", 7: "RECORDING", 8: "AUTOINTEGRATING"}
CONNECTED = (IDLE, RECORDING, AUTOINTEGRATING)

RECONNECT_INTERVAL = 5.0
POWER_SETTLE = 2.0        # seconds between switching power on and connecting
DEFAULT_TIME = 100        # ms, the integration time before autointegration
#: seconds between two readings of a cooled detector's temperature (taken
#: on the device's thread, between integrations while a batch runs): the
#: next is due this long after the last, whoever took it
TEMPERATURE_INTERVAL = 10.0


def temperature_stable(enabled, temperature, set_point, tolerance):
    """A spectrum is trusted unless its cooler was on and the detector was
    more than ``tolerance`` °C from the set point (or could not be read)."""
    if not enabled:
        return True
    if temperature is None or set_point is None:
        return False
    return abs(temperature - set_point) <= tolerance


def nonlinearity_in_pixel_units(coefficients, scale):
    """The device's nonlinearity polynomial (ascending, in raw counts) in
    the units of the pixels (raw x ``scale``): p(x / scale) has the
    coefficients c_i / scale**i. The deployed parser evaluates the
    polynomial at the pixels less the dark (piccolo3-common's
    ``corrected_pixels``): in pixel units it corrects by the device's own
    factor. Unknown scale: the coefficients as the device gives them."""
    if not scale or scale == 1.0:
        return list(coefficients)
    return [c / scale ** i for i, c in enumerate(coefficients)]


def saturated_pixels(pixels, level):
    """How many pixels are at or above ``level`` (the same units)."""
    return sum(1 for p in pixels if p >= level)


class DeviceUnavailable(PiccoloError):
    """The spectrometer is not connected."""


def _daemon_thread(*args, **kwargs):
    return threading.Thread(*args, daemon=True, **kwargs)


class DevicePool(ThreadPool):
    """One device's worker thread. Stopping does not wait more than a
    moment for a device call in progress (an integration can take minutes):
    the call finishes in its daemon thread and its result is dropped."""

    threadFactory = staticmethod(_daemon_thread)
    JOIN = 0.5

    def stop(self):
        self.joined = True
        self.started = False
        self._team.quit()
        for thread in self.threads:
            thread.join(self.JOIN)


class Spectrometer:
    log = Logger()

    def __init__(self, config, channels, device, clock, gpio=None,
                 to_thread=None):
        self.config = config
        self.name = config.name
        self.serial = config.serial
        self.channels = list(channels)
        self.device = device
        self.clock = clock
        self.pool = None
        if to_thread is None:
            # the device's own thread: its calls never wait behind file I/O
            # (or another device) in a shared pool, and run one at a time
            self.pool = DevicePool(1, 1, name=f"piccolo-{self.name}")
            to_thread = self._in_pool
        self.to_thread = to_thread
        self.lock = defer.DeferredLock()
        self.info = None
        self.last_error = None
        self.status = Observable(DISCONNECTED)
        self.min_time = Observable(config.min_time if config.min_time is not None else 1)
        self.max_time = Observable(config.max_time if config.max_time is not None else 10000)
        start = min(max(DEFAULT_TIME, self.min_time.value), self.max_time.value)
        self.current_time = {c: Observable(start) for c in self.channels}
        self.auto_state = {c: Observable("n") for c in self.channels}
        self.tec_enabled = Observable(bool(config.fan))
        self.target_temperature = Observable(float(config.set_temperature))
        self.temperature_tolerance = float(getattr(config, "temperature_tolerance", 2.0))
        #: the last detector temperature read: {"temperature": °C, "time":
        #: clock seconds, ...} (see ``last_temperature``), None until read
        self.temperature = Observable(None)
        self._temperature_on = False
        self._temperature_call = None
        self.power_pin = None
        if gpio is not None and config.power_switch >= 0:
            self.power_pin = gpio.output(config.power_switch, initial=True)
        self._reconnect = None
        self._want_connected = False
        self._reads = 0               # reads in a worker, abandoned ones too
        self._idle_after_read = False

    # -- the device's thread ----------------------------------------------

    def _in_pool(self, fn, *args, **kwargs):
        from twisted.internet import reactor
        self.start_pool()
        return threads.deferToThreadPool(reactor, self.pool, fn, *args, **kwargs)

    def start_pool(self):
        """Start the device's thread (with the service; at the latest with
        the first device call)."""
        if self.pool is not None and not self.pool.started:
            from twisted.internet import reactor
            self.pool.start()
            if self._pool_trigger is None:
                self._pool_trigger = reactor.addSystemEventTrigger(
                    "during", "shutdown", self.stop_pool)

    def stop_pool(self):
        """Stop the device's thread once the calls queued on it are done."""
        if self.pool is not None and self.pool.started:
            self.pool.stop()

    _pool_trigger = None

    # -- connection -------------------------------------------------------

    @property
    def connected(self):
        return self.status.value in CONNECTED

    def _open(self):
        """Thread side: open the device and apply the configured settings;
        a device that fails half-way is closed before anyone tries again."""
        info = self.device.open()
        try:
            self.device.set_integration_time(self._idle_time(info))
            if info.has_tec:
                self.device.set_tec(self.tec_enabled.value,
                                    self.target_temperature.value)
        except BaseException:
            try:
                self.device.close()
            except Exception:
                pass
            raise
        return info

    def _idle_time(self, info=None):
        info = info or self.info
        return max(info.min_time, self.min_time.value if self.config.min_time is not None else 0)

    def connect(self):
        """Connect (Deferred firing "ok" or a message saying why not)."""
        self._want_connected = True
        if self.connected:
            return defer.succeed("ok")
        if self.status.value == POWERED_OFF:
            return defer.succeed(f"{self.name} is powered off")
        if self.status.value == CONNECTING:
            return defer.succeed(f"{self.name} is connecting")
        self._cancel_reconnect()
        was_dropped = self.status.value == DROPPED
        self.status.set(CONNECTING)

        def opened(info):
            self.info = info
            self._apply_limits(info)
            self.last_error = None
            if not info.has_tec:
                # no cooler, none on (the legacy server answered false too)
                self.tec_enabled.set(False)
            self.status.set(IDLE)
            self._start_temperature_loop()
            self.log.info("{name}: connected ({model}, {pixels} pixels){again}",
                          name=self.name, model=info.model, pixels=info.pixels,
                          again=" again" if was_dropped else "")
            return "ok"

        def failed(f):
            f.trap(DeviceError)
            self.last_error = str(f.value)
            self.status.set(DROPPED)
            if not was_dropped:
                self.log.warn("{name}: cannot connect: {error}; retrying every "
                              "{interval:.0f} s", name=self.name, error=f.value,
                              interval=RECONNECT_INTERVAL)
            self._schedule_reconnect()
            return f"{self.name}: {f.value}"
        return self.lock.run(self.to_thread, self._open).addCallbacks(opened, failed)

    def _apply_limits(self, info):
        lo = info.min_time if self.config.min_time is None else max(info.min_time, self.config.min_time)
        hi = info.max_time if self.config.max_time is None else min(info.max_time, self.config.max_time)
        if lo > hi:
            lo, hi = info.min_time, info.max_time
        self._warn_limits(info, lo, hi)
        self._device_limits = (info.min_time, info.max_time)
        self.min_time.set(lo)
        self.max_time.set(hi)
        self._clamp_times()

    def _warn_limits(self, info, lo, hi):
        """The config's integration-time limits outside the device's range
        are replaced by what the device can do: said in the log, not silently."""
        for key, configured, used in (("min_integration_time", self.config.min_time, lo),
                                      ("max_integration_time", self.config.max_time, hi)):
            if configured is not None and configured != used:
                self.log.warn("{name}: {key} = {configured} ms is outside the device's "
                              "range {dmin}..{dmax} ms: using {used} ms", name=self.name,
                              key=key, configured=configured, dmin=info.min_time,
                              dmax=info.max_time, used=used)

    def _clamp_times(self):
        for obs in self.current_time.values():
            obs.set(min(max(obs.value, self.min_time.value), self.max_time.value))

    def _schedule_reconnect(self):
        if self._reconnect is None or not self._reconnect.active():
            self._reconnect = self.clock.callLater(RECONNECT_INTERVAL, self._try_reconnect)

    def _cancel_reconnect(self):
        if self._reconnect is not None and self._reconnect.active():
            self._reconnect.cancel()
        self._reconnect = None

    def _try_reconnect(self):
        self._reconnect = None
        if self._want_connected and self.status.value == DROPPED:
            self.connect()

    def disconnect(self):
        self._want_connected = False
        self._cancel_reconnect()
        if self.status.value in (POWERED_OFF, DISCONNECTED):
            return defer.succeed("ok")

        self._stop_temperature_loop()

        def closed(_):
            if self.status.value != POWERED_OFF:
                self.status.set(DISCONNECTED)
            self.log.info("{name}: disconnected", name=self.name)
            return "ok"
        return self.lock.run(self.to_thread, self.device.close).addBoth(closed)

    def dropped(self, error):
        """A device call failed: close it, report DROPPED, keep retrying."""
        if self.status.value == DROPPED:
            return
        self._stop_temperature_loop()
        self.last_error = str(error)
        self.status.set(DROPPED)
        self.log.error("{name}: device dropped: {error}; reconnecting every "
                       "{interval:.0f} s", name=self.name, error=error,
                       interval=RECONNECT_INTERVAL)
        # closed under the device's lock: never while another call holds it
        self.lock.run(self.to_thread, self.device.close).addErrback(lambda f: None)
        self._schedule_reconnect()

    # -- power ------------------------------------------------------------

    def power_on(self):
        if self.power_pin is None and not self.config.simulated:
            return defer.succeed(f"{self.name} has no power switch")
        if self.status.value != POWERED_OFF:
            return self.connect()
        if self.power_pin is not None:
            self.power_pin.on()
        self.status.set(DISCONNECTED)
        self.log.info("{name}: power on", name=self.name)
        return defer.Deferred.fromCoroutine(self._settle_and_connect())

    async def _settle_and_connect(self):
        from twisted.internet import task
        await task.deferLater(self.clock, POWER_SETTLE, lambda: None)
        return await self.connect()

    def power_off(self):
        if self.power_pin is None and not self.config.simulated:
            return defer.succeed(f"{self.name} has no power switch")
        if self.status.value == POWERED_OFF:
            return defer.succeed("ok")
        if self.status.value in (RECORDING, AUTOINTEGRATING):
            return defer.succeed(f"{self.name} is busy")

        def off(_):
            if self.power_pin is not None:
                self.power_pin.off()
            self.status.set(POWERED_OFF)
            self.log.info("{name}: power off", name=self.name)
            return "ok"

        def not_off(f):
            # the switch did not turn: the device is still on. Connected
            # again (if it was wanted so) before the failure is answered, so
            # that whoever holds the instrument's lease for this change
            # hands back a usable instrument, not one closed and powered
            if not was_wanted or self.status.value == POWERED_OFF:
                return f
            self.log.warn("{name}: power off failed ({error}); connecting again",
                          name=self.name, error=f.getErrorMessage())
            return self.connect().addBoth(lambda _: f)
        was_wanted = self._want_connected
        d = self.disconnect()
        self._want_connected = False
        return d.addCallback(off).addErrback(not_off)

    # -- device calls -----------------------------------------------------

    def _device(self, fn, *args):
        """Run a blocking device call in a worker thread, after any other
        call to this device; a DeviceError marks the device DROPPED (and
        starts reconnecting) before it reaches the caller."""
        def failed(f):
            f.trap(DeviceError)
            self.dropped(f.value)
            return f
        return self.lock.run(self.to_thread, fn, *args).addErrback(failed)

    def _setting_call(self, fn, *args):
        """A device call made for a CoAP request: its failure is a 4.00."""
        def refused(f):
            f.trap(DeviceError)
            raise PiccoloError(f"{self.name}: {f.value}")
        return self._device(fn, *args).addErrback(refused)

    # -- acquisition ------------------------------------------------------

    @property
    def read_outstanding(self):
        """A read is still running in its worker (perhaps one an abort
        abandoned): the device lock stays held until it returns."""
        return self._reads > 0

    def set_busy(self, status):
        if not self.connected:
            return
        # IDLE only once the device really is: an abandoned read runs on
        self._idle_after_read = status == IDLE and self._reads > 0
        if not self._idle_after_read:
            self.status.set(status)

    def _read_done(self, result):
        self._reads -= 1
        if not self._reads and self._idle_after_read:
            self._idle_after_read = False
            self.set_busy(IDLE)
        return result

    def acquire(self, ms):
        """A clean spectrum at ``ms`` that began after this call (Deferred)."""
        if not self.connected:
            return defer.fail(DeviceUnavailable(f"{self.name} is not connected"))
        idle = self._idle_time()
        has_tec = self.info.has_tec
        # the cooler as it is while this spectrum integrates
        enabled = bool(has_tec and self.tec_enabled.value)
        set_point = self.target_temperature.value if has_tec else None

        def work():
            # read just before and just after the integration, in the same
            # device call: nothing else runs on the device in between, and
            # a detector drifting through its tolerance meanwhile is seen
            before = self.device.temperature() if has_tec else None
            reading = acquire_clean(self.device, ms, idle)
            if has_tec:
                reading.temperature_before = before
                reading.temperature = self.device.temperature()
            return reading

        def read(reading):
            reading.tec_enabled = enabled
            reading.set_point = set_point
            if reading.temperature is not None:
                self._keep_temperature(reading.temperature)
            return reading

        self._reads += 1
        return self._device(work).addBoth(self._read_done).addCallback(read)

    def metadata(self, channel, reading):
        """The device part of a spectrum's metadata: the facts of the
        device, and what a reader needs to trust the spectrum -- how many
        pixels reached the saturation level, and whether a cooled detector
        was at its set point."""
        info = self.info
        scale = info.counts_scale
        meta = {
            "SerialNumber": self.serial,
            "IntegrationTime": float(reading.integration_time),
            "IntegrationTimeUnits": "milliseconds",
            "SaturationLevel": info.saturation,
            "SaturatedPixels": saturated_pixels(reading.pixels, info.saturation),
            # pixels = raw ADC counts x CountsScale (null: not known)
            "CountsScale": scale,
            "SaturationLevelRaw": round(info.saturation / scale) if scale else None,
            "WavelengthCalibrationCoefficients": list(info.wavelength_coefficients),
            "NonlinearityCorrectionCoefficients": nonlinearity_in_pixel_units(
                info.nonlinearity, scale),
            "NonlinearityCorrectionCoefficientsRaw": list(info.nonlinearity),
            "DarkPixels": list(info.dark_pixels),
            "TemperatureEnabled": bool(reading.tec_enabled),
            "Temperature": reading.temperature,
            "TemperatureBefore": reading.temperature_before,
            "TemperatureSetPoint": reading.set_point,
            "TemperatureTolerance": self.temperature_tolerance if info.has_tec else None,
            # both readings, before and after the integration, decide
            "TemperatureStable": all(temperature_stable(
                reading.tec_enabled, t, reading.set_point, self.temperature_tolerance)
                for t in (reading.temperature_before, reading.temperature)),
            "TemperatureUnits": "degC",
            "Model": info.model,
        }
        if info.has_tec:
            # the keys the deployed processing tool reads (piccolo3-utils'
            # PiccoloProcessedData.add: its temperature and target, °C)
            meta["TemperatureDetectorActual"] = reading.temperature
            meta["TemperatureDetectorSet"] = reading.set_point
        calibration = self.config.calibration.get(channel)
        if calibration is not None:
            meta["WavelengthCalibrationCoefficientsPiccolo"] = list(calibration)
        return meta

    # -- detector temperature -----------------------------------------------

    def _keep_temperature(self, value):
        """Reactor side: a reading just taken (a poll or an acquisition);
        the next poll is due TEMPERATURE_INTERVAL after it."""
        self.temperature.set({"temperature": float(value), "time": self.clock.seconds()})
        self._schedule_poll()

    def _start_temperature_loop(self):
        if self._temperature_on or not self.info.has_tec:
            return
        self._temperature_on = True
        self._poll_temperature()

    def _stop_temperature_loop(self):
        self._temperature_on = False
        call, self._temperature_call = self._temperature_call, None
        if call is not None and call.active():
            call.cancel()

    def _schedule_poll(self, failed=False):
        """The next reading, TEMPERATURE_INTERVAL after the last one (an
        acquisition's reading counts: during a batch the polls mostly wait),
        or after a failed one."""
        if not self._temperature_on:
            return
        if self._temperature_call is not None and self._temperature_call.active():
            self._temperature_call.cancel()
        last = self.temperature.value
        now = self.clock.seconds()
        due = (last["time"] if last and not failed else now) + TEMPERATURE_INTERVAL
        self._temperature_call = self.clock.callLater(max(0.0, due - now),
                                                      self._poll_temperature)

    def _poll_temperature(self):
        """One reading on the device's thread, queued behind whatever the
        device is doing (during a batch: between two integrations)."""
        self._temperature_call = None
        if not self._temperature_on or not self.connected:
            return

        def failed(f):
            # a DeviceError dropped the device (the loop stopped with it);
            # anything else: try again at the next interval
            if self._temperature_on and self._temperature_call is None:
                self._schedule_poll(failed=True)
        self.read_temperature().addErrback(failed)

    def read_temperature(self):
        """A fresh reading (Deferred °C), kept as the last one."""
        def keep(value):
            self._keep_temperature(value)
            return value
        return self._device(self.device.temperature).addCallback(keep)

    def last_temperature(self):
        """The last reading, its age and what it means, for health, status
        and ``last_temperature``: never a device call, so never waits
        behind an integration. None where there is no cooler."""
        if self.info is None or not self.info.has_tec:
            return None
        last = self.temperature.value if self.connected else None
        value = last["temperature"] if last else None
        enabled = bool(self.tec_enabled.value)
        target = self.target_temperature.value
        return {
            "temperature": value,
            "age": round(self.clock.seconds() - last["time"], 1) if last else None,
            "target": target,
            "enabled": enabled,
            "tolerance": self.temperature_tolerance,
            "stable": (temperature_stable(enabled, value, target, self.temperature_tolerance)
                       if last else None),
        }

    def get_last_temperature(self):
        if self.info is not None and not self.info.has_tec:
            raise PiccoloError(f"{self.name} has no thermo-electric cooler")
        return self.last_temperature()

    # -- settings (/spectrometer/<spec>/...) --------------------------------

    def _channel(self, channel):
        if channel not in self.current_time:
            raise NotFoundError(f"{self.name} has no channel {channel!r}")
        return channel

    def set_min_time(self, value):
        lo_dev = getattr(self, "_device_limits", (1, None))[0]
        value = to_int(value, "min_time", lo=lo_dev, hi=self.max_time.value)
        self.min_time.set(value)
        self._clamp_times()

    def set_max_time(self, value):
        hi_dev = getattr(self, "_device_limits", (None, None))[1]
        value = to_int(value, "max_time", lo=self.min_time.value, hi=hi_dev)
        self.max_time.set(value)
        self._clamp_times()

    def get_current_time(self, channel=None, *extra):
        if channel is None or extra:
            raise NotFoundError("use current_time/<channel>")
        return self.current_time[self._channel(channel)].value

    def set_current_time(self, channel=None, value=None, *extra):
        if channel is None:
            raise NotFoundError("use current_time/<channel>")
        if extra:
            raise PiccoloError("current_time/<channel> takes one value: "
                               "the integration time in ms")
        self._channel(channel)
        value = to_int(value, "integration time", lo=self.min_time.value,
                       hi=self.max_time.value)
        self.current_time[channel].set(value)

    def get_auto(self, channel=None, *extra):
        if channel is None or extra:
            raise NotFoundError("use autointegration/<channel>")
        return self.auto_state[self._channel(channel)].value

    def have_tec(self):
        if self.info is not None:
            return bool(self.info.has_tec)
        return False

    def current_temperature(self):
        """The detector temperature read now; while the device is busy (an
        integration, which may last an hour) the last reading, taken just
        before the integration began: a request never waits for an
        integration. Requests that
        arrive while a reading is under way share it (one device call)."""
        if not self.connected:
            raise PiccoloError(f"{self.name} is not connected")
        if not self.info.has_tec:
            raise PiccoloError(f"{self.name} has no thermo-electric cooler")
        last = self.temperature.value
        if self._temperature_read is None and last is not None and self.lock.locked:
            return last["temperature"]
        waiter = defer.Deferred()
        if self._temperature_read is not None:
            self._temperature_waiters.append(waiter)
            return waiter
        waiters = self._temperature_waiters = [waiter]

        def keep(value):
            self._keep_temperature(value)
            return value

        def done(result, fire):
            self._temperature_read = None
            for w in waiters:
                fire(w, result)
        self._temperature_read = read = self._setting_call(self.device.temperature)
        read.addCallback(keep).addCallbacks(
            done, done, callbackArgs=(defer.Deferred.callback,),
            errbackArgs=(defer.Deferred.errback,))
        return waiter

    _temperature_read = None
    _temperature_waiters = ()

    def _apply_tec(self):
        """Send the TEC settings to the device: at once when it is free
        (a failure is the request's 4.00); while it is busy (an integration)
        the request is answered at once and the settings go to the device
        as soon as it is free, once for every change made meanwhile (the
        latest values then)."""
        if not self.connected or not self.info.has_tec:
            return None
        if self.lock.locked:
            if not self._tec_pending:
                self._tec_pending = True

                def apply():
                    # the device is ours now: the latest values go to it
                    self._tec_pending = False
                    if not self.connected or not self.info.has_tec:
                        return None
                    return self.to_thread(self.device.set_tec, self.tec_enabled.value,
                                          self.target_temperature.value)

                def failed(f):
                    f.trap(DeviceError)
                    self.dropped(f.value)
                    self.log.warn("{name}: cannot apply the TEC settings: {error}",
                                  name=self.name, error=f.value)
                self.lock.run(apply).addErrback(failed)
            return None
        return self._setting_call(self.device.set_tec, self.tec_enabled.value,
                                  self.target_temperature.value).addCallback(lambda _: None)

    _tec_pending = False

    def set_tec_enabled(self, value):
        value = to_bool(value, "TECenabled")
        if self.info is not None and not self.info.has_tec:
            raise PiccoloError(f"{self.name} has no thermo-electric cooler")
        self.tec_enabled.set(value)
        return self._apply_tec()

    def set_target_temperature(self, value):
        value = to_float(value, "target_temperature", lo=-60.0, hi=40.0)
        if self.info is not None and not self.info.has_tec:
            raise PiccoloError(f"{self.name} has no thermo-electric cooler")
        self.target_temperature.set(value)
        return self._apply_tec()

    def resources(self):
        def obs_channel(table):
            def lookup(channel=None, *extra):
                if channel not in table or extra:
                    raise NotFoundError("no such channel")
                return table[channel]
            return lookup
        return {
            "connect": Resource(get=self.connect, get_acts=True),
            "disconnect": Resource(get=self.disconnect, get_acts=True),
            "power_on": Resource(get=self.power_on, get_acts=True),
            "power_off": Resource(get=self.power_off, get_acts=True),
            "status": Resource(get=lambda: self.status.value, observe=self.status),
            "min_time": Resource(get=lambda: self.min_time.value,
                                 put=self.set_min_time, observe=self.min_time,
                                 idempotent=True),
            "max_time": Resource(get=lambda: self.max_time.value,
                                 put=self.set_max_time, observe=self.max_time,
                                 idempotent=True),
            "current_time": Resource(get=self.get_current_time,
                                     put=self.set_current_time, parse_path=True,
                                     observe=obs_channel(self.current_time),
                                     known=tuple(self.channels), idempotent=True),
            "autointegration": Resource(get=self.get_auto, parse_path=True,
                                        observe=obs_channel(self.auto_state),
                                        known=tuple(self.channels)),
            "haveTEC": Resource(get=self.have_tec),
            "current_temperature": Resource(get=self.current_temperature),
            "last_temperature": Resource(get=self.get_last_temperature,
                                         observe=self.temperature),
            "TECenabled": Resource(get=lambda: self.tec_enabled.value,
                                   put=self.set_tec_enabled, observe=self.tec_enabled,
                                   idempotent=True),
            "target_temperature": Resource(get=lambda: self.target_temperature.value,
                                           put=self.set_target_temperature,
                                           observe=self.target_temperature,
                                           idempotent=True),
        }


class GroupError(Exception):
    """Several devices of a group action failed: each one's error."""

    def __init__(self, errors):
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))


def settle_all(ds):
    """One answer for the per-device Deferreds ``ds`` of a group action,
    given only when every one of them has settled: the devices' answers
    joined with "|" ("ok" when all are), or, when some failed, their
    failure (one: as it is; several: a :class:`GroupError` naming each).

    Never sooner: a caller holding the instrument's lease for the action
    (the power window, a power job, a client's power change) releases it
    on this answer, and a device still switching after that would act
    outside the lease. Every failure is consumed here, none is left
    unhandled in a Deferred."""
    def joined(results):
        failures = [r for ok, r in results if not ok]
        if len(failures) == 1:
            return failures[0]
        if failures:
            raise GroupError(f.value for f in failures)
        messages = [r for ok, r in results if r != "ok"]
        return "|".join(messages) if messages else "ok"
    return defer.DeferredList(ds, consumeErrors=True).addCallback(joined)


class Spectrometers:
    """All spectrometers: the /spectrometer resources and group actions."""

    log = Logger()
    POWER_STAGGER = 10.0

    def __init__(self, spectrometers, channels, clock):
        self.by_name = {s.name: s for s in spectrometers}
        self.channels = list(channels)
        self.clock = clock

    def __iter__(self):
        return iter(self.by_name.values())

    def names(self):
        return sorted(self.by_name)

    def connected(self):
        return [s for s in self if s.connected]

    def _all(self, action):
        return settle_all([defer.maybeDeferred(getattr(s, action)) for s in self])

    def connect_all(self):
        return self._all("connect")

    def disconnect_all(self):
        return self._all("disconnect")

    def power_off_all(self):
        return self._all("power_off")

    def power_on_all(self):
        """Power devices on 10 s apart (inrush current), then connect.
        Devices already on are not waited for: only those switched on now
        are spaced, so a power_on with everything on answers at once."""
        from twisted.internet import task
        ds = []
        switched = 0
        for s in self:
            if s.status.value != POWERED_OFF:
                ds.append(defer.maybeDeferred(s.power_on))   # on already: connects if need be
            elif switched == 0:
                ds.append(defer.maybeDeferred(s.power_on))
                switched = 1
            else:
                ds.append(task.deferLater(self.clock, self.POWER_STAGGER * switched,
                                          s.power_on))
                switched += 1
        return settle_all(ds)

    def resources(self):
        res = {
            "spectrometers": Resource(get=self.names),
            "channels": Resource(get=lambda: list(self.channels)),
            "connect": Resource(get=self.connect_all, get_acts=True),
            "disconnect": Resource(get=self.disconnect_all, get_acts=True),
            "power_on": Resource(get=self.power_on_all, get_acts=True),
            "power_off": Resource(get=self.power_off_all, get_acts=True),
        }
        for s in self:
            for path, r in s.resources().items():
                res[f"{s.name}/{path}"] = r
        return res
