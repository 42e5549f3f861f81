"""Our PPO and SAC vs Stable-Baselines3's PPO and SAC, side by side in one run.

Same robot (the pendulum: gymnasium's ``InvertedPendulum-v5`` for SB3, actions rescaled to [-1, 1], the
same MJCF, frame skip, observation, reward, initial noise and time limit as ours on our batched stepper), same env-step budget, same seed, one torch thread each, same update-to-data ratio
for SAC (1 gradient step per env step, batch 256, learning starts at 100) and the same
network sizes: PPO 2x64 tanh and SAC 2x256 relu (SB3's defaults), plus SAC 2x64 relu (where
per-step overhead, not matmul FLOPs, dominates). Reported per run:

* env-steps/s end to end (collection + updates, wall clock of the whole ``learn``);
  goal: PPO >= 5x, SAC >= 2x SB3's.
* mean return of the final deterministic policy over fixed evaluation seeds (ours and SB3's
  evaluated by the same ``policies.evaluate``); goal: ratio >= 1.0.

Learning curves (env steps, mean episode return) go to ``runs/benchmarks/train_vs_sb3.json``.
Three repeats (seeds seed, seed+1, seed+2) by default, medians: a learning result is several seeds.

Run: `.venv/bin/python benchmarks/train_vs_sb3.py [--ppo-steps 32768] [--sac-steps 2000] [--algorithms sac] [--device auto]`
(``--device auto`` puts both learners on the GPU where there is one; the metric names then say ``cuda``.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, quiet_sb3  # noqa: E402

from policies.evaluate import evaluate  # noqa: E402
from policies.ppo import PPOConfig  # noqa: E402
from policies.sac import SACConfig  # noqa: E402
from policies.trainer import Trainer, TrainerConfig, first_update, make_algorithm  # noqa: E402
from sim.variation import VariationProfile  # noqa: E402
from worldmodel.device import resolve_device  # noqa: E402

ROBOT = "pendulum"
EVAL_EPISODES, EVAL_SEED = 8, 12345
CURVES = Path("runs/benchmarks/train_vs_sb3.json")


def final_return(policy) -> float:
    return evaluate(policy, ROBOT, [VariationProfile()], EVAL_EPISODES, seed=EVAL_SEED).mean_return


def settings(algorithm: str, steps: int, seed: int, hidden: int, device: str) -> tuple[TrainerConfig, PPOConfig | SACConfig]:
    """Our arm's trainer and learner settings (the warm-up reads them for the learner's first update)."""
    if algorithm == "ppo":
        config = TrainerConfig(robot=ROBOT, algorithm="ppo", num_worlds=16, total_env_steps=steps, seed=seed, log_every=0, device=device)
        return config, PPOConfig(hidden_sizes=(hidden, hidden), n_steps=64, epochs=10, minibatch_size=256)
    config = TrainerConfig(robot=ROBOT, algorithm="sac", num_worlds=8, total_env_steps=steps, seed=seed, log_every=0, device=device)
    return config, SACConfig(hidden_sizes=(hidden, hidden), learning_starts=100, utd_ratio=1.0, batch_size=256)


def warmup_steps(algorithm: str, steps: int, hidden: int, device: str) -> int:
    """The untimed warm-up's budget: 256 env steps, or the learner's first update where that needs more (PPO's first
    rollout, 64 x 16 = 1,024): the Trainer refuses a budget that trains nothing, and a warm-up that never updates
    leaves the update's first-use costs to the timed run."""
    return max(min(steps, 256), first_update(*settings(algorithm, steps, 0, hidden, device))[0])


def ours(algorithm: str, steps: int, seed: int, hidden: int, device: str) -> dict:
    config, algo_config = settings(algorithm, steps, seed, hidden, device)
    with Trainer(config, make_algorithm(config, algo_config)) as trainer:
        start = time.perf_counter()
        result = trainer.train()
        wall = time.perf_counter() - start
        policy = trainer.algo.policy
    return {"steps_per_s": result.env_steps / wall, "return": final_return(policy), "curve": result.curve, "wall_s": wall}


def sb3(algorithm: str, steps: int, seed: int, hidden: int, device: str) -> dict:
    import gymnasium as gym
    from stable_baselines3 import PPO, SAC
    from stable_baselines3.common.monitor import Monitor

    # SB3 steps gymnasium's own InvertedPendulum-v5: the pendulum's MJCF, frame skip, observation, reward, noise and time
    # limit, its [-3, 3] actions scaled from [-1, 1] as ours are; a plain MujocoEnv steps 3-6x faster than flywheel/Pendulum-v0
    # (one world of the batched stepper), and the faster env is SB3's to have
    env = Monitor(gym.wrappers.RescaleAction(gym.make("InvertedPendulum-v5"), -1.0, 1.0))
    if algorithm == "ppo":
        model = PPO("MlpPolicy", env, seed=seed, device=device, policy_kwargs={"net_arch": [hidden, hidden]})  # n_steps 2048, batch 64
    else:
        model = SAC("MlpPolicy", env, seed=seed, device=device, learning_starts=100, train_freq=1, gradient_steps=1,
                    policy_kwargs={"net_arch": [hidden, hidden]})  # fmt: skip
    quiet_sb3(model)
    start = time.perf_counter()
    model.learn(steps)
    wall = time.perf_counter() - start
    ends = np.cumsum(env.get_episode_lengths())
    curve = [(int(s), float(r)) for s, r in zip(ends, env.get_episode_rewards())]
    ret = final_return(lambda obs: model.predict(obs, deterministic=True)[0].astype(np.float32))
    env.close()
    return {"steps_per_s": steps / wall, "return": ret, "curve": curve, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ppo-steps", type=int, default=32 * 1024)
    parser.add_argument("--sac-steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--algorithms", nargs="+", default=["ppo", "sac"], choices=["ppo", "sac"])
    parser.add_argument("--device", default="cpu", help="torch device of both learners, ours and SB3's (auto: cuda where there is one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    curves: dict = {}
    device = str(resolve_device(args.device))
    tag = "" if device == "cpu" else device.split(":")[0]  # in the metric names and the curves' file name
    arms = (("ppo", args.ppo_steps, 64), ("sac", args.sac_steps, 256), ("sac", args.sac_steps, 64))
    for algorithm, steps, hidden in (arm for arm in arms if arm[0] in args.algorithms):
        runs = {"ours": [], "sb3": []}
        label = f"{algorithm}_2x{hidden}"
        warmup = warmup_steps(algorithm, steps, hidden, device)
        for name, fn in (("sb3", sb3), ("ours", ours)):  # untimed: torch's and the env's first-use costs are paid by neither run
            fn(algorithm, warmup, args.seed, hidden, device)
        for r in range(args.repeats):
            for name, fn in (("sb3", sb3), ("ours", ours))[:: 1 if r % 2 == 0 else -1]:  # in turn: the VM's drift hits both
                run = fn(algorithm, steps, args.seed + r, hidden, device)
                runs[name].append(run)
                print(f"# {label} {name} repeat {r}: {run['steps_per_s']:.0f} env-steps/s, {run['wall_s']:.1f} s, "
                      f"final return {run['return']:.1f}", file=sys.stderr)  # fmt: skip
        med = {name: {k: statistics.median(run[k] for run in rs) for k in ("steps_per_s", "return")} for name, rs in runs.items()}
        for key, unit in (("steps_per_s", "env_steps/s"), ("return", "return")):
            value, base = med["ours"][key], med["sb3"][key]
            ratio = round(value / base, 4) if base > 0 else None
            emit(f"{label}_{ROBOT}_{tag + '_' if tag else ''}{'env_steps_per_s' if key == 'steps_per_s' else 'final_return'}_{steps}_steps", value, unit, base, ratio)
        curves[label] = {name: [run["curve"] for run in rs] for name, rs in runs.items()}
        curves[label]["env_steps"] = steps
    out = CURVES.with_name(f"{CURVES.stem}_{tag}.json") if tag else CURVES
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"robot": ROBOT, "seed": args.seed, "device": device, "curves": curves}))
    print(f"# learning curves: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
