"""A batched rollout of robots with a seeded random policy: what each robot's stepper does, measured."""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from sim.batched import BatchedStepper
from sim.policy_fn import random_policy


def survey(robots: Sequence[str], num_worlds: int, steps: int, seed: int = 0, nthread: int | None = None) -> list[dict]:
    """Step ``num_worlds`` worlds of each robot for ``steps`` control steps; one summary row per robot."""
    rows = []
    for robot in robots:
        with BatchedStepper(robot, num_worlds, nthread=nthread) as stepper:
            stepper.reset(seed=seed)
            start = time.perf_counter()
            episodes = stepper.run(random_policy(stepper.task.act_dim, seed), steps)
            elapsed = time.perf_counter() - start
            transitions = stepper.stats["steps"]
            rows.append(
                {
                    "robot": robot,
                    "worlds": num_worlds,
                    "transitions": transitions,
                    "physics_steps_per_s": transitions * stepper.task.frame_skip / elapsed,
                    "episodes_finished": len(episodes),
                    "terminated": sum(bool(e.terminated[-1]) for e in episodes),
                    "mean_return": float(np.mean([e.total_return for e in episodes])) if episodes else float("nan"),
                    "diverged": stepper.stats["diverged"],
                }
            )
    return rows
