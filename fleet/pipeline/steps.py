"""The steps of one flywheel iteration, each a function of data in, data out.

1. world model: train/update the dynamics ensemble on real + sim episodes
2. scenarios: calibrate each robot's profile from its telemetry, propose scenarios from
   failures / uncertainty / randomisation around it, simulate them (Ray tasks), branch
   short world-model rollouts from real states
3. policy: SAC on real + sim + world-model data plus online MuJoCo on the calibrated profiles
4. gate inputs: candidate and current policy on every robot's calibrated profile
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from sim.calibration import CalibrationConfig, CalibrationResult, calibrate_job
from sim.episode import Episode
from sim.sensors import OffsetBelief, track_offsets
from sim.variation import VariationProfile
from worldmodel.fanout import simulate_scenarios
from worldmodel.io import model_version
from worldmodel.proposals import ProposalConfig, propose
from worldmodel.rollout import RolloutConfig, branch_rollouts
from worldmodel.train import train_ensemble

log = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]


def by_robot(episodes: Sequence[Episode]) -> dict[str, list[Episode]]:
    out: dict[str, list[Episode]] = {}
    for ep in episodes:
        out.setdefault(ep.robot_id, []).append(ep)
    return out


def update_world_model(real: Sequence[Episode], sim: Sequence[Episode], previous, ensemble_cfg, train_cfg, log: LogFn | None):
    """Continue training the previous model (or start one) on every real and sim episode so far."""
    model, report = train_ensemble([*real, *sim], ensemble=ensemble_cfg, config=train_cfg, model=previous, log=log)
    return model, report, model_version(model)


def calibrate_fleet(
    robot_model: str, real: Sequence[Episode], config: CalibrationConfig, max_episodes: int, map_fn=map, starts: Mapping[str, dict] | None = None
) -> dict[str, CalibrationResult]:
    """Each robot's CalibrationResult from its most recent ``max_episodes`` episodes, one job per robot
    (``map_fn``: the services' Ray map runs them in parallel; jobs and results are bytes and JSON).
    ``starts``: robot id -> its previous calibrated profile (dict), where each search begins."""
    fleet = sorted(by_robot(real).items())
    config_fields, starts = dataclasses.asdict(config), starts or {}
    jobs = [
        {"robot": robot_model, "episodes": [ep.to_bytes() for ep in eps[-max_episodes:]], "config": config_fields, "start": starts.get(robot_id)}
        for robot_id, eps in fleet
    ]
    return {robot_id: CalibrationResult.from_json(text) for (robot_id, _), text in zip(fleet, map_fn(calibrate_job, jobs))}


def track_sensor_offsets(beliefs: dict, calibrations: dict[str, CalibrationResult], real: Sequence[Episode], config: CalibrationConfig, max_episodes: int):
    """Pool this round's calibrations into each robot's sensor-offset belief (``beliefs``: JSON from
    the loop state). Returns (updated beliefs as JSON, robot id -> offset to deliver)."""
    counts = {r: len(eps) for r, eps in by_robot(real).items()}
    used = {r: min(n, max_episodes) for r, n in counts.items()}
    updated, offsets = track_offsets({r: OffsetBelief(**b) for r, b in beliefs.items()}, calibrations, counts, used, config.sensor_bias_floor)
    return {r: dataclasses.asdict(b) for r, b in updated.items()}, offsets


def generate_scenarios(
    real: Sequence[Episode],
    profiles: dict[str, VariationProfile],
    model,
    policy_factory: Callable[[], object],
    proposal_cfg: ProposalConfig,
    *,
    map_fn,
    chunk_size: int,
    policy_version: str,
) -> tuple[list[Episode], dict[str, int]]:
    """Propose scenarios (failures, uncertainty, randomisation around calibrated profiles) and simulate them."""
    specs = propose(real, profiles, model, proposal_cfg)
    episodes = simulate_scenarios(specs, policy_factory, map_fn=map_fn, chunk_size=chunk_size, policy_version=policy_version, robot_id="scenario")
    counts: dict[str, int] = {}
    for spec in specs:
        kind = spec.tag.split(":", 1)[0] or "other"
        counts[kind] = counts.get(kind, 0) + 1
    return episodes, counts


def model_rollouts(
    model, real: Sequence[Episode], policy, num_rollouts: int, config: RolloutConfig, policy_version: str, profiles: dict[str, VariationProfile]
) -> list[Episode]:
    """World-model rollouts of ``policy`` branched from the robots' states (a body-conditioned policy
    reads each robot's calibrated body, ``profiles``)."""
    return branch_rollouts(model, real, policy, num_rollouts, config, policy_version=policy_version, context_of=functools.partial(episode_context, profiles))


@dataclasses.dataclass
class TrainedPolicy:
    policy: object  # policies.networks.Policy (torch)
    checkpoint: Path
    env_steps: int
    metrics: dict[str, float]


def train_policy(
    trainer_cfg,
    algo_cfg,
    data: dict[str, list[Episode]],
    profiles: dict[str, VariationProfile],
    warm_start: Path | None,
    out_dir: Path,
    log: LogFn | None,
    worlds: dict[str, VariationProfile] | None = None,
    sensor_filters=None,
) -> TrainedPolicy:
    """The policy learner (SAC or the model-based learner) on the fleet's data (``data``: source ->
    episodes) plus online MuJoCo on ``worlds`` (default ``profiles``: robot id -> its calibrated
    profile; evaluations use ``profiles``), continuing the learner checkpointed at ``warm_start`` (the
    previous candidate, promoted or not): its networks, optimisers, temperature, online replay and
    step counters carry over (no second warm-up), so an iteration may end before the first update if the
    run reaches it (``fleet.pipeline.loop.check_run_budget``); the offline sources are this snapshot's."""
    from policies.checkpoint import load_checkpoint
    from policies.trainer import Trainer, make_algorithm

    seen = seen_bodies(profiles, sensor_filters)  # the bodies the policy is told the episodes come from

    if trainer_cfg.algorithm == "mbpo":  # model-based: learns a model from the fleet's real + scenario episodes and its own steps
        algorithm = make_algorithm(trainer_cfg, algo_cfg)
        offline = [*data.get("real", []), *data.get("sim", [])]
    else:  # SAC: the fleet's episodes are replay sources, mixed by algo_cfg.replay_ratios
        ratios = {k: v for k, v in algo_cfg.replay_ratios.items() if k == algo_cfg.online_source or data.get(k)}
        algo_cfg = dataclasses.replace(algo_cfg, replay_ratios=ratios)
        offline = {k: v for k, v in data.items() if k in ratios and v}
        algorithm = make_algorithm(trainer_cfg, algo_cfg, offline=offline, context_of=functools.partial(episode_context, seen))
    if warm_start is not None:
        tensors, meta = load_checkpoint(warm_start)
        algorithm.continue_from(tensors, meta["algo"])
    if trainer_cfg.algorithm == "mbpo":  # its world model reads each episode's body: the robot's calibrated profile, the scenario's
        algorithm.add_offline(offline, functools.partial(episode_profile, seen))
    worlds = profiles if worlds is None else worlds
    with Trainer(
        trainer_cfg, algorithm, profiles=list(worlds.values()), eval_profiles=list(profiles.values()), log=log, checkpoint_dir=out_dir, algo_config=algo_cfg,
        sensor_filters=sensor_filters, carried_on=True,  # the next iteration continues it: the loop checked the run's budget (check_run_budget)
    ) as trainer:
        result = trainer.train()
        checkpoint = trainer.save(out_dir)  # the learner's latest state: the next iteration continues it
        candidate = trainer.best_policy if trainer.best_policy is not None else trainer.algo.policy  # keep_best: the best-evaluated
        return TrainedPolicy(candidate, checkpoint, result.env_steps, result.metrics)


def fit_sensor_filters(robot_model: str, profiles: dict[str, VariationProfile], policy, seed: int) -> dict:
    """A Kalman filter for each robot whose calibrated sensor is noisy (sim/sensor_filter.py), fitted on
    its calibrated body under ``policy`` (the fleet's current one) plus exploration noise; robot id ->
    ``FilterFit`` (its ``keep`` says whether it is delivered)."""
    from sim.sensor_filter import FilterConfig, fit_sensor_filter

    config, fits = FilterConfig(seed=seed), {}
    for robot_id, profile in sorted(profiles.items()):
        if profile.obs_noise_std > 0:
            try:
                fits[robot_id] = fit_sensor_filter(robot_model, profile, profile.obs_noise_std, policy, config)
            except ValueError as exc:  # e.g. every simulated episode diverged: the robot reads its sensor as it is
                log.warning("no sensor filter for %s: %s", robot_id, exc)
    return fits


def robust_to_fleet_sensors(algo_cfg, profiles: dict[str, VariationProfile]):
    """``algo_cfg`` (SAC's, or the model-based learner's around it) whose actor trains on observations
    as noisy as the noisiest sensor of ``profiles`` (at least its configured noise). The flywheel passes
    the bodies its policy is told it drives with a filtered sensor's noise at what its filter leaves
    (:func:`filter_residuals`): the raw sensor's noise on every body cost the clean bodies their skill,
    none left the pooled policy short on the filtered robot (docs/policies.md)."""
    worst = max((p.obs_noise_std for p in profiles.values()), default=0.0)
    sac = getattr(algo_cfg, "sac", algo_cfg)
    robust = dataclasses.replace(sac, actor_obs_noise=max(sac.actor_obs_noise, float(worst)))
    return dataclasses.replace(algo_cfg, sac=robust) if sac is not algo_cfg else robust


def body_conditioned(algo_cfg):
    """``algo_cfg`` (SAC's, or the model-based learner's around it) with a policy that reads each
    transition's body features (``loop.body_context``; sim/body_context.py)."""
    sac = getattr(algo_cfg, "sac", algo_cfg)
    conditioned = dataclasses.replace(sac, body_context=True)
    return dataclasses.replace(algo_cfg, sac=conditioned) if sac is not algo_cfg else conditioned


def clean_sensor_worlds(profiles: dict[str, VariationProfile]) -> dict[str, VariationProfile]:
    """Training worlds for an actor that trains under sensor noise (:func:`robust_to_fleet_sensors`):
    each robot's body and sensor offset with a noise-free sensor. The actor's own noise stands in
    for the sensor's, and the critic and the world model learn from the true state, which
    simulation has (privileged information, as in asymmetric actor-critic). ``loop.noise_free_training_worlds``;
    docs/policies.md (Sensor noise) has what it does to the worst body and to the demo."""
    return {r: p.replace(obs_noise_std=0.0) for r, p in profiles.items()}


def seen_bodies(profiles: dict[str, VariationProfile], sensor_filters) -> dict[str, VariationProfile]:
    """Each robot's body as its policy is told it (:func:`sim.sensor_filter.seen_body`): a robot whose
    calibrated profile has a filter in ``sensor_filters`` ({profile: SensorFilter}) with a clean sensor."""
    from sim.sensor_filter import seen_body

    return {r: seen_body(p, sensor_filters) for r, p in profiles.items()}


def filter_residuals(seen: dict[str, VariationProfile], residuals: Mapping[str, float]) -> dict[str, VariationProfile]:
    """What the actor-noise rule (:func:`robust_to_fleet_sensors`) reads: each robot's body as its
    policy is told it (``seen``), a filtered robot's sensor noise set to what its filter leaves
    (``residuals``: robot id -> ``FilterFit.view_noise``) rather than to none. Training every body's
    actor under that residual, with the filter running in the filtered robot's own world, keeps the
    pooled policy on that robot at equal data (docs/benchmarks.md, "At equal data")."""
    return {r: p.replace(obs_noise_std=float(residuals[r])) if r in residuals else p for r, p in seen.items()}


def episode_profile(profiles: dict[str, VariationProfile], episode: Episode) -> VariationProfile | None:
    """The body an episode was recorded on: its robot's calibrated profile, or its scenario's; None if unknown."""
    if episode.robot_id in profiles:
        return profiles[episode.robot_id]
    scenario = episode.json_metadata("scenario")
    return VariationProfile.from_dict(scenario["profile"]) if "profile" in scenario else None


def episode_context(profiles: dict[str, VariationProfile], episode: Episode):
    """The body features of the body an episode was recorded on (:func:`episode_profile`); None if unknown."""
    profile = episode_profile(profiles, episode)
    return None if profile is None else profile.context()


def evaluate_on_profiles(policy, robot_model: str, profiles: dict[str, VariationProfile], episodes: int, seed: int, sensor_filters=None) -> dict[str, list[float]]:
    """Per-episode returns of ``policy`` on each robot's profile (read through its filter where it has
    one: ``sensor_filters`` {profile: SensorFilter}); episode j of every robot and of every policy
    uses the same scenario seed (paired, for the gate)."""
    from policies.evaluate import evaluate

    ids = sorted(profiles)
    result = evaluate(policy, robot_model, [profiles[r] for r in ids], episodes, seed, sensor_filters=sensor_filters)
    return {r: list(p.returns) for r, p in zip(ids, result.profiles)}


def mean_returns(summaries: Sequence[dict]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for s in summaries:
        out.setdefault(s["robot_id"], []).append(s["return"])
    return {r: float(np.mean(v)) for r, v in sorted(out.items())}
