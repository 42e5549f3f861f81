"""A long-running store's size: one small episode a commit (robots that upload at their own pace), with the store's
maintenance (``EpisodeStore.maintain``: expired history and unreferenced objects deleted) against without, the same
episodes and commits side by side. Every episode is read back whole from both at the end (digests checked).

Maintenance runs every ``--every`` commits with no history kept and no grace (``fleet.store.maintenance.maintain``
with ``keep_history_s`` and ``gc_grace_s`` near 0): a server's 15-minute period on a faster clock.

Lines (ratio: maintained / not, lower is better): ``store_growth/bytes_per_commit``, ``store_growth/files_per_commit``,
and ``store_growth/maintenance_s`` (the longest run).

Run: `.venv/bin/python benchmarks/store_growth.py [--commits 1200] [--every 200]`
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402

from fleet.store import EpisodeStore, StoreConfig  # noqa: E402
from fleet.store.location import Location  # noqa: E402
from fleet.store.maintenance import maintain  # noqa: E402
from sim.episode import Episode  # noqa: E402

STEPS = 25  # a 1.7 KB pendulum-sized episode, as the soak's robots sent


def episode(k: int, rng: np.random.Generator) -> Episode:
    return Episode.create(
        observation=rng.normal(size=(STEPS + 1, 4)).astype(np.float32), action=rng.uniform(-1, 1, size=(STEPS, 1)).astype(np.float32),
        reward=np.ones(STEPS, np.float32), terminated=np.r_[np.zeros(STEPS - 1, bool), True], truncated=np.zeros(STEPS, bool),
        timestamp=10.0 * k + 0.05 * np.arange(STEPS + 1), robot_id="r1", robot_model="pendulum", source="real",
    )  # fmt: skip


def disk_use(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path``."""
    files = [Path(folder) / name for folder, _, names in os.walk(path) for name in names]
    return len(files), sum(f.stat().st_size for f in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commits", type=int, default=1200)
    parser.add_argument("--every", type=int, default=200, help="commits between maintenance runs")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    episodes = [episode(k, rng) for k in range(args.commits)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / name for name in ("plain", "maintained")}
        stores = {name: EpisodeStore.create(StoreConfig(path=str(path), fsync=False)) for name, path in paths.items()}
        longest = 0.0
        for k, ep in enumerate(episodes, 1):
            for store in stores.values():
                store.append([ep])
            if k % args.every == 0:
                longest = max(longest, maintain(Location.of(str(paths["maintained"])), keep_history_s=1e-3, gc_grace_s=0.0).seconds)
                (pf, pb), (mf, mb) = disk_use(paths["plain"]), disk_use(paths["maintained"])
                print(f"# {k} commits: {pb / 2**20:.1f} MiB, {pf} files without maintenance; {mb / 2**20:.1f} MiB, {mf} files with", file=sys.stderr)
        for name, path in paths.items():
            snap = EpisodeStore.open(StoreConfig(path=str(path))).snapshot()
            assert len(snap.read_episodes(snap.catalog())) == args.commits, name  # every episode whole, digests checked
        (pf, pb), (mf, mb) = disk_use(paths["plain"]), disk_use(paths["maintained"])
    n = args.commits
    emit("store_growth/bytes_per_commit", mb / n, "bytes", pb / n, round(mb / pb, 4))
    emit("store_growth/files_per_commit", mf / n, "files", pf / n, round(mf / pf, 4))
    emit("store_growth/maintenance_s", longest, "s")


if __name__ == "__main__":
    main()
