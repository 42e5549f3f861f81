"""The noisy-sensor robot with and without its on-board Kalman filter (sim/sensor_filter.py).

Every arm: the flywheel's learner (``policies.mbpo.default_config``, body-conditioned, the
sensor-noise rule ``robust_to_fleet_sensors``) pooled over the four demo bodies (nominal, 2 kg
payload, half-strength motor, noisy sensor: std 0.05, offset 0.02), one world each, the same seeds
and real-step budget. The sensor offset is taken out as the flywheel's robots do (here the true
one). The arms differ in the noisy robot only:

* ``unfiltered``: its policy reads the corrected readings; its training world simulates the sensor;
* ``filtered`` (the filter's first stand-in): it runs the filter fitted on its body before training
  (the fleet's first iteration: the zero policy plus exploration noise, ``FilterConfig``'s
  defaults); its training world simulates white noise of the size the filter leaves
  (``FilterFit.view_noise``), and the actor trains under that noise on every body;
* ``simulated`` (the flywheel's way): the same filter runs in its training world on the simulated
  sensor, the policy is told the robot's body with a clean sensor (``seen_body``), and the actor
  trains under the noise the filter leaves (``FilterFit.view_noise``, its largest per-channel residual)
  on every body, as the flywheel's noise rule counts a filtered sensor (``fleet.pipeline.steps.filter_residuals``).
* ``refit`` (the flywheel's way, as its iterations do it): ``simulated``, with the filter refitted
  under the policy in training at each third of the budget (the flywheel refits it every iteration
  under the fleet's current policy; fitted under the zero policy, the pendulum falls within ~10
  steps in every fit episode, and the model of the cart is poor where a balancing policy drives it).

Each policy is evaluated at the budget on every body, 6 fixed-seed 1,000-step episodes, the noisy
one through its real sensor (through the filter in the filtered arms). Each arm's policy is also
run on the noisy robot with a filter refitted under it after training, as the flywheel's next
iteration fits one under the fleet's current policy (for the ``unfiltered`` arm: the filter alone,
added to a policy that never saw it). Lines: per body, simulated vs unfiltered (median over seeds),
the worst body's, the stand-in's noisy robot, and the noisy robot with the refitted filter in each
arm. Each seed's result is cached as JSON under ``runs/benchmarks/sensor_filter/`` (``--fresh``
ignores it).

Run: `.venv/bin/python benchmarks/sensor_filter.py [--steps 3000] [--seeds 0 1 2]`
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import cached_json, emit, pooled_seed_args  # noqa: E402

from fleet.pipeline.simfleet import CONDITIONS  # noqa: E402
from fleet.pipeline.steps import body_conditioned, filter_residuals, robust_to_fleet_sensors  # noqa: E402
from policies.evaluate import evaluate  # noqa: E402
from policies.mbpo import default_config  # noqa: E402
from policies.trainer import Trainer, check_budget, make_algorithm  # noqa: E402
from sim.batched import BatchedStepper  # noqa: E402
from sim.policy_fn import with_context, zero_policy  # noqa: E402
from sim.scenario import ScenarioSpec  # noqa: E402
from sim.sensor_filter import FilterConfig, filtered_act, fit_sensor_filter, seen_body  # noqa: E402
from sim.variation import VariationProfile  # noqa: E402

ROBOT = "pendulum"
FLEET = ["nominal", "heavy_payload", "weak_motor", "noisy_sensor"]
CACHE = Path("runs/benchmarks/sensor_filter")
EPISODES, EVAL_SEED = 6, 123


ARMS = ("unfiltered", "filtered", "simulated", "refit")  # "filtered": the white-noise stand-in; "simulated": the filter itself in the world
REFITS = 2  # the refit arm's refits, evenly spaced over the budget (3 stretches: the demo's 3 iterations)


def run_arm(steps: int, seed: int, arm: str, conditions: tuple[str, ...] = tuple(FLEET)) -> dict:
    """Per body, the mean return at the budget; and the noisy robot's filter report (filtered arms).
    ``conditions``: the bodies trained on, one world each (the noisy one, if any, last); a specialist
    trains on one (benchmarks/equal_data.py)."""
    bodies = [VariationProfile(**CONDITIONS[c]).replace(obs_bias=0.0) for c in conditions]  # offsets taken out on board
    has_noisy = bodies[-1].obs_noise_std > 0
    noisy, fit, on_board = bodies[-1], None, None
    worlds, view = list(bodies), list(bodies)  # view: the bodies the policy is told it drives (and the actor-noise rule reads)
    if arm != "unfiltered" and has_noisy:
        fit = fit_sensor_filter(ROBOT, noisy, noisy.obs_noise_std, zero_policy(1))
        if arm == "filtered":
            worlds = view = [*bodies[:-1], noisy.replace(obs_noise_std=fit.view_noise)]
        else:
            on_board = {noisy: fit.filter}
            view = [seen_body(b, on_board) for b in bodies]
    config, algo = default_config(ROBOT, total_env_steps=steps, seed=seed)
    config = dataclasses.replace(config, num_worlds=len(worlds))
    view = {str(i): p for i, p in enumerate(view)}
    if on_board:  # the flywheel's rule: the actor trains under what the filter leaves (fleet.pipeline.steps.filter_residuals)
        view = filter_residuals(view, {str(len(bodies) - 1): fit.view_noise})
    algo = robust_to_fleet_sensors(body_conditioned(algo), view)
    algorithm = make_algorithm(config, algo)
    refits = REFITS if arm == "refit" and has_noisy else 0
    stretches = [steps // (refits + 1)] * refits + [steps - refits * (steps // (refits + 1))]
    if refits:  # one learner's run over the stretches, as over the flywheel's iterations: its whole budget is checked once, here
        check_budget(config, algo)
    for k, stretch in enumerate(stretches):
        if k:  # the flywheel's next iteration: a filter fitted under the policy in training (the same learner goes on)
            fit = fit_sensor_filter(ROBOT, noisy, noisy.obs_noise_std, with_context(algorithm.policy, seen_body(noisy, on_board).context()), FilterConfig(seed=k))
            on_board = {noisy: fit.filter}
        stretch_config = dataclasses.replace(config, total_env_steps=stretch, seed=config.seed + 7919 * k)
        with Trainer(stretch_config, algorithm, profiles=worlds, sensor_filters=on_board, carried_on=bool(refits)) as trainer:  # a stretch may end in the warm-up
            trainer.train()
            policy = trainer.algo.policy
    if not has_noisy:  # clean bodies only
        return {"returns": [p.mean_return for p in evaluate(policy, ROBOT, worlds, EPISODES, seed=EVAL_SEED).profiles], "filter": None}
    returns = [p.mean_return for p in evaluate(policy, ROBOT, worlds[:-1], EPISODES, seed=EVAL_SEED).profiles] if len(worlds) > 1 else []
    act = with_context(policy, seen_body(worlds[-1], on_board).context())  # the robot's delivered body features
    episode_act = filtered_act(act, fit.filter) if fit else (lambda: act)
    returns.append(noisy_robot_return(episode_act, noisy))
    refit = fit_sensor_filter(ROBOT, noisy, noisy.obs_noise_std, act)  # under the trained policy
    return {
        "returns": returns, "filter": fit.to_dict() if fit else None,
        "noisy_with_refit_filter": noisy_robot_return(filtered_act(act, refit.filter), noisy), "refit_filter": refit.to_dict(),
    }  # fmt: skip


def noisy_robot_return(episode_act, body: VariationProfile) -> float:
    """Mean return over the fixed-seed episodes on the robot's real sensor, a fresh per-episode policy each."""
    total = []
    with BatchedStepper(ROBOT, 1, nthread=1) as stepper:
        for s in range(EPISODES):
            (ep,) = stepper.simulate([ScenarioSpec(ROBOT, seed=EVAL_SEED * 1000 + s, profile=body, max_steps=1000)], episode_act())
            total.append(float(ep.reward.sum()))
    return float(np.mean(total))


def cached(steps: int, seed: int, arm: str, fresh: bool) -> dict:
    path = CACHE / f"steps{steps}-seed{seed}-{arm}.json"
    return cached_json(path, lambda: run_arm(steps, seed, arm), fresh, complete=lambda out: "noisy_with_refit_filter" in out)


def main() -> None:
    args = pooled_seed_args(__doc__)
    runs = {arm: [cached(args.steps, seed, arm, args.fresh) for seed in args.seeds] for arm in ARMS}
    for name in ARMS:
        for seed, r in zip(args.seeds, runs[name]):
            added = f"; noisy robot with a refitted filter {r['noisy_with_refit_filter']:.0f} ({r['refit_filter']})"
            print(f"# {name} seed {seed}: " + "/".join(f"{x:.0f}" for x in r["returns"]) + (f"; filter {r['filter']}" if r["filter"] else "") + added, file=sys.stderr)
    med = lambda values: float(statistics.median(values))  # noqa: E731
    for i, body in enumerate(FLEET):  # the flywheel's way (the filter simulated in training) vs no filter
        a, b = med([r["returns"][i] for r in runs["simulated"]]), med([r["returns"][i] for r in runs["unfiltered"]])
        emit(f"sensor_filter/{body}/return_at_{args.steps}", a, "return", b, round(a / b, 3) if b else None)
    a, b = med([min(r["returns"]) for r in runs["simulated"]]), med([min(r["returns"]) for r in runs["unfiltered"]])
    emit(f"sensor_filter/worst_body/return_at_{args.steps}", a, "return", b, round(a / b, 3) if b else None)
    for i, body in enumerate([*FLEET, "worst_body"]):  # refitted as the flywheel's iterations do, vs no filter
        pick = (lambda r: min(r["returns"])) if body == "worst_body" else (lambda r, i=i: r["returns"][i])
        a, b = med([pick(r) for r in runs["refit"]]), med([pick(r) for r in runs["unfiltered"]])
        emit(f"sensor_filter/refit/{body}/return_at_{args.steps}", a, "return", b, round(a / b, 3) if b else None)
    a, b = med([r["returns"][-1] for r in runs["filtered"]]), med([r["returns"][-1] for r in runs["unfiltered"]])
    emit(f"sensor_filter/noisy_sensor/white_noise_stand_in_at_{args.steps}", a, "return", b, round(a / b, 3) if b else None)
    for name in ARMS:
        a, b = med([r["noisy_with_refit_filter"] for r in runs[name]]), med([r["returns"][-1] for r in runs[name]])
        emit(f"sensor_filter/noisy_sensor/{name}_arm_with_refit_filter_{args.steps}", a, "return", b, round(a / b, 3) if b else None)


if __name__ == "__main__":
    main()
