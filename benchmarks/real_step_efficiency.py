"""Real-step efficiency: how many real robot steps each learner needs to master a task.

Methods, all on the same robot, the same evaluation seeds and the same real-step budget:

* ``sac``  our model-free SAC with SB3's recommended settings (2x256, batch 256, 1 gradient
  step per real step, learning starts at 100, auto entropy), one world (a robot);
* ``sb3``  Stable-Baselines3's SAC with its defaults on ``flywheel/<Robot>-v0``;
* ``mbpo`` our model-based learner (:mod:`policies.mbpo`, ``conf/policy/mbpo.yaml``'s settings);
* ``mbpo_published`` the same learner at MBPO's published settings for this task (Janner et al. 2019,
  jannerm/mbpo ``examples/config/inverted_pendulum/0.py``: :func:`mbpo_published`), the baseline the
  learner is to beat; line ``..._vs_mbpo_published`` where it was run;
* ``sac_ablation`` (not in the lines, printed): model-free SAC with the model-based learner's SAC
  settings (2x128, temperature from 0.1, 150 random steps, 1 update per real step), to show what
  the settings alone give;
* ``sac_float32`` (not in the lines, printed): ``sac`` with float32 gradient steps, where ``sac``'s
  ``precision=auto`` takes mixed precision (bfloat16) on this machine, to show both learn the same.

Every ``--eval-every`` real steps the deterministic policy runs ``--eval-episodes`` episodes
(fixed seeds, :func:`policies.evaluate.evaluate`); a run's "real steps to threshold" is the
first evaluation whose mean return reaches ``--threshold`` (where a robot has one, every run
stops there: later steps cannot change the number); a run that never does counts as its whole
budget. Lines (medians over seeds):

* ``efficiency/<robot>/real_steps_to_<threshold>``: value mbpo, baseline sac, ratio sac/mbpo
* ``efficiency/<robot>/real_steps_to_<threshold>_vs_sb3``: value mbpo, baseline sb3, ratio sb3/mbpo
* ``efficiency/<robot>/real_steps_to_<threshold>_vs_mbpo_published``: value mbpo, baseline
  mbpo_published, ratio mbpo_published/mbpo (printed where mbpo and mbpo_published are cached for every seed,
  with or without sac and sb3)
* ``efficiency/<robot>/return_at_budget`` (and ``_vs_sb3``), for robots without a threshold:
  the final evaluation return, ratio mbpo/peer (null where the peer's return is <= 0: a ratio
  against a negative return means nothing). half_cheetah's budget, 10,000 real steps, is what
  fits 15 minutes per method on 2 cores (docs/benchmarks.md)
* ``efficiency/<robot>/return_above_random_at_budget`` (and ``_vs_sb3``), for the same robots: each
  median final return minus a uniformly random policy's return on the same evaluation episodes
  (the usual normalisation, a random policy scoring 0), ratio mbpo/peer: the ratio above, defined
  where a peer's return is negative but better than chance

Each run is cached as JSON under ``runs/benchmarks/real_step_efficiency/`` (its settings in the
file name), so methods may run in separate processes (``--methods sb3``) and one final call
prints the lines from every cached run; ``--fresh`` ignores the cache. The lines need sac, sb3 and
mbpo cached for every one of ``--seeds``: otherwise the call names the missing runs, prints no lines
and exits non-zero with the command that runs them. SB3 is also evaluated at the budget where it is
no multiple of ``--eval-every``, as ours are, so every method is evaluated at the same steps.

Run: `.venv/bin/python benchmarks/real_step_efficiency.py [--robot pendulum] [--seeds 0 1 2]`
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import cached_json, emit, quiet_sb3  # noqa: E402

from policies.evaluate import evaluate  # noqa: E402
from sim.robots import get_task  # noqa: E402
from sim.variation import VariationProfile  # noqa: E402

CACHE = Path("runs/benchmarks/real_step_efficiency")
EVAL_SEED = 777
DEFAULTS = {  # robot: (threshold, budget per method, eval_every)
    "pendulum": (950.0, 15_000, 500),
    "half_cheetah": (None, 10_000, 1_000),
}


def eval_return(policy, robot: str, episodes: int) -> float:
    return evaluate(policy, robot, [VariationProfile()], episodes, seed=EVAL_SEED).mean_return


def mbpo_published() -> dict:
    """MBPO's published InvertedPendulum settings (jannerm/mbpo, examples/config/inverted_pendulum/0.py, on
    softlearning's SAC defaults) as :class:`policies.mbpo.MBPOConfig` fields: an ensemble of 7 (5 elites) of
    4x200, retrained every 250 real steps until its held-out loss stops improving; 100,000 one-step rollouts
    (the task's horizon schedule is 1 throughout) from real states every 250 steps, one refill kept; 5 % real
    data in each batch, 10 updates per real step, SAC 2x256 with target entropy -0.05 after 500 random steps.
    Our learner's own rules are off: the horizon is fixed (no error measurement) and no rollout is cut on
    ensemble disagreement."""
    from policies.mbpo import MBPOConfig
    from worldmodel import EnsembleConfig

    ours = MBPOConfig()
    return {
        "ensemble": EnsembleConfig(ensemble_size=7, num_elites=5, hidden_size=200, num_hidden_layers=4),
        "retrain_steps": ours.model_train.max_steps,  # to its early stop, as MBPO trains each time
        "model_train_every": 250,
        "rollout_every": 250,
        "rollouts_per_step": 400,  # x 250 steps: rollout_batch_size 100e3
        "model_retain": 1,
        "real_ratio": 0.05,
        "max_horizon": 1,
        "horizon_tolerance": float("inf"),
        "disagreement_threshold": float("inf"),
        "sac": dataclasses.replace(
            ours.sac, hidden_sizes=(256, 256), utd_ratio=10.0, learning_starts=500, init_alpha=1.0, target_entropy=-0.05, batch_size=256
        ),
    }


def run_ours(method: str, robot: str, budget: int, seed: int, eval_every: int, episodes: int, threshold: float | None = None, **overrides) -> list[tuple[int, float]]:
    """Our SAC or model-based learner on one world; evaluated every ``eval_every`` real steps."""
    from policies.trainer import Trainer, TrainerConfig, make_algorithm

    if method in ("sac", "sac_float32"):
        from policies.sac import SACConfig

        config = TrainerConfig(robot=robot, algorithm="sac", num_worlds=1, total_env_steps=budget, seed=seed, log_every=0)
        precision = "float32" if method == "sac_float32" else "auto"
        algo_config = SACConfig(hidden_sizes=(256, 256), learning_starts=100, utd_ratio=1.0, batch_size=256, precision=precision)
    elif method == "sac_ablation":
        from policies.mbpo import MBPOConfig

        config = TrainerConfig(robot=robot, algorithm="sac", num_worlds=1, total_env_steps=budget, seed=seed, log_every=0)
        algo_config = dataclasses.replace(MBPOConfig().sac, utd_ratio=1.0)
    else:
        from policies.mbpo import default_config

        config, algo_config = default_config(robot, total_env_steps=budget, seed=seed)
        algo_config = dataclasses.replace(algo_config, **(mbpo_published() if method == "mbpo_published" else {}), **overrides)
    curve = []
    with Trainer(config, make_algorithm(config, algo_config), algo_config=algo_config) as trainer:
        while trainer.env_steps < budget:
            target = min(budget, (trainer.env_steps // eval_every + 1) * eval_every)
            while trainer.env_steps < target:
                trainer.train(max_updates=1)
            curve.append((trainer.env_steps, eval_return(trainer.algo.policy, robot, episodes)))
            extra = getattr(trainer.algo, "model_metrics", dict)()
            extra = ", ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in extra.items())
            print(f"# {method} seed {seed}: {curve[-1][0]} real steps, return {curve[-1][1]:.1f} {extra}", file=sys.stderr)
            if threshold is not None and curve[-1][1] >= threshold:
                break
    return curve


def run_sb3(robot: str, budget: int, seed: int, eval_every: int, episodes: int, threshold: float | None = None) -> list[tuple[int, float]]:
    import gymnasium as gym
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    from sim.gym_env import ENV_IDS

    curve: list[tuple[int, float]] = []

    class Evaluate(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every == 0 or self.num_timesteps == budget:  # at the budget too, as run_ours
                act = lambda obs: self.model.predict(obs, deterministic=True)[0].astype(np.float32)  # noqa: E731
                curve.append((self.num_timesteps, eval_return(act, robot, episodes)))
                print(f"# sb3 seed {seed}: {curve[-1][0]} real steps, return {curve[-1][1]:.1f}", file=sys.stderr)
                return threshold is None or curve[-1][1] < threshold  # False stops learn()
            return True

    env = gym.make(ENV_IDS[robot])
    model = quiet_sb3(SAC("MlpPolicy", env, seed=seed, device="cpu"))  # SB3's defaults (2x256, batch 256, learning_starts 100)
    model.learn(budget, callback=Evaluate())
    env.close()
    return curve


def random_return(robot: str, episodes: int, seed: int) -> float:
    """A uniformly random policy's evaluation return (actions in [-1, 1], drawn from ``seed``), on the same
    evaluation episodes as every method's."""
    rng = np.random.default_rng(seed)
    act_dim = get_task(robot).act_dim
    return eval_return(lambda obs: rng.uniform(-1.0, 1.0, (len(obs), act_dim)).astype(np.float32), robot, episodes)


def cached_runs(cache: Path, tag: str, methods: tuple[str, ...], seeds: list[int]) -> tuple[dict[str, list[dict]], list[tuple[str, int]]]:
    """({method: its cached runs of ``seeds``}, the (method, seed) pairs with no cached run): a line's medians
    compare methods over the same seeds, so a caller prints none while a pair is missing."""
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    missing = []
    for method in methods:
        for seed in seeds:
            path = cache / f"{tag}_{method}_s{seed}.json"
            if path.exists():
                runs[method].append(json.loads(path.read_text()))
            else:
                missing.append((method, seed))
    return runs, missing


def rerun_command(args: argparse.Namespace, budget: int, eval_every: int, methods: list[str]) -> str:
    """The command that caches ``methods``' runs for this call's settings and seeds (cached seeds are read back)."""
    threshold = [] if args.threshold is None else ["--threshold", f"{args.threshold:g}"]
    flags = ["--robot", args.robot, "--budget", str(budget), "--eval-every", str(eval_every), "--eval-episodes", str(args.eval_episodes), *threshold]
    return " ".join([".venv/bin/python benchmarks/real_step_efficiency.py", *flags, "--methods", *methods, "--seeds", *map(str, args.seeds)])


def steps_to(curve: list[tuple[int, float]], threshold: float, budget: int) -> int:
    return next((s for s, r in curve if r >= threshold), budget)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--robot", default="pendulum", choices=sorted(DEFAULTS))
    parser.add_argument("--methods", nargs="+", default=["sac", "sb3", "mbpo"], choices=["sac", "sb3", "mbpo", "mbpo_published", "sac_ablation", "sac_float32"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=None, help="real steps per run (default: per robot)")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--eval-episodes", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--runs-only", action="store_true", help="run and cache, print no lines")
    args = parser.parse_args()
    threshold, budget, eval_every = DEFAULTS[args.robot]
    budget, eval_every = args.budget or budget, args.eval_every or eval_every
    threshold = args.threshold if args.threshold is not None else threshold
    torch.set_num_threads(1)
    # the threshold is in the key: a run stops once it reaches it, so its curve is cut there
    tag = f"{args.robot}_b{budget}_e{eval_every}x{args.eval_episodes}_t{'none' if threshold is None else f'{threshold:g}'}"

    def run(method: str, seed: int) -> dict:
        start = time.perf_counter()
        if method == "sb3":
            curve = run_sb3(args.robot, budget, seed, eval_every, args.eval_episodes, threshold)
        else:
            curve = run_ours(method, args.robot, budget, seed, eval_every, args.eval_episodes, threshold)
        return {"method": method, "seed": seed, "curve": curve, "wall_s": time.perf_counter() - start}

    for method in args.methods:
        for seed in args.seeds:  # the build that ran each is kept beside it; another build's is said on stderr
            cached_json(CACHE / f"{tag}_{method}_s{seed}.json", lambda m=method, s=seed: run(m, s), fresh=args.fresh)
    if args.runs_only:
        return
    runs, missing = cached_runs(CACHE, tag, ("sac", "sb3", "mbpo"), args.seeds)
    printed, _ = cached_runs(CACHE, tag, ("sac_ablation", "sac_float32"), args.seeds)  # not in the lines: whatever seeds ran
    published, published_missing = cached_runs(CACHE, tag, ("mbpo_published",), args.seeds)  # its line needs every seed
    for method, rs in [*runs.items(), *published.items(), *printed.items()]:
        for r in rs:
            t = steps_to(r["curve"], threshold, budget) if threshold is not None else None
            print(f"# {method} seed {r['seed']}: steps to {threshold}: {t}, final return {r['curve'][-1][1]:.1f}, wall {r['wall_s']:.0f} s", file=sys.stderr)
    prefix = f"efficiency/{args.robot}"
    median_steps = lambda rs: statistics.median(steps_to(r["curve"], threshold, budget) for r in rs)  # noqa: E731
    if threshold is not None and not published_missing and not any(m == "mbpo" for m, _ in missing):  # its two methods are all it needs
        mbpo, peer = median_steps(runs["mbpo"]), median_steps(published["mbpo_published"])
        emit(f"{prefix}/real_steps_to_{threshold:g}_vs_mbpo_published", mbpo, "real_steps", peer, round(peer / mbpo, 3))
    if missing:
        for method, seed in missing:
            print(f"# missing: {method} seed {seed}", file=sys.stderr)
        methods = list(dict.fromkeys(m for m, _ in missing))
        sys.exit(f"no lines: every method needs seeds {args.seeds} cached ({len(missing)} runs missing); run {rerun_command(args, budget, eval_every, methods)}")
    if threshold is not None:
        steps = {m: median_steps(rs) for m, rs in runs.items()}
        emit(f"{prefix}/real_steps_to_{threshold:g}", steps["mbpo"], "real_steps", steps["sac"], round(steps["sac"] / steps["mbpo"], 3))
        emit(f"{prefix}/real_steps_to_{threshold:g}_vs_sb3", steps["mbpo"], "real_steps", steps["sb3"], round(steps["sb3"] / steps["mbpo"], 3))
        return
    final = {m: statistics.median(r["curve"][-1][1] for r in rs) for m, rs in runs.items()}
    ratio = lambda a, b: round(a / b, 3) if b > 0 else None  # noqa: E731
    emit(f"{prefix}/return_at_budget", final["mbpo"], f"return@{budget}_real_steps", final["sac"], ratio(final["mbpo"], final["sac"]))
    emit(f"{prefix}/return_at_budget_vs_sb3", final["mbpo"], f"return@{budget}_real_steps", final["sb3"], ratio(final["mbpo"], final["sb3"]))
    chance = statistics.median(random_return(args.robot, args.eval_episodes, seed) for seed in args.seeds)
    above = {m: v - chance for m, v in final.items()}
    print(f"# a uniformly random policy's return: {chance:.1f} (median over the seeds' draws)", file=sys.stderr)
    emit(f"{prefix}/return_above_random_at_budget", above["mbpo"], f"return-random@{budget}_real_steps", above["sac"], ratio(above["mbpo"], above["sac"]))
    emit(f"{prefix}/return_above_random_at_budget_vs_sb3", above["mbpo"], f"return-random@{budget}_real_steps", above["sb3"], ratio(above["mbpo"], above["sb3"]))


if __name__ == "__main__":
    main()
