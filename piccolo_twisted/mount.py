"""Mounting the data device (a USB stick) as the deployed system did.

The legacy server ran ``sudo mount -o uid=<uid>,gid=<gid> <device>
<mntpnt>`` (so that the server's user owns the files on a FAT stick) and
``sudo umount <device>``; a device already mounted at the mount point is
left alone, one mounted elsewhere is an error. Here ``sudo`` gets ``-n``
(fail at once rather than wait for a password). A relative ``datadir`` is
taken relative to the mount point when mounting.
"""

import os

from . import commands
from .errors import PiccoloError


def mount_argv(device, mntpnt):
    return ("sudo", "-n", "mount", "-o", f"uid={os.getuid()},gid={os.getgid()}",
            device, mntpnt)


def umount_argv(device):
    return ("sudo", "-n", "umount", device)


def data_path(datadir, mntpnt):
    """Where the data directory is when the device is mounted."""
    return os.path.join(mntpnt, datadir)     # an absolute datadir stays as it is


def read_mounts(path="/proc/mounts"):
    """(device, mount point) pairs from /proc/mounts."""
    pairs = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                # /proc/mounts escapes blanks as \\040
                pairs.append(tuple(p.replace("\\040", " ") for p in parts[:2]))
    return pairs


def state(device, mntpnt, mounts_file="/proc/mounts"):
    """True: mounted at ``mntpnt``; False: not mounted; else the other
    mount point it is mounted at (blocking: call from a thread)."""
    try:
        mounts = read_mounts(mounts_file)
    except OSError as e:
        raise PiccoloError(f"cannot read {mounts_file}: {e.strerror or e}") from None
    for dev, point in mounts:
        if dev == device:
            if os.path.realpath(point) == os.path.realpath(mntpnt):
                return True
            return point
    return False


def mount_at_start(device, mntpnt, mounts_file="/proc/mounts", env=None):
    """Mount before the data directory is used (blocking, start-up only).

    Returns what was done, for the log; PiccoloError (one line) if the
    device cannot be mounted at ``mntpnt``.
    """
    now = state(device, mntpnt, mounts_file)
    if now is True:
        return f"{device} is already mounted at {mntpnt}"
    if now is not False:
        raise PiccoloError(f"{device} is mounted at {now}, not at {mntpnt}")
    commands.run_blocking(mount_argv(device, mntpnt), env=env)
    return f"mounted {device} at {mntpnt}"
