"""Where the server keeps what must not travel with the data: the manhole's
SSH host key.

The data directory is copied off the Pi whole (``rsync`` to a laptop, a
FAT stick handed round, where file modes mean nothing), so a private key
there is a private key on every laptop. Beside the data directory is no
better: on a field Pi that is the stick's root (``/mnt``). So the key lives
in the server's own state directory, never under the data:

- ``[manhole] host_key`` when set (``piccolo3-setup`` writes
  ``/var/lib/piccolo/manhole_host_key``);
- else ``$STATE_DIRECTORY`` (systemd's ``StateDirectory=piccolo``, which the
  shipped unit sets: ``/var/lib/piccolo``);
- else ``$XDG_STATE_HOME/piccolo`` or ``~/.local/state/piccolo``: the
  embedded default run from a clone keeps it in the user's home.

Earlier versions kept the key in ``<datadir>/.piccolo/`` (and before that in
the data directory itself): at start it is moved out, with a log line.
Blocking calls, start-up only; imports nothing heavy (runs whether or not
the manhole is on).
"""

import os

from twisted.logger import Logger

HOST_KEY = "manhole_host_key"
#: where earlier versions kept the key, relative to the data directory
OLD_HOST_KEYS = (os.path.join(".piccolo", HOST_KEY), HOST_KEY)

log = Logger()


def default_state_dir(environ=None):
    """The server's state directory when the config names no host key."""
    environ = os.environ if environ is None else environ
    systemd = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if os.path.isabs(systemd):
        return systemd
    xdg = environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(xdg):
        home = environ.get("HOME") or os.path.expanduser("~")
        xdg = os.path.join(home, ".local", "state")
    return os.path.join(xdg, "piccolo")


def host_key_path(settings, environ=None):
    """The absolute path of the manhole's host key for these settings."""
    path = settings.manhole_host_key or os.path.join(default_state_dir(environ), HOST_KEY)
    return os.path.abspath(path)


def inside(path, directory):
    """Is ``path`` ``directory`` or below it (after resolving symlinks)?"""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def migrate_host_key(datadir, path, note=None):
    """Move a host key an earlier version left under ``datadir`` to
    ``path``; when ``path`` already holds one, the stale copy under the data
    is removed. Either way it is said in the log (and to ``note`` when it
    fails: a key left in the data directory is a fault worth seeing)."""
    for relative in OLD_HOST_KEYS:
        old = os.path.join(datadir, relative)
        if os.path.islink(old) or not os.path.isfile(old):
            continue        # absent, or a run of that name: not ours
        try:
            if os.path.lexists(path):
                os.unlink(old)
                log.info("removed the old manhole host key {old}: the host key is "
                         "{path}, out of the data directory", old=old, path=path)
            else:
                _move(old, path)
                log.info("moved the manhole host key {old} to {path}, out of the "
                         "data directory", old=old, path=path)
        except OSError as e:
            log.error("cannot move the manhole host key {old} out of the data "
                      "directory to {path}: {error}", old=old, path=path,
                      error=e.strerror or e)
            if note is not None:
                note(f"manhole host key {old} is still in the data directory "
                     f"({e.strerror or e})")


def _move(old, path):
    """Move ``old`` to ``path`` (0600), across file systems (the data is
    usually on a USB stick): a complete copy is in place before ``old``
    goes."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        os.rename(old, path)
        os.chmod(path, 0o600)
        return
    except OSError as e:
        import errno
        if e.errno != errno.EXDEV:
            raise
    with open(old, "rb") as f:
        data = f.read()
    temporary = f"{path}.tmp-{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(temporary, path)        # never over a key that appeared meanwhile
    finally:
        os.unlink(temporary)
    os.unlink(old)
