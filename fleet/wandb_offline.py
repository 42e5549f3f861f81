"""Read a W&B offline run file (``run-*.wandb``) back into its records: what W&B will show after
``wandb sync``. The file is a LevelDB-style log (32 KiB blocks of checksummed chunks) after a
7-byte ``:W&B`` header; each record is a ``wandb_internal`` protobuf ``Record``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, parts, chunks = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER]) if left >= HEADER else (0, 0, 0)
        if left < HEADER or (length == 0 and kind == 0):  # block trailer or zero padding
            pos += left
            continue
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind == FULL:
            chunks.append(chunk)
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            chunks.append(parts + chunk)
    records = []
    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def offline_run(wandb_dir: Path) -> dict:
    """{"metrics": {name or glob: step_metric}, "history": [row dicts], "artifacts": [{name, type, aliases, metadata}],
    "config": {key: value}, "summary": {key: value} (what the run set itself), "exit_code": int or None (an unfinished run)} of
    the newest offline run in ``wandb_dir`` (a resumed run folder holds one per start: their names begin with their time)."""
    runs = sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    if not runs:
        raise FileNotFoundError(f"no W&B offline run in {wandb_dir} (offline-run-*/run-*.wandb)")
    path = runs[-1]
    records = read_records(path)
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item} for r in records if r.HasField("history")]
    metrics = {r.metric.name or r.metric.glob_name: r.metric.step_metric for r in records if r.HasField("metric")}
    artifacts = [
        {"name": a.name, "type": a.type, "aliases": list(a.aliases), "metadata": json.loads(a.metadata or "{}")}
        for a in (r.artifact for r in records if r.HasField("artifact"))
    ]
    config = {}  # the run's config as it starts, then each update
    for update in [r.run.config for r in records if r.HasField("run")] + [r.config for r in records if r.HasField("config")]:
        config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update.update})
    summary = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for r in records if r.HasField("summary") for item in r.summary.update}
    exits = [r.exit.exit_code for r in records if r.HasField("exit")]
    return {"metrics": metrics, "history": history, "artifacts": artifacts, "config": config, "summary": summary, "exit_code": exits[-1] if exits else None}
