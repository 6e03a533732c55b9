"""The power window as a state, over several simulated days on task.Clock,
with a wall clock that can jump (NTP on a Pi without RTC, PUT
/sysinfo/clock), settings changed mid-window and restarts.

The spectrometers here model what matters: whether they are on, and every
call the scheduler makes (a second power-off while off is a defect even
though the real devices would shrug it off)."""

import json
import os
import sqlite3
from datetime import datetime, timedelta, timezone

from twisted.internet import defer, task
from twisted.trial import unittest

from piccolo_twisted import scheduler as sch

from piccolo_twisted.instrument.spectrometer import IDLE, POWERED_OFF

from .test_scheduler import FakeControl, FakeSpectrometer, sync_db

DAY0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
TICK = 60.0
DAY = 24 * 3600


def wall_at(day, hour, minute=0):
    """POSIX time of ``hour:minute`` UTC on day ``day`` after DAY0's date."""
    return (DAY0.replace(hour=hour, minute=minute) + timedelta(days=day)).timestamp()


def hm(ts):
    d = datetime.fromtimestamp(ts, timezone.utc)
    return (d - DAY0.replace(hour=0)).days, d.strftime("%H:%M")


class Spectrometers:
    """Power state plus a record of calls: (day, "HH:MM", action)."""

    def __init__(self, world):
        self.world = world
        self.devices = [FakeSpectrometer("S_a"), FakeSpectrometer("S_b")]
        self.calls = []
        self.fail_next_on = 0

    def __iter__(self):
        return iter(self.devices)

    @property
    def on(self):
        return all(s.status.value != POWERED_OFF for s in self.devices)

    @on.setter
    def on(self, value):
        for s in self.devices:
            s.status.set(IDLE if value else POWERED_OFF)

    def power_off_all(self):
        self.calls.append(hm(self.world.wall()) + ("off",))
        self.on = False
        return defer.succeed("ok")

    def power_on_all(self):
        self.calls.append(hm(self.world.wall()) + ("on",))
        if self.fail_next_on:
            self.fail_next_on -= 1
            return defer.fail(RuntimeError("GPIO gone"))
        self.on = True
        return defer.succeed("ok")


class PowerWindowTests(unittest.TestCase):

    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), sch.DB_NAME)
        os.makedirs(os.path.dirname(self.path))
        self.clock = task.Clock()
        self.clock.advance(DAY0.timestamp())
        self.offset = 0.0                      # wall clock minus reactor clock
        self.control = FakeControl()
        self.spec = Spectrometers(self)
        self.control.instrument.spectrometers = self.spec
        self.s = None
        self.start()

    def wall(self):
        return self.clock.seconds() + self.offset

    def start(self):
        s = sch.Scheduler(self.control, self.path, self.clock, run_db=sync_db,
                          wall=self.wall)
        s.open()
        s.startService()
        self.s = s
        self.addCleanup(self.stop, s)
        return s

    def stop(self, s):
        if s.running:
            s.stopService()
        return s.close()

    def put(self, key, value):
        r = self.s.resources()[key].put(value)
        if isinstance(r, defer.Deferred):
            self.successResultOf(r)

    def window(self, start="22:00:00+0000", end="04:00:00+0000", delay=600):
        self.put("quietStart", start)
        self.put("quietEnd", end)
        self.put("powerDelay", delay)
        self.put("powerOffEnabled", True)
        self.put("quietTimeEnabled", True)

    def until(self, day, hour, minute=0):
        target = wall_at(day, hour, minute)
        while self.wall() < target:
            self.clock.advance(TICK)

    def jump(self, seconds):
        """The wall clock jumps; the reactor's clock goes on."""
        self.offset += seconds

    def calls(self):
        return [tuple(c) for c in self.spec.calls]

    def assert_alternating(self):
        actions = [c[2] for c in self.spec.calls]
        for a, b in zip(actions, actions[1:]):
            self.assertNotEqual(a, b, f"two {a} in a row: {self.spec.calls}")

    def stored_switched_off(self):
        db = sqlite3.connect(self.path)
        try:
            row = db.execute("SELECT value FROM state WHERE key = 'switched_off'").fetchone()
        finally:
            db.close()
        return row is not None and json.loads(row[0])

    # -- the tests ------------------------------------------------------------

    def test_three_nights_once_each(self):
        self.window()
        self.until(3, 12)
        self.assertEqual(self.calls(), [
            (0, "22:10", "off"), (1, "03:50", "on"),
            (1, "22:10", "off"), (2, "03:50", "on"),
            (2, "22:10", "off"), (3, "03:50", "on")])
        self.assertTrue(self.spec.on)

    def test_durable_flag_follows_the_state(self):
        self.window()
        self.until(0, 22, 5)
        self.assertFalse(self.stored_switched_off())
        self.until(0, 22, 11)
        self.assertTrue(self.stored_switched_off())
        self.until(1, 4)
        self.assertFalse(self.stored_switched_off())

    def test_power_delay_zero(self):
        self.window(delay=0)
        self.until(3, 12)
        self.assertEqual(self.calls(), [
            (0, "22:00", "off"), (1, "04:00", "on"),
            (1, "22:00", "off"), (2, "04:00", "on"),
            (2, "22:00", "off"), (3, "04:00", "on")])

    def test_flags_switched_off_mid_window(self):
        self.window()
        self.until(1, 1)
        self.put("quietTimeEnabled", False)          # night 0, 01:00
        self.until(1, 23)
        self.put("quietTimeEnabled", True)           # night 1 already begun
        self.until(2, 1, 30)
        self.put("powerOffEnabled", False)           # night 1, 01:30
        self.until(2, 12)
        self.put("powerOffEnabled", True)
        self.until(4, 12)
        self.assertEqual(self.calls(), [
            (0, "22:10", "off"), (1, "01:00", "on"),     # at once
            (1, "23:00", "off"), (2, "01:30", "on"),
            (2, "22:10", "off"), (3, "03:50", "on"),
            (3, "22:10", "off"), (4, "03:50", "on")])
        self.assertTrue(self.spec.on)

    def test_window_changed_mid_window(self):
        self.window()
        self.until(0, 23)
        self.put("quietStart", "22:30:00+0000")       # still inside: nothing
        self.put("quietEnd", "05:00:00+0000")         # later end: on later
        self.until(1, 23)
        self.put("quietStart", "21:00:00+0000")       # night 1, still inside
        self.put("quietEnd", "04:00:00+0000")
        self.until(2, 2)
        self.put("quietEnd", "01:00:00+0000")         # now past the end: on at once
        self.until(3, 12)
        self.assertEqual(self.calls(), [
            (0, "22:10", "off"), (1, "04:50", "on"),
            (1, "22:40", "off"), (2, "02:00", "on"),
            (2, "21:10", "off"), (3, "00:50", "on")])

    def test_clock_jumps_both_ways(self):
        self.window()
        self.until(0, 23)
        self.jump(7 * 3600)                           # 23:00 -> 06:00: past the end
        self.until(2, 2)
        self.jump(-5 * 3600)                          # 02:00 -> 21:00: before it
        self.until(2, 23)
        self.jump(-1800)                              # 23:00 -> 22:30: still inside
        self.until(3, 3)
        self.jump(-30 * DAY)                          # a Pi waking at an old time,
        self.until(-27, 12)                           # inside an old night
        self.jump(30 * DAY + 11 * 3600)               # NTP: into night 3
        self.until(4, 12)
        self.assert_alternating()
        # a jump is noticed at the scheduler's next look, MAX_SLEEP (5 min)
        # after the last at the latest
        self.assertEqual(self.calls(), [
            (0, "22:10", "off"), (1, "06:05", "on"),
            (1, "22:10", "off"), (1, "21:05", "on"),
            (1, "22:10", "off"), (2, "03:50", "on"),
            (2, "22:10", "off"), (-27, "03:50", "on"),
            (3, "23:05", "off"), (4, "03:50", "on")])
        self.assertTrue(self.spec.on)

    def test_restart_inside_the_window(self):
        self.window()
        self.until(0, 23)
        self.assertTrue(self.stored_switched_off())
        self.stop(self.s)
        self.spec.on = True                 # a restart may power them (GPIO reset)
        self.until(1, 2)                    # the server is down until 02:00
        self.start()
        self.until(1, 12)
        # down across the end of a window: on at the first tick
        self.until(1, 23)
        self.stop(self.s)
        self.until(2, 6)
        self.start()
        self.until(3, 12)
        # after the restart inside the window the state is applied again
        self.assertEqual(self.calls(), [
            (0, "22:10", "off"), (1, "02:00", "off"), (1, "03:50", "on"),
            (1, "22:10", "off"), (2, "06:00", "on"),
            (2, "22:10", "off"), (3, "03:50", "on")])
        self.assertTrue(self.spec.on)

    def test_never_in_the_middle_of_a_batch(self):
        self.window()
        self.until(0, 22)
        self.control.busy = True
        self.until(0, 22, 30)
        self.control.busy = False
        self.until(1, 12)
        # the moment the batch gives the instrument back
        self.assertEqual(self.calls(), [(0, "22:30", "off"), (1, "03:50", "on")])

    def test_failed_power_on_is_reported_and_retried(self):
        self.window()
        self.spec.fail_next_on = 2
        self.until(1, 3, 49)
        self.assertEqual(self.s.fault.value, "")
        self.until(1, 3, 51)
        self.assertIn("GPIO gone", self.s.fault.value)
        self.assertFalse(self.spec.on)
        self.assertTrue(self.stored_switched_off())
        self.until(1, 12)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertEqual(self.calls(), [(0, "22:10", "off"), (1, "03:50", "on"),
                                        (1, "03:51", "on"), (1, "03:52", "on")])
        self.assertTrue(self.spec.on)
        self.assertEqual(self.s.fault.value, "")
        self.assertFalse(self.stored_switched_off())

    def test_no_power_off_that_could_not_be_recorded(self):
        self.window()
        self.until(0, 22)
        real = self.s.store._db
        self.s.store._db = FailingWrites(real)
        self.until(0, 22, 30)
        self.assertEqual(self.calls(), [])           # never off without the record
        self.assertIn("not stored", self.s.fault.value)
        self.s.store._db = real
        self.until(1, 12)
        # tried again every minute: off at the first try after the disk has room
        self.assertEqual(self.calls(), [(0, "22:31", "off"), (1, "03:50", "on")])


class FailingWrites:
    """A connection whose writes fail as on a full disk."""

    def __init__(self, db):
        self.db = db

    def execute(self, sql, *args):
        if sql.split()[0].upper() in ("INSERT", "UPDATE", "DELETE"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def close(self):
        self.db.close()
