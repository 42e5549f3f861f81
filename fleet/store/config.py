"""Store configuration (a Hydra ``_target_``): where the store lives and how it writes."""

from __future__ import annotations

import dataclasses
import re

from fleet.store.location import Location

COMPRESSIONS = ("lz4-bitshuffle", "zstd", "none")
WRITER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_HISTORY_S = 10 * 365 * 86400.0  # beyond, a maintenance cutoff leaves the calendar (OverflowError)


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Episode store settings.

    path: store directory (holds ``icechunk/`` and ``writer.lock``), or ``s3://bucket/prefix`` for
        S3-compatible object storage (endpoint, region and credentials from the standard AWS_*
        environment variables; fleet/store/backend.py, docs/store.md).
    chunk_rows: time rows per data chunk; every commit starts a new chunk (docs/store.md).
    index_rows: episode slots per index chunk; every commit starts a new index chunk.
    compression: codec for data and index chunks: "lz4-bitshuffle" (Blosc), "zstd" or "none".
    fsync: after each commit, flush the store's file system (syncfs) before returning, so an
        acknowledged episode survives power loss, not only a process crash (on object storage a
        commit is durable once the storage acknowledged it).
    lock_timeout_s: how long a writer waits for another writer's commit before giving up.
    writer_id: this writer's name in the store (letters, digits, ``_``, ``-``; at most 64): it appends
        only to its own catalog partition and streams, so writers on object storage never touch
        the same arrays and a lost commit race is rebased, not redone (docs/store.md). Give every
        long-lived replica its own stable id (e.g. its pod or host name). "" (default): "local" on
        local disk (writers there take turns under the commit lock), a new id per opened store on
        object storage (``<host>-<pid>-<random>``, recorded in the partition and in each commit).
    keep_history_s: maintenance (``EpisodeStore.maintain``; a server runs it every
        ``ServerConfig.maintenance_every_s``) expires the branch's snapshots older than this; pinned
        snapshots (``EpisodeStore.pin``) stay readable whatever their age (docs/store.md, Maintenance).
    gc_grace_s: maintenance never deletes an object written less than this long ago (a commit in flight
        has written its chunks but not moved the branch yet): more than ``lock_timeout_s``; a commit whose
        chunks are older than half of it writes them again before it commits.
    """

    path: str
    chunk_rows: int = 16384
    index_rows: int = 64
    compression: str = "lz4-bitshuffle"
    fsync: bool = True
    lock_timeout_s: float = 60.0
    writer_id: str = ""
    keep_history_s: float = 3600.0
    gc_grace_s: float = 900.0

    def __post_init__(self):
        if not str(self.path):
            raise ValueError("StoreConfig.path must name a directory or s3://bucket/prefix")
        Location.parse(str(self.path))  # a local directory or s3://bucket/prefix (endpoint and credentials from AWS_* variables)
        if self.chunk_rows < 1 or self.index_rows < 1:
            raise ValueError(f"chunk_rows and index_rows must be >= 1, got {self.chunk_rows}, {self.index_rows}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression {self.compression!r} is not one of {COMPRESSIONS}")
        if self.lock_timeout_s <= 0:
            raise ValueError(f"lock_timeout_s must be > 0, got {self.lock_timeout_s}")
        if not 0 < self.keep_history_s <= MAX_HISTORY_S or not 0 < self.gc_grace_s <= MAX_HISTORY_S:  # also refuses NaN and inf
            raise ValueError(f"keep_history_s and gc_grace_s must be > 0 and at most {MAX_HISTORY_S:.0f} s (ten years), got {self.keep_history_s}, {self.gc_grace_s}")
        if not self.gc_grace_s > self.lock_timeout_s:  # also refuses NaN
            raise ValueError(
                f"gc_grace_s ({self.gc_grace_s}) must be more than lock_timeout_s ({self.lock_timeout_s}): maintenance must never "
                "delete the chunks of a commit still in flight"
            )
        if self.writer_id and not WRITER_ID.fullmatch(self.writer_id):
            raise ValueError(f"writer_id {self.writer_id!r}: use 1 to 64 letters, digits, '_' or '-' (or \"\" for a generated one)")
