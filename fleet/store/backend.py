"""Icechunk/zarr plumbing shared by the writer and the reader: location, repository, lock, codecs, fsync.

A store lives on local disk (``StoreConfig.path`` a directory) or in S3-compatible object
storage (``s3://bucket/prefix``; endpoint, region and credentials from the environment, as
every AWS SDK reads them: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``).

Icechunk's local-filesystem storage does not make concurrent commits safe by itself (its
branch-ref update is not a compare-and-swap on a local disk; earth-mover/icechunk#804,
#1494), so every committing writer on disk holds :class:`WriterLock`, an ``flock`` on
``<store>/writer.lock``. Under the lock the commit is the only one in flight, so
Icechunk's out-of-date check is exact again. On object storage the branch update is a
conditional write (a compare-and-swap): writers on any number of hosts commit optimistically,
and the loser of a race gets ``icechunk.ConflictError`` and rebases its commit onto the winner's
(``EpisodeStore.append``; each writer has its own arrays, so the rebase finds no conflict).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import re
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

from fleet.store.layout import CATALOG, LOCK_FILE, REPO_DIR
from fleet.store.location import Location, StoreLocationError

T = TypeVar("T")

# The lock above makes local commits safe; Icechunk's generic warning about them is noise here,
# and so is its warning on a rebase that finds a conflict (the writer then redoes its transaction).
icechunk.set_logs_filter("warn,icechunk::storage::object_store=error,icechunk::session=error")


class StoreUnreachableError(ConnectionError):
    """The object storage of a store did not answer (no credentials, no endpoint, no such bucket); ``reason``: the
    cause Icechunk named."""

    reason = ""


def short_reason(exc: Exception) -> str:
    """The cause at the end of an Icechunk error's context chain (its last line: "connection refused",
    "NoSuchBucket", ...), not the hundreds of characters of Rust context before it."""
    if isinstance(exc, StoreUnreachableError) and exc.reason:
        return exc.reason
    for line in reversed(str(exc).strip().splitlines()):  # its last line may be only the context block's frame ("  | ")
        cause = line.strip().lstrip("`|->x ").strip()
        if cause:
            return cause[:300]
    return type(exc).__name__


def unreachable(location: Location, exc: Exception, opening: bool = True) -> StoreUnreachableError:
    """What to check when object storage refused to open the store at ``location`` (``exc``: Icechunk's error), or,
    with ``opening`` false, stopped answering a read or a commit of the open store."""
    reason = short_reason(exc)
    env = os.environ
    hint = (
        "check the bucket, AWS_ENDPOINT_URL (an S3-compatible server) and the credentials"
        if env.get("AWS_ACCESS_KEY_ID")
        else "no AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment: set them, and AWS_ENDPOINT_URL for an S3-compatible server (MinIO, Ceph, moto)"
    )
    what = f"cannot open the episode store at {location}" if opening else f"the episode store at {location} did not answer"
    error = StoreUnreachableError(f"{what} ({reason}); {hint} (docs/store.md)")
    error.reason = reason
    return error


UNANSWERED_MARKER = "object store"  # Icechunk's words for a request object storage did not answer ("error getting object from object store ...")


@contextlib.contextmanager
def answering(location: Location) -> Iterator[None]:
    """A read or a commit of the open store at ``location``: Icechunk's error saying object storage did not answer
    (an endpoint down, throttling past Icechunk's retries) becomes :class:`StoreUnreachableError`, what to check; one
    saying damage (:func:`damaged`: a writer's id index or commit reading a short manifest) :class:`StoreCorruptionError`,
    naming the file (a reader names the episode first, :meth:`fleet.store.reader.StoreSnapshot._checked`). Anything else
    keeps its type and traceback: a local disk's fault, a bug."""
    try:
        yield
    except icechunk.IcechunkError as exc:
        if damaged(exc):
            raise corrupted(location, damaged_part(exc), short_reason(exc)) from None
        if location.is_local or UNANSWERED_MARKER not in str(exc):
            raise
        raise unreachable(location, exc, opening=False) from exc


class UnknownSnapshotError(ValueError):
    """A snapshot id asked for is not in the store's history: mistyped, of another store, or expired by maintenance
    (older than ``keep_history_s`` and not pinned; docs/store.md, Maintenance). Not damage: nothing to restore."""


class StoreCorruptionError(RuntimeError):
    """The store's files are damaged: an episode no longer matches the digest recorded when it was committed, or a
    snapshot, manifest, ref or chunk it needs is missing, short or undecodable. Restore the store from backup; waiting or
    retrying does not help, and deleting the store deletes every episode it holds."""


# What a read says when the storage answered, but with something other than what Icechunk wrote: an object missing,
# shorter than its manifest records, or not decodable. That is damage, for good. Anything else (a timeout, a refused
# connection, throttling) may pass, and stays a "retry later".
DAMAGE_MARKERS = ("not found", "object was only", "incomplete frame", "decompression", "cannot serialize ref json", "deserializ")
# Where Icechunk's error context names the object it failed on, most precise first: (pattern, the file it names).
_DAMAGED_PARTS = (
    (r"Object at location (\S+) not found", "{}"),
    (r"manifest_id=(\w+)", "manifest icechunk/manifests/{}"),
    (r"snapshot_id=(\w+)", "snapshot icechunk/snapshots/{}"),
    (r'fetch_branch[\s|]+with name="([^"]+)"', "branch ref icechunk/refs/branch.{}/ref.json"),
    (r'key="([^"]+)"', "{}"),  # a chunk (chunks/<id>) or the zarr key whose chunk it is
)


def corrupted(location: Location, part: str, reason: str, what: str = "") -> StoreCorruptionError:
    """The error for damage found in the store at ``location``: ``part`` (:func:`damaged_part`) cannot be read for
    ``reason``; ``what`` says what could not be done for it."""
    return StoreCorruptionError(
        f"the episode store at {location} is damaged: {part} cannot be read ({reason}){what}; restore it from a backup of the "
        "store (docs/store.md, \"Damaged files\"). Do not delete the store: that deletes every episode it holds"
    )


def damaged(exc: BaseException) -> bool:
    """Whether ``exc`` (Icechunk's, or a codec's) says the store's files are damaged rather than the storage not answering."""
    return isinstance(exc, (icechunk.IcechunkError, RuntimeError, ValueError)) and any(m in str(exc) for m in DAMAGE_MARKERS)


def damaged_part(exc: BaseException) -> str:
    """The store file a failed read names in ``exc`` ("snapshot icechunk/snapshots/GTCJ...", a chunk's path), for the
    operator who restores it; "a store file" when the error names none."""
    for pattern, form in _DAMAGED_PARTS:
        if found := re.search(pattern, str(exc)):
            return form.format(found.group(1))
    return "a store file"


def unreadable(location: Location, exc: Exception) -> Exception:
    """What to raise when opening the store at ``location`` failed with Icechunk's ``exc``: damage names the file and says
    to restore it (never to delete the store); object storage that did not answer, what to check; else one line with the cause."""
    if damaged(exc):
        return corrupted(location, damaged_part(exc), short_reason(exc))
    if not location.is_local:
        return unreachable(location, exc)
    return StoreLocationError(f"cannot open the episode store at {location}: {damaged_part(exc)} ({short_reason(exc)})")


class StoreBusyError(TimeoutError):
    """Another writer held the store's commit lock for longer than ``lock_timeout_s``."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run an async zarr/icechunk coroutine on zarr's own event-loop thread and wait for it."""
    return sync(coro)


def s3_options() -> dict:
    """Icechunk's S3 settings from the standard AWS environment variables. An endpoint (an
    S3-compatible server: MinIO, Ceph, moto) gets path-style addressing, and plain HTTP when its
    URL says http://."""
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    options: dict = {"region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"}
    if endpoint:
        options |= {"endpoint_url": endpoint, "allow_http": endpoint.startswith("http://"), "force_path_style": True}
    if env.get("AWS_ACCESS_KEY_ID"):
        options |= {"access_key_id": env["AWS_ACCESS_KEY_ID"], "secret_access_key": env.get("AWS_SECRET_ACCESS_KEY"), "session_token": env.get("AWS_SESSION_TOKEN")}
    else:
        options["from_env"] = True  # instance profiles, web identity, ...
    return options


def storage(where: Location | Path | str) -> icechunk.Storage:
    location = Location.of(where)
    if location.is_local:
        return icechunk.local_filesystem_storage(str(location.path / REPO_DIR))
    return icechunk.s3_storage(bucket=location.bucket, prefix="/".join(p for p in (location.prefix, REPO_DIR) if p), **s3_options())


def repo_exists(where: Location | Path | str) -> bool:
    location = Location.of(where)
    if location.is_local and not (location.path / REPO_DIR).is_dir():
        return False
    try:
        return icechunk.Repository.exists(storage(location))
    except icechunk.IcechunkError as exc:  # a ref that cannot be read (damaged, or storage that does not answer)
        raise unreadable(location, exc) from None


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


def create_repo(where: Location | Path | str) -> icechunk.Repository:
    location = Location.of(where)
    if location.is_local:
        location.path.mkdir(parents=True, exist_ok=True)
    repo = icechunk.Repository.create(storage(location), config=repo_config())
    repo.save_config()  # plain Icechunk readers of this store split manifests the same way
    return repo


def open_repo(where: Location | Path | str) -> icechunk.Repository:
    return icechunk.Repository.open(storage(where), config=repo_config())


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


async def first_damage(store) -> tuple[str, str] | None:
    """Where and why (:func:`damaged_part`, :func:`short_reason`) the first error that says damage (:func:`damaged`) was
    met listing every array under ``store`` (an Icechunk session's store) and its chunks: a listing reads every manifest
    piece. None when every manifest reads. (Not the error itself: zarr's sync raises an exception a coroutine returns.)"""
    try:
        root = await open_group(store)
        async for _, member in root.members(max_depth=None):
            if isinstance(member, zarr.AsyncArray):
                await member.nchunks_initialized()
    except Exception as exc:  # noqa: BLE001 - kept only where it says damage
        if damaged(exc):
            return damaged_part(exc), short_reason(exc)
        raise
    return None


# zarr_format=3 and no consolidated metadata: otherwise zarr also probes for Zarr v2 and
# consolidated-metadata keys on every open, and Icechunk answers "no such key" ever slower
# as the history grows.
async def open_group(store, path: str = "", mode: str = "r") -> zarr.AsyncGroup:
    return await za.open_group(store=store, path=path, mode=mode, zarr_format=3, use_consolidated=False)


async def open_array(store, path: str, mode: str = "r") -> zarr.AsyncArray:
    return await za.open_array(store=store, path=path, mode=mode, zarr_format=3)


async def catalog_partitions(store, schema_version: int) -> list[str | None]:
    """The writers whose catalog partitions a snapshot holds, sorted (schema 2: ``[None]``, its flat
    catalog; layout.partition_path names each group)."""
    if schema_version == 2:
        return [None]
    group = await open_group(store, CATALOG, mode="r")
    return sorted([name async for name in group.group_keys()])


class WriterLock:
    """Cross-process (flock) plus in-process (threading) exclusive commit lock for one store; on
    object storage (``path`` None) the in-process part only: commits there are compare-and-swap."""

    def __init__(self, path: Path | None, timeout_s: float):
        self.file = None if path is None else path / LOCK_FILE
        self.timeout_s = timeout_s
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if not self._thread_lock.acquire(timeout=self.timeout_s):
            raise StoreBusyError(f"another thread of this process kept the commit lock of {self.file.parent if self.file else 'this store'} for {self.timeout_s}s")
        try:
            if self.file is None:
                yield
                return
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

