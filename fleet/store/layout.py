"""On-disk layout of the episode store (docs/store.md): names, stream signatures, index rows.

No zarr calls here: this module only says *where* things go and *how* an episode maps to
rows, so the writer and the reader agree by construction.

Inside the Icechunk repository (branch ``main``), store schema version 3::

    /                                  root group; attrs["flywheel_store"] = root_attrs(...)
    /catalog/<writer>/<column>         the catalog partition of one writer: one row per episode it
                                       stored (dimension "episode"), its commit order, no padding;
                                       columns: fleet/store/catalog.py; ``seq`` orders all partitions
    /streams/<stream>/                 one stream per (robot_model, array signature, writer):
                                       <robot_model>-<sha256(signature)[:10]>.<writer>
        attrs["signature"], ["writer"] StreamSignature.to_dict(), the writer that owns it
        data/<array>                   (step, *tail) time-major; episode k owns rows
                                       [row_k, row_k + T_k + 1); "T"-length arrays leave
                                       the last of those rows as padding
        data/episode_index int32 (step,) row of the episode owning each row in its writer's catalog
                                       partition; -1 on padding rows (the tool-visible mask)
        data/image.NAME, data/image.NAME.timestamp
                                       schema 1.1 cameras with their own clock: (image.NAME_frame, ...)
                                       on their own frame axis; the catalog's ``frames`` column says
                                       which rows are whose; a NaN timestamp marks a padding row

A writer appends only to its own partition and its own streams, so two writers never touch the
same array: Icechunk rebases a commit that lost a race onto the winner's without conflict.
Every array carries Zarr v3 ``dimension_names`` (:func:`dimension_names`). Every commit
starts at a chunk boundary in every data array, pads its last chunk (NaN in float arrays,
zero/False otherwise, -1 in ``episode_index``), and never rewrites an earlier data chunk;
catalog rows are appended without padding. Schema version 2 (one flat ``/catalog/<column>``
table, streams without a writer) is read for snapshots pinned before its migration, and
migrated on open into the partition :data:`MIGRATED_WRITER` (:mod:`fleet.store.legacy`);
schema version 1 (per-stream ``index/`` arrays, no catalog) likewise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import secrets
import socket
import uuid

import numpy as np

from sim.episode import CAMERA_TIMESTAMP_SUFFIX, SCHEMA_VERSION, Episode

STORE_FORMAT = "flywheel-episode-store"
STORE_SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)  # 1 and 2 are migrated to 3 when the store is opened
REPO_DIR = "icechunk"
LOCK_FILE = "writer.lock"
MAINTENANCE_LOCK_FILE = "maintenance.lock"  # one maintenance run at a time on a local store (fleet/store/maintenance.py)
BRANCH = "main"
ROOT_ATTR = "flywheel_store"
STREAMS = "streams"
CATALOG = "catalog"
MIGRATED_WRITER = "migrated"  # the partition holding the rows of a store migrated from schema 1 or 2
LOCAL_WRITER = "local"  # the default writer id on local disk, where writers take turns under the commit lock
EPISODE_INDEX = "episode_index"  # data/episode_index: the per-row mask and episode link
STEP_DIM = "step"
EPISODE_DIM = "episode"
KEY_BYTES = 48  # 16-byte UUID + 32-byte sha256 (schema 1 index/key)
_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


def root_attrs(chunk_rows: int, index_rows: int, compression: str) -> dict:
    """The root group's ``flywheel_store`` attribute: format, versions and write geometry."""
    return {
        "format": STORE_FORMAT,
        "store_schema_version": STORE_SCHEMA_VERSION,
        "episode_schema_version": SCHEMA_VERSION,
        "chunk_rows": int(chunk_rows),
        "index_rows": int(index_rows),
        "compression": compression,
    }


def check_root_attrs(attrs: dict, where: str) -> dict:
    """Validate a store's root attribute; raise a ValueError that says what to do."""
    info = attrs.get(ROOT_ATTR)
    if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
        raise ValueError(f"{where} is an Icechunk repository but not a Flywheel episode store (no '{ROOT_ATTR}' root attribute)")
    if info.get("store_schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"{where} has store schema version {info.get('store_schema_version')!r}; this build reads "
            f"{list(READABLE_SCHEMA_VERSIONS)}. Use a matching build, or migrate the store (docs/store.md)."
        )
    return info


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One array of a stream: dtype, shape after the time axis, and leading length T, T+1 or
    "frames" (a schema 1.1 camera with its own clock: its own row count per episode)."""

    name: str
    dtype: str
    tail: tuple[int, ...]
    length: str  # "T", "T+1" or "frames"

    @property
    def camera(self) -> str:
        """The camera array ("image.NAME") a "frames" array belongs to."""
        return self.name.removesuffix(CAMERA_TIMESTAMP_SUFFIX) if self.name.endswith(CAMERA_TIMESTAMP_SUFFIX) else self.name

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "tail": list(self.tail), "length": self.length}

    @classmethod
    def from_dict(cls, d: dict) -> ArraySpec:
        return cls(name=d["name"], dtype=d["dtype"], tail=tuple(d["tail"]), length=d["length"])


@dataclasses.dataclass(frozen=True)
class StreamSignature:
    """What every episode of one stream shares: robot model and array layout."""

    robot_model: str
    arrays: tuple[ArraySpec, ...]  # sorted by name

    @classmethod
    def of(cls, episode: Episode) -> StreamSignature:
        t = episode.num_steps
        clocks = episode.camera_clocks() if episode.metadata.get("schema_version") == "1.1" else {}
        framed = {*clocks, *(f"{c}{CAMERA_TIMESTAMP_SUFFIX}" for c in clocks)}
        specs = []
        for name, arr in sorted(episode.arrays().items()):
            length = "frames" if name in framed else "T" if arr.shape[0] == t else "T+1"
            specs.append(ArraySpec(name, arr.dtype.str, tuple(int(s) for s in arr.shape[1:]), length))
        return cls(robot_model=episode.metadata["robot_model"], arrays=tuple(specs))

    def to_dict(self) -> dict:
        return {"robot_model": self.robot_model, "arrays": [a.to_dict() for a in self.arrays]}

    @classmethod
    def from_dict(cls, d: dict) -> StreamSignature:
        return cls(robot_model=d["robot_model"], arrays=tuple(ArraySpec.from_dict(a) for a in d["arrays"]))

    @property
    def name(self) -> str:
        """Stream group name: the sanitised robot model plus a hash of the full signature."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{_SAFE.sub('_', self.robot_model)[:48]}-{digest}"

    def spec(self, name: str) -> ArraySpec:
        for a in self.arrays:
            if a.name == name:
                return a
        raise KeyError(f"stream {self.name} has no array {name!r}; it has {[a.name for a in self.arrays]}")

    @property
    def obs_dim(self) -> int:
        return self.spec("observation").tail[0]

    @property
    def act_dim(self) -> int:
        return self.spec("action").tail[0]


def default_writer_id(local: bool) -> str:
    """The writer id used when the config names none: :data:`LOCAL_WRITER` on local disk, else a
    new ``<host>-<pid>-<random>`` (so two store handles never share a partition by accident)."""
    if local:
        return LOCAL_WRITER
    host = _SAFE.sub("_", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def stream_name(signature: StreamSignature, writer: str) -> str:
    """The stream a writer appends episodes of ``signature`` to: ``<signature name>.<writer>``."""
    return f"{signature.name}.{writer}"


def stream_path(stream: str) -> str:
    return f"{STREAMS}/{stream}"


def data_path(stream: str, array: str) -> str:
    return f"{STREAMS}/{stream}/data/{array}"


def index_path(stream: str, name: str) -> str:
    """A schema-1 per-stream index array (read by fleet.store.legacy only)."""
    return f"{STREAMS}/{stream}/index/{name}"


def partition_path(writer: str | None) -> str:
    """The catalog group of one writer's rows; ``None``: the flat catalog of schema 2."""
    return CATALOG if writer is None else f"{CATALOG}/{writer}"


def catalog_path(column: str, writer: str | None = None) -> str:
    """A catalog column of ``writer``'s partition (``None``: the flat schema-2 catalog)."""
    return f"{partition_path(writer)}/{column}"


_TAIL_DIMS = {"observation": ("obs_dim",), "action": ("act_dim",)}


def dimension_names(spec: ArraySpec) -> tuple[str, ...]:
    """Zarr v3 dimension names of a data array: ("step", *tail names).

    observation -> (step, obs_dim), action -> (step, act_dim), qpos -> (step, qpos_dim),
    image.front (T, H, W, C) -> (step, image.front_height, image.front_width, image.front_channel);
    other tails get NAME_dim0, NAME_dim1, ... Names are per array, so arrays of one stream
    never share a tail dimension of a different size. A camera with its own clock has its own
    time axis: image.wrist -> (image.wrist_frame, image.wrist_height, ...),
    image.wrist.timestamp -> (image.wrist_frame,).
    """
    if spec.length == "frames":
        return (f"{spec.camera}_frame", *dimension_names(dataclasses.replace(spec, name=spec.camera, length="T"))[1:])
    if spec.name in _TAIL_DIMS and len(spec.tail) == 1:
        return (STEP_DIM, *_TAIL_DIMS[spec.name])
    if len(spec.tail) == 1:
        return (STEP_DIM, f"{spec.name}_dim")
    if spec.name.startswith("image.") and len(spec.tail) == 3:
        return (STEP_DIM, *(f"{spec.name}_{axis}" for axis in ("height", "width", "channel")))
    return (STEP_DIM, *(f"{spec.name}_dim{i}" for i in range(len(spec.tail))))


def padding_value(dtype: str) -> float | int | bool:
    """What a commit's padding rows hold: NaN in float arrays (never data: schema v1 rejects NaN), else 0/False."""
    return float("nan") if np.dtype(dtype).kind == "f" else 0


MAX_CHUNK_BYTES = 16 << 20


def array_chunk_rows(spec: ArraySpec, chunk_rows: int) -> int:
    """Rows per chunk of one data array: ``chunk_rows`` halved until a chunk is <= 16 MiB.

    Halving keeps it a divisor of ``chunk_rows`` (a power of two in every shipped config),
    so a commit aligned to ``chunk_rows`` is aligned for every array.
    """
    row_bytes = np.dtype(spec.dtype).itemsize * int(np.prod(spec.tail, dtype=np.int64))
    rows = chunk_rows
    while rows > 1 and rows % 2 == 0 and rows * row_bytes > MAX_CHUNK_BYTES:
        rows //= 2
    return rows


def padded(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def episode_key(episode_id: str, digest: bytes) -> np.ndarray:
    """The 48-byte index key: UUID bytes then sha256 digest. Shape (48,) uint8."""
    return np.frombuffer(uuid.UUID(episode_id).bytes + digest, dtype=np.uint8)


def split_keys(keys: np.ndarray) -> tuple[list[str], list[bytes]]:
    """Inverse of :func:`episode_key` for a (N, 48) uint8 block: (episode ids, digests)."""
    ids = [str(uuid.UUID(bytes=bytes(k[:16]))) for k in keys]
    return ids, [bytes(k[16:]) for k in keys]


def stack_rows(episodes: list[Episode], spec: ArraySpec, total_rows: int, fill) -> np.ndarray:
    """The time-major block of ``spec`` for consecutive episodes, padded with ``fill`` to ``total_rows``.

    Episode k takes T_k + 1 rows; a "T"-length array leaves the last row as ``fill``.
    Returns (total_rows, *spec.tail) of spec.dtype.
    """
    out = np.full((total_rows, *spec.tail), fill, dtype=np.dtype(spec.dtype))
    row = 0
    for ep in episodes:
        arr = ep.arrays()[spec.name]
        out[row : row + arr.shape[0]] = arr
        row += ep.num_steps + 1
    return out


def episode_index_rows(episodes: list[Episode], catalog_rows: list[int], total_rows: int) -> np.ndarray:
    """``data/episode_index`` for consecutive episodes whose catalog rows are ``catalog_rows``:
    (total_rows,) int32; each episode's T_k + 1 rows hold its catalog row, padding holds -1."""
    out = np.full(total_rows, -1, dtype=np.int32)
    row = 0
    for ep, catalog_row in zip(episodes, catalog_rows):
        out[row : row + ep.num_steps + 1] = catalog_row
        row += ep.num_steps + 1
    return out


def stack_frames(episodes: list[Episode], spec: ArraySpec, total_rows: int, fill) -> tuple[np.ndarray, list[int]]:
    """The block of a "frames" array for consecutive episodes, padded with ``fill`` to ``total_rows``,
    and each episode's first row in it (frames are packed back to back)."""
    out = np.full((total_rows, *spec.tail), fill, dtype=np.dtype(spec.dtype))
    starts, row = [], 0
    for ep in episodes:
        arr = ep.arrays()[spec.name]
        out[row : row + arr.shape[0]] = arr
        starts.append(row)
        row += arr.shape[0]
    return out, starts


def rows_of(spec: ArraySpec, row: int, num_steps: int) -> slice:
    """The rows of one episode's ``spec`` array inside the stream."""
    return slice(row, row + num_steps + (1 if spec.length == "T+1" else 0))

