"""LeRobot dataset v3.0 (the layout of huggingface/lerobot ``CODEBASE_VERSION = "v3.0"``), with pyarrow.

    meta/info.json                              codebase_version, fps, robot_type, features, totals, path templates
    meta/stats.json                             per feature: min, max, mean, std, count, q01 q10 q50 q90 q99
    meta/tasks.parquet                          task (index) -> task_index
    meta/episodes/chunk-000/file-000.parquet    one row per episode: episode_index, tasks, length, data/chunk_index,
                                                data/file_index, dataset_from_index, dataset_to_index, stats/..., flywheel/...
    data/chunk-000/file-000.parquet             one row per frame (all episodes)
    meta/flywheel.json                          dataset-level provenance and the flywheel array layout

A flywheel episode of T steps is T frames: frame t holds observation t, action t and what
followed it (``next.reward``, ``next.terminated``, ``next.truncated``, ``next.done``). The final
observation (and the final row of every other T+1 array) is kept in the episode's
``flywheel/final`` column (JSON), the exact float64 timestamps in ``flywheel.timestamp``
(``timestamp`` is LeRobot's float32 ``frame_index / fps``), the full metadata map in
``flywheel/metadata``. Optional arrays become ``observation.qpos``, ``observation.qvel``,
``observation.actuator_force``, ``observation.contact_force`` and ``intervention``
(flattened per frame). Image arrays are not exported (LeRobot stores images as video).

Schema 1.1 metadata: ``fps`` is the episodes' ``control_rate_hz`` (rounded) when they declare
one, each feature's ``names`` the episodes' ``names`` of that array, the task their ``task``;
a foreign dataset's fps, ``observation.state``/``action`` names and first task come back as
``control_rate_hz``, ``names`` and ``task`` (docs/interop.md).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from fleet.interop.common import (
    ImportOptions, InteropError, Selection, cast, derived_episode_id, foreign_episode, fps_of, new_output, restored_episode, single_layout, step_rate,
)  # fmt: skip
from sim.episode import IMAGE_PREFIX, RATE_TOLERANCE, Episode, EpisodeValidationError, schema_cast

log = logging.getLogger(__name__)
CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
DATA_FILE_MB = 100  # LeRobot's default data file size
CHUNKS_SIZE = 1000  # files per chunk folder
# flywheel array -> LeRobot feature
FEATURE = {
    "observation": "observation.state",
    "action": "action",
    "reward": "next.reward",
    "terminated": "next.terminated",
    "truncated": "next.truncated",
    "timestamp": "flywheel.timestamp",
    "qpos": "observation.qpos",
    "qvel": "observation.qvel",
    "actuator_force": "observation.actuator_force",
    "contact_force": "observation.contact_force",
    "intervention": "intervention",
}


def task_of(metadata: dict[str, str]) -> str:
    return metadata.get("task") or metadata.get("x.task", f"flywheel {metadata['robot_model']}")


def names_of(variants: set[tuple[str, ...]], array: str) -> list[str] | None:
    """The dimension names of ``array`` when every episode declares them alike (schema 1.1 ``names``; ``variants``: the
    tuples seen, () for none), else None."""
    if len(variants) > 1:
        log.warning("episodes name the dimensions of %r differently (%d variants); LeRobot feature names left empty", array, len(variants))
        return None
    return list(next(iter(variants), ())) or None


# -- export -----------------------------------------------------------------------------
def export_lerobot(selection: Selection, out: str | Path, data_file_mb: float = DATA_FILE_MB) -> Path:
    """Write the selection as a LeRobot v3.0 dataset rooted at ``out``; returns ``out``. Frames go into data files of
    about ``data_file_mb`` each, and the selection is read a batch at a time: memory stays bounded whatever its size."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    with new_output(out) as root:
        _write(selection, root, data_file_mb, pd, pa, pq)
    return Path(out).resolve()


def _write(selection: Selection, root: Path, data_file_mb: float, pd, pa, pq) -> None:
    every = single_layout(selection, "LeRobot")
    arrays = {k: v for k, v in every.items() if not k.startswith(IMAGE_PREFIX)}
    skipped = sorted(set(every) - set(arrays))
    if skipped:
        log.warning("LeRobot export leaves out image arrays %s (LeRobot keeps images as video; use --format minari or mcap for them)", skipped)
    declared, rates, tasks, names = [], [], set(), {name: set() for name in arrays}
    for meta, arrs in selection.headers(["timestamp"]):  # first pass: what the dataset's header needs, reading little
        declared.append(float(meta["control_rate_hz"]) if "control_rate_hz" in meta else None)
        rates.append(step_rate(arrs["timestamp"]))
        tasks.add(task_of(meta))
        named = json.loads(meta["names"]) if "names" in meta else {}
        for name in arrays:
            names[name].add(tuple(named.get(name) or ()))
    fps = fps_of(declared, rates)
    _check_one_rate(selection.infos, rates, fps)
    tasks = sorted(tasks)
    data = _DataFiles(root, int(data_file_mb * 2**20), pa, pq)
    totals: dict[str, dict[str, np.ndarray]] = {}
    features: dict[str, dict] = {}
    episode_rows: list[dict] = []
    episodes_file = _RowGroups(root / EPISODES_PATH.format(chunk_index=0, file_index=0), pa, pq)
    start = index = 0
    for batch in selection.batches():
        for ep in batch:
            frames = _frames(ep, arrays, index, start, fps, tasks.index(task_of(ep.metadata)))
            features = features or {key: _feature(value) for key, value in frames.items()}
            chunk_index, file_index = data.add(frames)
            final = {name: ep.arrays()[name][-1].reshape(-1).tolist() for name, spec in arrays.items() if spec["length"] == "T+1"}
            row = {
                "episode_index": index,
                "tasks": [task_of(ep.metadata)],
                "length": ep.num_steps,
                "data/chunk_index": chunk_index,
                "data/file_index": file_index,
                "dataset_from_index": start,
                "dataset_to_index": start + ep.num_steps,
                "meta/episodes/chunk_index": 0,
                "meta/episodes/file_index": 0,
                "flywheel/metadata": json.dumps(ep.metadata, sort_keys=True),
                "flywheel/final": json.dumps(final),
                "flywheel/snapshot_id": selection.snapshot_id,
            }
            for feature, stats in _stats(frames).items():
                row.update({f"stats/{feature}/{name}": value.tolist() for name, value in stats.items()})
                totals[feature] = _merged(totals.get(feature), stats)
            episode_rows.append(row)
            start += ep.num_steps
            index += 1
        data.flush()  # the batch's frames and episode rows, before the next batch is read
        episodes_file.write(episode_rows)
        episode_rows = []
    data.close()
    episodes_file.close()
    for name in arrays:
        features[FEATURE[name]]["names"] = names_of(names[name], name)
    pd.DataFrame({"task_index": range(len(tasks))}, index=pd.Index(tasks, name="task")).to_parquet(root / "meta" / "tasks.parquet")
    models = sorted({info.robot_model for info in selection.infos})
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": models[0] if len(models) == 1 else None,
        "total_episodes": index,
        "total_frames": start,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": data_file_mb,
        "video_files_size_in_mb": 200,
        "fps": fps,
        "splits": {"train": f"0:{index}"},
        "data_path": DATA_PATH,
        "video_path": None,
        "features": features,
    }
    _write_json(root / "meta" / "info.json", info)
    _write_json(root / "meta" / "stats.json", {k: {s: v.tolist() for s, v in st.items()} for k, st in totals.items()})
    _write_json(root / "meta" / "flywheel.json", {**selection.provenance(), "arrays": arrays, "features": {k: FEATURE[k] for k in arrays}, "skipped_arrays": skipped})


class _DataFiles:
    """The frames of whole episodes into ``data/chunk-C/file-F.parquet`` files of about ``max_bytes`` each (an episode
    is never split; a file holds at least one), CHUNKS_SIZE files a chunk, as LeRobot v3.0 lays them out. Frames are
    written a row group at a time (:meth:`flush`, once per batch read), so one batch's frames are held, not a file's."""

    def __init__(self, root: Path, max_bytes: int, pa, pq):
        self.root, self.max_bytes, self.pa, self.pq = root, max_bytes, pa, pq
        self.columns: dict[str, list[np.ndarray]] = {}
        self.size = self.files = 0  # bytes of frames in the open file (written or buffered); files finished
        self.file = self._open()

    def _open(self) -> _RowGroups:
        chunk_index, file_index = divmod(self.files, CHUNKS_SIZE)
        return _RowGroups(self.root / DATA_PATH.format(chunk_index=chunk_index, file_index=file_index), self.pa, self.pq)

    def add(self, frames: dict[str, np.ndarray]) -> tuple[int, int]:
        """Buffer one episode's frames; returns the (chunk_index, file_index) of the file it goes into."""
        nbytes = sum(v.nbytes for v in frames.values())
        if self.size and self.size + nbytes > self.max_bytes:
            self.close()
            self.size, self.files = 0, self.files + 1
            self.file = self._open()
        for key, value in frames.items():
            self.columns.setdefault(key, []).append(value)
        self.size += nbytes
        return divmod(self.files, CHUNKS_SIZE)

    def flush(self) -> None:
        """Write the buffered frames as one row group of the open file."""
        if self.columns:
            self.file.write_table(self.pa.table({k: _arrow(np.concatenate(parts)) for k, parts in self.columns.items()}))
            self.columns = {}

    def close(self) -> None:
        self.flush()
        self.file.close()


class _RowGroups:
    """One parquet file written a row group at a time, made with its first one."""

    def __init__(self, path: Path, pa, pq):
        self.path, self.pa, self.pq, self.writer = path, pa, pq, None

    def write(self, rows: list[dict]) -> None:
        """Rows (dicts) as one row group, typed as the file's first."""
        if rows:
            self.write_table(self.pa.Table.from_pylist(rows, schema=self.writer.schema if self.writer is not None else None))

    def write_table(self, table) -> None:
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = self.pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _merged(total: dict[str, np.ndarray] | None, stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dataset statistics with one more episode's: min, max, count exact; mean and std by the parallel (Chan) update,
    exact up to rounding; each quantile the count-weighted mean of the episodes' (an estimate: quantiles do not merge)."""
    if total is None:
        return dict(stats)
    n, m = total["count"].astype(np.float64), stats["count"].astype(np.float64)
    count = n + m
    delta = stats["mean"] - total["mean"]
    mean = total["mean"] + delta * (m / count)
    var = (total["std"] ** 2 * n + stats["std"] ** 2 * m + delta**2 * n * m / count) / count
    out = {"min": np.minimum(total["min"], stats["min"]), "max": np.maximum(total["max"], stats["max"]), "mean": mean, "std": np.sqrt(var), "count": total["count"] + stats["count"]}
    out.update({q: (total[q] * n + stats[q] * m) / count for q in total if q.startswith("q")})
    return out


def _check_one_rate(infos: list, rates: list[float], fps: int) -> None:
    """InteropError for an episode whose steps are not 1/``fps`` apart (within RATE_TOLERANCE, the tolerance of a declared
    control rate): LeRobot's time is frame_index / fps, one integer rate per dataset, so its timestamps would be wrong
    (a 10 Hz robot beside 50 Hz ones: 5x too fast). ``rates``: each episode's, from its timestamps."""
    one_rate = len({round(r, 6) for r in rates}) == 1
    for info, rate in zip(infos, rates):
        if abs(rate / fps - 1.0) <= RATE_TOLERANCE:
            continue
        if one_rate and abs(rate - round(rate)) > RATE_TOLERANCE * rate:  # one robot's rate, and no integer near it
            raise InteropError(
                f"the episodes step at {rate:.4g} Hz, and a LeRobot dataset's fps is an integer (its timestamps are frame_index / fps): "
                "no LeRobot fps fits; use --format minari or mcap, which keep each row's own time"
            )
        raise InteropError(
            f"episode {info.episode_id} of {info.robot_id} steps at {rate:.4g} Hz, the dataset at {fps} fps: a LeRobot dataset has one "
            "integer frame rate, and its timestamps are frame_index / fps; export robots of each rate apart (--robot-id), or use "
            "--format minari or mcap, which keep each row's own time"
        )


def _frames(ep: Episode, arrays: dict, index: int, start: int, fps: int, task_index: int) -> dict[str, np.ndarray]:
    """The T frame rows of one episode, by feature."""
    T, all_arrays = ep.num_steps, ep.arrays()
    out = {FEATURE[name]: all_arrays[name][:T].reshape(T, -1) if all_arrays[name].ndim > 2 else all_arrays[name][:T] for name in arrays}
    out["next.done"] = ep.terminated | ep.truncated
    out["timestamp"] = (np.arange(T) / fps).astype(np.float32)
    out["frame_index"] = np.arange(T, dtype=np.int64)
    out["episode_index"] = np.full(T, index, np.int64)
    out["index"] = np.arange(start, start + T, dtype=np.int64)
    out["task_index"] = np.full(T, task_index, np.int64)
    return out


def _feature(values: np.ndarray) -> dict:
    return {"dtype": "bool" if values.dtype == np.bool_ else str(values.dtype), "shape": [int(values.shape[1]) if values.ndim == 2 else 1], "names": None}


def _arrow(values: np.ndarray):
    import pyarrow as pa

    if values.ndim == 1 or values.shape[1] == 1:  # LeRobot reads a feature of shape [1] as a scalar column
        return pa.array(np.ascontiguousarray(values.reshape(len(values))))
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), values.shape[1])


def _stats(columns: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """LeRobot's per-feature statistics (vector features: per dimension)."""
    out = {}
    for key, values in columns.items():
        x = values.reshape(values.shape[0], -1).astype(np.float64)
        out[key] = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0), "count": np.array([x.shape[0]])}
        out[key].update({f"q{int(round(q * 100)):02d}": np.quantile(x, q, axis=0) for q in QUANTILES})
    return out


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=4) + "\n")


# -- import -----------------------------------------------------------------------------
def import_lerobot(root: str | Path, options: ImportOptions = ImportOptions()) -> list[Episode]:
    """Episodes of a LeRobot v3.0 dataset folder: bit-exact for a flywheel export, else mapped
    (observation.state, action, next.reward, timestamp; see docs/interop.md)."""
    import pyarrow.parquet as pq

    root = Path(root)
    info_path = root / "meta" / "info.json"
    if not info_path.is_file():
        raise InteropError(f"{root} has no meta/info.json, so it is not a LeRobot dataset folder; pass the dataset's root folder")
    info = json.loads(info_path.read_text())
    if not isinstance(info, dict):
        raise InteropError(f"{info_path} is JSON, but not an object of the dataset's fields; it is not a LeRobot dataset's info.json")
    version = str(info.get("codebase_version", "?"))
    if not version.startswith("v3."):
        raise InteropError(
            f"{root} is a LeRobot {version} dataset; this import reads v3.0 only: convert it with lerobot's "
            "`python -m lerobot.scripts.convert_dataset_v21_to_v30` first"
        )
    episode_files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not episode_files:
        raise InteropError(f"{root}/meta/episodes/ holds no chunk-*/file-*.parquet; the dataset is incomplete")
    meta_rows = [row for f in episode_files for row in pq.read_table(f).to_pylist()]
    data_path = info.get("data_path", DATA_PATH)
    tables: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    flywheel = json.loads((root / "meta" / "flywheel.json").read_text()) if (root / "meta" / "flywheel.json").is_file() else None
    if flywheel is not None and not isinstance(flywheel, dict):
        raise InteropError(f"{root}/meta/flywheel.json is not a JSON object; it is not a flywheel export's provenance")
    out, single = [], []  # single: episodes of one frame (no step), left out
    for row in sorted(meta_rows, key=lambda r: r["episode_index"]):
        key = (row["data/chunk_index"], row["data/file_index"])
        if key not in tables:
            path = _inside(root, data_path, key)
            if not path.is_file():
                raise InteropError(f"{path} is missing but episode {row['episode_index']} points to it; the dataset is incomplete")
            rows, declared = pq.ParquetFile(path).metadata.num_rows, info.get("total_frames")
            if isinstance(declared, int) and rows > declared:  # read whole below: a file of 10^8 tiny rows is gigabytes in memory
                raise InteropError(f"{path} holds {rows} rows, more than the {declared} frames meta/info.json declares; the dataset is inconsistent")
            table = pq.read_table(path)
            tables[key] = {name: _numpy(col) for name, col in zip(table.column_names, table.columns)}
        table = tables[key]
        rows = table["episode_index"] == row["episode_index"]
        frames = {name: col[rows] for name, col in table.items()}
        origin = f"{root} episode {row['episode_index']}"
        if flywheel is not None and row.get("flywheel/metadata"):
            out.append(_restore(frames, row, flywheel["arrays"], origin, flywheel.get("skipped_arrays") or []))
        elif len(frames.get("frame_index", frames.get("timestamp", ()))) < 2:  # no step in it: left out, the others still come in
            single.append(row["episode_index"])
        else:
            out.append(_foreign(frames, row, info, options, origin))
    if single:
        log.warning("%s: left out %d episode(s) of one frame, which hold no step (an episode needs two frames): %s", root, len(single), single[:20])
    features = info.get("features") if isinstance(info.get("features"), dict) else {}
    if flywheel is None and (unread := sorted(set(features) - FOREIGN_READ)):  # a camera or a gripper flag went without a word
        log.warning("%s: features not imported (images, videos and features other than observation.state, action, next.reward and "
                    "timestamp; docs/interop.md): %s; to keep a value, put it into observation.state", root, ", ".join(unread))  # fmt: skip
    return out


# what a foreign dataset's import reads (_foreign), or needs no word about (LeRobot's own bookkeeping columns)
FOREIGN_READ = frozenset({"observation.state", "action", "next.reward", "timestamp", "frame_index", "episode_index", "index", "task_index", "next.done"})


def _inside(root: Path, template, key: tuple[int, int]) -> Path:
    """The data file ``template`` (info.json's data_path) names for (chunk, file) ``key``, inside ``root``: an absolute path,
    a ``..`` or a link out of the dataset folder once imported another dataset's files under this one's robot."""
    if not isinstance(template, str):
        raise InteropError(f"{root}/meta/info.json: data_path must be a path template like {DATA_PATH!r}, got {template!r}")
    try:
        relative = template.format(chunk_index=key[0], file_index=key[1])
    except (KeyError, IndexError, ValueError) as exc:
        raise InteropError(f"{root}/meta/info.json: data_path {template!r} is not a template of chunk_index and file_index ({exc})") from None
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InteropError(f"{root}/meta/info.json: data_path {template!r} names {path}, outside the dataset folder; a dataset reads only its own files")
    return path


def _numpy(column) -> np.ndarray:
    """A parquet column as numpy: (rows,) for scalars, (rows, n) for fixed-size lists."""
    import pyarrow as pa

    column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type):
        return np.stack(column.to_numpy(zero_copy_only=False)) if len(column) else np.zeros((0, 0))
    return column.to_numpy(zero_copy_only=False)


def _restore(frames: dict[str, np.ndarray], row: dict, arrays: dict, origin: str, skipped: list[str]) -> Episode:
    final = json.loads(row["flywheel/final"])
    out = {}
    for name, spec in arrays.items():
        feature = FEATURE[name]
        if feature not in frames:
            raise InteropError(f"{origin}: column {feature!r} is missing from the data files")
        values = frames[feature]
        if spec["length"] == "T+1":
            values = np.concatenate([values.reshape(values.shape[0], -1), np.asarray(final[name], values.dtype).reshape(1, -1)])
        out[name] = cast(values, spec["dtype"], spec["tail"], f"{origin} array {name!r}")
    metadata = _without_missing_cameras(json.loads(row["flywheel/metadata"]), out)
    if skipped:  # the export left arrays out: this is other content than the episode it came from, so another episode id
        metadata = {**metadata, "episode_id": derived_episode_id(metadata["episode_id"], skipped), "x.flywheel.derived_from": metadata["episode_id"]}
    return restored_episode(out, metadata, origin)


def _without_missing_cameras(metadata: dict, arrays: dict) -> dict:
    """The metadata less the ``cameras`` entries of image arrays LeRobot did not carry (images are not exported)."""
    if "cameras" not in metadata:
        return metadata
    cameras = {k: v for k, v in json.loads(metadata["cameras"]).items() if f"{IMAGE_PREFIX}{k}" in arrays}
    rest = {k: v for k, v in metadata.items() if k != "cameras"}
    return {**rest, "cameras": json.dumps(cameras, sort_keys=True)} if cameras else rest


def _foreign(frames: dict[str, np.ndarray], row: dict, info: dict, options: ImportOptions, origin: str) -> Episode:
    """A LeRobot episode of L frames -> T = L - 1 steps: observation.state (L rows), action, reward
    and timestamps of the first L - 1 frames; it ends truncated (the recording stopped)."""
    for feature in ("observation.state", "action", "timestamp"):
        if feature not in frames:
            raise InteropError(f"{origin}: needs feature {feature!r}; it has {sorted(frames)}")
    order = np.argsort(frames["frame_index"]) if "frame_index" in frames else slice(None)
    try:  # float32 as before (an import's id hashes these bytes), refusing a cast that changes the values (int ticks over 2^24)
        obs, action = (schema_cast(name, frames[name][order], np.float32) for name in ("observation.state", "action"))
    except EpisodeValidationError as exc:
        raise InteropError(f"{origin}: {exc}") from None
    L = obs.shape[0]
    if L < 2:
        raise InteropError(f"{origin}: has {L} frame(s); an episode needs at least 2 (one step)")
    T = L - 1
    reward = frames["next.reward"][order][:T].astype(np.float32).reshape(T) if "next.reward" in frames else np.zeros(T, np.float32)
    truncated = np.zeros(T, bool)
    truncated[-1] = True
    arrays = {
        "observation": obs.reshape(L, -1),
        "action": action[:T].reshape(T, -1),
        "reward": reward,
        "terminated": np.zeros(T, bool),
        "truncated": truncated,
        "timestamp": frames["timestamp"][order].astype(np.float64),
    }
    robot_model = options.robot_model or info.get("robot_type")
    extra = _schema_1_1_metadata(row, info, arrays, origin)
    return foreign_episode(arrays, ImportOptions(**{**options.__dict__, "robot_model": robot_model}), origin, extra)


def _schema_1_1_metadata(row: dict, info: dict, arrays: dict[str, np.ndarray], origin: str) -> dict[str, str]:
    """task (the first task), control_rate_hz (info.json ``fps``, when the timestamps agree) and
    names (features' ``names`` of observation.state and action, when they fit) of a foreign episode."""
    out = {}
    tasks = row.get("tasks") or []
    if tasks and str(tasks[0]).strip():
        out["task"] = str(tasks[0])
    fps = info.get("fps")
    step = float(np.median(np.diff(arrays["timestamp"])))
    if isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0:
        if abs(fps * step - 1.0) <= RATE_TOLERANCE:
            out["control_rate_hz"] = repr(float(fps)) if isinstance(fps, float) else str(fps)
        else:
            log.warning("%s: info.json fps %s disagrees with its timestamps (median step %s s); control_rate_hz left out", origin, fps, step)
    names = {}
    for array, feature in (("observation", "observation.state"), ("action", "action")):
        given = (info.get("features", {}).get(feature) or {}).get("names")
        if isinstance(given, dict) and len(given) == 1:  # LeRobot v2 style {"motors": [...]}
            given = next(iter(given.values()))
        if isinstance(given, list) and len(given) == arrays[array].shape[1] and all(isinstance(n, str) and n for n in given) and len(set(given)) == len(given):
            names[array] = given
    if names:
        out["names"] = json.dumps(names, sort_keys=True)
    return out
