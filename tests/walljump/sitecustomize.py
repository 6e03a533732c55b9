"""Preloaded (PYTHONPATH) into the server by tests/test_timers.py: the wall
clock of a Pi without an RTC. Only ``time.time`` moves -- ``time.monotonic``
never does -- and it moves the way the field sees it: the server runs
``sudo date -s <when>`` for ``PUT /sysinfo/clock`` and from then on this
process's wall clock reads <when>. The command itself is never run (``true``
runs instead; any other use of ``date`` runs ``false``)."""

import shutil
import sys
import time
from datetime import datetime

_real_time = time.time
_offset = 0.0


def _wall():
    return _real_time() + _offset


time.time = _wall      # before Twisted binds it (twisted.python.runtime.seconds)

from twisted.internet.posixbase import PosixReactorBase  # noqa: E402

_spawn = PosixReactorBase.spawnProcess


def _parse(text):
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return datetime.fromisoformat(text).timestamp()


def spawnProcess(self, protocol, executable, args=(), *rest, **kw):
    global _offset
    argv = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
    if "date" in argv:
        try:
            when = argv[argv.index("-s", argv.index("date")) + 1]
            target = _parse(when)
        except (ValueError, IndexError):
            sys.__stderr__.write(f"walljump: refusing {argv!r}\n")
            executable, args = shutil.which("false"), ["false"]
        else:
            _offset = target - _real_time()
            sys.__stderr__.write(f"walljump: wall clock set to {when} "
                                 f"({_offset:+.0f} s)\n")
            sys.__stderr__.flush()
            executable, args = shutil.which("true"), ["true"]
    return _spawn(self, protocol, executable, args, *rest, **kw)


PosixReactorBase.spawnProcess = spawnProcess
