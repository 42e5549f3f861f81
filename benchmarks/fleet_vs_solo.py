"""Does each robot's experience train all others? Fleet-pooled vs solo policies, and real steps
saved by world-model + scenario data.

Part 1: N robots of one model, each in its own condition (heavy payload, weak motor, ...), each
collects the same number of env steps S. Every policy's actor trains under the noisiest sensor
among the conditions it trains on, as the flywheel's do (``loop.robust_to_sensor_noise``;
``--raw-pooling``: none does). A solo policy trains (SAC) on its own robot's S steps;
the fleet policy on all N x S steps pooled (the same total the fleet collected). Every policy is
evaluated on every condition (fixed seeds). Lines: fleet vs solo on the solo robot's own
condition, and on the conditions that robot never saw.

Equal data: the pooled policy (N x S steps over N conditions) vs a specialist trained on N x S
steps of one condition alone, each evaluated on that condition (goal >= 0.9: pooling must not
cost a robot its own skill). The same for the pooled *body-conditioned* policy (one policy that
reads each body's features, ``SACConfig.body_context``; sim/body_context.py), and its ratio to the
plain pooled one: pooled vs pooled-conditioned vs solo.

Part 2: returns per real env step. SAC online-only with 3x the real steps, vs the flywheel's
learner with 1x real steps plus its synthetic data: the model-based learner (policies/mbpo.py)
as the loop trains it, body-conditioned, under the sensor-noise rule, the noisy robot's Kalman
filter simulated in its world (benchmarks/sensor_filter.py's ``simulated`` arm, whose cached seeds
it shares), with world-model rollouts of the *current* policy branched from the fleet's real
states, refreshed as it learns (on-policy, not drawn once by a random policy). Every arm pools
the N conditions (one world each), the sensor offsets taken out as the flywheel's robots do.
Ratio of the mean return over the conditions (goal: >= 1.0, i.e. the same return with 3x fewer
real steps). The SAC peer runs at its own recommended settings (SB3's defaults, as
``real_step_efficiency.py``'s: 2x256, batch 256, 100 warm-up steps, one update per step). Printed
beside it: against part 1's 2x64 SAC at 3x (``..._vs_sac_2x64``, the peer of earlier builds), and
``policy=mbpo``'s defaults alone at 1x (``..._mbpo_defaults``: no body features, no filter; the
arm of earlier builds).

Every number is the median over ``--seeds`` (default 0 1 2; one seed seeds every run of it, and
the evaluation seeds are fixed). Each seed's returns are cached as JSON under
``runs/benchmarks/fleet_vs_solo/`` (part, steps and seed in the file name), so seeds may run in
separate processes (``--seeds 1 --runs-only``) and one final call prints the lines; ``--fresh``
ignores the cache; ``--parts synthetic`` runs and prints part 2 alone.

Run: `.venv/bin/python benchmarks/fleet_vs_solo.py [--steps 2000] [--seeds 0 1 2] [--parts pooling synthetic]`
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cached_json, emit  # noqa: E402
from sensor_filter import cached as flywheel_learner_seed  # noqa: E402

from fleet.pipeline.simfleet import CONDITIONS  # noqa: E402
from fleet.pipeline.steps import robust_to_fleet_sensors  # noqa: E402
from policies.evaluate import evaluate  # noqa: E402
from policies.mbpo import default_config  # noqa: E402
from policies.sac import SACConfig  # noqa: E402
from policies.trainer import Trainer, TrainerConfig, make_algorithm  # noqa: E402
from sim.variation import VariationProfile  # noqa: E402

ROBOT = "pendulum"
FLEET = ["nominal", "heavy_payload", "weak_motor", "noisy_sensor"]
SAC = SACConfig(hidden_sizes=(64, 64), learning_starts=500, replay_ratios={"online": 1.0})
# Part 2's model-free peer at its own recommended settings: SB3's SAC defaults, as real_step_efficiency's arm (a)
SAC_DEFAULTS = SACConfig(hidden_sizes=(256, 256), learning_starts=100, utd_ratio=1.0, batch_size=256)


def train(profiles: list[VariationProfile], steps: int, seed: int, body_context: bool = False, sac: SACConfig = SAC, num_worlds: int = 8):
    config = TrainerConfig(robot=ROBOT, algorithm="sac", num_worlds=num_worlds, total_env_steps=steps, seed=seed)
    algo = dataclasses.replace(sac, body_context=body_context)
    with Trainer(config, make_algorithm(config, robust(algo, profiles)), profiles=profiles) as trainer:
        trainer.train()
        return trainer.algo.policy


def train_model_based(profiles: list[VariationProfile], steps: int, seed: int):
    config, algo = default_config(ROBOT, total_env_steps=steps, seed=seed)
    config = dataclasses.replace(config, num_worlds=len(profiles))
    with Trainer(config, make_algorithm(config, robust(algo, profiles)), profiles=profiles) as trainer:
        trainer.train()
        return trainer.algo.policy


ROBUST = True  # --raw-pooling sets it off


def robust(algo_cfg, profiles: list[VariationProfile]):
    """As the flywheel trains (``loop.robust_to_sensor_noise``): the actor reads observations as
    noisy as the noisiest sensor among the conditions this policy trains on; every arm alike."""
    return robust_to_fleet_sensors(algo_cfg, {str(i): p for i, p in enumerate(profiles)}) if ROBUST else algo_cfg


def returns(policy, profiles: list[VariationProfile], episodes: int = 6) -> list[float]:
    return [p.mean_return for p in evaluate(policy, ROBOT, profiles, episodes, seed=123).profiles]


CACHE = Path("runs/benchmarks/fleet_vs_solo")


def pooling_seed(steps: int, seed: int, fresh: bool) -> dict:
    """Part 1's returns (pooled, body-conditioned, solo, specialist), for one seed."""
    profiles = [VariationProfile(**CONDITIONS[c]) for c in FLEET]
    out = {"fleet": returns(train(profiles, steps * len(profiles), seed), profiles)}
    out["fleet_conditioned"] = conditioned_fleet(steps, seed)
    out["solo"] = [returns(train([p], steps, seed), profiles) for p in profiles]
    out["specialist"] = [returns(train([p], steps * len(profiles), seed), [p])[0] for p in profiles]
    return out


def synthetic_seed(steps: int, seed: int, fresh: bool) -> dict:
    """Part 2's mean returns over the conditions, for one seed: the flywheel's learner at 1x real
    steps, SAC at 3x with its recommended settings (one world per condition, as the learner's),
    part 1's 2x64 SAC at 3x, and ``policy=mbpo``'s defaults at 1x."""
    profiles = [VariationProfile(**CONDITIONS[c]).replace(obs_bias=0.0) for c in FLEET]  # offsets taken out on board
    mean = lambda policy: float(np.mean(returns(policy, profiles)))  # noqa: E731
    return {
        "with_synthetic": float(np.mean(flywheel_learner_seed(steps, seed, "simulated", fresh)["returns"])),
        "online_only_3x": mean(train(profiles, 3 * steps, seed, sac=SAC_DEFAULTS, num_worlds=len(profiles))),
        "online_only_3x_2x64": mean(train(profiles, 3 * steps, seed)),
        "with_synthetic_mbpo_defaults": mean(train_model_based(profiles, steps, seed)),
    }


def conditioned_fleet(steps: int, seed: int) -> list[float]:
    profiles = [VariationProfile(**CONDITIONS[c]) for c in FLEET]
    return returns(train(profiles, steps * len(profiles), seed, body_context=True), profiles)


PARTS = {"pooling": (pooling_seed, "fleet_conditioned"), "synthetic": (synthetic_seed, "with_synthetic_mbpo_defaults")}


def cached_seed(part: str, steps: int, seed: int, fresh: bool) -> dict:
    """One seed's arms of one part, run by one build (a seed cached before an arm existed is run again whole, not mixed)."""
    compute, last_arm = PARTS[part]
    path = CACHE / f"{part}-steps{steps}-seed{seed}{'' if ROBUST else '-raw'}.json"
    return cached_json(path, lambda: compute(steps, seed, fresh), fresh=fresh, complete=lambda out: last_arm in out)


def med(values) -> float:
    return float(statistics.median(values))


def report_pooling(runs: list[dict]) -> None:
    """Part 1's medians over seeds: the table on stderr, the lines on stdout."""
    n = len(FLEET)
    fleet = [med([r["fleet"][i] for r in runs]) for i in range(n)]
    solo = [[med([r["solo"][j][i] for r in runs]) for i in range(n)] for j in range(n)]
    print(f"\n{'median of ' + str(len(runs)) + ' seeds':>22} | " + " | ".join(f"{c:>13}" for c in FLEET), file=sys.stderr)
    print(f"{'fleet (pooled)':>22} | " + " | ".join(f"{r:13.1f}" for r in fleet), file=sys.stderr)
    for c, row in zip(FLEET, solo):
        print(f"{'solo ' + c:>22} | " + " | ".join(f"{r:13.1f}" for r in row), file=sys.stderr)
    for i, c in enumerate(FLEET):  # ratios of medians, and each seed's own ratio on stderr
        own = solo[i][i]
        unseen = med([float(np.mean([r["solo"][j][i] for j in range(n) if j != i])) for r in runs])
        emit(f"fleet_vs_solo/{c}/own_condition_return", fleet[i], "return", own, round(fleet[i] / own, 3) if own else None)
        emit(f"fleet_vs_solo/{c}/unseen_by_solo_return", fleet[i], "return", unseen, round(fleet[i] / unseen, 3) if unseen else None)
    conditioned = [med([r["fleet_conditioned"][i] for r in runs]) for i in range(n)]
    print(f"{'fleet, body-conditioned':>22} | " + " | ".join(f"{r:13.1f}" for r in conditioned), file=sys.stderr)
    for i, c in enumerate(FLEET):
        specialist = med([r["specialist"][i] for r in runs])
        print(f"# {c} equal data per seed (pooled/conditioned/specialist): " + ", ".join(
            f"{r['fleet'][i]:.1f}/{r['fleet_conditioned'][i]:.1f}/{r['specialist'][i]:.1f}" for r in runs), file=sys.stderr)  # fmt: skip
        emit(f"fleet_vs_solo/{c}/equal_data_return", fleet[i], "return", specialist, round(fleet[i] / specialist, 3) if specialist else None)
        emit(f"fleet_vs_solo/{c}/conditioned_equal_data_return", conditioned[i], "return", specialist, round(conditioned[i] / specialist, 3) if specialist else None)
        emit(f"fleet_vs_solo/{c}/conditioned_vs_pooled_return", conditioned[i], "return", fleet[i], round(conditioned[i] / fleet[i], 3) if fleet[i] else None)


def report_synthetic(steps: int, runs: list[dict]) -> None:
    """Part 2's medians over seeds, against SAC at its recommended settings and against the 2x64 SAC."""
    print("# synthetic per seed (flywheel's learner / SAC defaults / SAC 2x64 / policy=mbpo defaults): " + ", ".join(
        f"{r['with_synthetic']:.1f}/{r['online_only_3x']:.1f}/{r['online_only_3x_2x64']:.1f}/{r['with_synthetic_mbpo_defaults']:.1f}" for r in runs), file=sys.stderr)  # fmt: skip
    emit("fleet_vs_solo/synthetic_data/real_steps_with_synthetic", steps, "real env steps", 3 * steps, round(1 / 3, 3))
    for suffix, ours, peer in (("", "with_synthetic", "online_only_3x"), ("_vs_sac_2x64", "with_synthetic", "online_only_3x_2x64"), ("_mbpo_defaults", "with_synthetic_mbpo_defaults", "online_only_3x")):
        a, b = med([r[ours] for r in runs]), med([r[peer] for r in runs])
        emit(f"fleet_vs_solo/synthetic_data/return_with_1x_real_plus_synthetic{suffix}", a, "return", b, round(a / b, 3) if b else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000, help="env steps each robot collects (part 1) / real steps of the fleet (part 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fresh", action="store_true", help="ignore cached seeds")
    parser.add_argument("--runs-only", action="store_true", help="run and cache, print no lines")
    parser.add_argument("--raw-pooling", action="store_true", help="no SAC arm trains its actor under sensor noise (the flywheel does; its learner's arm in part 2 is the loop's, unchanged)")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="pooling (part 1), synthetic (part 2)")
    args = parser.parse_args()
    global ROBUST
    ROBUST = not args.raw_pooling
    torch.set_num_threads(1)
    for part in args.parts:
        runs = [cached_seed(part, args.steps, seed, args.fresh) for seed in args.seeds]
        if args.runs_only:
            continue
        if part == "pooling":
            report_pooling(runs)
        else:
            report_synthetic(args.steps, runs)


if __name__ == "__main__":
    main()
