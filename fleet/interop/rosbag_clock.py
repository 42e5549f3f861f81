"""A ROS 2 bag recorded across a clock step back (NTP setting a robot's clock that ran ahead): refused, not interleaved.

A bag is read in time order (rosbags orders by log time; the importer matches on header stamps), so the
messages recorded after a step back fall among those before it: ``[20, 0, 21, 1, ...]``, a clean-looking
stream at twice the rate with every transition wrong. The recorder's clock stepping back is seen in
the storage's own order (a .db3's messages table rows, a .mcap's file order, a split bag's files in
its metadata's order, compressed ones decompressed first); the robot's alone (a recorder on another
machine) in the observations' header stamps as read. A step back of up to one message period is the
jitter of a stream sorting puts right (two publishers, a late message), not a clock set back.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from fleet.interop.common import InteropError

log = logging.getLogger(__name__)


def refuse_a_clock_step_back(path: Path, streams: dict, obs_topic: str) -> None:
    """InteropError naming the topic, the message and how far its clock went back, where one did while the bag was
    recorded; ``streams``: topic -> [(header stamp ns or None, log time ns, message)] as read."""
    order = _storage_order(path, set(streams))
    for topic, times in order.items():
        back = _step_back(times)
        if back is not None:
            raise InteropError(
                f"{path}: the recorder's clock stepped back {back[1] / 1e9:.6g} s at message {back[0]} on {topic!r} (a clock set back "
                "while it recorded, NTP): read in time order its steps would interleave with the earlier ones, so the bag is refused. "
                "Import the recording before and after that point as two bags, and record with a clock that only goes forward"
            )
    stamps = [h for h, _, _ in streams[obs_topic]]
    back = _step_back(stamps) if all(h is not None for h in stamps) else None
    if back is not None:
        raise InteropError(
            f"{path}: the header stamps on {obs_topic!r} step back {back[1] / 1e9:.6g} s at message {back[0]} (the robot's clock was set "
            "back while it recorded, NTP): in stamp order its steps would interleave with the earlier ones, so the bag is refused. "
            "Import the recording before and after that point as two bags, and stamp with a clock that only goes forward"
        )


def _step_back(times) -> tuple[int, int] | None:
    """(message index, ns back) of the first step back longer than the stream's median period, else None."""
    gaps = np.diff(np.asarray(times, np.int64))
    forward = gaps[gaps > 0]
    period = int(np.median(forward)) if len(forward) else 0
    back = np.flatnonzero(gaps < -period)
    return None if not len(back) else (int(back[0]) + 1, int(-gaps[back[0]]))


def _storage_order(path: Path, topics: set[str]) -> dict[str, list[int]]:
    """Each topic's log times in the order the storage holds its messages ({} with a warning where it cannot be read so:
    a step back of the recorder's clock then goes unseen)."""
    times: dict[str, list[int]] = {}
    try:
        for file in _storage_files(path):
            for topic, log_ns in _stored_rows(file, topics):
                times.setdefault(topic, []).append(log_ns)
    except Exception as exc:  # noqa: BLE001  (rosbags read the bag; only its storage order is not seen)
        log.warning("%s: could not read the order its messages were stored in (%s: %s); a step back of the recorder's clock would not be seen", path, exc.__class__.__name__, exc)
        return {}
    return times


def _storage_files(path: Path) -> list[Path]:
    """The bag's storage files in recording order: its metadata's list (a split bag), else its files by split index."""
    if not path.is_dir():
        return [path]
    metadata = path / "metadata.yaml"
    if metadata.is_file():
        from ruamel.yaml import YAML

        info = YAML(typ="safe").load(metadata.read_text())["rosbag2_bagfile_information"]
        return [path / Path(name).name for name in info["relative_file_paths"]]
    files = [f for f in path.iterdir() if f.suffix in (".db3", ".mcap") or f.name.endswith((".db3.zstd", ".mcap.zstd"))]
    return sorted(files, key=_split_index)


def _stored_rows(file: Path, topics: set[str]) -> Iterator[tuple[str, int]]:
    """(topic, log time ns) of ``file``'s messages on ``topics``, in stored order; a .zstd file (rosbag2's file
    compression) decompressed to a temporary file first."""
    if file.suffix == ".zstd":
        import zstandard

        with tempfile.TemporaryDirectory() as tmp, open(file, "rb") as packed:
            plain = Path(tmp) / file.stem
            with open(plain, "wb") as out:
                zstandard.ZstdDecompressor().copy_stream(packed, out)
            yield from _stored_rows(plain, topics)
        return
    if file.suffix == ".db3":
        with contextlib.closing(sqlite3.connect(f"file:{file}?mode=ro", uri=True)) as db:
            query = "SELECT topics.name, messages.timestamp FROM messages JOIN topics ON topics.id = messages.topic_id ORDER BY messages.id"
            yield from ((t, ns) for t, ns in db.execute(query) if t in topics)
    elif file.suffix == ".mcap":
        from mcap.reader import make_reader

        with open(file, "rb") as f:
            yield from ((channel.topic, message.log_time) for _, channel, message in make_reader(f).iter_messages(topics=sorted(topics), log_time_order=False))
    else:
        raise ValueError(f"storage file {file.name} is neither .db3 nor .mcap")


def _split_index(file: Path) -> tuple[str, int]:
    """A split bag's files in recording order (``b_0.db3``, ``b_1.db3``, ... ``b_10.db3``)."""
    stem, _, index = file.name.split(".")[0].rpartition("_")
    return (stem, int(index)) if index.isdigit() else (file.name, -1)
