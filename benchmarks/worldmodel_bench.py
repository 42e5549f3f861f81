"""World model and calibration, measured side by side with their baselines.

Per robot (default: half_cheetah, ant), on simulated fleet data (random-action episodes):
  * synthetic transitions/s of the ensemble (10k start states, policy in the loop; `--starts 10000 100000`
    adds a line per further count, MBPO's rollout batch is 100k) vs MuJoCo batched stepping of the same robot
    with the same policy on the same cores;
  * open-loop k-step prediction error (k = 1, 5, 20) on held-out episodes vs a linear
    least-squares model fitted on the same training episodes;
  * the physics check: model rollouts branched from held-out states vs MuJoCo replays.
For calibration (half_cheetah): relative error of the recovered mass / friction / actuator
strength / damping for simulated robots with planted profiles, from 20 episodes of telemetry
each (observations with sensor noise and actions only, like real telemetry), vs the error of
the uncalibrated (nominal) profile.

Run: `.venv/bin/python benchmarks/worldmodel_bench.py [--robots half_cheetah ant] [--device auto] [--threads N]`
(On a shared, oversubscribed machine `--threads 1` avoids OpenMP spin-wait collapse in torch.)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import emit, median_rate  # noqa: E402

from sim.batched import BatchedStepper  # noqa: E402
from sim.calibration import CalibrationConfig, calibrate  # noqa: E402
from sim.policy_fn import random_policy  # noqa: E402
from sim.robots import get_task  # noqa: E402
from sim.scenario import ScenarioSpec  # noqa: E402
from sim.variation import VariationProfile  # noqa: E402
from worldmodel import EnsembleConfig, RolloutConfig, TrainConfig, branch_rollouts, model_rollout, train_ensemble  # noqa: E402
from worldmodel.evaluate import LinearDynamics, ensemble_step_fn, k_step_errors, observation_scale  # noqa: E402
from worldmodel.physics_check import PhysicsCheckConfig, physics_check  # noqa: E402
from worldmodel.transitions import to_transitions  # noqa: E402

DEFAULT_STARTS = 10_000  # start states per batched rollout; its lines carry no count in their name
SENSOR_NOISE = 0.01  # std of the simulated robots' observation noise
PLANTED = [
    VariationProfile(mass_scale=1.15, friction_scale=0.8, actuator_strength=0.9, damping_scale=1.2, obs_noise_std=SENSOR_NOISE),
    VariationProfile(mass_scale=0.85, friction_scale=1.25, actuator_strength=1.1, damping_scale=0.8, obs_noise_std=SENSOR_NOISE),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def policy_net(obs_dim: int, act_dim: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(obs_dim, 64), torch.nn.Tanh(), torch.nn.Linear(64, act_dim), torch.nn.Tanh())
    return net.to(device).eval()


def fleet_data(robot: str, episodes: int, steps: int, nthread: int, profile: VariationProfile = VariationProfile(), seed: int = 0):
    task = get_task(robot)
    with BatchedStepper(robot, min(episodes, 256), nthread=nthread, robot_id=f"{robot}-fleet") as stepper:
        specs = [ScenarioSpec(robot, seed=seed * 100_000 + i, profile=profile, max_steps=steps) for i in range(episodes)]
        return stepper.simulate(specs, random_policy(task.act_dim, seed))


def mujoco_rate(robot: str, worlds: int, steps: int, nthread: int) -> float:
    """Control steps (transitions) per second of the batched MuJoCo stepper, same policy network on the CPU."""
    task = get_task(robot)
    actor = policy_net(task.obs_dim, task.act_dim, torch.device("cpu"))
    with BatchedStepper(robot, worlds, nthread=nthread, record=False) as stepper:
        stepper.reset(seed=0)

        def work():
            before = stepper.stats["steps"]
            stepper.run(actor, steps)
            return stepper.stats["steps"] - before

        return median_rate(work)


def model_rate(model, starts: np.ndarray, horizon: int, members: str = "all") -> tuple[float, float]:
    """(transitions/s, share of rollouts that ran the full horizon) of world-model rollouts from ``starts``.

    No cut (threshold and envelope wide open), so every rollout does the full work.
    """
    actor = policy_net(model.spec.obs_dim, model.spec.act_dim, model.device)
    config = RolloutConfig(horizon=horizon, disagreement_threshold=1e9, envelope_margin=1e3, disagreement_members=members)
    full = []
    model_rollout(model, starts[: min(len(starts), 1024)], actor, config)  # untimed: a GPU's first call pays its lazy set-up

    def work():
        batch = model_rollout(model, starts, actor, config)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        full.append(float((batch.length == horizon).mean()))
        return batch.num_transitions

    return median_rate(work), statistics.median(full)


def bench_robot(robot: str, args, device: torch.device, nthread: int) -> None:
    started = time.perf_counter()
    episodes = fleet_data(robot, args.episodes, args.episode_steps, nthread)
    split = int(0.85 * len(episodes))
    train_eps, test_eps = episodes[:split], episodes[split:]
    log(f"[{robot}] {len(episodes)} episodes, {sum(e.num_steps for e in episodes)} transitions in {time.perf_counter() - started:.1f}s")
    ensemble = EnsembleConfig(ensemble_size=5, num_elites=3, hidden_size=args.hidden, num_hidden_layers=args.layers)
    train_cfg = TrainConfig(
        max_steps=args.train_steps, batch_size=512, learning_rate=3e-3, eval_every=250, patience=4, device=str(device), seed=0
    )
    t0 = time.perf_counter()
    model, report = train_ensemble(train_eps, ensemble=ensemble, config=train_cfg)
    train_s = time.perf_counter() - t0
    log(f"[{robot}] trained {report.steps} steps in {train_s:.1f}s, elite val mse {report.elite_val_mse:.4f}")
    emit(f"worldmodel/{robot}/train_seconds", train_s, "s", None, None)

    linear = LinearDynamics.fit(to_transitions(train_eps))
    scale = observation_scale(test_eps)
    ours = k_step_errors(ensemble_step_fn(model), test_eps, (1, 5, 20), scale=scale)
    base = k_step_errors(linear, test_eps, (1, 5, 20), scale=scale)
    for k in (1, 5, 20):
        emit(f"worldmodel/{robot}/kstep_error_k{k}", ours[k], "normalised RMSE", round(base[k], 6), round(ours[k] / base[k], 3))

    check = physics_check(
        branch_rollouts(model, test_eps, random_policy(model.spec.act_dim, 5), 512, RolloutConfig(horizon=20, disagreement_threshold=1e9, seed=1)),
        scale,
        PhysicsCheckConfig(tolerance=1.0, nthread=nthread),
    )
    for k, err in check.k_step_error.items():
        emit(f"worldmodel/{robot}/physics_check_error_k{k}", err, "normalised RMSE", None, None)
    kept = len(check.kept) / max(1, len(check.kept) + len(check.dropped))
    emit(f"worldmodel/{robot}/physics_check_kept", kept, "fraction", None, None)

    pool = np.concatenate([ep.observation[:-1] for ep in train_eps])
    tag = f"{device.type}{'' if device.type == 'cuda' else nthread}"
    for count in dict.fromkeys(args.starts):  # a count given twice is measured once
        mj_rate = mujoco_rate(robot, count, max(2, round(args.mujoco_transitions / count)), nthread)  # as many worlds as starts
        starts = pool[np.random.default_rng(0).choice(len(pool), count)]
        wm_rate, full = model_rate(model, starts, args.horizon)
        elite_rate, _ = model_rate(model, starts, args.horizon, members="elites")
        name = f"worldmodel/{robot}/synthetic_transitions_per_s_{tag}{'' if count == DEFAULT_STARTS else f'_{count}_starts'}"
        emit(name, wm_rate, "transitions/s", round(mj_rate, 1), round(wm_rate / mj_rate, 2))
        emit(f"{name}_elite_disagreement", elite_rate, "transitions/s", round(mj_rate, 1), round(elite_rate / mj_rate, 2))
        log(f"[{robot}] {count:,} starts: model {wm_rate:,.0f}/s ({full:.0%} full-horizon; elites only {elite_rate:,.0f}/s) vs MuJoCo {mj_rate:,.0f}/s ({count:,} worlds, {nthread} CPU threads)")
    log(f"[{robot}] {time.perf_counter() - started:.0f}s")


def bench_calibration(robot: str, args, nthread: int) -> None:
    started = time.perf_counter()
    errors: dict[str, list[float]] = {}
    nominal: dict[str, list[float]] = {}
    for i, truth in enumerate(PLANTED[: args.calibration_robots]):
        telemetry = fleet_data(robot, 20, args.episode_steps, nthread, profile=truth, seed=10 + i)
        for ep in telemetry:  # like real telemetry: noisy observations and actions only, no physics state
            ep.extras.clear()
        config = CalibrationConfig(population=48, num_elites=6, windows_per_episode=3, nthread=nthread, seed=i)
        result = calibrate(robot, telemetry, config, base=VariationProfile(obs_noise_std=SENSOR_NOISE))
        guess = dataclasses.replace(result, estimates={name: float(getattr(VariationProfile(), name)) for name in result.estimates})
        for name, err in result.relative_errors(truth).items():  # relative, or absolute where the truth is 0 (a bias, a payload)
            errors.setdefault(name, []).append(err)
            nominal.setdefault(name, []).append(guess.relative_errors(truth)[name])  # the nominal body as the guess
        log(f"[calibration {robot} #{i}] {result.estimates} identifiable={result.identifiable} loss {result.loss:.2e}")
    for name in errors:
        value, base = statistics.median(errors[name]), statistics.median(nominal[name])
        emit(f"calibration/{robot}/rel_error_{name}", value, "relative error", round(base, 6), round(value / base, 4) if base else None)
    log(f"[calibration {robot}] {time.perf_counter() - started:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--robots", nargs="*", default=["half_cheetah", "ant"])
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--episode-steps", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=3000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument(
        "--starts", type=int, nargs="+", default=[DEFAULT_STARTS], help="start states per batched model rollout (and MuJoCo worlds), one line each"
    )
    parser.add_argument("--horizon", type=int, default=10)
    parser.add_argument("--mujoco-transitions", type=int, default=20_000, help="MuJoCo transitions per timed repeat (all worlds)")
    parser.add_argument("--calibration-robot", default="half_cheetah")
    parser.add_argument("--calibration-robots", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for torch and MuJoCo alike")
    args = parser.parse_args()
    from worldmodel.device import resolve_device

    device = resolve_device(args.device)
    nthread = args.threads
    torch.set_num_threads(nthread)
    emit("worldmodel/cpu_threads", nthread, "threads", None, None)
    for robot in args.robots:
        bench_robot(robot, args, device, nthread)
    if args.calibration_robots:
        bench_calibration(args.calibration_robot, args, nthread)


if __name__ == "__main__":
    main()
