"""EpisodeStore: open/create a store and append episodes in atomic, idempotent commits.

One :meth:`EpisodeStore.append` call is one Icechunk commit: every episode in it becomes
visible together, or (crash, error) none does. The writer re-reads the episode-id index of
commits made by other writers first, and writes only its own catalog partition and streams
(``StoreConfig.writer_id``), so several writers (server replicas, scenario generators) can
append to one store at once without losing or duplicating an episode: on local disk they take
turns under the store's commit lock; on object storage a commit that lost a race is rebased
onto the winner's and committed again (docs/store.md, "Commit protocol").
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Sequence

import icechunk
import numpy as np
from zarr import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.codec_pipeline import fill_value_or_default
from zarr.core.metadata import ArrayV3Metadata
from zarr.errors import GroupNotFoundError
from zarr.storage import StorePath

from fleet.store import backend, legacy, maintenance
from fleet.store.catalog import COLUMNS, columns, fill_value, record_of, zarr_dtype
from fleet.store.config import StoreConfig
from fleet.store.index import IdIndex
from fleet.store.layout import (
    BRANCH,
    CATALOG,
    EPISODE_DIM,
    EPISODE_INDEX,
    MIGRATED_WRITER,
    ROOT_ATTR,
    STEP_DIM,
    STORE_SCHEMA_VERSION,
    STREAMS,
    StreamSignature,
    array_chunk_rows,
    catalog_path,
    check_root_attrs,
    data_path,
    default_writer_id,
    dimension_names,
    episode_index_rows,
    padded,
    padding_value,
    partition_path,
    root_attrs,
    stack_frames,
    stack_rows,
    stream_name,
    stream_path,
)
from fleet.store.location import Location, StoreLocationError
from fleet.store.reader import StoreSnapshot
from fleet.store.withdrawal import WITHDRAWALS_ATTR, Withdrawal, rules_of
from sim.episode import Episode, encode_safetensors

STATUSES = ("created", "duplicate", "conflict")
# Every write covers whole chunks of real data plus zero padding: skip zarr's per-chunk
# "is it all fill value?" comparison and store every chunk.
_ARRAY_CONFIG = {"write_empty_chunks": True}


_INLINE_ENCODE_BYTES = 1 << 16  # blocks up to this size are encoded on the event loop (catalog rows), larger ones on zarr's threads


def _encodes_inline(pipeline) -> bool:
    """Whether ``pipeline`` is zarr's batched pipeline of codecs that all encode synchronously."""
    codecs = (*getattr(pipeline, "array_array_codecs", (None,)), getattr(pipeline, "array_bytes_codec", None), *getattr(pipeline, "bytes_bytes_codecs", (None,)))
    return all(hasattr(c, "_encode_sync") and hasattr(c, "resolve_metadata") for c in codecs)


def _encode_inline(pipeline, chunks: list) -> list:
    """``pipeline.encode(chunks)``'s result, computed here by the same codecs' synchronous halves, in
    the same order (zarr's BatchedCodecPipeline.encode_batch): for a small chunk, zarr's hop to a
    worker thread per codec costs ten times the encoding. None-free input, so None-free output."""
    out = []
    for chunk, spec in chunks:
        for codec in pipeline.array_array_codecs:
            chunk = codec._encode_sync(chunk, spec)
            spec = codec.resolve_metadata(spec)
        data = pipeline.array_bytes_codec._encode_sync(chunk, spec)
        spec = pipeline.array_bytes_codec.resolve_metadata(spec)
        for codec in pipeline.bytes_bytes_codecs:
            data = codec._encode_sync(data, spec)
            spec = codec.resolve_metadata(spec)
        out.append(data)
    return out


def _block_rows(arr: AsyncArray, used: int, chunk_rows: int) -> int:
    """Rows of a commit's block for ``arr`` holding ``used`` rows of data: whole chunks of the array's own, up to the
    ``chunk_rows`` boundary the array grows to (the chunks past them hold only padding and are not written)."""
    grid = arr.metadata.chunk_grid
    rows = grid.chunk_shape[0] if isinstance(grid, RegularChunkGrid) else chunk_rows
    return min(padded(used, rows), padded(used, chunk_rows))


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


@dataclasses.dataclass
class _Written:
    """What one transaction wrote to its writer's catalog partition: rows [first, first + count)."""

    seq: AsyncArray  # the partition's ``seq`` column, as this session wrote it
    first: int
    count: int

    async def renumber(self, total: int) -> None:
        """Number the rows from ``total``, the catalog's row count in the snapshot now under them (after a rebase)."""
        await self.seq.setitem(slice(self.first, self.first + self.count), np.arange(total, total + self.count, dtype=np.int64))


class _Redo(Exception):
    """The transaction cannot be rebased (another writer stored one of its episode ids meanwhile,
    or wrote this writer's arrays): redo it on the new tip."""


def _initialise(repo: icechunk.Repository, config: StoreConfig) -> dict:
    """A new repository's first commit: the root group with the store's geometry, its streams group and catalog."""
    info = root_attrs(config.chunk_rows, config.index_rows, config.compression)
    session = repo.writable_session(BRANCH)
    root = backend.open_root(session, mode="w")
    root.attrs[ROOT_ATTR] = info
    root.create_group(STREAMS)
    backend.run(_create_catalog(session.store, info))  # partitions come with each writer's first commit
    session.commit("create flywheel episode store", metadata={"store_schema_version": info["store_schema_version"]})
    return info


CREATING_POLL_S = 0.2  # how often open() looks again at a store another process is creating


def _created_root(repo: icechunk.Repository, path: Location, timeout_s: float):
    """The store's root group. A repository whose first commit has not landed yet is a store another process is
    creating (replicas started together on a new bucket): waited for, up to ``timeout_s`` (it failed with zarr's
    "No group found in store"). zarr says the same when the newest snapshot cannot be read (a torn write, a bad
    sector): a branch with more than Icechunk's initial commit is never waited for, and an unreadable one is damage."""
    deadline, landed = time.monotonic() + timeout_s, False
    while True:
        try:
            return backend.open_root(repo.readonly_session(branch=BRANCH))
        except icechunk.IcechunkError as exc:
            raise backend.unreadable(path, exc) from None
        except GroupNotFoundError:
            try:
                _check_being_created(repo, path)
            except StoreLocationError:
                if landed:
                    raise
                landed = True  # the creation's commit may have landed between the read and the history: read once more
                continue
            if time.monotonic() > deadline:
                raise StoreLocationError(
                    f"{path} holds an Icechunk repository but no episode store: its creation never finished (the process creating it "
                    f"died?) after {timeout_s:g} s; remove it and start again, or point fleet.store.path elsewhere"
                ) from None
            time.sleep(CREATING_POLL_S)


def _check_being_created(repo: icechunk.Repository, path: Location) -> None:
    """Passes only if branch main holds nothing but Icechunk's initial commit (a store whose creation has not landed):
    every snapshot is read (the damaged one named, to restore), and a branch with commits of its own is never
    called unfinished (removing it, as that message says, would delete what it holds)."""
    try:
        history = list(repo.ancestry(branch=BRANCH))
    except icechunk.IcechunkError as exc:
        raise backend.unreadable(path, exc) from None
    if len(history) > 1:
        raise StoreLocationError(
            f"{path} holds an Icechunk repository with {len(history)} commits on branch {BRANCH}, but its newest snapshot "
            f"{history[0].id} has no episode store root: it is not a Flywheel store, or that snapshot is damaged (restore the "
            "store from backup); do not delete it before you know which"
        )


# What Icechunk's commit says when a manifest it builds on cannot be read, and nothing more (the case _damaged_below reads for)
OPAQUE_COMMIT_FAILURE = "failed to create manifest"


class EpisodeStore:
    """A Flywheel episode store on disk. Build with :meth:`create`, :meth:`open` or :meth:`open_or_create`."""

    created_here = False  # open_or_create made it (a new, empty store)

    def __init__(self, config: StoreConfig, repo: icechunk.Repository, info: dict):
        self.config = config
        self.location = Location.parse(config.path)
        self.path = self.location.path  # None on object storage
        self.info = info  # root attrs: geometry this store was created with (authoritative)
        self._repo = repo
        self._lock = backend.WriterLock(self.path, config.lock_timeout_s)
        self._index = IdIndex()  # every committed episode id, as of the snapshot it names
        self._meta_cache: dict[str, ArrayV3Metadata] = {}  # array path -> metadata as of _meta_snapshot
        self._meta_snapshot: str | None = None
        self._written_meta: dict[str, ArrayV3Metadata] = {}
        # array path -> (first row of its last, partial chunk, the rows it holds) as this writer's
        # last commit (snapshot _tails_snapshot) left them: a later append to that chunk re-encodes
        # it without reading it back. Only catalog columns end mid-chunk (data commits are padded).
        self._tails: dict[str, tuple[int, np.ndarray]] = {}
        self._tails_snapshot: str | None = None
        self._written_tails: dict[str, tuple[int, np.ndarray]] = {}
        self.writer_id = config.writer_id or default_writer_id(self.location.is_local)  # its catalog partition and streams
        self.commit_rebases = 0  # commits that lost a race and were rebased onto the winner's (object storage)
        self.commit_retries = 0  # transactions redone on the new tip: a rebase was impossible (object storage)

    # -- explicit open modes -------------------------------------------------------------
    @classmethod
    def create(cls, config: StoreConfig) -> EpisodeStore:
        """Create a new, empty store at ``config.path``; fails if one is already there."""
        path = Location.parse(config.path)
        if backend.repo_exists(path):
            raise FileExistsError(f"an episode store already exists at {path}; use EpisodeStore.open (or open_or_create)")
        try:
            repo = backend.create_repo(path)
        except icechunk.IcechunkError as exc:
            if not path.is_local and backend.repo_exists(path):  # another process created it first
                raise FileExistsError(f"an episode store already exists at {path}; use EpisodeStore.open (or open_or_create)") from None
            raise StoreLocationError(f"cannot create an episode store at {path}: {exc}") from None
        store = cls(config, repo, _initialise(repo, config))
        store._sync()
        return store

    @classmethod
    def open(cls, config: StoreConfig) -> EpisodeStore:
        """Open an existing store; fails if there is none or its schema version is not ours."""
        path = Location.parse(config.path)
        if not backend.repo_exists(path):
            raise FileNotFoundError(f"no episode store at {path}; create it with EpisodeStore.create (or open_or_create)")
        try:
            repo = backend.open_repo(path)
        except icechunk.IcechunkError as exc:  # its config or a ref cannot be read
            raise backend.unreadable(path, exc) from None
        root = _created_root(repo, path, config.lock_timeout_s)
        store = cls(config, repo, check_root_attrs(dict(root.attrs), str(path)))
        if store.info["store_schema_version"] != STORE_SCHEMA_VERSION:
            store._migrate()
        return store

    @classmethod
    def open_or_create(cls, config: StoreConfig) -> EpisodeStore:
        if backend.repo_exists(Location.parse(config.path)):
            return cls.open(config)
        try:
            store = cls.create(config)
        except FileExistsError:  # another process created it between our check and create
            return cls.open(config)
        store.created_here = True
        return store

    def _migrate(self) -> None:
        """Bring a schema-1 or schema-2 store to schema 3 in one commit (docs/store.md, "Older schemas")."""
        deadline = time.monotonic() + self.config.lock_timeout_s
        with self._lock.hold():
            while True:
                session = self._repo.writable_session(BRANCH)
                info = check_root_attrs(dict(backend.open_root(session).attrs), str(self.location))
                old = info["store_schema_version"]
                if old != STORE_SCHEMA_VERSION:  # else another process migrated it meanwhile
                    step = legacy.migrate if old == 1 else legacy.migrate_catalog
                    info = backend.run(step(session, info, lambda: _create_catalog(session.store, info, MIGRATED_WRITER)))
                    try:
                        session.commit(f"migrate store schema {old} -> {STORE_SCHEMA_VERSION}", metadata={"store_schema_version": STORE_SCHEMA_VERSION})
                    except icechunk.ConflictError:
                        if self.location.is_local:
                            raise
                        self._check_deadline(deadline)
                        continue  # another writer committed first: look at the store again
                    self._sync()
                self.info = info
                return

    # -- reading -------------------------------------------------------------------------
    def latest_snapshot_id(self) -> str:
        with backend.answering(self.location):
            return self._repo.lookup_branch(BRANCH)

    def snapshot(self, snapshot_id: str | None = None, base: StoreSnapshot | None = None) -> StoreSnapshot:
        """A read-only view pinned to ``snapshot_id`` (default: the current tip of the store).

        base: an earlier snapshot of this store with its catalog loaded; only what was
        committed since is read when the new catalog loads.
        """
        asked = snapshot_id
        snapshot_id = snapshot_id or self.latest_snapshot_id()
        with backend.answering(self.location):
            if asked:
                try:
                    self._repo.lookup_snapshot(asked)  # its file, not yet what it refers to
                except icechunk.IcechunkError as exc:
                    if "not found" in str(exc) or "invalid snapshot id" in str(exc):
                        self._unknown(asked)
                    raise
            try:
                return StoreSnapshot(self._repo, snapshot_id, self.info, base=base, location=self.location)
            except icechunk.IcechunkError as exc:
                if asked and "snapshot not found" in str(exc):  # expired since this process looked it up (its id cached)
                    self._unknown(asked)
                raise

    def _unknown(self, snapshot_id: str) -> None:
        """UnknownSnapshotError for a snapshot id asked for that is not in the store (read as "damaged, restore from backup")."""
        raise backend.UnknownSnapshotError(
            f"snapshot {snapshot_id!r} is not in the episode store at {self.location}: a mistyped id, another store's, or one "
            "maintenance expired (a snapshot goes the maintaining server's keep_history_s after a newer one replaced it, unless "
            "pinned; docs/store.md, Maintenance). Pin a snapshot you will read later: EpisodeStore.pin or `flywheel store pin`"
        ) from None

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
        return len(self._index.digests)

    def lookup(self, episode_id: str) -> bytes | None:
        """Digest of a committed episode known to this writer, else None (see :meth:`refresh_index`)."""
        return self._index.digests.get(episode_id)

    def refresh_index(self) -> int:
        """Read episode ids committed since the last refresh (by anyone); returns how many are known."""
        with backend.answering(self.location):
            session = self._repo.readonly_session(branch=BRANCH)
            backend.run(self._index.refresh(session.store, session.snapshot_id))
        return len(self._index.digests)

    # -- keeping its size bounded (fleet/store/maintenance.py) ---------------------------------
    def pin(self, snapshot_id: str, name: str) -> None:
        """Keep ``snapshot_id`` readable through every maintenance, as pin ``name``."""
        maintenance.pin(self._repo, self.location, snapshot_id, name)

    def unpin(self, name: str) -> None:
        """Let maintenance expire what pin ``name`` kept."""
        maintenance.unpin(self._repo, self.location, name)

    def pins(self) -> dict[str, str]:
        """Pin name -> snapshot id."""
        return maintenance.pins(self._repo, self.location)

    def pin_names(self) -> list[str]:
        """The pins' names (one listing; a loop keeps a pin an iteration)."""
        return maintenance.pin_names(self._repo, self.location)

    def maintain(self) -> maintenance.MaintenanceReport:
        """Expire the history older than ``config.keep_history_s`` and delete what nothing reaches any more."""
        return maintenance.maintain(self.location, self.config.keep_history_s, self.config.gc_grace_s)

    # -- withdrawing episodes (docs/store.md, "Withdrawing episodes") ---------------------------
    def withdrawals(self) -> list[Withdrawal]:
        """The withdrawal rules in force at the store's tip, oldest first."""
        return self.snapshot().withdrawals()

    def withdraw(
        self, reason: str, *, robot_id: str | None = None, episode_ids: Sequence[str] = (), since: float | None = None, until: float | None = None,
        force: bool = False,
    ) -> tuple[Withdrawal, int]:  # fmt: skip
        """Withdraw ``robot_id``'s episodes uploaded in [``since``, ``until``) (either open), or ``episode_ids``, from
        training: every snapshot from the commit this makes on leaves them out of :meth:`StoreSnapshot.episodes`, and
        the scenario and world-model episodes made from that robot's data with them; the store keeps them (an audit reads
        them with ``include_withdrawn=True``). Returns the rule and how many episodes the tip's catalog holds that it
        names. Refused (LookupError) for a robot with no episode in the store, or episode ids it does not hold, and
        (ValueError) for a rule that names no episode now, unless ``force`` (a robot withdrawn before it uploads)."""
        rule = Withdrawal.new(reason, robot_id, episode_ids, since, until)
        tip = self.snapshot()
        named = sum(rule.covers(e) for e in tip.catalog())
        if not force:
            if robot_id is not None and not any(e.robot_id == robot_id for e in tip.catalog()):
                raise LookupError(f"no episode of robot {robot_id!r} in the store at {self.location}: check the id (GET /v1/episodes lists them), or pass --force (force=True) to withdraw a robot before it uploads")
            missing = [e for e in rule.episode_ids if e not in tip]
            if missing:
                raise LookupError(f"{len(missing)} of the episode ids are not in the store at {self.location} (the first {missing[0]}): check them, or pass --force (force=True)")
            if not named:
                raise ValueError(f"robot {robot_id!r} uploaded no episode in that window: check --since/--until (upload times, the server's clock), or pass --force (force=True) for a rule that covers later uploads")
        self._edit_withdrawals(lambda rules: [*rules, rule], f"withdraw episodes: {rule.id}: {reason}")
        return rule, named

    def restore(self, rule_id: str) -> Withdrawal:
        """Lift withdrawal rule ``rule_id``: the episodes it withdrew (and those derived from them) train again from the next
        snapshot on (LookupError: no such rule). Returns the rule lifted."""
        lifted = []

        def edit(rules: list[Withdrawal]) -> list[Withdrawal]:
            lifted[:] = [r for r in rules if r.id == rule_id]
            if not lifted:
                raise LookupError(f"no withdrawal rule {rule_id!r} in the store at {self.location} (`flywheel store withdrawals` lists them)")
            return [r for r in rules if r.id != rule_id]

        self._edit_withdrawals(edit, f"restore episodes: lift {rule_id}")
        return lifted[0]

    def _edit_withdrawals(self, edit, message: str) -> str:
        """Commit ``edit(rules)`` as the store's withdrawal rules (the root group's attribute), under the commit lock on
        local disk; on object storage a commit that lost a race is redone on the new tip (``edit`` sees its rules), until
        ``config.lock_timeout_s``. Returns the new snapshot id."""
        deadline = time.monotonic() + self.config.lock_timeout_s
        with self._lock.hold(), backend.answering(self.location):
            while True:
                session = self._repo.writable_session(BRANCH)
                root = backend.open_root(session, mode="r+")
                rules = edit(rules_of(root.attrs))
                root.attrs[WITHDRAWALS_ATTR] = [r.to_dict() for r in rules]
                try:
                    snapshot_id = self._commit(session, message, {"withdrawals": len(rules), "writer": self.writer_id, "store_schema_version": self.info["store_schema_version"]})
                except icechunk.ConflictError:
                    if self.location.is_local:
                        raise
                    self._check_deadline(deadline)
                    self.commit_retries += 1
                    continue
                self._sync()
                return snapshot_id

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
        Returns when the commit is durable (flushed to disk when ``config.fsync``; on object
        storage, when the storage acknowledged every object and the branch update).

        On object storage another writer (another host) may commit first; this commit then
        fails Icechunk's compare-and-swap, is rebased onto the new tip (the writers' arrays are
        disjoint, so nothing conflicts) and committed again, once the rows committed meanwhile are
        read: if another writer stored one of these episode ids meanwhile, the whole transaction
        is redone on the new tip instead, where that episode is a duplicate (or a conflict). Both
        go on until ``config.lock_timeout_s`` (``commit_rebases``, ``commit_retries`` count them).
        """
        now = time.time()
        items = [
            _Pending(ep, digests[i] if digests is not None else canonical_digest(ep), upload_times[i] if upload_times is not None else now)
            for i, ep in enumerate(episodes)
        ]
        deadline = time.monotonic() + self.config.lock_timeout_s
        with self._lock.hold(), backend.answering(self.location):
            while True:
                try:
                    return self._append_once(items, message, deadline)
                except _Redo:
                    self.commit_retries += 1

    def _check_deadline(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise backend.StoreBusyError(f"other writers kept committing to {self.location} for {self.config.lock_timeout_s}s; raise store.lock_timeout_s")

    def _sync(self) -> None:
        if self.config.fsync and self.location.is_local:
            backend.sync_filesystem(self.path)

    def _append_once(self, items: list[_Pending], message: str, deadline: float) -> AppendResult:
        session = self._repo.writable_session(BRANCH)
        if session.snapshot_id != self._index.snapshot_id:
            backend.run(self._index.refresh(session.store, session.snapshot_id))
        statuses, fresh = self._classify(items)
        if not fresh:
            return AppendResult(session.snapshot_id, tuple(statuses))
        self._written_meta, self._written_tails = {}, {}
        tails = self._tails if self._tails_snapshot == session.snapshot_id else {}  # nobody committed since this writer did
        written_at = time.monotonic()  # its chunks are written from here on
        written = backend.run(self._write(session, fresh, self._index.total, tails))
        metadata = {"episodes": len(fresh), "writer": self.writer_id, "store_schema_version": self.info["store_schema_version"]}
        rebased = False
        while True:
            if time.monotonic() - written_at > self.config.gc_grace_s / 2:  # maintenance may take chunks this old for garbage
                self._check_deadline(deadline)
                raise _Redo  # written again, in a fresh session: never committed over chunks that may be gone
            try:
                snapshot_id = self._commit(session, message, metadata)
                break
            except icechunk.ConflictError:
                if self.location.is_local:  # on disk the lock rules races out: a conflict is a bug, not a race
                    raise
                self._check_deadline(deadline)
                self._rebase(session, fresh, written)
                rebased = True  # renumbered seq rows: the tails written above are stale
            except icechunk.IcechunkError as exc:
                damage = self._damaged_below(session.snapshot_id, exc)
                if damage is None:
                    raise
                raise damage from None
        self._tails = {} if rebased else {**tails, **self._written_tails}
        self._tails_snapshot = snapshot_id
        self._sync()
        pairs = [(item.episode.episode_id, item.digest) for item in fresh]
        self._index.committed(self.writer_id, pairs, written.first + written.count, snapshot_id)
        self._meta_cache.update(self._written_meta)
        self._meta_snapshot = snapshot_id
        return AppendResult(snapshot_id, tuple(statuses))

    def _damaged_below(self, snapshot_id: str, exc: icechunk.IcechunkError) -> backend.StoreCorruptionError | None:
        """The damage a failed commit stands on, if any. Icechunk's commit says only "failed to create manifest from chunk
        stream" when a manifest it builds on is short or undecodable (it answered uploads "did not answer; retry later",
        for good): the snapshot it started from is read, every array's manifests, and a damaged one named. Any other failure:
        None (one that says what it is, damage or storage that did not answer, backend.answering maps)."""
        text = str(exc)
        if OPAQUE_COMMIT_FAILURE not in text or backend.UNANSWERED_MARKER in text or backend.damaged(exc):
            return None
        found = backend.run(backend.first_damage(self._repo.readonly_session(snapshot_id=snapshot_id).store))
        return None if found is None else backend.corrupted(self.location, *found, f", so no commit can build on snapshot {snapshot_id}")

    def _commit(self, session: icechunk.Session, message: str, metadata: dict) -> str:
        """Icechunk's commit (the branch's compare-and-swap on object storage); tests that need a
        race at this exact point let another writer commit first here."""
        return session.commit(message, metadata=metadata)

    def _rebase(self, session: icechunk.Session, fresh: list[_Pending], written: _Written) -> None:
        """Move a transaction that lost a commit race onto the new tip, or raise :class:`_Redo`.

        Nothing conflicts unless another store handle shares this writer id. The rows committed
        meanwhile are read from the new tip itself (not from this session, which holds ours too).
        """
        try:
            session.rebase(icechunk.ConflictDetector())
        except icechunk.RebaseFailedError:
            raise _Redo from None
        tip = self._repo.readonly_session(snapshot_id=session.snapshot_id)
        backend.run(self._index.refresh(tip.store, tip.snapshot_id))
        if any(item.episode.episode_id in self._index.digests for item in fresh):
            raise _Redo  # another writer stored one of these ids meanwhile: it is a duplicate or a conflict now
        backend.run(written.renumber(self._index.total))
        self.commit_rebases += 1

    def _classify(self, items: list[_Pending]) -> tuple[list[str], list[_Pending]]:
        statuses, fresh, in_batch = [], [], {}
        for item in items:
            eid = item.episode.episode_id
            known = self._index.digests.get(eid, in_batch.get(eid))
            if known is None:
                in_batch[eid] = item.digest
                fresh.append(item)
                statuses.append("created")
            else:
                statuses.append("duplicate" if known == item.digest else "conflict")
        return statuses, fresh

    async def _write(self, session: icechunk.Session, items: list[_Pending], total: int, tails: dict | None = None) -> _Written:
        """Write ``items`` into this writer's streams and catalog partition, numbered from ``total``
        (the catalog's rows in the session's snapshot); ``tails``: see ``self._tails``."""
        by_stream: dict[str, tuple[StreamSignature, list[int]]] = {}
        for k, item in enumerate(items):
            sig = StreamSignature.of(item.episode)
            by_stream.setdefault(stream_name(sig, self.writer_id), (sig, []))[1].append(k)
        # the catalog first: its partition listing (Icechunk's list_dir) blocks the event loop's thread until the session's
        # lock is free, and a new stream created beside it held that lock across an await: the append hung (seen once in CI)
        catalog = await self._catalog_arrays(session)
        streams = await asyncio.gather(*(self._stream_arrays(session, name, sig) for name, (sig, _) in by_stream.items()))
        first = catalog["episode_id"].shape[0]
        writes: list[tuple] = []  # (array, start, block, rows the array grows by)
        records: list[dict] = [{}] * len(items)
        for (name, (sig, ks)), arrays in zip(by_stream.items(), streams):
            blocks, frames = self._stream_blocks(sig, arrays, [items[k].episode for k in ks], [first + k for k in ks])
            writes += blocks
            row = arrays[EPISODE_INDEX].shape[0]
            for j, k in enumerate(ks):
                records[k] = record_of(items[k].episode, items[k].digest, items[k].upload_time, name, row, frames[j], seq=total + k)
                row += items[k].episode.num_steps + 1
        values = columns(records)
        writes += [(catalog[c], first, values[c], len(values[c])) for c in COLUMNS]
        await asyncio.gather(*(self._append_rows(arr, start, block, tails or {}, grow) for arr, start, block, grow in writes))
        self._written_meta.update({arr.path: arr.metadata for arr, *_ in writes})
        return _Written(catalog["seq"], first, len(items))

    async def _append_rows(self, arr: AsyncArray, start: int, block: np.ndarray, tails: dict, grow: int) -> None:
        """Grow ``arr`` (``start`` rows) by ``grow`` rows, the first ones ``block``'s, the rest (whole chunks of
        padding, if any) left unwritten: they read as the fill value. What ``arr.resize`` then ``arr.setitem`` of
        ``block`` store, byte for byte (the same metadata document, the same chunks through the array's own codec
        pipeline), with one metadata write and one batched encode per array. A chunk that already holds rows is
        completed from ``tails`` (what this writer's last commit left in it) or read back; arrays whose chunks do
        not span their whole trailing axes take zarr's path."""
        new_shape = (start + grow, *block.shape[1:])
        meta = arr.metadata
        grid = meta.chunk_grid
        if (
            start != meta.shape[0] or not isinstance(grid, RegularChunkGrid) or tuple(grid.chunk_shape[1:]) != tuple(block.shape[1:])
            or not len(block) or meta.zarr_format != 3 or not arr.config.write_empty_chunks
        ):  # fmt: skip
            await arr.resize(new_shape)
            if len(block):
                await arr.setitem(slice(start, start + len(block)), block)
            return
        meta = meta.update_shape(new_shape)
        rows = grid.chunk_shape[0]
        first_chunk = start // rows
        base = first_chunk * rows  # the first row of the first chunk written
        native = meta.dtype.to_native_dtype()
        if block.dtype.name != native.name:
            block = block.astype(native, order="A")
        if start > base:  # that chunk holds rows already
            tail = tails.get(arr.path)
            if tail is not None and tail[0] == base and len(tail[1]) == start - base:
                head = tail[1]
            else:
                head = await arr.getitem(slice(base, start))
            block = np.concatenate([np.asarray(head, dtype=native), block])
        prototype = default_buffer_prototype()
        chunks, keys = [], []
        for k in range(-(-len(block) // rows)):
            coords = (first_chunk + k, *(0 for _ in new_shape[1:]))
            spec = meta.get_chunk_spec(coords, arr.config, prototype)
            part = block[k * rows : (k + 1) * rows]
            if part.shape == spec.shape:
                chunk = prototype.nd_buffer.from_ndarray_like(part)
            else:  # the array's last chunk, partly beyond its end: fill value there, as zarr writes it
                chunk = prototype.nd_buffer.create(shape=spec.shape, dtype=native, order=spec.order, fill_value=fill_value_or_default(spec))
                chunk[slice(0, len(part))] = prototype.nd_buffer.from_ndarray_like(part)
            chunks.append((chunk, spec))
            keys.append(meta.encode_chunk_key(coords))
        if block.nbytes <= _INLINE_ENCODE_BYTES and _encodes_inline(arr.codec_pipeline):
            encoded = _encode_inline(arr.codec_pipeline, chunks)
        else:
            encoded = await arr.codec_pipeline.encode(chunks)
        path = arr.store_path
        await asyncio.gather(*((path / key).set(value) for key, value in meta.to_buffer_dict(prototype).items()))  # first: Icechunk checks chunk keys against it
        await asyncio.gather(*((path / key).set(value) for key, value in zip(keys, encoded)))
        object.__setattr__(arr, "metadata", meta)
        end = len(block) % rows
        if end:
            self._written_tails[arr.path] = (base + len(block) - end, block[len(block) - end :].copy())  # the block's end, not the grown one

    def _stream_blocks(self, sig: StreamSignature, arrays: dict, episodes: list[Episode], catalog_rows: list[int]) -> tuple[list[tuple], list[dict]]:
        """(array, first row, block, rows it grows by) of every data array of one stream; and per episode
        {image.NAME: (first row, frames)} of its cameras with their own clock. Every array grows to the next
        multiple of ``chunk_rows``; its block covers the array's own chunks that hold data (a wide array's chunks
        are shorter, ``array_chunk_rows``), so a commit's memory follows its episodes, not ``chunk_rows`` x a row."""
        chunk_rows = self.info["chunk_rows"]
        row0 = arrays[EPISODE_INDEX].shape[0]  # always a multiple of chunk_rows
        used = sum(ep.num_steps + 1 for ep in episodes)
        steps = [s for s in sig.arrays if s.length != "frames"]
        out = [(arrays[s.name], row0, stack_rows(episodes, s, _block_rows(arrays[s.name], used, chunk_rows), arrays[s.name].metadata.fill_value), padded(used, chunk_rows)) for s in steps]
        out.append((arrays[EPISODE_INDEX], row0, episode_index_rows(episodes, catalog_rows, padded(used, chunk_rows)), padded(used, chunk_rows)))
        frames: list[dict] = [{} for _ in episodes]
        for s in (s for s in sig.arrays if s.length == "frames"):  # each camera's arrays share its frame rows
            start = arrays[s.name].shape[0]  # a multiple of chunk_rows too
            count = sum(ep.arrays()[s.name].shape[0] for ep in episodes)
            block, starts = stack_frames(episodes, s, _block_rows(arrays[s.name], count, chunk_rows), arrays[s.name].metadata.fill_value)
            out.append((arrays[s.name], start, block, padded(count, chunk_rows)))
            for k, ep in enumerate(episodes):
                frames[k][s.camera] = (start + starts[k], int(ep.arrays()[s.name].shape[0]))
        return out, frames

    async def _catalog_arrays(self, session) -> dict[str, AsyncArray]:
        """This writer's catalog partition for writing, created by its first commit; columns the
        partition predates (catalog.ADDED_COLUMNS) are created at its length, holding their fill
        value (= absent) for earlier rows."""
        paths = [catalog_path(c, self.writer_id) for c in COLUMNS]
        if not all(p in self._meta_cache for p in paths) or self._meta_snapshot != session.snapshot_id:
            catalog = await backend.open_group(session.store, CATALOG, mode="r+")
            if not await catalog.contains(self.writer_id):
                created = await _create_partition(session.store, self.info, self.writer_id)
                return {c: a.with_config(_ARRAY_CONFIG) for c, a in created.items()}
            group = await backend.open_group(session.store, partition_path(self.writer_id), mode="r+")
            have = {name async for name in group.array_keys()}
            missing = [c for c in COLUMNS if c not in have]
            if missing:
                rows = (await backend.open_array(session.store, catalog_path("episode_id", self.writer_id), mode="r")).shape[0]
                await asyncio.gather(*(_create_column(group, c, self.info, rows) for c in missing))
                await group.update_attributes({"columns": list(COLUMNS)})
        return dict(zip(COLUMNS, await self._open(session, paths)))

    async def _open(self, session, paths: list[str]) -> list[AsyncArray]:
        """Open arrays for writing; reuses the metadata this writer wrote in its previous commit
        when nobody else committed since (the session starts from that commit)."""
        if self._meta_snapshot != session.snapshot_id:
            self._meta_cache.clear()
            self._meta_snapshot = session.snapshot_id
        if all(p in self._meta_cache for p in paths):
            return [AsyncArray(self._meta_cache[p], StorePath(session.store, p), config=_ARRAY_CONFIG) for p in paths]
        opened = await asyncio.gather(*(backend.open_array(session.store, p, mode="r+") for p in paths))
        return [a.with_config(_ARRAY_CONFIG) for a in opened]

    async def _stream_arrays(self, session, stream: str, sig: StreamSignature) -> dict[str, AsyncArray]:
        """Open (or create, for a new stream) every data array of this writer's stream and its episode_index, by name."""
        names = [*(spec.name for spec in sig.arrays), EPISODE_INDEX]
        paths = [data_path(stream, n) for n in names]
        if all(p in self._meta_cache for p in paths) or await (await backend.open_group(session.store, mode="r")).contains(stream_path(stream)):
            return dict(zip(names, await self._open(session, paths)))
        root = await backend.open_group(session.store, mode="r+")
        group = await root.create_group(stream_path(stream), attributes={"signature": sig.to_dict(), "writer": self.writer_id})
        comp = backend.compressors(self.info["compression"])
        chunk_rows = self.info["chunk_rows"]

        def make(name: str, tail, chunks, dtype, fill, dims):
            return group.create_array(
                f"data/{name}", shape=(0, *tail), chunks=chunks, dtype=dtype, compressors=comp, fill_value=fill, dimension_names=dims, config=_ARRAY_CONFIG
            )

        created = await asyncio.gather(
            *(
                make(s.name, s.tail, (array_chunk_rows(s, chunk_rows), *(max(1, t) for t in s.tail)), s.dtype, padding_value(s.dtype), dimension_names(s))
                for s in sig.arrays
            ),
            make(EPISODE_INDEX, (), (chunk_rows,), "int32", -1, (STEP_DIM,)),
        )
        return dict(zip(names, created))


CATALOG_ATTRS = {"partitioned_by": "writer", "order_by": "seq"}  # /catalog/<writer>/<column>; the union sorted by seq is the catalog


async def _create_catalog(store, info: dict, writer: str | None = None) -> dict[str, AsyncArray]:
    """The ``/catalog`` group (made once, when the store is created or migrated) and, when
    ``writer`` is given, that writer's empty partition (its columns by name)."""
    root = await backend.open_group(store, mode="r+")
    await root.create_group(CATALOG, attributes=CATALOG_ATTRS)
    return await _create_partition(store, info, writer) if writer is not None else {}


async def _create_partition(store, info: dict, writer: str) -> dict[str, AsyncArray]:
    """A writer's empty catalog partition ``/catalog/<writer>``: one 1-D array per column,
    dimension ``episode``, ``index_rows`` rows per chunk; its columns by name."""
    catalog = await backend.open_group(store, CATALOG, mode="r+")
    group = await catalog.create_group(writer, attributes={"writer": writer, "columns": list(COLUMNS)})
    comp = backend.compressors(info["compression"])
    created = await asyncio.gather(*(_create_column(group, c, info, 0, comp) for c in COLUMNS))
    return dict(zip(COLUMNS, created))


async def _create_column(group, column: str, info: dict, rows: int, comp=None) -> AsyncArray:
    """One catalog column of ``rows`` rows (all its fill value), dimension ``episode``, ``index_rows`` per chunk."""
    return await group.create_array(
        column, shape=(rows,), chunks=(info["index_rows"],), dtype=zarr_dtype(column), fill_value=fill_value(column),
        compressors=comp if comp is not None else backend.compressors(info["compression"]), dimension_names=(EPISODE_DIM,),
    )  # fmt: skip
