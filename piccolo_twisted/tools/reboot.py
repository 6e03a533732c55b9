"""``piccolo3-reboot``: a push button on GPIO 10 reboots or shuts down the Pi.

Held 5 s or longer: shutdown; shorter: reboot. The commands are
configurable; ``--dry-run`` only logs. Runs on the reactor: the button's
edges (gpiozero callbacks, in gpiozero's thread) are handed over with
``callFromThread``; the hold time comes from the reactor clock (monotonic).
"""

import argparse
import shlex
import sys

from twisted.internet import utils
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver

BUTTON_PIN = 10
HOLD = 5.0


class RebootButton:
    log = Logger()

    def __init__(self, clock, run, reboot_cmd, shutdown_cmd, dry_run=False, hold=HOLD):
        self.clock = clock
        self.run = run
        self.reboot_cmd = reboot_cmd
        self.shutdown_cmd = shutdown_cmd
        self.dry_run = dry_run
        self.hold = hold
        self.pressed_at = None
        self.actions = []

    def pressed(self):
        self.pressed_at = self.clock.seconds()

    def released(self):
        if self.pressed_at is None:
            return None
        held = self.clock.seconds() - self.pressed_at
        self.pressed_at = None
        if held >= self.hold:
            return self.act("shutdown", self.shutdown_cmd, held)
        return self.act("reboot", self.reboot_cmd, held)

    def act(self, what, cmd, held):
        self.actions.append(what)
        self.log.info("button held {held:.1f} s: {what} ({cmd}){dry}", held=held,
                      what=what, cmd=" ".join(cmd), dry=" [dry run]" if self.dry_run else "")
        if self.dry_run:
            return None
        return self.run(cmd)


def main(argv=None):
    p = argparse.ArgumentParser(prog="piccolo3-reboot", description=__doc__)
    p.add_argument("--pin", type=int, default=BUTTON_PIN)
    p.add_argument("--reboot-command", default="sudo reboot")
    p.add_argument("--shutdown-command", default="sudo shutdown -h now")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    from twisted.internet import reactor
    from ..instrument.gpio import GPIO
    from ..timers import monotonic_timers
    monotonic_timers(reactor)       # the hold time must not jump with NTP

    def run(cmd):
        return utils.getProcessOutputAndValue(cmd[0], cmd[1:])
    button = RebootButton(reactor, run, shlex.split(args.reboot_command),
                          shlex.split(args.shutdown_command), dry_run=args.dry_run)
    device = GPIO().input(args.pin)
    device.when_pressed = lambda: reactor.callFromThread(button.pressed)
    device.when_released = lambda: reactor.callFromThread(button.released)
    reactor.run()


if __name__ == "__main__":
    main()
