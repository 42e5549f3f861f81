"""On-robot inference latency per action: the numpy runtime (policies.runtime) on one CPU core,
with the torch policy on the same core as the peer baseline, for the default MLPs
(SAC: 2x256 relu, PPO: 2x64 tanh). One observation per call, as a robot acts.

Prints JSON lines (p50 and p99 in microseconds, medians over repeats) and a line comparing
the runtime's p99 to the 1 ms goal. Run: `.venv/bin/python benchmarks/inference.py [--calls 3000]`
"""

from __future__ import annotations

import os

# one core, one BLAS thread: set before numpy/torch load their thread pools
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import emit  # noqa: E402

from policies.export import export_policy  # noqa: E402
from policies.networks import Policy, PolicySpec  # noqa: E402
from policies.runtime import load_policy  # noqa: E402

NETS = {"sac_2x256_relu": ((256, 256), "relu"), "ppo_2x64_tanh": ((64, 64), "tanh")}


def latencies_us(act, obs: np.ndarray, calls: int) -> np.ndarray:
    for i in range(100):  # warm-up
        act(obs[i % len(obs)])
    out = np.empty(calls)
    for i in range(calls):
        o = obs[i % len(obs)]
        start = time.perf_counter_ns()
        act(o)
        out[i] = (time.perf_counter_ns() - start) / 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=3000, help="actions per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--robot", default="ant", help="robot whose obs/act sizes to use (ant: 27 -> 8)")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    from sim.robots import get_task

    task = get_task(args.robot)
    obs = np.random.default_rng(0).normal(size=(256, task.obs_dim)).astype(np.float32)
    for name, (hidden, activation) in NETS.items():
        torch.manual_seed(0)
        policy = Policy(PolicySpec(task.obs_dim, task.act_dim, hidden, activation)).eval()
        policy.normalizer.update(torch.from_numpy(obs))
        with tempfile.TemporaryDirectory() as tmp:
            export_policy(policy, tmp, robot_model=args.robot, policy_version="bench", algorithm="none")
            runtime = load_policy(tmp, robot_model=args.robot, obs_dim=task.obs_dim, act_dim=task.act_dim)

        def torch_act(o: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return policy(torch.from_numpy(o)[None]).numpy()[0]

        stats = {"numpy": {"p50": [], "p99": []}, "torch": {"p50": [], "p99": []}}
        for _ in range(args.repeats):
            for impl, act in (("numpy", runtime.act), ("torch", torch_act)):
                lat = latencies_us(act, obs, args.calls)
                stats[impl]["p50"].append(float(np.percentile(lat, 50)))
                stats[impl]["p99"].append(float(np.percentile(lat, 99)))
        med = {impl: {q: statistics.median(v) for q, v in s.items()} for impl, s in stats.items()}
        for q in ("p50", "p99"):
            value, base = med["numpy"][q], med["torch"][q]
            emit(f"runtime_{name}_{args.robot}_{q}_latency", value, "us", base, round(value / base, 4))
        emit(f"runtime_{name}_{args.robot}_p99_vs_1ms_goal", med["numpy"]["p99"], "us")  # a goal, not a peer: no baseline
        print(f"# {name}: numpy p50 {med['numpy']['p50']:.1f} us, p99 {med['numpy']['p99']:.1f} us; "
              f"torch p50 {med['torch']['p50']:.1f} us, p99 {med['torch']['p99']:.1f} us", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
