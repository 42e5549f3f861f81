"""EpisodeStore: open/create a store and append episodes in atomic, idempotent commits.

One :meth:`EpisodeStore.append` call is one Icechunk commit: every episode in it becomes
visible together, or (crash, error) none does. The writer holds the store's commit lock
for the whole transaction and re-reads the episode-id index of commits made by other
writers first, so several writers (server replicas, scenario generators) can append to
one store at once without losing or duplicating an episode.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import icechunk
import numpy as np
from zarr import AsyncArray
from zarr.core.metadata import ArrayV3Metadata
from zarr.storage import StorePath

from fleet.store import backend
from fleet.store.config import StoreConfig
from fleet.store.layout import (
    BRANCH,
    INDEX_ARRAYS,
    KEY_BYTES,
    ROOT_ATTR,
    STREAMS,
    StreamSignature,
    array_chunk_rows,
    check_root_attrs,
    data_path,
    episode_key,
    index_path,
    metadata_json,
    padded,
    record_json,
    root_attrs,
    split_keys,
    stack_rows,
    stream_path,
)
from fleet.store.reader import StoreSnapshot
from sim.episode import Episode, encode_safetensors

STATUSES = ("created", "duplicate", "conflict")
# Every write covers whole chunks of real data plus zero padding: skip zarr's per-chunk
# "is it all fill value?" comparison and store every chunk.
_ARRAY_CONFIG = {"write_empty_chunks": True}


def canonical_digest(episode: Episode) -> bytes:
    """sha256 of the episode's canonical safetensors bytes (what idempotency compares)."""
    return hashlib.sha256(encode_safetensors(episode.arrays(), episode.metadata)).digest()


@dataclasses.dataclass(frozen=True)
class AppendResult:
    """Outcome of one append: the store's tip afterwards and one status per input episode.

    status: "created" (stored by this call), "duplicate" (that episode_id is already stored
    with the same bytes; nothing written) or "conflict" (already stored with different bytes;
    nothing written).
    """

    snapshot_id: str
    statuses: tuple[str, ...]

    @property
    def created(self) -> int:
        return self.statuses.count("created")


@dataclasses.dataclass
class _Pending:
    episode: Episode
    digest: bytes
    upload_time: float


class EpisodeStore:
    """A Flywheel episode store on disk. Build with :meth:`create`, :meth:`open` or :meth:`open_or_create`."""

    def __init__(self, config: StoreConfig, repo: icechunk.Repository, info: dict):
        self.config = config
        self.path = Path(config.path)
        self.info = info  # root attrs: geometry this store was created with (authoritative)
        self._repo = repo
        self._lock = backend.WriterLock(self.path, config.lock_timeout_s)
        self._digests: dict[str, bytes] = {}  # episode_id -> digest of every committed episode
        self._slots_seen: dict[str, int] = {}  # stream -> index slots already read into _digests
        self._index_snapshot: str | None = None
        self._meta_cache: dict[str, ArrayV3Metadata] = {}  # array path -> metadata as of _meta_snapshot
        self._meta_snapshot: str | None = None
        self._written_meta: dict[str, ArrayV3Metadata] = {}
        self._writer_id = f"{socket.gethostname()}:{os.getpid()}"

    # -- explicit open modes -------------------------------------------------------------
    @classmethod
    def create(cls, config: StoreConfig) -> EpisodeStore:
        """Create a new, empty store at ``config.path``; fails if one is already there."""
        path = Path(config.path)
        if backend.repo_exists(path):
            raise FileExistsError(f"an episode store already exists at {path}; use EpisodeStore.open (or open_or_create)")
        repo = backend.create_repo(path)
        info = root_attrs(config.chunk_rows, config.index_rows, config.compression)
        session = repo.writable_session(BRANCH)
        root = backend.open_root(session, mode="w")
        root.attrs[ROOT_ATTR] = info
        root.create_group(STREAMS)
        session.commit("create flywheel episode store", metadata={"store_schema_version": info["store_schema_version"]})
        if config.fsync:
            backend.sync_filesystem(path)
        return cls(config, repo, info)

    @classmethod
    def open(cls, config: StoreConfig) -> EpisodeStore:
        """Open an existing store; fails if there is none or its schema version is not ours."""
        path = Path(config.path)
        if not backend.repo_exists(path):
            raise FileNotFoundError(f"no episode store at {path}; create it with EpisodeStore.create (or open_or_create)")
        repo = backend.open_repo(path)
        root = backend.open_root(repo.readonly_session(branch=BRANCH))
        return cls(config, repo, check_root_attrs(dict(root.attrs), str(path)))

    @classmethod
    def open_or_create(cls, config: StoreConfig) -> EpisodeStore:
        path = Path(config.path)
        if backend.repo_exists(path):
            return cls.open(config)
        try:
            return cls.create(config)
        except FileExistsError:  # another process created it between our check and create
            return cls.open(config)

    # -- reading -------------------------------------------------------------------------
    def latest_snapshot_id(self) -> str:
        return self._repo.lookup_branch(BRANCH)

    def snapshot(self, snapshot_id: str | None = None, base: StoreSnapshot | None = None) -> StoreSnapshot:
        """A read-only view pinned to ``snapshot_id`` (default: the current tip of the store).

        base: an earlier snapshot of this store with its catalog loaded; only what was
        committed since is read when the new catalog loads.
        """
        return StoreSnapshot(self._repo, snapshot_id or self.latest_snapshot_id(), self.info, base=base)

    def history(self, limit: int = 20) -> list[dict]:
        """The newest ``limit`` commits: snapshot_id, written_at (ISO), message, metadata."""
        out = []
        for snap in self._repo.ancestry(branch=BRANCH):
            out.append({"snapshot_id": snap.id, "written_at": snap.written_at.isoformat(), "message": snap.message, "metadata": snap.metadata})
            if len(out) >= limit:
                break
        return out

    @property
    def known_episodes(self) -> int:
        """Episodes in this writer's id index (all committed ones as of its last refresh or commit)."""
        return len(self._digests)

    def lookup(self, episode_id: str) -> bytes | None:
        """Digest of a committed episode known to this writer, else None (see :meth:`refresh_index`)."""
        return self._digests.get(episode_id)

    def refresh_index(self) -> int:
        """Read episode ids committed since the last refresh (by anyone); returns how many are known."""
        session = self._repo.readonly_session(branch=BRANCH)
        backend.run(self._refresh_index(session))
        return len(self._digests)

    # -- writing -------------------------------------------------------------------------
    def append(
        self,
        episodes: Sequence[Episode],
        *,
        digests: Sequence[bytes] | None = None,
        upload_times: Sequence[float] | None = None,
        message: str = "append episodes",
    ) -> AppendResult:
        """Store ``episodes`` in one atomic commit; idempotent by episode_id.

        digests: sha256 of each episode's canonical bytes, when the caller has them already.
        upload_times: per-episode receipt time (unix seconds); default now.
        Returns when the commit is durable (flushed to disk when ``config.fsync``).
        """
        now = time.time()
        items = [
            _Pending(ep, digests[i] if digests is not None else canonical_digest(ep), upload_times[i] if upload_times is not None else now)
            for i, ep in enumerate(episodes)
        ]
        with self._lock.hold():
            session = self._repo.writable_session(BRANCH)
            if session.snapshot_id != self._index_snapshot:
                backend.run(self._refresh_index(session))
            statuses, fresh = self._classify(items)
            if not fresh:
                return AppendResult(session.snapshot_id, tuple(statuses))
            self._written_meta = {}
            slots = backend.run(self._write(session, fresh))
            snapshot_id = session.commit(
                message, metadata={"episodes": len(fresh), "writer": self._writer_id, "store_schema_version": self.info["store_schema_version"]}
            )
            if self.config.fsync:
                backend.sync_filesystem(self.path)
            for item in fresh:
                self._digests[item.episode.episode_id] = item.digest
            self._slots_seen.update(slots)  # the index was current when this session began
            self._index_snapshot = snapshot_id
            self._meta_cache.update(self._written_meta)
            self._meta_snapshot = snapshot_id
            return AppendResult(snapshot_id, tuple(statuses))

    def _classify(self, items: list[_Pending]) -> tuple[list[str], list[_Pending]]:
        statuses, fresh, in_batch = [], [], {}
        for item in items:
            eid = item.episode.episode_id
            known = self._digests.get(eid, in_batch.get(eid))
            if known is None:
                in_batch[eid] = item.digest
                fresh.append(item)
                statuses.append("created")
            else:
                statuses.append("duplicate" if known == item.digest else "conflict")
        return statuses, fresh

    async def _refresh_index(self, session: icechunk.Session) -> None:
        """Add every committed episode this writer has not seen yet to ``_digests``."""
        streams_group = await backend.open_group(session.store, STREAMS, mode="r")
        names = [name async for name in streams_group.group_keys()]

        async def new_keys(stream: str) -> tuple[str, int, np.ndarray, np.ndarray]:
            span = await backend.open_array(store=session.store, path=index_path(stream, "span"), mode="r")
            start, stop = self._slots_seen.get(stream, 0), span.shape[0]
            if stop <= start:
                return stream, stop, np.zeros((0, 2), np.int64), np.zeros((0, KEY_BYTES), np.uint8)
            key = await backend.open_array(store=session.store, path=index_path(stream, "key"), mode="r")
            spans, keys = await asyncio.gather(span.getitem(slice(start, stop)), key.getitem(slice(start, stop)))
            return stream, stop, spans, keys

        for stream, stop, spans, keys in await asyncio.gather(*(new_keys(n) for n in names)):
            ids, digests = split_keys(keys[spans[:, 1] > 0])
            self._digests.update(zip(ids, digests))
            self._slots_seen[stream] = stop
        self._index_snapshot = session.snapshot_id

    async def _write(self, session: icechunk.Session, items: list[_Pending]) -> dict[str, int]:
        """Write ``items`` into their streams; returns each touched stream's new slot count."""
        by_stream: dict[str, tuple[StreamSignature, list[_Pending]]] = {}
        for item in items:
            sig = StreamSignature.of(item.episode)
            by_stream.setdefault(sig.name, (sig, []))[1].append(item)
        counts = await asyncio.gather(*(self._write_stream(session, sig, group) for sig, group in by_stream.values()))
        return dict(zip(by_stream, counts))

    async def _write_stream(self, session, sig: StreamSignature, items: list[_Pending]) -> int:
        arrays = await self._stream_arrays(session, sig)
        chunk_rows, index_rows = self.info["chunk_rows"], self.info["index_rows"]
        episodes = [item.episode for item in items]
        row0 = arrays[sig.arrays[0].name].shape[0]  # always a multiple of chunk_rows
        slot0 = arrays["index/span"].shape[0]  # always a multiple of index_rows
        rows = padded(sum(ep.num_steps + 1 for ep in episodes), chunk_rows)
        slots = padded(len(episodes), index_rows)
        blocks: dict[str, np.ndarray] = {spec.name: stack_rows(episodes, spec, rows) for spec in sig.arrays}
        span = np.zeros((slots, 2), np.int64)
        key = np.zeros((slots, KEY_BYTES), np.uint8)
        record = np.full(slots, "", dtype=object)
        meta = np.full(slots, "", dtype=object)
        row = row0
        for k, item in enumerate(items):
            ep = item.episode
            span[k] = (row, ep.num_steps)
            key[k] = episode_key(ep.episode_id, item.digest)
            record[k] = record_json(ep, item.upload_time)
            meta[k] = metadata_json(ep)
            row += ep.num_steps + 1
        blocks.update({"index/span": span, "index/key": key, "index/record": record, "index/metadata": meta})
        starts = {name: (slot0 if name.startswith("index/") else row0) for name in blocks}
        await asyncio.gather(
            *(arrays[name].resize((starts[name] + len(block), *block.shape[1:])) for name, block in blocks.items())
        )
        await asyncio.gather(
            *(arrays[name].setitem(slice(starts[name], starts[name] + len(block)), block) for name, block in blocks.items())
        )
        self._written_meta.update({arr.path: arr.metadata for arr in arrays.values()})
        return slot0 + slots

    async def _stream_arrays(self, session, sig: StreamSignature) -> dict:
        """Open (or create, for a new stream) every array of a stream, keyed by data name or index/NAME.

        Array metadata this writer wrote in its previous commit is reused when nobody else
        committed since (the session starts from that commit), saving a metadata read per array.
        """
        stream = sig.name
        store = session.store
        names = [spec.name for spec in sig.arrays]
        keys = [*names, *(f"index/{n}" for n in INDEX_ARRAYS)]
        paths = [*(data_path(stream, n) for n in names), *(index_path(stream, n) for n in INDEX_ARRAYS)]
        if self._meta_snapshot != session.snapshot_id:
            self._meta_cache.clear()
        if all(p in self._meta_cache for p in paths):
            opened = [AsyncArray(self._meta_cache[p], StorePath(store, p), config=_ARRAY_CONFIG) for p in paths]
            return dict(zip(keys, opened))
        root = await backend.open_group(store, mode="r+")
        if await root.contains(stream_path(stream)):
            opened = await asyncio.gather(*(backend.open_array(store, p, mode="r+") for p in paths))
            return dict(zip(keys, (a.with_config(_ARRAY_CONFIG) for a in opened)))
        group = await root.create_group(stream_path(stream), attributes={"signature": sig.to_dict()})
        comp = backend.compressors(self.info["compression"])
        chunk_rows, index_rows = self.info["chunk_rows"], self.info["index_rows"]

        def make(path: str, shape, chunks, dtype, fill):
            return group.create_array(path, shape=shape, chunks=chunks, dtype=dtype, compressors=comp, fill_value=fill, config=_ARRAY_CONFIG)

        index_specs = {
            "span": ((0, 2), (index_rows, 2), "int64", 0),
            "key": ((0, KEY_BYTES), (index_rows, KEY_BYTES), "uint8", 0),
            "record": ((0,), (index_rows,), str, ""),
            "metadata": ((0,), (index_rows,), str, ""),
        }
        created = await asyncio.gather(
            *(
                make(f"data/{s.name}", (0, *s.tail), (array_chunk_rows(s, chunk_rows), *(max(1, t) for t in s.tail)), s.dtype, 0)
                for s in sig.arrays
            ),
            *(make(f"index/{n}", *index_specs[n]) for n in INDEX_ARRAYS),
        )
        return dict(zip(keys, created))
