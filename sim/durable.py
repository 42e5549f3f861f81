"""Files a crash leaves whole or absent (write a temporary name, fsync, rename, fsync the folder), and
a folder locked against writers in other processes.

Standard library only: the robot side (the agent's spool), the server (staged uploads) and the
registry's local files share it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path


def disk_full(exc: BaseException) -> bool:
    """A full disk or quota: raised by Python (ENOSPC, EDQUOT), or reported in a message (Icechunk's "os error 28")."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """``path`` holds ``data`` or what it held before, never a part, after any crash: written as ``tmp``
    (default ``.<name>.<pid>.<thread>.tmp`` beside it: writers of one path at once never share a
    temporary file; the last rename wins), fsynced, renamed, and the folder fsynced. A write that fails (a full disk)
    leaves no temporary file behind."""
    tmp = tmp if tmp is not None else path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: the part written goes, not the space it holds
        with contextlib.suppress(OSError):  # a read-only disk refuses the unlink too: the write's own error is the one to raise
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` itself, held in this block (no lock file: layouts stay as
    they are); it orders writers on this host, in this process and in others."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
