"""Pooling at equal data, with the flywheel's learner: does training one policy on every body cost a
robot its own skill?

The pooled policy is benchmarks/sensor_filter.py's ``simulated`` arm, the flywheel's way: the
model-based learner (``policies.mbpo.default_config``, body-conditioned, the sensor-noise rule) on the
four demo bodies, one world each, ``--steps`` real steps pooled, the noisy robot's Kalman filter fitted
before training and simulated in its world. A *specialist* per condition gets the same learner, the
same treatment of its sensor and the same ``--steps`` real steps, all on its own body. Both are
evaluated on that body (6 fixed-seed 1,000-step episodes; the noisy one through its filter).
Lines ``fleet_vs_solo/{condition}/equal_data_return_flywheel_learner``: value the pooled policy's
return on the condition, baseline the specialist's, ratio of the medians over ``--seeds`` (goal >= 0.9,
issue 9). benchmarks/fleet_vs_solo.py's ``equal_data_return`` lines make the same comparison with
model-free SAC 2x64 at 8,000 steps, where no arm has learned the task yet.

Line ``fleet_vs_solo/noisy_sensor/equal_data_return_as_released``: the same policies on the noisy
body through a filter refitted under each (the flywheel's release carries one fitted under the policy
it carries, fleet/pipeline/loop.py), pooled vs specialist, ratio of the medians.

Seeds are cached as JSON under ``runs/benchmarks/sensor_filter/`` (the pooled runs are that
benchmark's), so seeds and conditions may run in separate processes (``--conditions``); ``--fresh``
ignores the cache.

Run: `.venv/bin/python benchmarks/equal_data.py [--steps 3000] [--seeds 0 1 2] [--conditions nominal ...]`
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import cached_json, emit, pooled_seed_args  # noqa: E402
from sensor_filter import CACHE, FLEET, cached, run_arm  # noqa: E402

ARM = "simulated"


def specialist(steps: int, seed: int, condition: str, fresh: bool) -> dict:
    """The specialist's run: ``returns[0]`` on its own body (and, for the noisy body, ``noisy_with_refit_filter``)."""
    path = CACHE / f"steps{steps}-seed{seed}-{ARM}-only-{condition}.json"
    return cached_json(path, lambda: run_arm(steps, seed, ARM, (condition,)), fresh)


def main() -> None:
    args = pooled_seed_args(__doc__, "real steps: pooled over the four bodies, or all on one body (a specialist)", conditions=FLEET)
    conditions = [c for c in FLEET if c in args.conditions]
    pooled_runs = [cached(args.steps, seed, ARM, args.fresh) for seed in args.seeds]
    pooled = [run["returns"] for run in pooled_runs]
    med = lambda values: float(statistics.median(values))  # noqa: E731
    for condition in conditions:
        i = FLEET.index(condition)
        runs = [specialist(args.steps, seed, condition, args.fresh) for seed in args.seeds]
        alone = [run["returns"][0] for run in runs]
        print(f"# {condition}: pooled " + "/".join(f"{r[i]:.0f}" for r in pooled) + ", specialist " + "/".join(f"{x:.0f}" for x in alone), file=sys.stderr)
        a, b = med([r[i] for r in pooled]), med(alone)
        emit(f"fleet_vs_solo/{condition}/equal_data_return_flywheel_learner", a, "return", b, round(a / b, 3) if b else None)
        if condition == FLEET[-1]:  # the filtered body as a release ships it: its filter refitted under the policy it carries
            pooled_released, alone_released = [r["noisy_with_refit_filter"] for r in pooled_runs], [run["noisy_with_refit_filter"] for run in runs]
            print(f"# {condition} as released: pooled " + "/".join(f"{x:.0f}" for x in pooled_released) + ", specialist " + "/".join(f"{x:.0f}" for x in alone_released), file=sys.stderr)
            a, b = med(pooled_released), med(alone_released)
            emit(f"fleet_vs_solo/{condition}/equal_data_return_as_released", a, "return", b, round(a / b, 3) if b else None)


if __name__ == "__main__":
    main()
