"""/control: settings, batches of dark and light sequences, autointegration.

A batch is a coroutine on the reactor: shutters are pulsed with the clock,
every connected spectrometer acquires in parallel (each in its own worker
thread, serialised per device), files are written in worker threads while
the next acquisitions run. ``pause`` takes effect at the next step;
``abort`` at once: a read in progress finishes in its worker and is
discarded (the spectrometer front keeps the device to itself until then),
the shutters close and the status is idle within a shutter pulse.

Nothing heavy runs on the reactor thread: numpy (11 MiB, ~100 ms of
import) is imported in a worker when the first procedure starts, not at
start (``prepare``), autointegration arithmetic and ``.pico`` encoding run
in workers, and the encoder works spectrum by spectrum.
"""

import dataclasses
import functools
import time

from twisted.internet import defer, threads
from twisted.logger import Logger

from ..api import Resource
from ..datadir import SaveFailed, check_run_name
from ..errors import BusyError, PiccoloError
from ..instrument.spectrometer import AUTOINTEGRATING, IDLE, RECORDING
from ..observable import Observable
from ..values import to_bool, to_float, to_int
from . import pico
from .live import LiveSpectra
from .summary import BatchSummary

#: seconds between two looks at the detector temperatures while a batch
#: waits for the set point (``wait_for_temperature``)
TEMPERATURE_POLL = 5.0


#: requests that move hardware: refused while a procedure runs (a shutter
#: opened during a dark set would record light labelled dark)
HARDWARE_ACTIONS = frozenset(("open_shutter", "close_shutter", "connect",
                              "disconnect", "power_on", "power_off"))


#: ``/control/progress`` while nothing runs
IDLE_PROGRESS = {"kind": None, "run": None, "batch": None, "sequence": None,
                 "nsequence": None}


class Aborted(Exception):
    """The batch was aborted."""


class BatchFailed(Exception):
    """The batch cannot go on (no device left, files cannot be written)."""


@dataclasses.dataclass
class Outcome:
    """How a procedure ended: what its Deferred (``start_record``,
    ``start_dark``) fires with."""
    kind: str                      # "batch", "dark sequence", "autointegration"
    run: str | None = None
    batch: int | None = None       # once the run's directory gave it a number
    ok: bool = False
    reason: str | None = None      # why it did not complete


class Control:
    log = Logger()

    def __init__(self, instrument, datadir, clock, to_thread=threads.deferToThread,
                 wall_time=time.time):
        self.instrument = instrument
        self.datadir = datadir
        self.clock = clock
        self.to_thread = to_thread
        self.wall_time = wall_time
        #: what the last batch or dark sequence did (BatchSummary.as_dict()),
        #: published at its start, after every file and at its end
        self.last_batch = Observable(None)
        self._summary = None
        self.scheduler = None
        # the deployed (legacy) server's defaults: one sequence, never
        # autointegrate, no delay, target 80.0 % of saturation
        self.num_sequences = Observable(1)
        self.autointegration = Observable(-1)
        self.delay = Observable(0.0)
        self.target = Observable(80.0)
        self.status = Observable("idle")
        self.current_sequence = Observable(-1)
        self.fault = Observable("")
        #: what runs now: {"kind", "run", "batch", "sequence", "nsequence"}
        self.progress = Observable(IDLE_PROGRESS)
        #: the latest spectrum of every spectrometer and channel
        self.live = LiveSpectra([s.name for s in instrument.spectrometers],
                                instrument.channels, to_thread=to_thread)
        self.files_written = 0
        self._task = None
        self._abort = False
        #: a pause asked for (the procedure stops at its next step, and
        #: status reads "paused" from then)
        self.paused = Observable(False)
        self._resume = None
        self._wait = None
        self._waiters = set()
        self._writes = defer.DeferredLock()
        self._imported = None           # Deferred: numpy imported in a worker
        self._write_failed = None
        self._lease = None
        #: the Outcome of the running (or last) procedure
        self.outcome = None

    def prepare(self):
        """Import what procedures need (numpy, with autointegration), once,
        in a worker: not at start (it would cost every server 11 MiB of
        RSS), and never on the reactor thread, where the ~100 ms of import,
        most of it holding the GIL, stalled the first batch. Returns a
        Deferred; ``_start`` calls it, and autointegration waits for it."""
        if self._imported is None:
            def load():
                from . import autointegrate  # noqa: F401 (numpy with it)
            self._imported = defer.maybeDeferred(self.to_thread, load)
            self._imported.addErrback(lambda f: self.log.failure("importing numpy failed", f))
        return self._imported

    # -- state --------------------------------------------------------------

    @property
    def busy(self):
        return self._task is not None

    @property
    def aborted(self):
        """Whether an abort was asked of the current (or last) procedure."""
        return self._abort

    def _start(self, kind, coro, lease=None, run=None):
        """Run procedure ``coro`` holding the instrument's lease (``lease``,
        already taken, or taken now: BusyError if anyone holds it). Returns
        a Deferred firing with its Outcome."""
        if lease is None:
            lease = self.instrument.lease.try_take(kind)
        if self.busy:
            lease.release()
            raise BusyError()
        self._lease = lease
        self.outcome = Outcome(kind, run)
        outcome = self.outcome
        self._abort = False
        self.paused.set(False)
        self._write_failed = None
        self.prepare()
        self._summary = None
        self.fault.set("")
        # busy from the first moment: a client polling status right after
        # its PUT must not read "idle" before the first step has begun
        self.status.set("waiting")
        self.progress.set(dict(IDLE_PROGRESS, kind=kind))
        if self.instrument.leds is not None:
            self.instrument.leds.recording(True)
        d = defer.Deferred.fromCoroutine(self._guarded(coro))
        self._task = d

        def finished(result):
            self._task = None
            self.paused.set(False)
            summary, self._summary = self._summary, None
            if summary is not None:
                summary.fault(self.fault.value)
                summary.finish(self.wall_time(), self._abort)
                self.last_batch.set(summary.as_dict())
            self.current_sequence.set(-1)
            self.progress.set(IDLE_PROGRESS)
            self.status.set("idle")
            for s in self.instrument.spectrometers:
                s.set_busy(IDLE)
            if self.instrument.leds is not None:
                self.instrument.leds.recording(False)
            self._lease = None
            lease.release()
            return outcome

        def succeeded(_):
            outcome.ok = True

        def failed(f):
            if f.check(Aborted):
                outcome.reason = "aborted by a client"
                self.log.info("{kind} aborted", kind=kind)
            elif f.check(BatchFailed, PiccoloError):    # e.g. the run is not a directory
                outcome.reason = str(f.value)
                self.fault.set(str(f.value))
                self.log.error("{kind} stopped: {why}", kind=kind, why=f.value)
            else:
                outcome.reason = f"unexpected error: {f.value}"
                self.fault.set(f"unexpected error: {f.value}")
                self.log.failure("{kind} failed", f, kind=kind)
            return None
        d.addCallbacks(succeeded, failed)
        d.addBoth(finished)
        # nothing may end unseen in this Deferred (its callers drop it)
        d.addErrback(lambda f: self.log.failure("ending the {kind} failed", f, kind=kind))
        return d

    async def _guarded(self, coro):
        """Run a procedure; whatever happens, let queued files complete and
        leave every shutter closed."""
        try:
            await coro
        finally:
            # shutters first: an abort must not wait for the disk to go dark
            try:
                await self.instrument.shutters.only(None)
            except Exception:
                self.log.failure("closing the shutters failed")
            await self._writes.run(lambda: None)

    def _unless_aborted(self, d):
        """``d``'s result, or Aborted as soon as ``abort`` is asked for.

        An abandoned ``d`` (a read at a long integration time) still
        finishes in its worker; its result, failure included, is discarded
        here."""
        if self._abort:
            d.addErrback(lambda f: None)
            return defer.fail(Aborted())
        waiter = defer.Deferred()
        self._waiters.add(waiter)

        def done(result):
            self._waiters.discard(waiter)
            if not waiter.called:
                waiter.callback(result)
            return None
        d.addBoth(done)
        return waiter

    async def _checkpoint(self):
        if self._abort:
            raise Aborted()
        if self._write_failed is not None:
            raise BatchFailed(self._write_failed)
        if self.paused.value:
            previous = self.status.value
            self.status.set("paused")
            self.log.info("paused")
            self._resume = defer.Deferred()
            await self._resume
            self._resume = None
            if self._abort:
                raise Aborted()
            self.status.set(previous)
            self.log.info("resumed")

    async def _sleep(self, seconds, wake_on=()):
        """Sleep ``seconds`` (on the injected clock), or until one of the
        observables ``wake_on`` changes, or an abort."""
        if seconds <= 0:
            return
        d = defer.Deferred()
        call = self.clock.callLater(seconds, d.callback, None)

        def woken(_value):
            if not d.called:
                call.cancel()
                d.callback(None)
        for obs in wake_on:
            obs.watch(woken)
        self._wait = (d, call)
        try:
            await d
        finally:
            self._wait = None
            for obs in wake_on:
                obs.unwatch(woken)

    # -- the batch summary and the detector temperature ------------------------

    def _begin_summary(self, kind, run, batch):
        summary = BatchSummary(kind, run, self.wall_time())
        summary.batch = batch
        self._summary = summary
        self.last_batch.set(summary.as_dict())
        return summary

    async def _wait_for_temperature(self, devices):
        """Before recording, wait up to each spectrometer's
        ``wait_for_temperature`` minutes (from the batch's start) for its
        cooled detector to come within ``temperature_tolerance`` of its set
        point (status "waiting for temperature"); a detector still away then
        is recorded anyway, its spectra flagged, and the summary says so.

        Every look takes the cooler as it is now: switching it off ends the
        wait for that detector (no cooling asked: nothing to wait for), a
        new set point is judged at once. Either change wakes the wait
        immediately rather than at its next reading."""
        limits = {s: s.config.wait_for_temperature * 60.0 for s in devices
                  if getattr(s.config, "wait_for_temperature", 0) > 0
                  and s.info is not None and s.info.has_tec}
        if not limits:
            return
        started = self.clock.seconds()
        previous = self.status.value
        waited = False
        try:
            while True:
                await self._checkpoint()
                cooled = [s for s in limits if s.tec_enabled.value and s.connected]
                readings = await self._unless_aborted(defer.DeferredList(
                    [s.read_temperature() for s in cooled], consumeErrors=True))
                elapsed = self.clock.seconds() - started
                away = []
                for s, (ok, value) in zip(cooled, readings):
                    target = s.target_temperature.value     # as it is now
                    if not s.tec_enabled.value or (
                            ok and abs(value - target) <= s.temperature_tolerance):
                        continue
                    if elapsed >= limits[s]:
                        why = (f"{value - target:+.1f} °C from its set point {target:g} °C"
                               if ok else f"temperature unreadable: {value.getErrorMessage()}")
                        self.log.warn("{name}: {why} after {minutes:g} min; recording anyway",
                                      name=s.name, why=why, minutes=limits[s] / 60.0)
                        if self._summary is not None:
                            self._summary.fault(f"{s.name}: {why} after waiting "
                                                f"{limits[s] / 60.0:g} min")
                        continue
                    away.append(s)
                if not away:
                    break
                if self.status.value != "waiting for temperature":
                    self.log.info("waiting up to {minutes:g} min for the detector "
                                  "temperature", minutes=max(limits.values()) / 60.0)
                    self.status.set("waiting for temperature")
                    waited = True
                limits = {s: limits[s] for s in away}
                left = min(limits.values()) - elapsed       # > 0: none has timed out
                changes = [obs for s in away for obs in (s.tec_enabled, s.target_temperature)]
                await self._sleep(max(0.5, min(TEMPERATURE_POLL, left)), wake_on=changes)
        finally:
            # an abort during the wait still says how long it waited
            if waited and self._summary is not None:
                self._summary.temperature_wait = round(self.clock.seconds() - started, 1)
        self.status.set(previous)

    # -- acquisition steps -------------------------------------------------

    def _devices(self):
        """The connected spectrometers in legacy order: by name (the legacy
        server iterated its sorted spectrometer names), so each channel's
        spectra come in that order in a file."""
        devices = sorted(self.instrument.spectrometers.connected(), key=lambda s: s.name)
        if not devices:
            raise BatchFailed("no spectrometer is connected")
        return devices

    async def _acquire_channel(self, channel, dark, devices, state):
        """Acquire ``channel`` on every device in parallel; [(device, reading)]."""
        for s in devices:
            s.set_busy(state)
        results = await self._unless_aborted(defer.DeferredList(
            [s.acquire(s.current_time[channel].value) for s in devices],
            consumeErrors=True))
        good = []
        for s, (ok, value) in zip(devices, results):
            if ok:
                good.append((s, value))
            else:
                self.log.error("{name}: {channel} {kind} failed: {error}",
                               name=s.name, channel=channel,
                               kind="dark" if dark else "light",
                               error=value.getErrorMessage())
                if self._summary is not None:
                    self._summary.fault(f"{s.name}: {channel} {'dark' if dark else 'light'} "
                                        f"failed: {value.getErrorMessage()}")
        if not good:
            raise BatchFailed(f"no spectrometer delivered a {channel} spectrum")
        return good

    async def _record_set(self, dark, sequence, batch, run, devices):
        """One dark or light set: every channel on every device, as
        [(spectrometer name, pico spectrum)]."""
        spectra = []
        shutters = self.instrument.shutters
        kind = "dark" if dark else "light"
        for channel in self.instrument.channels:
            await self._checkpoint()
            self.status.set(f"{channel} {kind}")
            # the next channel's shutter change closes this one; the set ends
            # dark below, and _guarded closes everything on any failure
            await shutters.only(None if dark else channel)
            results = await self._acquire_channel(channel, dark, devices, RECORDING)
            for s, reading in results:
                spectrum = pico.spectrum(s.metadata(channel, reading), reading.pixels,
                                         channel, dark, sequence, batch, run)
                # the summary counts it once its file is written (_write)
                spectra.append((s.name, spectrum))
                self.live.record(s.name, channel, kind, spectrum["Pixels"],
                                 spectrum["Metadata"], run=run, batch=batch,
                                 sequence=sequence)
            devices = [s for s in devices if s.connected] or devices
        if not dark:
            await shutters.only(None)
        return spectra

    async def _autointegrate(self, devices, target):
        """Find integration times for every channel and device."""
        await self.prepare()            # (imported in a worker: a no-op here)
        from .autointegrate import AutoIntegration
        shutters = self.instrument.shutters
        for channel in self.instrument.channels:
            await self._checkpoint()
            self.status.set(f"autointegrate {channel}")
            jobs = {s: AutoIntegration(target, s.info.saturation, s.min_time.value,
                                       s.max_time.value, s.current_time[channel].value,
                                       s.info.dark_pixels)
                    for s in devices if s.connected}
            await shutters.only(channel)
            try:
                while True:
                    todo = [s for s, job in jobs.items() if not job.done and s.connected]
                    if not todo:
                        break
                    await self._checkpoint()
                    for s in todo:
                        s.set_busy(AUTOINTEGRATING)
                    results = await self._unless_aborted(defer.DeferredList(
                        [s.acquire(jobs[s].next_time) for s in todo], consumeErrors=True))
                    # the arithmetic (numpy) runs in a worker, one job each
                    fed = []
                    for s, (ok, value) in zip(todo, results):
                        if ok:
                            self.live.record(s.name, channel, "autointegration",
                                             value.pixels, s.metadata(channel, value))
                            fed.append(self.to_thread(jobs[s].feed, value.integration_time,
                                                      value.pixels))
                        else:
                            jobs[s].give_up(s.current_time[channel].value)
                    for result in await defer.DeferredList(fed, consumeErrors=True):
                        ok, value = result
                        if not ok:
                            value.raiseException()
            finally:
                await shutters.only(None)
            for s, job in jobs.items():
                if job.result is not None and s.connected:
                    s.current_time[channel].set(
                        min(max(job.result, s.min_time.value), s.max_time.value))
                s.auto_state[channel].set(job.state)
                self.log.info("{name}: {channel} autointegration {state} at {t} ms "
                              "after {n} acquisitions", name=s.name, channel=channel,
                              state=job.state, t=job.result, n=job.steps)

    def _write(self, run, batch, sequence, kind, recorded, clobber):
        """Queue a file write of ``recorded`` ([(spectrometer, spectrum)]:
        storage names and writes it); any failure stops the batch at its
        next step. The summary takes the file's spectra in when the write
        has completed (the file is durable), never at acquisition: it
        describes what is on disk, whatever failed or was aborted after."""
        summary = self._summary
        spectra = [spectrum for _, spectrum in recorded]

        def written(name):
            self.files_written += 1
            self.datadir.files_written.set(self.files_written)
            if summary is not None:
                summary.written(name, sequence, kind,
                                [(spec, spectrum["Metadata"]) for spec, spectrum in recorded])
                if summary is self._summary:
                    self.last_batch.set(summary.as_dict())

        def failed(f):
            # any exception, not only OSError, raised at once or later: the
            # batch ends with a fault (storage's SaveFailed names the file
            # and the reason, and logged the traceback of anything that is
            # not an OSError); nothing is left in a dropped Deferred
            if f.check(SaveFailed):
                message = str(f.value)
                self.log.error("{message}", message=message)
            else:
                message = (f"cannot write sequence {sequence} of batch {batch}: "
                           f"{f.type.__name__}: {f.value}")
                self.log.failure("{message}", f, message=message)
            if self._write_failed is None:
                self._write_failed = message
            if summary is not None:
                summary.fault(message)
        # counting inside the lock: a flush sees every earlier write counted
        return self._writes.run(
            lambda: defer.maybeDeferred(self.datadir.save, run, batch, sequence, kind,
                                        spectra, clobber)
            .addCallback(written).addErrback(failed))

    async def _flush_writes(self):
        await self._writes.run(lambda: None)
        if self._write_failed is not None:
            raise BatchFailed(self._write_failed)

    # -- procedures --------------------------------------------------------

    async def _batch(self, run, nsequence, auto, delay, target):
        split = self.instrument.config.split
        clobber = self.instrument.config.clobber
        batch = await self.datadir.prepare_run(run)
        self.outcome.batch = batch
        self._begin_summary("batch", run, batch)
        self._progress(run=run, batch=batch, nsequence=nsequence)
        self.log.info("batch {batch} of run {run}: {n} sequences, autointegration "
                      "{auto}, delay {delay} s", batch=batch, run=run, n=nsequence,
                      auto=auto, delay=delay)
        written_before = self.files_written
        await self._wait_for_temperature(self._devices())
        if auto == 0:
            await self._autointegrate(self._devices(), target)
        dark_done = set()

        def save(sequence, kind, spectra):
            if split:
                self._write(run, batch, sequence, kind, spectra, clobber)
            return spectra

        for sequence in range(nsequence):
            await self._checkpoint()
            self.current_sequence.set(sequence)
            self._progress(sequence=sequence)
            devices = self._devices()
            dark = None
            if auto > 0 and sequence % auto == 0:
                await self._autointegrate(devices, target)
                dark = await self._record_set(True, sequence, batch, run, devices)
            elif sequence == 0 and auto < 1:
                dark = await self._record_set(True, sequence, batch, run, devices)
            light = await self._record_set(False, sequence, batch, run, devices)
            if dark is not None:
                save(sequence, "dark", dark)
                dark_done.add(sequence)
            save(sequence, "light", light)
            if not split:
                self._write(run, batch, sequence, None, (dark or []) + light, clobber)
            if sequence < nsequence - 1:
                self.status.set("waiting")
                await self._sleep(delay)
        if nsequence > 1:
            await self._checkpoint()
            last = nsequence - 1
            final_seq = last if (split and last not in dark_done) else nsequence
            dark = await self._record_set(True, final_seq, batch, run, self._devices())
            if split:
                save(final_seq, "dark", dark)
            else:
                self._write(run, batch, final_seq, None, dark, clobber)
        await self._flush_writes()
        self.log.info("batch {batch} of run {run} done: {n} files written",
                      batch=batch, run=run, n=self.files_written - written_before)

    def _progress(self, **changes):
        self.progress.set(dict(self.progress.value, **changes))

    async def _dark_only(self, run):
        batch = await self.datadir.prepare_run(run)
        self.outcome.batch = batch
        self._begin_summary("dark sequence", run, batch)
        self._progress(run=run, batch=batch, sequence=0, nsequence=1)
        self.current_sequence.set(0)
        dark = await self._record_set(True, 0, batch, run, self._devices())
        kind = "dark" if self.instrument.config.split else None
        self._write(run, batch, 0, kind, dark, self.instrument.config.clobber)
        await self._flush_writes()
        self.log.info("dark sequence written: run {run} batch {batch}", run=run, batch=batch)

    async def _auto_only(self, target):
        await self._autointegrate(self._devices(), target)

    async def shutdown(self):
        """Stop a running batch cleanly and wait for it (service stop)."""
        if self._task is not None:
            task = self._task
            self.abort()
            await task
        await self.instrument.shutters.close_all()
        self.log.info("acquisition stopped, every shutter closed")

    # -- the CoAP-facing operations ----------------------------------------

    @staticmethod
    def _check_target(value):
        # a float, as the legacy server kept it (float(t))
        return to_float(value, "target", lo=10, hi=90)

    def set_num_sequences(self, value):
        self.num_sequences.set(to_int(value, "numSequences", lo=1, hi=1000000))

    @staticmethod
    def _check_auto(value, name):
        # below -1 means never: clamped to -1 as the legacy server did
        # (max(int(n), -1)), so `piccolo3-record -a -2` records
        return max(to_int(value, name, hi=1000000), -1)

    def set_autointegration(self, value):
        self.autointegration.set(self._check_auto(value, "autointegration"))

    def set_delay(self, value):
        self.delay.set(to_float(value, "delay", lo=0.0, hi=7 * 24 * 3600.0))

    def set_target(self, value):
        self.target.set(self._check_target(value))

    def validate_record(self, run=None, nsequence=None, auto=None, delay=None,
                        target=None):
        """Checked settings for a batch, falling back to the current ones."""
        return dict(
            run=check_run_name(run) if run is not None else self.datadir.current_run.value,
            nsequence=(to_int(nsequence, "nsequence", lo=1, hi=1000000)
                       if nsequence is not None else self.num_sequences.value),
            auto=(self._check_auto(auto, "auto")
                  if auto is not None else self.autointegration.value),
            delay=(to_float(delay, "delay", lo=0.0, hi=7 * 24 * 3600.0)
                   if delay is not None else self.delay.value),
            target=(self._check_target(target) if target is not None
                    else self.target.value))

    def record_sequence(self, run=None, nsequence=None, auto=None, delay=None,
                        target=None, at_time=None, interval=None, end_time=None):
        given = dict(nsequence=nsequence, auto=auto, delay=delay, target=target)
        job = self.validate_record(run, nsequence, auto, delay, target)
        if at_time is not None:
            if self.scheduler is None:
                raise PiccoloError("no scheduler")
            # answered once the job is stored (a Deferred firing None)
            d = self.scheduler.add("record", job, at_time, interval, end_time)
            return d.addCallback(lambda job_id: self.log.info(
                "scheduled record_sequence job {id}", id=job_id))
        if interval is not None or end_time is not None:
            raise PiccoloError("interval and end_time need at_time")
        self.start_record(job, update_settings=given)
        return None

    def run_record(self, job, update_settings=None):
        """Start a batch now; BusyError if busy."""
        self.start_record(job, update_settings=update_settings)
        return None

    def start_record(self, job, update_settings=None, lease=None):
        """Start a batch now holding ``lease`` (or the lease taken now:
        BusyError if it is held); a Deferred firing with its Outcome (the
        scheduler records it)."""
        if lease is None and self.instrument.lease.held:
            raise BusyError()
        if self.busy:
            raise BusyError()
        if update_settings:
            for key, obs in (("nsequence", self.num_sequences), ("auto", self.autointegration),
                             ("delay", self.delay), ("target", self.target)):
                if update_settings.get(key) is not None:
                    obs.set(job[key])
        run = job["run"]
        if run != self.datadir.current_run.value:
            self.datadir.current_run.set(run)
        return self._start("batch", self._batch(run, job["nsequence"], job["auto"],
                                                job["delay"], job["target"]),
                           lease=lease, run=run)

    def put_record_sequence(self, run=None, nsequence=None, auto=None, delay=None,
                            target=None, at_time=None, interval=None, end_time=None):
        """PUT record_sequence: a batch starting now first makes sure of its
        run on disk (see _run_ready); a job for later, that its run is not
        a file or a symlink."""
        def start():
            return self.record_sequence(run, nsequence, auto, delay, target,
                                        at_time, interval, end_time)
        self.validate_record(run, nsequence, auto, delay, target)
        if at_time is not None:
            if run is None:
                return start()
            return self.datadir.check_run_usable(run).addCallback(lambda _: start())
        return self._run_ready(run, start)

    def put_record_dark(self, run=None):
        return self._run_ready(run, lambda: self.record_dark(run))

    def _run_ready(self, run, start):
        """``start()`` once ``run`` (or the current run) is a directory in
        the data directory (created if missing): a name that exists there
        as a file or a symlink is 4.00 now, as current_run answers it, and a
        missing data directory (a pulled stick) 5.03 with the reason, rather
        than a 2.04 and a batch stopping on a fault."""
        if self.busy:
            return start()              # 4.00 busy
        if run is not None:
            check_run_name(run)
        else:
            run = self.datadir.current_run.value
        return self.datadir.prepare_run(run).addCallback(lambda _: start())

    def record_dark(self, run=None):
        self.start_dark(run)

    def start_dark(self, run=None, lease=None):
        """A dark sequence now (holding ``lease``, or the lease taken now);
        a Deferred firing with its Outcome."""
        run = check_run_name(run) if run is not None else self.datadir.current_run.value
        if self.busy or (lease is None and self.instrument.lease.held):
            raise BusyError()
        if run != self.datadir.current_run.value:
            self.datadir.current_run.set(run)
        return self._start("dark sequence", self._dark_only(run), lease=lease, run=run)

    def auto(self, target=None):
        target = self._check_target(target) if target is not None else self.target.value
        if self.busy or self.instrument.lease.held:
            raise BusyError()
        self._start("autointegration", self._auto_only(target))

    def _power(self, on, at_time):
        if at_time is not None:
            if self.scheduler is None:
                raise PiccoloError("no scheduler")
            d = self.scheduler.add("power_on" if on else "power_off", None, at_time,
                                   24 * 3600, None)
            return d.addCallback(lambda _: None)
        spectrometers = self.instrument.spectrometers
        # answered at once; the switching holds the lease until it is done
        d = self.instrument.lease.run(f"power {'on' if on else 'off'} (a client)",
                                      spectrometers.power_on_all if on
                                      else spectrometers.power_off_all)
        d.addErrback(lambda f: self.log.failure("power switching failed", f))
        return None

    def power_on(self, at_time=None):
        return self._power(True, at_time)

    def power_off(self, at_time=None):
        return self._power(False, at_time)

    def abort(self):
        if not self.busy:
            raise PiccoloError("nothing to abort: piccolo system is idle")
        self._abort = True
        for waiter in list(self._waiters):
            if not waiter.called:
                waiter.errback(Aborted())
        self._waiters.clear()
        if self._wait is not None:
            d, call = self._wait
            if call.active():
                call.cancel()
            if not d.called:
                d.callback(None)
        if self._resume is not None:
            self._resume.callback(None)
        self.log.info("abort requested")

    def pause(self):
        """GET /control/pause, as legacy: pause, or resume when paused."""
        if not self.busy:
            raise PiccoloError("nothing to pause: piccolo system is idle")
        self._set_paused(not self.paused.value)

    def put_paused(self, value):
        """PUT /control/paused: pause (true) or resume (false), and say
        whether that changed anything. Unlike the toggling GET pause, a
        resume never pauses and a pause never resumes, whatever happened
        since the client last looked."""
        paused = to_bool(value, "paused")
        if not self.busy:
            raise PiccoloError(f"nothing to {'pause' if paused else 'resume'}: "
                               f"piccolo system is idle")
        return self._set_paused(paused)

    def _set_paused(self, paused):
        """The one place the pause changes: True when it did."""
        if self.paused.value == paused:
            return False
        self.paused.set(paused)
        self.log.info("pause requested" if paused else "resume requested")
        if not paused and self._resume is not None:
            self._resume.callback(None)
        return True

    def guard_hardware(self, resources):
        """``resources`` with every hardware action holding the instrument's
        lease while it runs: 4.00 "busy" while a batch, dark sequence,
        autointegration or power change holds it; settings (integration
        times, TEC) stay changeable."""
        def guarded(fn):
            if fn is None:
                return None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                name = getattr(fn, "__name__", "hardware")
                return self.instrument.lease.run(f"{name} (a client)", fn, *args, **kwargs)
            return call
        return {path: (dataclasses.replace(r, get=guarded(r.get), put=guarded(r.put))
                       if path.rsplit("/", 1)[-1] in HARDWARE_ACTIONS else r)
                for path, r in resources.items()}

    def resources(self):
        def setting(obs, setter):
            return Resource(get=lambda: obs.value, put=setter, observe=obs,
                            idempotent=True)
        return {
            "status": Resource(get=lambda: self.status.value, observe=self.status),
            "current_sequence": Resource(get=lambda: self.current_sequence.value,
                                         observe=self.current_sequence),
            "progress": Resource(get=lambda: self.progress.value, observe=self.progress),
            "fault": Resource(get=lambda: self.fault.value, observe=self.fault),
            "last_batch": Resource(get=lambda: self.last_batch.value,
                                   observe=self.last_batch),
            "numSequences": setting(self.num_sequences, self.set_num_sequences),
            "autointegration": setting(self.autointegration, self.set_autointegration),
            "delay": setting(self.delay, self.set_delay),
            "target": setting(self.target, self.set_target),
            "record_sequence": Resource(put=self.put_record_sequence),
            "record_dark": Resource(put=self.put_record_dark),
            "auto": Resource(put=self.auto),
            "power_on": Resource(put=self.power_on),
            "power_off": Resource(put=self.power_off),
            "abort": Resource(get=self.abort, get_acts=True, urgent=True),
            "pause": Resource(get=self.pause, get_acts=True, urgent=True),
            "paused": Resource(get=lambda: self.paused.value, put=self.put_paused,
                               observe=self.paused),
        }

