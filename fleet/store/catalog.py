"""The episode catalog ``/catalog``: one row per stored episode, real columns, no padding.

No zarr calls here: this module says which columns there are and how an episode maps to
a row and back, so the writer, the reader and generic tools agree by construction.

The catalog is split into one partition per writer, ``/catalog/<writer>/<column>`` (so writers
never write the same array). Every column is a 1-D Zarr array with dimension name ``episode``;
row i of every column of a partition describes the same episode. A partition's rows are in its
writer's commit order and are written in the same Icechunk commit as the episodes they describe,
so a pinned snapshot's catalog lists exactly its episodes. ``seq`` is an episode's position in
the whole catalog (commit order across writers: a commit numbers its rows from the number of
rows its parent snapshot holds, and renumbers them when it is rebased), so the union of the
partitions sorted by ``seq`` is the catalog. ``xarray.open_zarr(store, group="catalog/<writer>",
...)`` opens a partition as a Dataset, ``.to_dataframe()`` makes it a pandas table (docs/store.md).

Strings are variable-length UTF-8. The metadata map of an episode is rebuilt exactly from
its row (:func:`metadata_of`), so stored episodes still read back bit for bit.

Columns added later (the schema 1.1 ones: ``schema_version``, ``task``, ``control_rate_hz``,
``names``, ``cameras``, ``frames``) may be missing from a partition written before them: a reader
takes their fill value for every row (``""``, NaN = absent; ``schema_version`` "" = the
store's ``episode_schema_version``), and its writer's next append creates them at the
partition's length with nothing written for the earlier rows (:data:`ADDED_COLUMNS`). ``seq`` is
missing only from the flat catalog of schema 2 (snapshots pinned before a migration), whose
rows are in commit order: there it is the row number.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from sim.episode import JSON_METADATA, REQUIRED_METADATA, Episode

# column -> dtype ("str": variable-length UTF-8)
COLUMNS: dict[str, str] = {
    "seq": "int64",  # position in the whole catalog: commit order across every writer's partition
    "episode_id": "str",  # UUID text, the idempotency key
    "digest": "str",  # hex sha256 of the canonical safetensors bytes
    "stream": "str",  # /streams/<stream> holding the episode's arrays
    "row": "int64",  # its first row on that stream's step axis
    "num_steps": "int64",  # T; it owns rows [row, row + T + 1)
    "total_return": "float64",  # sum of rewards (float64 accumulation)
    "start_time": "float64",  # first timestamp (robot clock, seconds)
    "upload_time": "float64",  # when the store received it (unix seconds)
    "robot_id": "str",
    "robot_model": "str",
    "source": "str",  # real | sim | worldmodel
    "policy_version": "str",
    "model_version": "str",  # "" when absent
    "hardware": "str",  # JSON text exactly as uploaded, "" when absent
    "calibration": "str",  # JSON text exactly as uploaded, "" when absent
    "scenario": "str",  # JSON text exactly as uploaded, "" when absent
    "other_metadata": "str",  # JSON object of the remaining entries (the x.* keys), "{}" when none
    # episode schema 1.1 (absent from stores written before it: see the module docstring)
    "schema_version": "str",  # the episode's schema_version; "" = the store's episode_schema_version ("1")
    "task": "str",  # task instruction text, "" when absent
    "control_rate_hz": "float64",  # NaN when absent
    "names": "str",  # JSON text exactly as uploaded, "" when absent
    "cameras": "str",  # JSON text exactly as uploaded, "" when absent
    "frames": "str",  # JSON {"image.NAME": [first row, frames]} of cameras with their own clock, "" when none
}
ADDED_COLUMNS = ("schema_version", "task", "control_rate_hz", "names", "cameras", "frames")
NESTED_COLUMNS = (*JSON_METADATA, "other_metadata", "names", "cameras")  # read per episode, on demand
SUMMARY_COLUMNS = tuple(c for c in COLUMNS if c not in NESTED_COLUMNS)  # read for every catalog load
_OWN_COLUMN = (*REQUIRED_METADATA, *JSON_METADATA, "model_version", "task", "control_rate_hz", "names", "cameras")


def zarr_dtype(column: str):
    return str if COLUMNS[column] == "str" else COLUMNS[column]


def fill_value(column: str):
    """What a row holds where nothing was written: "" / 0, and NaN (absent) for control_rate_hz."""
    if column == "control_rate_hz":
        return float("nan")
    return "" if COLUMNS[column] == "str" else 0


def absent(column: str, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a column a catalog predates: its fill value in each (``seq``: the row
    number, as in schema 2's flat catalog, whose rows are in commit order)."""
    if column == "seq":
        return np.arange(start, stop, dtype=np.int64)
    value = fill_value(column)
    return np.full(stop - start, value, dtype=object if isinstance(value, str) else np.float64)


@dataclasses.dataclass(frozen=True)
class EpisodeInfo:
    """Catalog entry of one stored episode (provenance plus where its rows are)."""

    episode_id: str
    stream: str
    slot: int  # its position in the snapshot's catalog, = its seq (schema 1 stores: its slot in the stream's index)
    row: int
    num_steps: int
    digest: str  # hex sha256 of the canonical safetensors bytes
    robot_id: str
    robot_model: str
    source: str
    policy_version: str
    model_version: str | None
    upload_time: float  # unix seconds, when the store received it
    start_time: float  # the episode's first timestamp (robot clock)
    total_return: float
    schema_version: str = ""  # "" = the store's episode_schema_version
    task: str | None = None
    control_rate_hz: float | None = None
    frames: tuple[tuple[str, int, int], ...] = ()  # (image.NAME, first row, frames) of cameras with their own clock


def record_of(
    ep: Episode, digest: bytes, upload_time: float, stream: str, row: int, frames: Mapping[str, tuple[int, int]] | None = None, *, seq: int = 0
) -> dict:  # fmt: skip
    """The catalog row of a new episode as {column: value}; ``frames``: {image.NAME: (first row, frames)}."""
    return record(
        ep.metadata, digest=digest.hex(), stream=stream, row=row, num_steps=ep.num_steps,
        total_return=ep.total_return, start_time=float(ep.timestamp[0]), upload_time=upload_time, frames=frames, seq=seq,
    )  # fmt: skip


def record(
    meta: Mapping[str, str], *, digest: str, stream: str, row: int, num_steps: int, total_return: float, start_time: float, upload_time: float,
    frames: Mapping[str, tuple[int, int]] | None = None, seq: int = 0,
) -> dict:  # fmt: skip
    """A catalog row as {column: value} from an episode's metadata map and its summary numbers;
    ``seq``: its position in the whole catalog."""
    model_version = meta.get("model_version", "")
    other = {k: v for k, v in meta.items() if k not in _OWN_COLUMN}
    if model_version == "" and "model_version" in meta:  # present but empty: its column cannot tell that from absent
        other["model_version"] = ""
    rate = meta.get("control_rate_hz")
    if rate is not None and repr(float(rate)) != rate:  # "20" or "1e3": the float column cannot give back the text
        other["control_rate_hz"] = rate
    return {
        "seq": int(seq),
        "episode_id": meta["episode_id"],
        "digest": digest,
        "stream": stream,
        "row": int(row),
        "num_steps": int(num_steps),
        "total_return": float(total_return),
        "start_time": float(start_time),
        "upload_time": float(upload_time),
        "robot_id": meta["robot_id"],
        "robot_model": meta["robot_model"],
        "source": meta["source"],
        "policy_version": meta["policy_version"],
        "model_version": model_version,
        **{key: meta.get(key, "") for key in JSON_METADATA},
        "other_metadata": json.dumps(other, sort_keys=True, separators=(",", ":")),
        "schema_version": meta["schema_version"],
        "task": meta.get("task", ""),
        "control_rate_hz": float(rate) if rate is not None else float("nan"),
        "names": meta.get("names", ""),
        "cameras": meta.get("cameras", ""),
        "frames": json.dumps({k: list(v) for k, v in sorted(frames.items())}, separators=(",", ":")) if frames else "",
    }


def columns(records: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Rows {column: value} turned into columns: (N,) arrays, str columns as object arrays."""
    out = {}
    for column, dtype in COLUMNS.items():
        values = [r[column] for r in records]
        out[column] = np.array(values, dtype=object) if dtype == "str" else np.array(values, dtype=dtype)
    return out


def info_of(values: Mapping[str, object], slot: int) -> EpisodeInfo:
    """An EpisodeInfo from one row of the summary columns; ``slot``: its position in the catalog."""
    return EpisodeInfo(
        episode_id=str(values["episode_id"]),
        stream=str(values["stream"]),
        slot=slot,
        row=int(values["row"]),
        num_steps=int(values["num_steps"]),
        digest=str(values["digest"]),
        robot_id=str(values["robot_id"]),
        robot_model=str(values["robot_model"]),
        source=str(values["source"]),
        policy_version=str(values["policy_version"]),
        model_version=str(values["model_version"]) or None,
        upload_time=float(values["upload_time"]),
        start_time=float(values["start_time"]),
        total_return=float(values["total_return"]),
        schema_version=str(values["schema_version"]),
        task=str(values["task"]) or None,
        control_rate_hz=None if math.isnan(rate := float(values["control_rate_hz"])) else rate,
        frames=tuple((k, int(a), int(n)) for k, (a, n) in json.loads(str(values["frames"])).items()) if values["frames"] else (),
    )


def metadata_of(info: EpisodeInfo, nested: Mapping[str, str], schema_version: str) -> dict[str, str]:
    """The episode's metadata map, exactly as uploaded, from its catalog entry and its nested
    column values (``hardware``, ``calibration``, ``scenario``, ``names``, ``cameras``,
    ``other_metadata``). ``schema_version``: the store's, for rows that do not name their own."""
    meta = {"schema_version": info.schema_version or schema_version, "episode_id": info.episode_id, "robot_id": info.robot_id}
    meta.update(robot_model=info.robot_model, source=info.source, policy_version=info.policy_version)
    if info.model_version:
        meta["model_version"] = info.model_version
    if info.task:
        meta["task"] = info.task
    if info.control_rate_hz is not None:
        meta["control_rate_hz"] = repr(info.control_rate_hz)  # other_metadata holds the text when it differs
    for key in (*JSON_METADATA, "names", "cameras"):
        if nested[key]:
            meta[key] = str(nested[key])
    meta.update(json.loads(str(nested["other_metadata"])))
    return meta
