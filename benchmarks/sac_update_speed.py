"""SAC gradient steps per second: ours vs Stable-Baselines3's, the same batch, networks and threads.

Both learners get a replay of the same pendulum transitions, then time ``--steps`` gradient
steps alone (no env stepping): ours ``SAC.update`` (one fused critic + actor + temperature
step, policies/sac.py), SB3's ``SAC.train(gradient_steps, batch_size)``. Batch 256, 2x256 and
2x128 ReLU networks, one torch thread each (``--threads`` to change), median of 3 repeats.
Lines: ``sac_update/<hidden>/gradient_steps_per_s`` value ours, baseline SB3, ratio ours/SB3
(goal >= 2 at 2x256), ours with its default ``precision=auto`` (mixed-precision bfloat16 steps where
they pay: SACConfig.precision, printed); ``sac_update/<hidden>/float32/...`` ours in float32, as SB3 runs.

Run: `.venv/bin/python benchmarks/sac_update_speed.py [--steps 1000] [--threads 1] [--device auto]`
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, quiet_sb3  # noqa: E402

from policies.sac import SAC, SACConfig, matmul_dtype  # noqa: E402
from policies.trainer import make_spec  # noqa: E402
from policies.transition import VectorStep  # noqa: E402
from worldmodel.device import resolve_device  # noqa: E402

BATCH = 256


def transitions(n: int, seed: int = 0) -> VectorStep:
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((n, 4)).astype(np.float32)
    nxt = obs + 0.01 * rng.standard_normal((n, 4)).astype(np.float32)
    return VectorStep(obs, rng.uniform(-1, 1, (n, 1)).astype(np.float32), np.ones(n, np.float32), nxt, nxt, np.zeros(n, bool), np.zeros(n, bool))


def ours(hidden: int, steps: int, device: str, precision: str = "auto") -> float:
    config = SACConfig(hidden_sizes=(hidden, hidden), batch_size=BATCH, learning_starts=0, precision=precision)
    sac = SAC(make_spec("pendulum", config), config, device=torch.device(device))
    sac.observe(transitions(10_000))
    sac.grad_debt = 50
    sac.update()  # warm-up
    synchronize(device)
    sac.grad_debt = steps
    start = time.perf_counter()
    sac.update()
    synchronize(device)
    return steps / (time.perf_counter() - start)


def sb3(hidden: int, steps: int, device: str) -> float:
    import gymnasium as gym
    from stable_baselines3 import SAC as SB3SAC

    from sim.gym_env import ENV_IDS

    env = gym.make(ENV_IDS["pendulum"])
    model = quiet_sb3(SB3SAC("MlpPolicy", env, batch_size=BATCH, learning_starts=0, device=device, policy_kwargs={"net_arch": [hidden, hidden]}))
    step = transitions(10_000)
    for i in range(len(step.reward)):
        model.replay_buffer.add(step.obs[i : i + 1], step.next_obs[i : i + 1], step.action[i : i + 1], step.reward[i : i + 1], step.terminated[i : i + 1], [{}])
    model._setup_learn(0)  # the logger and schedules train() needs, without collecting
    model.train(gradient_steps=50, batch_size=BATCH)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    model.train(gradient_steps=steps, batch_size=BATCH)
    synchronize(device)
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="torch device of both learners (auto: cuda where there is one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    tag = "" if device == "cpu" else f"{device.split(':')[0]}/"
    for hidden in (256, 128):
        dtype = matmul_dtype("auto", torch.device(device), (hidden, hidden))
        print(f"# 2x{hidden}: precision auto is {'bfloat16' if dtype else 'float32'} here", file=sys.stderr)
        arms = {"sb3": lambda: sb3(hidden, args.steps, device), **{p: (lambda p=p: ours(hidden, args.steps, device, p)) for p in ("auto", "float32")}}
        rates: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(args.repeats):  # in turn, the order reversed every other repeat: the VM's drift hits every arm alike
            for name in list(arms)[:: 1 if r % 2 == 0 else -1]:
                rates[name].append(arms[name]())
        b = statistics.median(rates["sb3"])
        for precision in ("auto", "float32"):
            a = statistics.median(rates[precision])
            name = "" if precision == "auto" else f"{precision}/"
            emit(f"sac_update/{tag}2x{hidden}/{name}gradient_steps_per_s", a, "gradient_steps/s", round(b, 2), round(a / b, 3))


if __name__ == "__main__":
    main()
