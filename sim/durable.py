"""Files a crash leaves whole or absent: write a temporary name, fsync, rename, fsync the folder.

Standard library only: the robot side (the agent's spool) and the server (staged uploads) share it.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """``path`` holds ``data`` or what it held before, never a part, after any crash: written as ``tmp``
    (default ``.<name>.tmp`` beside it), fsynced, renamed, and the folder fsynced."""
    tmp = tmp if tmp is not None else path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
