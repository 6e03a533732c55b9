"""Reading local files the command line did not make: regular files only.

``read_regular`` never blocks on a FIFO, never reads a device (``/dev/zero``
would be read until memory runs out) and never reads more than its limit;
``follow=False`` refuses a symlink too (fetch: nothing outside DIR).
"""

import errno
import os
import stat


def read_regular(path, limit, follow=True):
    """The bytes of the regular file ``path`` (at most ``limit``); OSError
    with a reason a person can read otherwise."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (not read)")
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes (not read)")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:           # grew while read
            raise OSError(errno.EFBIG, f"larger than {limit} bytes (not read)")
        return data
    finally:
        os.close(fd)
