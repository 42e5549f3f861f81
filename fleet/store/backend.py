"""Icechunk/zarr plumbing shared by the writer and the reader: repository, lock, codecs, fsync.

Icechunk's local-filesystem storage does not make concurrent commits safe by itself (its
branch-ref update is not a compare-and-swap on a local disk; earth-mover/icechunk#804,
#1494), so every committing writer holds :class:`WriterLock`, an ``flock`` on
``<store>/writer.lock``. Under the lock the commit is the only one in flight, so
Icechunk's out-of-date check is exact again.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import icechunk
import zarr
from zarr.api import asynchronous as za
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync

from fleet.store.layout import LOCK_FILE, REPO_DIR

T = TypeVar("T")

# The lock above makes local commits safe; Icechunk's generic warning about them is noise here.
icechunk.set_logs_filter("warn,icechunk::storage::object_store=error")


class StoreBusyError(TimeoutError):
    """Another writer held the store's commit lock for longer than ``lock_timeout_s``."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run an async zarr/icechunk coroutine on zarr's own event-loop thread and wait for it."""
    return sync(coro)


def storage(path: Path) -> icechunk.Storage:
    return icechunk.local_filesystem_storage(str(path / REPO_DIR))


def repo_exists(path: Path) -> bool:
    return (path / REPO_DIR).is_dir() and icechunk.Repository.exists(storage(path))


MANIFEST_SPLIT_CHUNKS = 1024


def repo_config() -> icechunk.RepositoryConfig:
    """Split every array's chunk manifest along time, 1024 chunks per piece.

    Icechunk rewrites the manifest of each array a commit touches; unsplit, that manifest
    lists every chunk ever written, so commits would slow down as the store grows. Split,
    a commit rewrites only the piece(s) holding its new chunks.
    """
    splitting = icechunk.ManifestSplittingConfig.from_dict(
        {icechunk.ManifestSplitCondition.AnyArray(): {icechunk.ManifestSplitDimCondition.Axis(0): MANIFEST_SPLIT_CHUNKS}}
    )
    config = icechunk.RepositoryConfig.default()
    config.manifest = icechunk.ManifestConfig(splitting=splitting)
    config.caching = CACHE
    return config


# Icechunk keeps the snapshots, manifests and transaction logs it reads or writes in memory. With
# its default sizes a writer that commits for days grows without end: 2.1 GiB of anonymous memory
# after 3,200 one-episode commits (scripted in docs/store.md); with these bounds it stays at ~100
# MiB. A manifest piece holds at most MANIFEST_SPLIT_CHUNKS chunk refs per array.
CACHE = icechunk.CachingConfig(
    num_snapshot_nodes=10_000, num_chunk_refs=200_000, num_transaction_changes=10_000, num_bytes_attributes=4 << 20, num_bytes_chunks=16 << 20
)


def create_repo(path: Path) -> icechunk.Repository:
    path.mkdir(parents=True, exist_ok=True)
    repo = icechunk.Repository.create(storage(path), config=repo_config())
    repo.save_config()  # plain Icechunk readers of this store split manifests the same way
    return repo


def open_repo(path: Path) -> icechunk.Repository:
    return icechunk.Repository.open(storage(path), config=repo_config())


def compressors(name: str) -> list | None:
    """The zarr compressor list for a StoreConfig.compression name."""
    if name == "none":
        return None
    if name == "zstd":
        return [ZstdCodec(level=1)]
    if name == "lz4-bitshuffle":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")]
    raise ValueError(f"unknown compression {name!r}")


def open_root(session: icechunk.Session, mode: str = "r") -> zarr.Group:
    return zarr.open_group(store=session.store, mode=mode, zarr_format=3, use_consolidated=False)


# zarr_format=3 and no consolidated metadata: otherwise zarr also probes for Zarr v2 and
# consolidated-metadata keys on every open, and Icechunk answers "no such key" ever slower
# as the history grows.
async def open_group(store, path: str = "", mode: str = "r") -> zarr.AsyncGroup:
    return await za.open_group(store=store, path=path, mode=mode, zarr_format=3, use_consolidated=False)


async def open_array(store, path: str, mode: str = "r") -> zarr.AsyncArray:
    return await za.open_array(store=store, path=path, mode=mode, zarr_format=3)


class WriterLock:
    """Cross-process (flock) plus in-process (threading) exclusive commit lock for one store."""

    def __init__(self, path: Path, timeout_s: float):
        self.file = path / LOCK_FILE
        self.timeout_s = timeout_s
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if not self._thread_lock.acquire(timeout=self.timeout_s):
            raise StoreBusyError(f"another thread of this process kept the commit lock of {self.file.parent} for {self.timeout_s}s")
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._flock(fd)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        finally:
            self._thread_lock.release()

    def _flock(self, fd: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreBusyError(
                        f"another process held {self.file} for more than {self.timeout_s}s; "
                        "is a writer stuck? raise store.lock_timeout_s or stop that writer"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)


_libc = ctypes.CDLL(None, use_errno=True)


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the file system holding ``path`` to disk (Linux syncfs)."""
    syncfs = getattr(_libc, "syncfs", None)
    if syncfs is None:  # not Linux: flush everything
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({path}) failed: {os.strerror(err)}; acknowledged data may not be on disk")
    finally:
        os.close(fd)

