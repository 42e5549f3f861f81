"""MCAP: one file per export, a JSON channel per array, log times from the episode timestamps.

Channels (message encoding ``json``, schema encoding ``jsonschema``):

    /flywheel/episode            one message per episode at its first timestamp: episode_id,
                                 num_steps, the full metadata map, the array layout, snapshot_id
    /flywheel/<array>            one message per row of that array (``image.front`` ->
                                 ``/flywheel/image/front``): episode_id, step, timestamp,
                                 shape (of one row), data (the row, flattened)

A row's log time is its timestamp in nanoseconds (clamped at 0). Values go through JSON as
Python floats, which hold float32 and float64 exactly, so an import is bit-exact. The file's
metadata record ``flywheel.export`` holds the dataset-level provenance (store, snapshot id).
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np

from fleet.interop.common import InteropError, Selection, cast, layout, new_output, restored_episode
from sim.episode import CAMERA_TIMESTAMP_SUFFIX, Episode

EPISODE_TOPIC = "/flywheel/episode"
METADATA_NAME = "flywheel.export"
_ROW_SCHEMA = {
    "title": "flywheel.ArrayRow",
    "type": "object",
    "properties": {
        "episode_id": {"type": "string"},
        "step": {"type": "integer"},
        "timestamp": {"type": "number", "description": "seconds (the episode's timestamp of this step; a camera with its own clock: of this frame)"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "data": {"type": "array", "items": {"type": ["number", "boolean"]}},
    },
}
_EPISODE_SCHEMA = {
    "title": "flywheel.Episode",
    "type": "object",
    "properties": {
        "episode_id": {"type": "string"},
        "num_steps": {"type": "integer"},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "arrays": {"type": "object"},
        "snapshot_id": {"type": "string"},
    },
}


def topic_of(array: str) -> str:
    return "/flywheel/" + array.replace(".", "/")


MAX_NS = (1 << 64) - 1  # MCAP's log and publish times are unsigned 64-bit nanoseconds


def _ns(seconds: float) -> int:
    """MCAP time of a row: its timestamp in ns, a time before the epoch as 0 (the row keeps its own in ``timestamp``)."""
    ns = max(0, int(round(seconds * 1e9)))
    if ns > MAX_NS:
        raise InteropError(
            f"timestamp {seconds:.6g} s is past what MCAP's 64-bit nanosecond times hold (about 1.8e10 s, the year 2554): a clock in "
            "milliseconds? export with --format minari or lerobot, or fix the robot's clock"
        )
    return ns


def export_mcap(selection: Selection, out: str | Path) -> Path:
    """Write the selection to ``out/episodes.mcap``; returns the file path."""
    from mcap.writer import Writer

    Path(out).mkdir(parents=True, exist_ok=True)
    with new_output(Path(out) / "episodes.mcap") as path, open(path, "wb") as f:
        writer = Writer(f)
        writer.start(profile="", library="flywheel")
        row_schema = writer.register_schema("flywheel.ArrayRow", "jsonschema", json.dumps(_ROW_SCHEMA).encode())
        episode_schema = writer.register_schema("flywheel.Episode", "jsonschema", json.dumps(_EPISODE_SCHEMA).encode())
        channels = {EPISODE_TOPIC: writer.register_channel(EPISODE_TOPIC, "json", episode_schema)}
        channels_of: dict[str, str] = {}  # topic -> the array it carries
        for ep in (ep for batch in selection.batches() for ep in batch):  # a batch in memory at a time
            arrays, clocks = ep.arrays(), ep.camera_clocks()
            writer.add_message(channels[EPISODE_TOPIC], _ns(ep.timestamp[0]), _episode_message(ep, selection.snapshot_id), _ns(ep.timestamp[0]))
            for name, arr in sorted(arrays.items()):
                if name == "timestamp":
                    continue  # every row message carries its timestamp
                topic = topic_of(name)
                if topic in channels and channels_of.get(topic, name) != name:
                    raise InteropError(f"arrays {channels_of[topic]!r} and {name!r} both map to MCAP topic {topic}: rename one (a '.' and a '/' read alike there)")
                channels_of[topic] = name
                if topic not in channels:
                    channels[topic] = writer.register_channel(topic, "json", row_schema, {"array": name, "dtype": str(arr.dtype)})
                shape = list(arr.shape[1:])
                ts = clocks.get(name.removesuffix(CAMERA_TIMESTAMP_SUFFIX), ep.timestamp)  # a camera with its own clock: its frame times
                for step in range(arr.shape[0]):
                    row = {"episode_id": ep.episode_id, "step": step, "timestamp": float(ts[step]), "shape": shape, "data": arr[step].reshape(-1).tolist()}
                    writer.add_message(channels[topic], _ns(ts[step]), json.dumps(row).encode(), _ns(ts[step]), sequence=step)
        writer.add_metadata(METADATA_NAME, {k: str(v) for k, v in selection.provenance().items()} | {"episodes": str(len(selection))})
        writer.finish()
    return Path(out).resolve() / "episodes.mcap"


def _episode_message(ep: Episode, snapshot_id: str) -> bytes:
    return json.dumps({"episode_id": ep.episode_id, "num_steps": ep.num_steps, "metadata": ep.metadata, "arrays": layout(ep), "snapshot_id": snapshot_id}).encode()


def import_mcap(path: str | Path) -> list[Episode]:
    """Episodes from an MCAP file written by :func:`export_mcap`, bit-exact, in file order."""
    from mcap.exceptions import McapError
    from mcap.reader import make_reader

    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path} is not a file; pass the .mcap file written by `flywheel export --format mcap`")
    heads: dict[str, dict] = {}
    rows: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    try:
        with open(path, "rb") as f:
            reader = make_reader(f)
            for _, channel, message in reader.iter_messages(log_time_order=False):
                body = json.loads(message.data)
                if channel.topic == EPISODE_TOPIC:
                    heads[body["episode_id"]] = body
                elif "array" in channel.metadata:
                    rows[body["episode_id"]][channel.metadata["array"]][body["step"]] = body
    except (McapError, ValueError, KeyError, struct.error, EOFError) as exc:  # struct.error, EOFError: a file too short for a record
        raise InteropError(f"{path} is not a readable flywheel MCAP file ({exc.__class__.__name__}: {exc}); re-export it with `flywheel export --format mcap`") from None
    if not heads:
        raise InteropError(
            f"{path} has no {EPISODE_TOPIC} channel, so it was not written by `flywheel export --format mcap`; "
            "for a ROS 2 recording (bag folder, .db3 or ROS 2 .mcap) use `flywheel import --format rosbag`"
        )
    return [_episode(head, rows[eid], f"{path} episode {eid}") for eid, head in heads.items()]


def _episode(head: dict, rows: dict[str, dict[int, dict]], origin: str) -> Episode:
    steps = head["num_steps"]
    arrays: dict[str, np.ndarray] = {}
    timestamps: dict[int, float] = {}
    for name, spec in head["arrays"].items():
        if name == "timestamp":
            continue
        got = rows.get(name, {})
        expected = len(got) if spec["length"] == "frames" else steps + 1 if spec["length"] == "T+1" else steps
        if len(got) != expected or sorted(got) != list(range(expected)):  # the length first: a header may claim 10^8 rows
            raise InteropError(f"{origin}: array {name!r} has {len(got)} of its {expected} rows; the file is truncated or was edited, re-export it")
        arrays[name] = cast([got[t]["data"] for t in range(expected)], spec["dtype"], spec["tail"], f"{origin} array {name!r}")
        if spec["length"] == "frames":
            continue  # row times are the camera's clock, which is its own array
        for t in range(expected):
            timestamps[t] = got[t]["timestamp"]
    arrays["timestamp"] = np.array([timestamps[t] for t in range(steps + 1)], dtype=np.float64)
    return restored_episode(arrays, head["metadata"], origin)


def read_export_metadata(path: str | Path) -> dict[str, str]:
    """The ``flywheel.export`` metadata record of an exported file ({} if absent)."""
    from mcap.reader import make_reader

    with open(path, "rb") as f:
        for record in make_reader(f).iter_metadata():
            if record.name == METADATA_NAME:
                return dict(record.metadata)
    return {}

