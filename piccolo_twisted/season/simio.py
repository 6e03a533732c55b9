"""Simulated time and simulated I/O for the real components.

Nothing here is a stand-in for the server's own code: these are the things
the server is handed from outside (threads, the wall clock, GPIO pins, the
disk's failures), each built so that a seeded world drives it.

- :class:`SimThreads` runs a component's blocking calls (device, file,
  database, compute) in simulated time on the incarnation's clock: the call
  runs when the "thread" gets to it, its ``sleep`` advances the thread's
  own time, and the result arrives when the thread would have finished.
- :class:`SimWall` is the wall clock: the reactor's clock plus an offset
  the world moves (NTP, ``PUT /sysinfo/clock``, a Pi booting at 1970).
- :class:`SimGPIO` is the board: gpiozero's mock pins, with power switches
  that can fail and that cut the simulated device's power.
"""

import errno
import os

from twisted.internet import defer
from twisted.python.failure import Failure

from ..instrument.gpio import GPIO, RECORDING_LED_PIN, STATUS_LED_PIN


class SimThreads:
    """A ``deferToThread`` in simulated time.

    ``fn`` runs ``before()`` seconds after the call (the queue, a slow
    commit); inside it ``monotonic()`` is the thread's own time, which its
    ``sleep()`` calls advance; the result is delivered ``after()`` seconds
    after it returns. ``serial``: one thread, calls run one after another
    (SQLite's one connection). A crash of the incarnation drops its clock,
    and with it every call not yet run or not yet delivered."""

    def __init__(self, clock, serial=False, before=None, after=None, cost=None):
        self.clock = clock
        self.cost = cost            # extra seconds a call takes, by function
        self.serial = serial
        self.before = before or (lambda: 0.0)
        self.after = after or (lambda: 0.0)
        self.free_at = 0.0
        self.running = 0            # calls queued or running, not yet delivered
        self.calls = 0
        self._now = None
        self.on_error = None        # called with (fn, exception) thread side
        self.on_call = None         # called with (now, when it will run)
        self.watch = None           # the same, for the world's aim

    # -- the time source of the code running "in" the thread --------------

    def monotonic(self):
        return self._now if self._now is not None else self.clock.seconds()

    def sleep(self, seconds):
        if self._now is None:
            raise RuntimeError("sleep() outside a simulated worker call")
        if seconds > 0:
            # a sleep takes at least a microsecond: at simulated POSIX times
            # (1.3e9 s) a shorter one would not move the clock at all
            self._now += max(seconds, 1e-6)

    # -- deferToThread ----------------------------------------------------

    def __call__(self, fn, *args, **kwargs):
        d = defer.Deferred()
        now = self.clock.seconds()
        start = (max(now, self.free_at) if self.serial else now) + self.before()
        if self.serial:
            self.free_at = start
        if self.on_call is not None:
            self.on_call(now, start)
        if self.watch is not None:
            self.watch(now, start)
        self.running += 1
        self.calls += 1

        def run():
            self._now = self.clock.seconds()
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                result = Failure()
                if self.on_error is not None:
                    self.on_error(fn, e)
            finally:
                end, self._now = self._now, None
            if self.cost is not None:
                end += self.cost(fn)
            if self.serial:
                self.free_at = max(self.free_at, end)
            self.clock.callLater(max(0.0, end - self.clock.seconds()) + self.after(),
                                 deliver, result)

        def deliver(result):
            self.running -= 1
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        if start <= now:
            run()           # a free thread starts at once (its answer comes later)
        else:
            self.clock.callLater(start - now, run)
        return d


class SimWall:
    """The wall clock of one incarnation: its reactor clock plus an offset."""

    def __init__(self, clock, offset):
        self.clock = clock
        self.offset = offset

    def __call__(self):
        return self.clock.seconds() + self.offset


class PowerPin:
    """A spectrometer's power switch: a gpiozero mock pin that the world can
    make fail, and that powers the simulated device."""

    def __init__(self, device, board, serial):
        self._pin = device
        self.board = board
        self.serial = serial

    @property
    def value(self):
        return self._pin.value

    def _set(self, on):
        board = self.board
        if board.failing(self.serial):
            raise OSError(errno.EIO, f"GPIO: cannot drive the power switch of {self.serial}")
        if board.before_switch is not None:
            board.before_switch(self.serial, on)
        (self._pin.on if on else self._pin.off)()
        board.powered[self.serial] = bool(on)
        board.apply(self.serial)

    def on(self):
        self._set(True)

    def off(self):
        self._set(False)

    def close(self):
        self._pin.close()


class SimGPIO(GPIO):
    """The simulated board: mock pins, no status LEDs (their blinking
    would be 172,800 timer events a simulated day), power switches that
    can fail and that cut the simulated device's power."""

    def __init__(self, power_pins, plugged, failing, before_switch=None, now=None):
        from gpiozero.pins.mock import MockFactory
        super().__init__(MockFactory())
        self.power_pins = dict(power_pins)     # pin -> serial
        self.plugged = plugged                 # serial -> cable in (the world's)
        self.failing = failing                 # serial -> bool: switch faults now
        self.before_switch = before_switch     # the invariants' hook
        self.powered = {}
        self.devices = {}                      # serial -> SimulatedSpectrometer
        self.pins = {}                         # serial -> PowerPin
        self.now = now                         # the incarnation's clock
        self.ok_since = {}                     # serial -> plugged and powered since

    def output(self, pin, initial=False):
        if pin in (STATUS_LED_PIN, RECORDING_LED_PIN):
            raise RuntimeError("the simulated board has no status LEDs")
        device = super().output(pin, initial=initial)
        serial = self.power_pins.get(pin)
        if serial is None:
            return device
        self.powered[serial] = bool(initial)
        wrapped = PowerPin(device, self, serial)
        self.pins[serial] = wrapped
        self.apply(serial)
        return wrapped

    def attach(self, serial, device):
        self.devices[serial] = device
        self.apply(serial)

    def apply(self, serial):
        """The device answers when its cable is in and its power is on."""
        ok = self.plugged(serial) and self.powered.get(serial, True)
        if not ok:
            self.ok_since[serial] = None
        elif self.ok_since.get(serial) is None and self.now is not None:
            self.ok_since[serial] = self.now()
        device = self.devices.get(serial)
        if device is not None:
            device.plugged = ok


class SimCrash(BaseException):
    """The process died in the middle of a system call (a torn write):
    raised through the dead incarnation's code so that it does no more."""


class DiskWrites:
    """``os.write`` on the simulated disk, for the duration of one file
    write of the data directory (``with DiskWrites(...)``: the module
    attribute is swapped, so whatever writer the server uses -- the atomic
    one or any other -- goes through it).

    - While ``disk.full`` a write stores part of its bytes and returns the
      short count, and the next write on that descriptor fails with ENOSPC
      (what a full ext4 or FAT does): a writer that wrote in place leaves
      a partial file under the final name.
    - When ``tear()`` answers true, the write stores part of its bytes and
      the process dies right there (:class:`SimCrash`): what is on disk is
      what a ``kill -9`` or a power cut mid-``write()`` leaves.
    - ``alive()`` false: the process is dead, nothing more is written."""

    def __init__(self, disk, tear, alive):
        self.disk = disk
        self.tear = tear
        self.alive = alive
        self._short = set()
        self._real = None

    def __enter__(self):
        self._real = os.write
        os.write = self.write
        return self

    def __exit__(self, *exc):
        os.write = self._real
        return False

    def write(self, fd, data):
        real = self._real
        if not self.alive():
            raise SimCrash()
        n = len(data)
        if self.tear():
            if n > 1:
                real(fd, bytes(data[:n // 2]))
            raise SimCrash()
        if self.disk.full:
            if fd in self._short or n <= 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            self._short.add(fd)
            return real(fd, bytes(data[:n // 2]))
        return real(fd, data)


def failing_fsync(disk):
    """An ``fsync`` for ``pico.write_atomic``: ENOSPC while ``disk.full``
    (a full disk shows itself at the latest when the data is flushed)."""
    def fsync(fd):
        if disk.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)
    return fsync


class FullDiskConnection:
    """A real SQLite connection on a disk that can be full: while
    ``disk.full`` every statement that writes fails as SQLite fails there
    (SQLITE_FULL), after rolling back what the transaction had done."""

    WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "COMMIT")

    def __init__(self, db, disk):
        self._db = db
        self._disk = disk

    def _check(self, sql):
        if self._disk.full and sql.lstrip().split(None, 1)[0].upper() in self.WRITES:
            import sqlite3
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql, *args):
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql, *args):
        self._check(sql)
        return self._db.executemany(sql, *args)

    def executescript(self, script):
        self._check(script.replace("BEGIN IMMEDIATE;", "").lstrip() or "SELECT")
        return self._db.executescript(script)

    def close(self):
        self._db.close()

    def __getattr__(self, name):
        return getattr(self._db, name)


def full_disk_connect(disk):
    """``sqlite3.connect`` for a disk that can be full."""
    import sqlite3

    def connect(*args, **kwargs):
        return FullDiskConnection(sqlite3.connect(*args, **kwargs), disk)
    return connect
