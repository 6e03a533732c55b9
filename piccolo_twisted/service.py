"""The top-level service: one MultiService, one child per concern."""

import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from .access import ControlPolicy
from .coap.server import coap_service
from .datadir import DataDir
from .sysinfo import Health, SysInfo


@dataclass
class Workers:
    """Where blocking calls run, each a ``deferToThread``-like callable; None
    is the component's own pool. The season simulator runs them in
    simulated time."""
    devices: Optional[Callable] = None      # spectrometer calls
    files: Optional[Callable] = None        # the data directory's file system work
    database: Optional[Callable] = None     # the scheduler's SQLite (one at a time)
    compute: Optional[Callable] = None      # arithmetic (autointegration), health probes
    connect: Optional[Callable] = None      # opens the scheduler's SQLite file


class PiccoloService(service.MultiService):
    """Builds the instrument, the data directory, control, scheduler and the
    CoAP server from parsed configuration, and shuts them down in order.

    ``serve=False`` builds the components without the CoAP server and the
    manhole (and leaves the heap alone): the season simulator's server."""

    log = Logger()
    STOP_DEVICES_WAIT = 1.0     # for device calls at stop
    STOP_SHUTTERS_WAIT = 0.2    # a read is running: only the shutters matter
    SWITCH_INTERVAL = 0.001

    def __init__(self, settings, instrument, notes=(), clock=None,
                 configure_logging=True, time_scale=1.0, wall=None,
                 workers=None, bus=None, gpio=None, serve=True):
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock
            # the reactor's seconds() count monotonic time (timers.py)
            wall = wall or time.time
        # dates (quiet times, job times) come from the wall clock
        self.wall = wall or clock.seconds
        self.settings = settings
        self.instrument_config = instrument
        self.notes = list(notes)
        self.clock = clock
        self.configure_logging = configure_logging
        self.workers = workers or Workers()
        self.serve = serve
        self.sysinfo = SysInfo()
        self.datadir = DataDir(settings.datadir, device=settings.device,
                               mntpnt=settings.mntpnt, to_thread=self.workers.files)
        self.components = {
            "sysinfo": self.sysinfo.resources(),
            "data_dir": self.datadir.resources(),
        }
        self._build_instrument(time_scale, bus, gpio)
        #: [access] control_from: who may change anything, over CoAP and the web
        self.access = ControlPolicy(settings.control_from)
        self.coap = None
        self.manhole = None
        self.web = None
        if serve:
            self.coap = coap_service(self.components, settings.address,
                                     settings.port, clock=clock, access=self.access)
            self.coap.setServiceParent(self)
            self._build_web()
            # before the manhole looks for its key: an old one is moved, not remade
            self._move_state_out_of_the_data()
            self._build_manhole()

    def _build_instrument(self, time_scale, bus, gpio):
        from .instrument import build_instrument
        from .acquisition.control import Control
        from .scheduler import DB_NAME, Scheduler
        workers = self.workers
        self.instrument = build_instrument(
            self.instrument_config, self.clock, gpio=gpio, bus=bus,
            time_scale=time_scale, to_thread=workers.devices,
            emulate=self.settings.emulate,
            seabreeze_backend=self.settings.seabreeze_backend)
        control_options = {"to_thread": workers.compute} if workers.compute else {}
        self.control = Control(self.instrument, self.datadir, self.clock,
                               wall_time=self.wall, **control_options)
        # the server's own files live out of the runs' reach
        db_options = {"connect": workers.connect} if workers.connect else {}
        self.scheduler = Scheduler(self.control,
                                   os.path.join(self.datadir.state_dir, DB_NAME),
                                   self.clock, run_db=workers.database, wall=self.wall,
                                   catch_up=self.settings.catch_up, **db_options)
        self.control.scheduler = self.scheduler
        self.components.update({
            "shutter": self.control.guard_hardware(self.instrument.shutters.resources()),
            "spectrometer": self.control.guard_hardware(
                self.instrument.spectrometers.resources()),
            "control": self.control.resources(),
            "control/scheduler": self.scheduler.resources(),
        })
        self.components["spectrometer"].update(self.control.live.resources())
        self.scheduler.setServiceParent(self)
        self.sysinfo.clock_set.append(self.scheduler.wall_changed)
        self.health = Health(self.datadir, self.clock, control=self.control,
                             spectrometers=self.instrument.spectrometers,
                             scheduler=self.scheduler, to_thread=workers.compute,
                             wall_time=self.wall)
        self.components["sysinfo"].update(self.health.resources())

    def _build_web(self):
        self.web = None
        if self.settings.web_port:
            self.add_web(self.settings.web_port)

    def add_web(self, port, address=None):
        """The web page on ``port`` (0: any free one), before the service
        starts; ``address`` defaults to ``[web] address``, else CoAP's."""
        from .web import web_service
        self.web = web_service(self.components, self.datadir.path.path,
                               address=address or self.settings.web_interface,
                               port=port, access=self.access, clock=self.clock,
                               hosts=self.settings.web_hosts)
        self.web.setServiceParent(self)
        return self.web

    def _move_state_out_of_the_data(self):
        """A host key an earlier version kept under the data directory goes
        to the state directory (statedir.py), whether or not the manhole is on."""
        from .statedir import host_key_path, inside, migrate_host_key
        path = host_key_path(self.settings)
        if not inside(path, self.settings.datadir):
            migrate_host_key(self.settings.datadir, path, note=self.datadir.note_fault)

    def _build_manhole(self):
        if self.settings.manhole_port:
            from .manhole import manhole_service
            self.manhole = manhole_service(self)
            self.manhole.setServiceParent(self)

    def namespace(self):
        """The live objects the SSH manhole exposes."""
        return {
            "service": self, "settings": self.settings,
            "instrument": self.instrument,
            "shutters": self.instrument.shutters,
            "spectrometers": self.instrument.spectrometers,
            "control": self.control, "scheduler": self.scheduler,
            "datadir": self.datadir,
            "coap": self.coap.protocol if self.coap is not None else None,
            "web": self.web, "access": self.access,
        }

    def privilegedStartService(self):
        if self.configure_logging:
            from .logs import route_stdlib_logging, set_level
            set_level(self.settings.debug)
            route_stdlib_logging(self.settings.debug)
            if self.settings.logfile:
                from .logs import add_log_file
                add_log_file(self.settings.logfile, self.settings.debug)
        for note in self.notes:
            self.log.info("{note}", note=note)
        try:
            self.datadir.prepare()
        except OSError as e:
            raise SystemExit(f"piccolo: cannot use data directory "
                             f"{self.settings.datadir}: {e.strerror or e}") from None
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            # the data directory's file pool (started with the index build)
            # would keep the process alive, serving nothing
            self.datadir.stop()
            if self.web is not None and self.web.bound_failed(e):
                raise SystemExit(f"piccolo: cannot listen on [{self.settings.web_interface}]:"
                                 f"{self.settings.web_port} (web page, [web] port or "
                                 f"--web; 0 turns it off): {e.socketError}") from None
            raise SystemExit(f"piccolo: cannot listen on [{self.settings.address}]:"
                             f"{self.settings.port}: {e.socketError}") from None
        # after the bind: a failed start must not leave its thread behind
        self.scheduler.open()

    def startService(self):
        # The order matters. The instrument's lease is held by start-up
        # until every spectrometer has been tried once: the scheduler (a
        # child service, started next) may find a job due at once, and its
        # batch waits for the instrument instead of failing on devices not
        # yet connected.
        startup = self.instrument.lease.try_take("start-up")
        super().startService()
        # a worker running Python code (a device driver, an import) gives
        # the GIL up after 1 ms instead of 5 when the reactor asks for it
        sys.setswitchinterval(self.SWITCH_INTERVAL)
        d = self.instrument.start()
        d.addErrback(lambda f: self.log.failure("starting the instrument failed", f))
        # ready once every spectrometer has been tried (a batch's shutter
        # moves queue behind the closing pulses on each shutter's lock)
        tried = self.instrument.tried if self.instrument.tried is not None else d
        tried.addBoth(lambda result: (startup.release(), result)[1])
        if self.serve:
            self.clock.callLater(0, self._freeze_heap)
            self.log.info("piccolo serving CoAP on [{address}]:{port}",
                          address=self.settings.address, port=self.coap_port())

    def coap_port(self):
        """The UDP port bound: the configured one, or the one the system
        chose for ``port = 0`` (which clients need to be told)."""
        port = getattr(self.coap, "_port", None)
        return port.getHost().port if port is not None else self.settings.port

    def _freeze_heap(self):
        """Move everything start-up created out of the collector's reach:
        full collections then scan only what the server creates while
        serving, which keeps them to a millisecond or two instead of
        ~25 ms pauses over the import-time heap."""
        gc.collect()
        gc.freeze()

    @defer.inlineCallbacks
    def stopService(self):
        self.log.info("piccolo stopping")
        # first no new requests and no scheduler ticks: nothing may start a
        # batch while the running one is being ended
        yield super().stopService()
        self.health.stop()
        try:
            yield self.control.shutdown()
        except Exception:
            self.log.failure("stopping the acquisition failed")
        try:
            # shutters close at once; a device still busy with a read an
            # abort abandoned (an integration can take minutes) is not
            # waited for: its call ends in its own thread, which does not
            # hold the process, and the OS releases the device
            reading = any(s.read_outstanding for s in self.instrument.spectrometers)
            wait = self.STOP_SHUTTERS_WAIT if reading else self.STOP_DEVICES_WAIT
            yield self.instrument.stop().addTimeout(wait, self.clock)
        except defer.TimeoutError:
            self.log.warn("spectrometer calls still running after {t} s: not waiting "
                          "for them", t=wait)
        except Exception:
            self.log.failure("stopping the instrument failed")
        try:
            yield self.scheduler.close()
        except Exception:
            self.log.failure("closing the scheduler failed")
        self.datadir.stop()
        self.log.info("piccolo stopped")
