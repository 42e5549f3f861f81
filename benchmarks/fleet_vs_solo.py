"""Does each robot's experience train all others? Fleet-pooled vs solo policies, and real steps
saved by world-model + scenario data.

Part 1: N robots of one model, each in its own condition (heavy payload, weak motor, ...), each
collects the same number of env steps S. A solo policy trains (SAC) on its own robot's S steps;
the fleet policy on all N x S steps pooled (the same total the fleet collected). Every policy is
evaluated on every condition (fixed seeds). Lines: fleet vs solo on the solo robot's own
condition, and on the conditions that robot never saw.

Part 2: returns per real env step. SAC online-only with 3x the real steps, vs SAC with 1x real
steps plus synthetic data: MuJoCo scenario episodes (domain randomisation around the fleet's
conditions) and world-model rollouts branched from real states (the world model trained on
the real episodes). Ratio of final returns (goal: >= 1.0, i.e. the same return with 3x fewer
real steps).

Run: `.venv/bin/python benchmarks/fleet_vs_solo.py [--steps 2000]`
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402

from fleet.pipeline.simfleet import CONDITIONS  # noqa: E402
from policies.evaluate import evaluate  # noqa: E402
from policies.sac import SACConfig  # noqa: E402
from policies.trainer import Trainer, TrainerConfig, make_algorithm  # noqa: E402
from sim.batched import BatchedStepper  # noqa: E402
from sim.policy_fn import random_policy  # noqa: E402
from sim.scenario import DomainRandomization, ScenarioSpec  # noqa: E402
from sim.variation import VariationProfile  # noqa: E402
from worldmodel.fanout import simulate_scenarios  # noqa: E402
from worldmodel.rollout import RolloutConfig, branch_rollouts  # noqa: E402
from worldmodel.train import TrainConfig, train_ensemble  # noqa: E402

ROBOT = "pendulum"
FLEET = ["nominal", "heavy_payload", "weak_motor", "noisy_sensor"]
SAC = SACConfig(hidden_sizes=(64, 64), learning_starts=500, replay_ratios={"online": 1.0})


def train(profiles: list[VariationProfile], steps: int, seed: int, offline: dict | None = None, ratios: dict | None = None):
    algo = dataclasses.replace(SAC, replay_ratios=ratios or {"online": 1.0})
    config = TrainerConfig(robot=ROBOT, algorithm="sac", num_worlds=8, total_env_steps=steps, seed=seed)
    with Trainer(config, make_algorithm(config, algo, offline=offline), profiles=profiles) as trainer:
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


def real_steps_saved(steps: int, seed: int) -> None:
    profiles = [VariationProfile(**CONDITIONS[c]) for c in FLEET]
    # real telemetry: a random policy on every robot (counted as real steps)
    with BatchedStepper(ROBOT, 16, source="real", robot_id="fleet") as stepper:
        specs = [ScenarioSpec(ROBOT, seed=seed * 1000 + i, profile=profiles[i % len(profiles)], max_steps=200) for i in range(64)]
        real = stepper.simulate(specs, random_policy(1, seed))
    real_steps = sum(e.num_steps for e in real)
    model, _ = train_ensemble(real, config=TrainConfig(max_steps=600, eval_every=100, seed=seed))
    wm = branch_rollouts(model, real, random_policy(1, seed), 1024, RolloutConfig(horizon=10, seed=seed))
    dr = DomainRandomization({"payload_mass": (0.0, 2.0), "actuator_strength": (0.5, 1.2), "damping_scale": (0.5, 4.0)})
    sim = simulate_scenarios(dr.sample(ROBOT, 128, seed), functools.partial(random_policy, 1, seed))
    with_synth = train(
        profiles, steps, seed, offline={"real": real, "sim": sim, "worldmodel": wm}, ratios={"online": 0.4, "real": 0.2, "sim": 0.25, "worldmodel": 0.15}
    )
    online_only = train(profiles, 3 * (steps + real_steps), seed)
    a, b = float(np.mean(returns(with_synth, profiles))), float(np.mean(returns(online_only, profiles)))
    emit("fleet_vs_solo/synthetic_data/real_steps_with_synthetic", steps + real_steps, "real env steps", 3 * (steps + real_steps), round(1 / 3, 3))
    emit("fleet_vs_solo/synthetic_data/return_with_1x_real_plus_synthetic", a, "return", b, round(a / b, 3) if b else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000, help="env steps each robot collects (part 1) / online real steps (part 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fleet_vs_solo(args.steps, args.seed)
    real_steps_saved(args.steps, args.seed)


if __name__ == "__main__":
    main()
