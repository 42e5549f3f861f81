"""What a long-running loop reads each iteration: every real episode ever stored, or the newest
``loop.real_window_steps`` (:func:`fleet.pipeline.services.newest_within`), side by side on the same store.

A store is filled as a fleet fills it: each iteration, ``--robots`` robots upload ``--episodes`` 200-step pendulum
episodes each, in one commit. Every ``--check-every`` iterations the loop's own read
(:meth:`fleet.pipeline.services.Services.read_data`) runs once as it does now (the window; reading on from its last
snapshot, so only the catalog rows committed since are read) and once as it did before (every episode; the whole
catalog read again), which one first in turn: seconds, and the bytes of the episodes each holds (their arrays).

Lines at the last iteration (ratio: now / before, lower is better): ``data_window/read_s``,
``data_window/held_MB``, ``data_window/steps_read``. Per check, a ``#`` line on stderr.

Run: `.venv/bin/python benchmarks/data_window.py [--iterations 60] [--robots 4] [--episodes 40] [--window 1000000]`
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402

from fleet.pipeline.services import Services  # noqa: E402
from fleet.store import EpisodeStore, StoreConfig  # noqa: E402
from sim.episode import Episode  # noqa: E402

STEPS = 200  # the demo's telemetry episodes


def episode(robot: str, k: int, rng: np.random.Generator) -> Episode:
    return Episode.create(
        observation=rng.normal(size=(STEPS + 1, 4)).astype(np.float32), action=rng.uniform(-1, 1, size=(STEPS, 1)).astype(np.float32),
        reward=np.ones(STEPS, np.float32), terminated=np.zeros(STEPS, bool), truncated=np.r_[np.zeros(STEPS - 1, bool), True],
        timestamp=10.0 * k + 0.05 * np.arange(STEPS + 1), robot_id=robot, robot_model="pendulum", source="real",
    )  # fmt: skip


def held_bytes(episodes: list[Episode]) -> int:
    return sum(a.nbytes for ep in episodes for a in (ep.observation, ep.action, ep.reward, ep.terminated, ep.truncated, ep.timestamp))


def read(svc, window: int | None, iteration_start: str) -> tuple[float, int, int]:
    """(seconds, bytes held, steps) of one read of the loop's real data, as the loop reads it: the tip, and its sim
    episodes as of the iteration's start (a snapshot before the robots' telemetry)."""
    start = time.perf_counter()
    _, real, _, _ = svc.read_data("pendulum", iteration_start, window, None)
    return time.perf_counter() - start, held_bytes(real), sum(ep.num_steps for ep in real)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--robots", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=40, help="per robot and iteration")
    parser.add_argument("--window", type=int, default=1_000_000, help="loop.real_window_steps")
    parser.add_argument("--check-every", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = EpisodeStore.create(StoreConfig(path=os.path.join(tmp, "store"), fsync=False))
        loops = {window: Services.of_store(store) for window in (None, args.window)}
        for it in range(1, args.iterations + 1):
            iteration_start = store.latest_snapshot_id()
            store.append([episode(f"robot-{r}", it * args.episodes + k, rng) for r in range(args.robots) for k in range(args.episodes)])
            if it % args.check_every and it != args.iterations:
                continue
            order = (None, args.window) if it // args.check_every % 2 else (args.window, None)  # who reads first, in turn
            loops[None]._last_read = None  # the loop before windows: the whole catalog read again every iteration
            took = {window: read(loops[window], window, iteration_start) for window in order}
            everything, windowed = took[None], took[args.window]
            print(
                f"# iteration {it}: stored {everything[2]:,} steps; read {windowed[0]:.2f} s / {everything[0]:.2f} s, "
                f"held {windowed[1] / 1e6:.1f} MB / {everything[1] / 1e6:.1f} MB (now / before)", file=sys.stderr,
            )  # fmt: skip
        for name, unit, scale, i in (("read_s", "s", 1.0, 0), ("held_MB", "MB", 1e-6, 1), ("steps_read", "steps", 1.0, 2)):
            emit(f"data_window/{name}", windowed[i] * scale, unit, everything[i] * scale, round(windowed[i] / everything[i], 4))


if __name__ == "__main__":
    main()
