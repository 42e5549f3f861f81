"""Minari 0.5: a real Minari dataset (arrow storage) that ``minari.load_dataset`` reads.

Layout: ``<out>/<dataset_id>/data/`` (metadata.json + one arrow partition per episode), so
``MINARI_DATASETS_PATH=<out>`` makes ``minari.load_dataset(dataset_id)`` find it, and
``minari.MinariDataset("<out>/<dataset_id>/data")`` opens it directly.

    Minari                 flywheel
    observations (T+1, d)  observation
    actions (T, a)         action
    rewards / terminations / truncations (T,)
    infos["timestamp"]     timestamp (T+1, 1)
    infos[<extra>]         optional arrays; rows are T+1, a T-length array gets a final zero row

Episode metadata (``dataset.storage.get_episode_metadata``) holds ``flywheel_metadata`` (the
full metadata map: robot_id, episode_id, policy_version, source, robot_model, hardware,
calibration, ...) and ``flywheel_snapshot_id``; the dataset metadata holds ``flywheel`` (store,
snapshot id, interop version) and ``flywheel_arrays`` (each array's dtype, tail and length).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fleet.interop.common import InteropError, Selection, new_output, single_layout
from sim.episode import CAMERA_TIMESTAMP_SUFFIX

log = logging.getLogger(__name__)

SPACE_BOUND = np.inf


def default_dataset_id(robot_models: Sequence[str]) -> str:
    """``flywheel-<model>-v0`` (several models joined by ``-``), each name's characters outside Minari's id rule as
    ``_`` (``franka.panda``, a ``/`` that Minari would read as a namespace)."""
    return "flywheel-" + "-".join(re.sub(r"[^A-Za-z0-9_-]", "_", m) for m in sorted(set(robot_models))) + "-v0"


def export_minari(selection: Selection, out: str | Path, dataset_id: str | None = None) -> Path:
    """Write the selection as Minari dataset ``dataset_id``; returns its data folder."""
    from minari.dataset.minari_dataset import parse_dataset_id

    every = single_layout(selection, "Minari")
    arrays = {k: v for k, v in every.items() if v["length"] != "frames"}
    if len(arrays) < len(every):
        log.warning("Minari export leaves out cameras with their own clock (their frames are not one per step; use --format mcap for them)")
    given, dataset_id = dataset_id is not None, dataset_id or default_dataset_id([info.robot_model for info in selection.infos])
    try:
        if not re.search(r"-v\d+$", dataset_id):  # Minari's own parser fails on it with int(None)
            raise ValueError(f"{dataset_id!r} has no version: end it with -v<N> (flywheel-pendulum-v0)")
        parse_dataset_id(dataset_id)
    except (ValueError, TypeError) as exc:
        raise InteropError(f"{'--dataset-id' if given else 'the default dataset id'}: {exc}") from None
    with new_output(Path(out) / dataset_id) as folder:  # absolute: Minari's arrow writer joins a relative path twice
        folder.mkdir(parents=True, exist_ok=True)
        _write(selection, arrays, dataset_id, folder / "data")
    return Path(out).resolve() / dataset_id / "data"


class _SizeAtEnd:
    """Mixed into the storage's own class for one export: ``get_size`` answers 0 until the end.

    Minari 0.5's arrow writer records ``dataset_size`` after every episode it appends (``update_episodes`` ->
    ``update_episode_metadata`` -> ``get_size``), and ``get_size`` globs and stats every file written so far: an
    export of N episodes made N scans of up to N folders, quadratic (2,000 one-step episodes: 439 s). The export
    writes the size once, measured by Minari's own ``get_size`` after the last episode (``_write``)."""

    def get_size(self) -> float:
        return 0.0

    def measured_size(self) -> float:
        return super().get_size()


def _write(selection: Selection, arrays: dict, dataset_id: str, data_path: Path) -> Path:
    """The episodes a batch at a time (Minari appends each batch's partitions), then the dataset's metadata and size."""
    import gymnasium as gym
    import minari
    from minari.data_collector.episode_buffer import EpisodeBuffer
    from minari.dataset.minari_storage import MinariStorage

    spec = {name: int(np.prod(arrays[name]["tail"])) for name in ("observation", "action")}
    box = lambda n: gym.spaces.Box(-SPACE_BOUND, SPACE_BOUND, (n,), np.float32)  # noqa: E731
    created = MinariStorage.new(data_path, observation_space=box(spec["observation"]), action_space=box(spec["action"]), data_format="arrow", jpeg_encoding=False)
    # the same storage (Minari's arrow class, as MinariStorage.read opens it), only this object's get_size deferred
    storage = type("ArrowStorage", (_SizeAtEnd, type(created)), {})(data_path, created.observation_space, created.action_space, jpeg_encoding=created.jpeg_encoding)
    written = 0
    for episodes in selection.batches():
        storage.update_episodes(
            EpisodeBuffer(observations=ep.observation, actions=ep.action, rewards=ep.reward, terminations=ep.terminated, truncations=ep.truncated, infos=_infos(ep))
            for ep in episodes
        )
        metadata = [{"flywheel_metadata": ep.metadata, "flywheel_snapshot_id": selection.snapshot_id} for ep in episodes]
        storage.update_episode_metadata(metadata, range(written, written + len(episodes)))
        written += len(episodes)
    storage.update_metadata(
        {
            "dataset_id": dataset_id,
            "minari_version": minari.__version__,
            "author": {"flywheel"},
            "algorithm_name": "flywheel fleet (see per-episode policy_version)",
            "description": f"{written} flywheel episodes of snapshot {selection.snapshot_id} of store {selection.store}",
            "flywheel": selection.provenance(),
            "flywheel_arrays": arrays,
            "dataset_size": storage.measured_size(),  # what Minari's get_size after each episode ended with
        }
    )
    return data_path


def _infos(ep) -> dict[str, np.ndarray]:
    """timestamp and the optional arrays as T+1 rows of at least one column."""
    out = {"timestamp": ep.timestamp.reshape(-1, 1)}
    framed = {*ep.camera_clocks(), *(f"{c}{CAMERA_TIMESTAMP_SUFFIX}" for c in ep.camera_clocks())}
    for name, arr in ep.extras.items():
        if name in framed:
            continue
        if arr.shape[0] == ep.num_steps:
            arr = np.concatenate([arr, np.zeros((1, *arr.shape[1:]), arr.dtype)])
        out[name] = arr.reshape(arr.shape[0], -1) if arr.ndim == 1 else arr
    return out
