"""Does each robot's experience train all others? Fleet-pooled vs solo policies, and real steps
saved by world-model + scenario data.

Part 1: N robots of one model, each in its own condition (heavy payload, weak motor, ...), each
collects the same number of env steps S. A solo policy trains (SAC) on its own robot's S steps;
the fleet policy on all N x S steps pooled (the same total the fleet collected). Every policy is
evaluated on every condition (fixed seeds). Lines: fleet vs solo on the solo robot's own
condition, and on the conditions that robot never saw.

Equal data: the pooled policy (N x S steps over N conditions) vs a specialist trained on N x S
steps of one condition alone, each evaluated on that condition (goal >= 0.9: pooling must not
cost a robot its own skill).

Part 2: returns per real env step. SAC online-only with 3x the real steps, vs the model-based
learner (policies/mbpo.py, conf/policy/mbpo.yaml) with 1x real steps plus its synthetic data:
world-model rollouts of the *current* policy branched from the fleet's real states, refreshed
as it learns (on-policy, not drawn once by a random policy). Both pool the N conditions (one
world each). Ratio of the mean return over the conditions (goal: >= 1.0, i.e. the same
return with 3x fewer real steps).

Run: `.venv/bin/python benchmarks/fleet_vs_solo.py [--steps 2000]`
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402

from fleet.pipeline.simfleet import CONDITIONS  # noqa: E402
from policies.evaluate import evaluate  # noqa: E402
from policies.mbpo import default_config  # noqa: E402
from policies.sac import SACConfig  # noqa: E402
from policies.trainer import Trainer, TrainerConfig, make_algorithm  # noqa: E402
from sim.variation import VariationProfile  # noqa: E402

ROBOT = "pendulum"
FLEET = ["nominal", "heavy_payload", "weak_motor", "noisy_sensor"]
SAC = SACConfig(hidden_sizes=(64, 64), learning_starts=500, replay_ratios={"online": 1.0})


def train(profiles: list[VariationProfile], steps: int, seed: int):
    config = TrainerConfig(robot=ROBOT, algorithm="sac", num_worlds=8, total_env_steps=steps, seed=seed)
    with Trainer(config, make_algorithm(config, SAC), profiles=profiles) as trainer:
        trainer.train()
        return trainer.algo.policy


def train_model_based(profiles: list[VariationProfile], steps: int, seed: int):
    config, algo = default_config(ROBOT, total_env_steps=steps, seed=seed)
    config = dataclasses.replace(config, num_worlds=len(profiles))
    with Trainer(config, make_algorithm(config, algo), profiles=profiles) as trainer:
        trainer.train()
        return trainer.algo.policy


def returns(policy, profiles: list[VariationProfile], episodes: int = 6) -> list[float]:
    return [p.mean_return for p in evaluate(policy, ROBOT, profiles, episodes, seed=123).profiles]


def fleet_vs_solo(steps: int, seed: int) -> None:
    profiles = [VariationProfile(**CONDITIONS[c]) for c in FLEET]
    fleet = returns(train(profiles, steps * len(profiles), seed), profiles)
    solo = [returns(train([p], steps, seed), profiles) for p in profiles]
    print(f"\n{'policy':>22} | " + " | ".join(f"{c:>13}" for c in FLEET), file=sys.stderr)
    print(f"{'fleet (pooled)':>22} | " + " | ".join(f"{r:13.1f}" for r in fleet), file=sys.stderr)
    for c, row in zip(FLEET, solo):
        print(f"{'solo ' + c:>22} | " + " | ".join(f"{r:13.1f}" for r in row), file=sys.stderr)
    for i, c in enumerate(FLEET):
        own = solo[i][i]
        unseen = float(np.mean([solo[j][i] for j in range(len(FLEET)) if j != i]))
        emit(f"fleet_vs_solo/{c}/own_condition_return", fleet[i], "return", own, round(fleet[i] / own, 3) if own else None)
        emit(f"fleet_vs_solo/{c}/unseen_by_solo_return", fleet[i], "return", unseen, round(fleet[i] / unseen, 3) if unseen else None)
    for i, (c, p) in enumerate(zip(FLEET, profiles)):
        specialist = returns(train([p], steps * len(profiles), seed), [p])[0]
        emit(f"fleet_vs_solo/{c}/equal_data_return", fleet[i], "return", specialist, round(fleet[i] / specialist, 3) if specialist else None)


def real_steps_saved(steps: int, seed: int) -> None:
    profiles = [VariationProfile(**CONDITIONS[c]) for c in FLEET]
    with_synth = train_model_based(profiles, steps, seed)
    online_only = train(profiles, 3 * steps, seed)
    a, b = float(np.mean(returns(with_synth, profiles))), float(np.mean(returns(online_only, profiles)))
    emit("fleet_vs_solo/synthetic_data/real_steps_with_synthetic", steps, "real env steps", 3 * steps, round(1 / 3, 3))
    emit("fleet_vs_solo/synthetic_data/return_with_1x_real_plus_synthetic", a, "return", b, round(a / b, 3) if b else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000, help="env steps each robot collects (part 1) / real steps of the fleet (part 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fleet_vs_solo(args.steps, args.seed)
    real_steps_saved(args.steps, args.seed)


if __name__ == "__main__":
    main()
