"""Physics steps/s per robot: (a) the raw mujoco.rollout limit on the same model and threads,
(b) our batched stepper with a 2x256 MLP actor in the loop, recording episodes, (c) gymnasium's
own single env. Ratios are to (a); one more line, ``batched_vs_gymnasium``, has value (b), baseline (c) and
ratio (b)/(c). Also peak RSS per 1,000 worlds.
A robot without a gymnasium env of its own (one of ``robot_modules``) has (c) and (b)/(c) null: not measured.
(a) and (b) run in turn, five timed runs each after one untimed run (the median of each): this VM's
speed drifts within a minute, and measured one after the other the ratio read the drift.

Run: `.venv/bin/python benchmarks/sim_throughput.py [--worlds 512] [--steps 60]`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable

import gymnasium as gym
import mujoco
import numpy as np
import torch
from mujoco import rollout

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, interleaved_rates, median_rate  # noqa: E402

from sim.batched import BatchedStepper  # noqa: E402
from sim.robots import get_task, robot_names  # noqa: E402

GYM_IDS = {"ant": "Ant-v5", "half_cheetah": "HalfCheetah-v5", "pendulum": "InvertedPendulum-v5", "reacher": "Reacher-v5"}


def mlp_actor(obs_dim: int, act_dim: int) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(obs_dim, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, act_dim), torch.nn.Tanh()
    )
    return net.eval()


def rollout_limit(robot: str, worlds: int, steps: int, nthread: int, stack: contextlib.ExitStack) -> Callable[[], int]:
    """A run of one open-loop mujoco.rollout call over all worlds (pure C, persistent pool); returns physics steps."""
    task = get_task(robot)
    m = task.model
    datas = [mujoco.MjData(m) for _ in range(nthread)]
    state0 = np.empty(mujoco.mj_stateSize(m, mujoco.mjtState.mjSTATE_FULLPHYSICS))
    mujoco.mj_getState(m, datas[0], state0, mujoco.mjtState.mjSTATE_FULLPHYSICS)
    nstep = steps * task.frame_skip
    ctrl = np.random.default_rng(0).uniform(-0.5, 0.5, (worlds, nstep, m.nu)) * m.actuator_ctrlrange[:, 1]
    states = np.tile(state0, (worlds, 1))
    pool = stack.enter_context(rollout.Rollout(nthread=nthread))
    out_state = np.empty((worlds, nstep, state0.size))
    out_sensor = np.empty((worlds, nstep, m.nsensordata))

    def work():
        pool.rollout([m] * worlds, datas, states, ctrl, state=out_state, sensordata=out_sensor)
        return worlds * nstep

    return work


def batched_with_policy(robot: str, worlds: int, steps: int, nthread: int, stack: contextlib.ExitStack) -> Callable[[], int]:
    """A run of ``steps`` control steps of our stepper with a 2x256 MLP actor, recording; returns physics steps."""
    task = get_task(robot)
    actor = mlp_actor(task.obs_dim, task.act_dim)
    stepper = stack.enter_context(BatchedStepper(robot, worlds, nthread=nthread))
    stepper.reset(seed=0)

    def work():
        before = stepper.stats["steps"]
        stepper.run(actor, steps)
        return (stepper.stats["steps"] - before) * task.frame_skip

    return work


def gymnasium_single(robot: str, steps: int) -> float | None:
    """gymnasium's own env of ``robot`` stepped alone (physics steps/s); None for a robot gymnasium has no env of."""
    if robot not in GYM_IDS:
        return None
    env = gym.make(GYM_IDS[robot])
    env.reset(seed=0)
    frame_skip = env.unwrapped.frame_skip
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, *env.action_space.shape)).astype(np.float32)

    def work():
        for a in actions:
            _, _, terminated, truncated, _ = env.step(a)
            if terminated or truncated:
                env.reset()
        return steps * frame_skip

    return median_rate(work)


def rss_per_1000_worlds(robot: str, record: bool) -> float:
    """MiB of peak RSS added by a 1,000-world stepper, measured in a fresh process.

    The episode buffers are touched in full, as they are once episodes reach the time limit.
    """
    code = f"""
import re
def peak_mib():  # VmHWM belongs to this address space (ru_maxrss would inherit the parent's peak)
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
from sim.batched import BatchedStepper
from sim.policy_fn import zero_policy
warm = BatchedStepper({robot!r}, 1); warm.reset(seed=0); warm.run(zero_policy(warm.task.act_dim), 2)
base = peak_mib()
s = BatchedStepper({robot!r}, 1000, record={record})
s.reset(seed=0); s.run(zero_policy(s.task.act_dim), 20)
if s._recorder is not None:
    for buf in (s._recorder.obs, s._recorder.qpos, s._recorder.qvel, s._recorder.action, s._recorder.reward):
        buf.fill(1.0)
print(peak_mib() - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worlds", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60, help="control steps per timed repeat")
    parser.add_argument("--robots", nargs="*", default=robot_names())
    args = parser.parse_args()
    nthread = os.cpu_count() or 1
    torch.set_num_threads(1)
    for robot in args.robots:
        with contextlib.ExitStack() as stack:  # (a) and (b) in turn, so that the VM's drift does not read as a ratio
            rates = interleaved_rates({
                "limit": rollout_limit(robot, args.worlds, args.steps, nthread, stack),
                "ours": batched_with_policy(robot, args.worlds, args.steps, nthread, stack),
            })  # fmt: skip
        limit, ours = rates["limit"], rates["ours"]
        single = gymnasium_single(robot, 2000)
        emit(f"sim/{robot}/rollout_limit_steps_per_s", limit, "physics steps/s")  # the limit itself
        emit(f"sim/{robot}/batched_mlp_steps_per_s", ours, "physics steps/s", limit, round(ours / limit, 3))
        emit(f"sim/{robot}/gymnasium_single_steps_per_s", single, "physics steps/s", limit, None if single is None else round(single / limit, 3))
        emit(f"sim/{robot}/batched_vs_gymnasium", ours, "physics steps/s", single, None if single is None else round(ours / single, 2))
        for record in (True, False):
            mib = rss_per_1000_worlds(robot, record)
            emit(f"sim/{robot}/rss_per_1000_worlds{'' if record else '_norecord'}", mib, "MiB", None, None)
    print(json.dumps({"metric": "sim/threads", "value": nthread, "unit": "threads", "baseline": None, "ratio": None}))


if __name__ == "__main__":
    main()
