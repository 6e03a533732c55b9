"""Running the system's helper commands (``sudo date``, ``sudo mount``).

A helper that is missing, cannot be started, fails or hangs is a refusal
the client can act on (4.00 with the reason), never a server fault: every
such outcome becomes a :class:`~piccolo_twisted.errors.PiccoloError` whose
message carries the command's own words (its stderr). ``sudo`` is run with
``-n`` so that it fails at once instead of waiting for a password nobody
can type.
"""

import os
import shutil
import subprocess

from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from .errors import PiccoloError

#: how long a helper may run before it is killed and the request refused
TIMEOUT = 60.0
_MAX_OUTPUT = 64 * 1024
log = Logger()


def describe(argv):
    return " ".join(argv)


def failure_message(argv, out, err, code):
    """One line: the command, and what it said (or its exit status)."""
    text = (err or out or b"")
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("Upon execvpe"):
        # Twisted's child could not exec: its last line is the OSError
        lines = lines[-1:]
    said = "; ".join(lines)
    if len(said) > 300:
        said = said[:297] + "..."
    return f"{describe(argv)} failed: {said or f'exit status {code}'}"


def find(argv, env):
    """The executable's path, or PiccoloError naming the missing command."""
    path = shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if path is None:
        raise PiccoloError(f"{describe(argv)}: {argv[0]}: command not found")
    return path


class _Collect(protocol.ProcessProtocol):
    def __init__(self, deferred):
        self.deferred = deferred
        self.out, self.err = [], []
        self.size = 0
        self.timed_out = False

    def outReceived(self, data):
        self._keep(self.out, data)

    def errReceived(self, data):
        self._keep(self.err, data)

    def _keep(self, into, data):
        if self.size < _MAX_OUTPUT:
            into.append(data[:_MAX_OUTPUT - self.size])
            self.size += len(data)

    def processEnded(self, reason):
        if self.deferred.called:    # answered at the timeout already
            return
        code = reason.value.exitCode
        if code is None:            # killed by a signal
            code = -(reason.value.signal or 0)
        self.deferred.callback((b"".join(self.out), b"".join(self.err), code))


def run(argv, env=None, reactor=None, timeout=TIMEOUT):
    """Run ``argv``; a Deferred firing ``(stdout, stderr, exit code)``.

    Missing executable, spawn failure and timeout errback with
    PiccoloError. The caller decides what a non-zero exit code means (see
    :func:`check`).
    """
    if reactor is None:
        from twisted.internet import reactor
    env = dict(os.environ if env is None else env)
    try:
        executable = find(argv, env)
    except PiccoloError:
        return defer.fail()
    d = defer.Deferred()
    proto = _Collect(d)
    try:
        transport = reactor.spawnProcess(proto, executable, list(argv), env=env)
    except OSError as e:
        return defer.fail(PiccoloError(f"{describe(argv)}: cannot start: "
                                       f"{e.strerror or e}"))

    def expire():
        # Answer now: processEnded waits for the pipes to close too, and a
        # child of the helper (the mount that sudo started, hung on a dying
        # stick) outlives the killed helper and keeps them open.
        proto.timed_out = True
        try:
            transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass
        transport.loseConnection()          # stop reading the child's pipes
        if not d.called:
            d.errback(PiccoloError(f"{describe(argv)}: no answer within {timeout:g} s"))
    call = reactor.callLater(timeout, expire)

    def ended(result):
        if call.active():
            call.cancel()
        if proto.timed_out:
            raise PiccoloError(f"{describe(argv)}: no answer within {timeout:g} s")
        return result
    return d.addCallback(ended)


def call(runner, argv):
    """``runner(argv)`` (``run`` or a stand-in) as a Deferred; a spawn
    failure it raises (OSError) becomes a PiccoloError too."""
    def failed(f):
        f.trap(OSError)
        raise PiccoloError(f"{describe(argv)}: cannot start: "
                           f"{f.value.strerror or f.value}")
    return defer.maybeDeferred(runner, argv).addErrback(failed)


def check(argv, result):
    """The output of a helper that succeeded; PiccoloError if it failed."""
    out, err, code = result
    if code != 0:
        raise PiccoloError(failure_message(argv, out, err, code))
    return out


def run_blocking(argv, env=None, timeout=TIMEOUT):
    """The same outcomes, for start-up before the reactor runs."""
    env = dict(os.environ if env is None else env)
    executable = find(argv, env)
    try:
        p = subprocess.run([executable] + list(argv[1:]), env=env,
                           capture_output=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PiccoloError(f"{describe(argv)}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise PiccoloError(f"{describe(argv)}: cannot start: {e.strerror or e}") from None
    return check(argv, (p.stdout, p.stderr, p.returncode))
