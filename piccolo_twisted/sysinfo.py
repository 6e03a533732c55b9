"""/sysinfo: host facts and the system clock."""

import socket
from datetime import datetime, timezone

from twisted.logger import Logger

from . import __version__, commands
from .api import Resource
from .errors import PiccoloError
from .values import to_datetime


def _read_cpu_times(path="/proc/stat"):
    with open(path) as f:
        fields = f.readline().split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values), idle


class SysInfo:
    log = Logger()

    def __init__(self, run_command=None, clock_command=("sudo", "-n", "date", "-s")):
        self._run = run_command or self._spawn
        self.clock_command = tuple(clock_command)
        try:
            self._cpu_last = _read_cpu_times()
        except OSError:
            self._cpu_last = None

    @staticmethod
    def _spawn(argv):
        return commands.run(argv)

    def cpu(self):
        """CPU use in percent since the previous call (or since boot)."""
        try:
            total, idle = _read_cpu_times()
        except OSError:
            raise PiccoloError("CPU statistics are not available here") from None
        last_total, last_idle = self._cpu_last or (0, 0)
        self._cpu_last = (total, idle)
        busy_total = total - last_total
        if busy_total <= 0:
            return 0.0
        return round(100.0 * (busy_total - (idle - last_idle)) / busy_total, 1)

    def mem(self):
        info = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    info[key] = int(rest.split()[0])
        except OSError:
            raise PiccoloError("memory statistics are not available here") from None
        total = info.get("MemTotal", 0)
        available = info.get("MemAvailable", info.get("MemFree", 0))
        return round(100.0 * (total - available) / total, 1) if total else 0.0

    def host(self):
        return socket.gethostname()

    def get_clock(self):
        return datetime.now(timezone.utc).isoformat()

    def set_clock(self, value):
        """``sudo -n date -s <ISO time>``: the legacy command; a missing or
        failing helper is a 4.00 with its reason."""
        when = to_datetime(value, "clock")
        argv = self.clock_command + (when.strftime("%Y-%m-%dT%H:%M:%S%z"),)

        def done(result):
            commands.check(argv, result)
            self.log.info("system clock set to {when}", when=when.isoformat())
        return commands.call(self._run, argv).addCallback(done)

    def version(self):
        return __version__

    def resources(self):
        return {
            "cpu": Resource(get=self.cpu),
            "mem": Resource(get=self.mem),
            "host": Resource(get=self.host),
            "clock": Resource(get=self.get_clock, put=self.set_clock),
            "version": Resource(get=self.version),
        }
