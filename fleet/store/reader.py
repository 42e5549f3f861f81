"""Pinned, read-only views of the episode store: catalog, filters, episodes, flat transitions.

A :class:`StoreSnapshot` reads one Icechunk snapshot and nothing else, so a training run
that keeps its ``snapshot_id`` sees the same dataset however many episodes arrive later.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence

import icechunk
import numpy as np

from fleet.store import backend, legacy
from fleet.store.backend import StoreCorruptionError
from fleet.store.catalog import NESTED_COLUMNS, SUMMARY_COLUMNS, EpisodeInfo, absent, info_of, metadata_of
from fleet.store.layout import BRANCH, ROOT_ATTR, StreamSignature, catalog_path, data_path, partition_path, rows_of, stream_path
from fleet.store.location import Location
from fleet.store.withdrawal import Withdrawal, lineage_robot, rules_of, withdrawn_ids
from sim.episode import REQUIRED_ARRAYS, Episode, encode_safetensors

__all__ = ["EpisodeInfo", "StoreCorruptionError", "StoreSnapshot", "TransitionTable"]


@dataclasses.dataclass
class TransitionTable:
    """Flat transitions of several episodes, rows kept time-major per episode.

    Rows: R = sum(T_k + 1). ``observation`` (R, obs_dim) f32 holds every observation
    including each episode's final one; ``action`` (R, act_dim), ``reward`` (R,),
    ``terminated`` / ``truncated`` (R,) bool are aligned to the observation they follow
    (their row T_k per episode is padding: NaN in float arrays, False in bool arrays). Transitions: N = sum(T_k); transition i starts
    at row ``rows[i]`` (next_obs is row ``rows[i] + 1``) and belongs to ``episode_ids[episode[i]]``.
    """

    snapshot_id: str
    episode_ids: list[str]
    observation: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    rows: np.ndarray  # (N,) int64
    episode: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Transitions ``idx`` (B,) as obs/next_obs (B, obs_dim), action (B, act_dim), reward, terminated, truncated (B,)."""
        r = self.rows[idx]
        return {
            "obs": self.observation[r],
            "action": self.action[r],
            "reward": self.reward[r],
            "next_obs": self.observation[r + 1],
            "terminated": self.terminated[r],
            "truncated": self.truncated[r],
        }


class StoreSnapshot:
    """Read-only view of the store at one snapshot. Cheap to create; the catalog loads on first use."""

    def __init__(self, repo: icechunk.Repository, snapshot_id: str, info: dict, base: StoreSnapshot | None = None, *, location: Location):
        """``base``: an earlier snapshot of the same store whose loaded catalog may be reused
        (the store is append-only, so only the catalog rows written since it are read); ``location``: where the store
        is, named when its object storage does not answer a read."""
        self.snapshot_id = snapshot_id
        self.location = location
        self.info = info
        self._session = repo.readonly_session(snapshot_id=snapshot_id)
        self._catalog: list[EpisodeInfo] | None = None
        self._by_id: dict[str, EpisodeInfo] = {}
        self._signatures: dict[str, StreamSignature] = {}
        self._parts: dict[str | None, int] = {}  # writer -> rows of its catalog partition (None: schema 2's flat catalog)
        self._places: list[tuple[str | None, int]] = []  # slot -> (writer, row in its partition)
        self._schema_version: int | None = None  # of this snapshot (a pinned one may predate a migration)
        self._columns: dict[str | None, set[str]] = {}  # writer -> the catalog columns its partition has (older ones lack the 1.1 ones)
        self._base = base if base is not None and base._catalog is not None else None
        self._rules: list[Withdrawal] | None = None
        self._withdrawn: dict[tuple[str, ...], frozenset[str]] = {}  # rule ids -> the ids they withdraw here
        # derived episode id -> the robot it was made from (withdrawal.lineage_robot), shared with ``base`` (an episode's
        # never changes): a loop's next read reads only the new derived episodes' metadata
        self._lineage: dict[str, str | None] = base._lineage if base is not None else {}

    # -- catalog ---------------------------------------------------------------------
    def catalog(self) -> list[EpisodeInfo]:
        """Every episode in this snapshot, in commit order across all writers (``seq``; schema 1
        stores: stream by stream)."""
        if self._catalog is None:
            self._catalog = self._checked([], lambda: backend.run(self._load_catalog()))
            self._base = None  # do not chain every earlier snapshot in memory
            self._by_id = {e.episode_id: e for e in self._catalog}
        return self._catalog

    def __len__(self) -> int:
        return len(self.catalog())

    def __contains__(self, episode_id: str) -> bool:
        self.catalog()
        return episode_id in self._by_id

    def get(self, episode_id: str) -> EpisodeInfo:
        self.catalog()
        if episode_id not in self._by_id:
            raise KeyError(f"episode {episode_id} is not in snapshot {self.snapshot_id}")
        return self._by_id[episode_id]

    def episodes(
        self,
        *,
        robot_id: str | Iterable[str] | None = None,
        robot_model: str | None = None,
        source: str | Iterable[str] | None = None,
        policy_version: str | None = None,
        since: float | None = None,
        until: float | None = None,
        include_withdrawn: bool = False,
    ) -> list[EpisodeInfo]:
        """Catalog entries matching every given filter (``since <= upload_time < until``); withdrawn ones
        (:meth:`withdrawn`) only with ``include_withdrawn`` (an audit)."""
        robots = {robot_id} if isinstance(robot_id, str) else set(robot_id) if robot_id is not None else None
        sources = {source} if isinstance(source, str) else set(source) if source is not None else None
        withdrawn = frozenset() if include_withdrawn else self.withdrawn()
        return [
            e
            for e in self.catalog()
            if e.episode_id not in withdrawn
            and (robots is None or e.robot_id in robots)
            and (robot_model is None or e.robot_model == robot_model)
            and (sources is None or e.source in sources)
            and (policy_version is None or e.policy_version == policy_version)
            and (since is None or e.upload_time >= since)
            and (until is None or e.upload_time < until)
        ]

    def withdrawals(self) -> list[Withdrawal]:
        """The withdrawal rules in force at this snapshot (docs/store.md, "Withdrawing episodes"), oldest first."""
        if self._rules is None:
            self._rules = self._checked([], lambda: rules_of(backend.open_root(self._session).attrs))
        return list(self._rules)

    def withdrawn(self, rules: Sequence[Withdrawal] | None = None) -> frozenset[str]:
        """Ids of this snapshot's episodes that ``rules`` (default: :meth:`withdrawals`) withdraw: those a rule names,
        and the scenario and world-model episodes made from a withdrawn robot's data (fleet/store/withdrawal.py)."""
        rules = self.withdrawals() if rules is None else list(rules)
        key = tuple(r.id for r in rules)
        if key not in self._withdrawn:
            self._withdrawn[key] = withdrawn_ids(self.catalog(), rules, self._lineage_of)
        return self._withdrawn[key]

    def _lineage_of(self, infos: Sequence[EpisodeInfo]) -> list[str | None]:
        """The robot each derived episode of ``infos`` was made from (its scenario's metadata read once per episode)."""
        new = [i for i in infos if i.episode_id not in self._lineage and i.source != "worldmodel"]  # a world-model episode's is its robot id
        for info, meta in zip(new, self.metadata(new) if new else []):
            scenario = json.loads(meta["scenario"]) if meta.get("scenario") else {}
            self._lineage[info.episode_id] = lineage_robot(info, scenario if isinstance(scenario, dict) else {})
        return [lineage_robot(i, None) if i.source == "worldmodel" else self._lineage[i.episode_id] for i in infos]

    def signature(self, stream: str) -> StreamSignature:
        self.catalog()
        return self._signatures[stream]

    def provenance(self, episode_id: str) -> dict:
        """Who/what made an episode: catalog fields plus parsed hardware/scenario/calibration JSON."""
        info = self.get(episode_id)
        meta = self.metadata([info])[0]
        out = dataclasses.asdict(info)
        out["scenario_sha256"] = hashlib.sha256(meta["scenario"].encode()).hexdigest()[:16] if "scenario" in meta else None
        for key in ("hardware", "scenario", "calibration"):
            out[key] = json.loads(meta[key]) if key in meta else None
        return out

    # -- episodes --------------------------------------------------------------------
    def metadata(self, infos: Sequence[EpisodeInfo]) -> list[dict[str, str]]:
        """Full metadata maps of ``infos``, in order."""
        return backend.run(self._read_metadata(list(infos)))

    def read_episode(self, episode: str | EpisodeInfo, verify: bool = True) -> Episode:
        return self.read_episodes([episode], verify=verify)[0]

    def read_episodes(self, episodes: Sequence[str | EpisodeInfo], verify: bool = True) -> list[Episode]:
        """Episodes by id or catalog entry, in order. ``verify`` re-checks each against its commit digest."""
        infos = [self.get(e) if isinstance(e, str) else e for e in episodes]
        arrays, metas = self._checked(infos, lambda: (backend.run(self._read_arrays(infos, None)), self.metadata(infos)))
        out = []
        for info, arrs, meta in zip(infos, arrays, metas):
            required = {k: arrs.pop(k) for k in REQUIRED_ARRAYS}
            ep = Episode(**required, metadata=meta, extras=arrs)
            if verify:
                digest = hashlib.sha256(encode_safetensors(ep.arrays(), ep.metadata)).hexdigest()
                if digest != info.digest:
                    raise StoreCorruptionError(
                        f"episode {info.episode_id} in snapshot {self.snapshot_id} reads back with sha256 {digest}, "
                        f"committed as {info.digest}; the store files are damaged (restore from backup)"
                    )
            out.append(ep)
        return out

    def read_arrays(self, infos: Sequence[EpisodeInfo], names: Sequence[str]) -> list[dict[str, np.ndarray]]:
        """Only the arrays ``names`` of each of ``infos`` (unverified: the digest covers the whole episode), in order."""
        infos = list(infos)
        return self._checked(infos, lambda: backend.run(self._read_arrays(infos, list(names))))

    def read_bytes(self, episode_id: str) -> bytes:
        """One episode as canonical safetensors bytes (what a robot uploaded, bit for bit)."""
        return self.read_episode(episode_id).to_bytes()

    def transitions(self, infos: Sequence[EpisodeInfo]) -> TransitionTable:
        """Flat transitions of ``infos`` (all must share obs_dim and act_dim)."""
        infos = list(infos)
        if not infos:
            raise ValueError(f"no episodes selected from snapshot {self.snapshot_id}; loosen the filters")
        robots: dict[tuple[int, int], set[str]] = {}
        for i in infos:
            robots.setdefault((self.signature(i.stream).obs_dim, self.signature(i.stream).act_dim), set()).add(i.robot_id)
        if len(robots) > 1:
            said = "; ".join(f"{dims}: {', '.join(sorted(ids)[:5])}{' ...' if len(ids) > 5 else ''}" for dims, ids in sorted(robots.items()))
            raise ValueError(f"selected episodes mix (obs_dim, act_dim) layouts, by robot: {said}; select episodes of one layout "
                             "(one robot_model; a robot whose observation or action changed under the same model: leave its robot_id out)")  # fmt: skip
        names = ("observation", "action", "reward", "terminated", "truncated")
        per_episode = self._checked(infos, lambda: backend.run(self._read_arrays(infos, names, full_rows=True)))
        steps = np.array([i.num_steps for i in infos], np.int64)
        starts = np.concatenate([[0], np.cumsum(steps + 1)[:-1]])
        rows = np.concatenate([s + np.arange(t) for s, t in zip(starts, steps)])
        episode = np.repeat(np.arange(len(infos), dtype=np.int32), steps)
        cols = {n: np.concatenate([arrs[n] for arrs in per_episode]) for n in names}
        return TransitionTable(self.snapshot_id, [i.episode_id for i in infos], rows=rows, episode=episode, **cols)

    # -- internals -------------------------------------------------------------------
    def _checked(self, infos: Sequence[EpisodeInfo], read):
        """``read()``'s result. Object storage that did not answer it raises StoreUnreachableError (``backend.answering``:
        what to check; a server answers "retry later"). A read of the catalog, or of episodes it says are stored, that
        finds a chunk or manifest missing, short or undecodable (backend.damaged) raises StoreCorruptionError naming them,
        the snapshot and the file: that damage stays, unlike storage that did not answer (a timeout). Unless the snapshot
        itself is gone from the store: maintenance expired it while it was read, an UnknownSnapshotError."""
        with backend.answering(self.location):
            try:
                return read()
            except (icechunk.IcechunkError, RuntimeError, ValueError) as exc:
                if isinstance(exc, StoreCorruptionError) or not backend.damaged(exc):
                    raise
                if self._expired():  # while it was read: not damage, nothing to restore
                    raise backend.UnknownSnapshotError(
                        f"snapshot {self.snapshot_id} of the episode store at {self.location} was expired by maintenance while it was "
                        "being read (a snapshot goes keep_history_s after a newer one replaced it, unless pinned; docs/store.md, "
                        "Maintenance): read the tip again, or pin a snapshot you read for longer (EpisodeStore.pin or `flywheel store pin`)"
                    ) from None
                which = "the catalog" if not infos else f"episode {infos[0].episode_id}" if len(infos) == 1 else f"one of {len(infos)} episodes (the first {infos[0].episode_id})"
                raise StoreCorruptionError(
                    f"{which} in snapshot {self.snapshot_id} cannot be read back ({backend.damaged_part(exc)}: {backend.short_reason(exc)}): "
                    "the store's files are damaged; restore the store from backup"
                ) from exc

    def _expired(self) -> bool:
        """Whether maintenance expired this snapshot since it was opened: it is gone from the store (asked of a fresh
        handle: this one's cache still holds the snapshot file it read when it opened it), out of the branch's history
        and named by no pin. One the history or a pin still names, gone, is damage (a lost file, not an expiry); so is a
        history that cannot be walked."""
        repo = backend.open_repo(self.location)
        try:
            repo.lookup_snapshot(self.snapshot_id)
            return False
        except icechunk.IcechunkError as exc:
            if "not found" not in str(exc):
                raise
        if any(snap.id == self.snapshot_id for snap in repo.ancestry(branch=BRANCH)):
            return False
        for tag in repo.list_tags():
            try:
                if repo.lookup_tag(tag) == self.snapshot_id:
                    return False
            except icechunk.IcechunkError as exc:  # a pin let go since the listing names nothing
                if "not found" not in str(exc):
                    raise
        return True

    async def _load_catalog(self) -> list[EpisodeInfo]:
        store = self._session.store
        root = await backend.open_group(store, mode="r")
        self._schema_version = root.attrs[ROOT_ATTR]["store_schema_version"]
        if self._schema_version == 1:
            catalog, self._signatures = await legacy.load_catalog(store)
            return catalog
        base = self._base if self._base is not None and self._base._schema_version == self._schema_version else None
        writers = await backend.catalog_partitions(store, self._schema_version)
        parts = await asyncio.gather(*(self._load_partition(w, base._parts.get(w, 0) if base is not None else 0) for w in writers))
        if base is not None and any(self._parts.get(w, 0) < rows for w, rows in base._parts.items()):  # not an earlier snapshot:
            self._base = None  # its catalog would have stood in for this one's (a partition shorter here read as no new rows)
            return await self._load_catalog()
        rows = sorted((row for part in parts for row in part), key=lambda r: (r[0], r[1] or "", r[2]))  # seq, then writer, then its row
        first = len(base._catalog) if base is not None else 0
        new = [info_of(values, first + i) for i, (_, _, _, values) in enumerate(rows)]
        self._places = [*(base._places if base is not None else []), *((w, local) for _, w, local, _ in rows)]
        if base is not None:
            self._signatures.update(base._signatures)
        missing = sorted({e.stream for e in new} - set(self._signatures))
        groups = await asyncio.gather(*(backend.open_group(store, stream_path(s), mode="r") for s in missing))
        self._signatures.update({s: StreamSignature.from_dict(g.attrs["signature"]) for s, g in zip(missing, groups)})
        return [*(base._catalog if base is not None else []), *new]

    async def _load_partition(self, writer: str | None, start: int) -> list[tuple[int, str | None, int, dict]]:
        """Rows ``start:`` of one writer's catalog partition as (seq, writer, row, {summary column: value})."""
        store = self._session.store
        group = await backend.open_group(store, partition_path(writer), mode="r")
        self._columns[writer] = {name async for name in group.array_keys()}
        stop = (await backend.open_array(store, catalog_path("episode_id", writer), mode="r")).shape[0]
        self._parts[writer] = stop
        if stop <= start:
            return []
        values = dict(zip(SUMMARY_COLUMNS, await asyncio.gather(*(self._column(writer, c, start, stop) for c in SUMMARY_COLUMNS))))
        return [(int(values["seq"][i]), writer, start + i, {c: v[i] for c, v in values.items()}) for i in range(stop - start)]

    async def _read_metadata(self, infos: list[EpisodeInfo]) -> list[dict[str, str]]:
        self.catalog()  # knows the schema version
        if self._schema_version == 1:
            return await legacy.read_metadata(self._session.store, infos, self.info["index_rows"])
        unit = self.info["index_rows"]
        by_writer: dict[str | None, list[int]] = {}
        for k, info in enumerate(infos):
            by_writer.setdefault(self._places[info.slot][0], []).append(k)

        async def one(writer: str | None, ks: list[int]) -> list[dict[str, str]]:
            rows = [self._places[infos[k].slot][1] for k in ks]
            runs = _runs([(r, r + 1) for r in rows], unit)
            stop = self._parts[writer]
            blocks = await asyncio.gather(*(self._column(writer, c, a, min(b, stop)) for c in NESTED_COLUMNS for a, b in runs))
            starts = [a for a, _ in runs]
            out = []
            for k, row in zip(ks, rows):
                j = bisect.bisect_right(starts, row) - 1
                nested = {c: blocks[n * len(runs) + j][row - runs[j][0]] for n, c in enumerate(NESTED_COLUMNS)}
                out.append(metadata_of(infos[k], nested, self.info["episode_schema_version"]))
            return out

        out: list[dict[str, str]] = [{} for _ in infos]
        parts = await asyncio.gather(*(one(w, ks) for w, ks in by_writer.items()))
        for ks, metas in zip(by_writer.values(), parts):
            for k, meta in zip(ks, metas):
                out[k] = meta
        return out

    async def _column(self, writer: str | None, column: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a column of ``writer``'s catalog partition. A column the partition
        predates reads as its fill value; ``seq`` of the flat schema-2 catalog is the row number."""
        if column not in self._columns[writer]:
            return absent(column, start, stop)
        arr = await backend.open_array(self._session.store, catalog_path(column, writer), mode="r")
        return await arr.getitem(slice(start, stop))

    async def _read_arrays(self, infos: list[EpisodeInfo], names: Sequence[str] | None, full_rows: bool = False) -> list[dict]:
        """Per episode, {array name: rows}; ``full_rows`` keeps T+1 rows for every array (padding included)."""
        self.catalog()  # loads the stream signatures
        out: list[dict] = [dict() for _ in infos]
        by_stream: dict[str, list[int]] = {}
        for k, info in enumerate(infos):
            by_stream.setdefault(info.stream, []).append(k)

        async def one(stream: str, ks: list[int]) -> None:
            sig = self._signatures[stream]
            specs = [sig.spec(n) for n in names] if names is not None else list(sig.arrays)
            await asyncio.gather(*(frames(spec, ks) for spec in specs if spec.length == "frames"))
            specs = [s for s in specs if s.length != "frames"]
            spans = [(infos[k].row, infos[k].row + infos[k].num_steps + 1) for k in ks]
            arrays = await asyncio.gather(*(backend.open_array(store=self._session.store, path=data_path(stream, s.name), mode="r") for s in specs))
            runs = [_runs(spans, _chunk_rows(arr)) for arr in arrays]  # each array's own chunks: a camera's are shorter
            blocks = await asyncio.gather(*(asyncio.gather(*(arr.getitem(slice(a, b)) for a, b in r)) for arr, r in zip(arrays, runs)))
            for j, spec in enumerate(specs):
                for k in ks:
                    info = infos[k]
                    sl = slice(info.row, info.row + info.num_steps + 1) if full_rows else rows_of(spec, info.row, info.num_steps)
                    out[k][spec.name] = _slice_runs(blocks[j], runs[j], sl)

        async def frames(spec, ks: list[int]) -> None:
            """A camera with its own clock: each episode's rows from its catalog ``frames`` entry."""
            where = [dict((c, (a, n)) for c, a, n in infos[k].frames)[spec.camera] for k in ks]
            arr = await backend.open_array(store=self._session.store, path=data_path(infos[ks[0]].stream, spec.name), mode="r")
            runs = _runs([(a, a + n) for a, n in where], _chunk_rows(arr))
            blocks = await asyncio.gather(*(arr.getitem(slice(a, b)) for a, b in runs))
            for k, (a, n) in zip(ks, where):
                out[k][spec.name] = _slice_runs(blocks, runs, slice(a, a + n))

        await asyncio.gather(*(one(stream, ks) for stream, ks in by_stream.items()))
        return out


def _chunk_rows(arr) -> int:
    """Rows per chunk of a data array (a wide one's are fewer than the store's ``chunk_rows``: reading in those
    read a 640x480 camera's episode as 16,384 rows of frames, 14 GiB)."""
    return int(arr.metadata.chunks[0])


def _runs(spans: Sequence[tuple[int, int]], unit: int) -> list[tuple[int, int]]:
    """Merge [start, stop) spans into disjoint ``unit``-aligned runs that cover them, sorted."""
    cells = sorted((a // unit, -(-b // unit)) for a, b in spans)
    runs: list[list[int]] = []
    for a, b in cells:
        if runs and a <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], b)
        else:
            runs.append([a, b])
    return [(a * unit, b * unit) for a, b in runs]


def _slice_runs(blocks: Sequence[np.ndarray], runs: Sequence[tuple[int, int]], sl: slice) -> np.ndarray:
    for block, (a, b) in zip(blocks, runs):
        if a <= sl.start and sl.stop <= b:
            return np.ascontiguousarray(block[sl.start - a : sl.stop - a])
    raise AssertionError(f"rows {sl} not inside the runs read {runs}")

