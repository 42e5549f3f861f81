"""Scenario proposals: what MuJoCo should simulate next, as replayable ScenarioSpecs.

Three sources, all around each robot's calibrated profile (sim.calibration):
  * fleet failures: episodes that terminated, saw an operator intervention, or whose return
    is in the bottom ``low_return_quantile`` of their robot model; the scenario starts
    ``lookback`` steps before the failure, from the recorded physical state (the qpos/qvel
    extras, else a state rebuilt from the observation);
  * model uncertainty: the recorded (state, action) pairs where the world-model ensemble
    disagrees most, one per episode at most;
  * domain randomisation: ranges of variation sampled around the calibrated profile.

Every spec gets a tag saying why it exists (``failure:<reason>:<robot_id>:<episode_id>:<step>``,
``uncertainty:<robot_id>:<episode_id>:<step>``, ``dr:<robot_id>``) and a seed derived from
where it came from (the recorded experience, not the episode's id, which robots draw at random),
so the same inputs always give the same proposals, in any run.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from sim.calibration import state_from_observation
from sim.episode import Episode
from sim.robots import get_task
from sim.scenario import DomainRandomization, ScenarioSpec
from sim.variation import VariationProfile, contexts
from worldmodel.ensemble import DynamicsEnsemble


def _default_randomization() -> DomainRandomization:
    return DomainRandomization(
        ranges={"mass_scale": (0.9, 1.1), "friction_scale": (0.8, 1.2), "actuator_strength": (0.9, 1.1), "damping_scale": (0.8, 1.2)},
        init_noise_scale=(0.5, 1.5),
    )


@dataclasses.dataclass(frozen=True)
class ProposalConfig:
    low_return_quantile: float = 0.1  # bottom share of returns (per robot model) counted as failures
    lookback: int = 10  # control steps before the failure the scenario starts
    max_failures: int = 64
    num_uncertain: int = 32
    num_randomized: int = 16  # per robot
    max_steps: int = 200  # length limit of a proposed scenario
    randomization: DomainRandomization = dataclasses.field(default_factory=_default_randomization)
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.low_return_quantile < 1.0:
            raise ValueError(f"proposals: low_return_quantile must be in [0, 1), got {self.low_return_quantile}")
        if self.lookback < 0 or self.max_steps < 1:
            raise ValueError(f"proposals: lookback must be >= 0 and max_steps >= 1, got {self.lookback}, {self.max_steps}")


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:4], "little") >> 1


def _start_state(episode: Episode, step: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if "qpos" in episode.extras and "qvel" in episode.extras:
        qpos, qvel = episode.extras["qpos"][step], episode.extras["qvel"][step]
    else:
        q, v = state_from_observation(get_task(episode.metadata["robot_model"]), episode.observation[step : step + 1])
        qpos, qvel = q[0], v[0]
    return tuple(float(x) for x in qpos), tuple(float(x) for x in qvel)


def _content(episode: Episode) -> str:
    """A digest of what the episode recorded (observations, actions): unlike its id, which a robot
    draws at random, the same experience gives the same digest in every run."""
    return hashlib.sha256(np.ascontiguousarray(episode.observation).tobytes() + np.ascontiguousarray(episode.action).tobytes()).hexdigest()[:16]


def _spec_at(episode: Episode, step: int, profile: VariationProfile, why: str, config: ProposalConfig) -> ScenarioSpec:
    """The scenario from ``episode``'s state at ``step``, tagged ``<why>:<robot_id>:<episode_id>:<step>``;
    seeded by what the episode recorded, not by its id, so one seed gives one run."""
    qpos, qvel = _start_state(episode, step)
    tag = f"{why}:{episode.robot_id}:{episode.episode_id}:{step}"
    return ScenarioSpec(
        robot=episode.metadata["robot_model"],
        seed=_seed(config.seed, why, episode.robot_id, _content(episode), step),
        profile=profile,
        init_qpos=qpos,
        init_qvel=qvel,
        max_steps=config.max_steps,
        tag=tag,
    )


def find_failures(episodes: Sequence[Episode], low_return_quantile: float) -> list[tuple[int, int, str]]:
    """(episode index, failure step, reason) for every failed episode, most severe first.

    Reasons, by priority: ``intervention`` (first step an operator intervened), ``terminated``
    (the last step), ``low_return`` (the step with the lowest reward). Ordered by reason
    priority, then by return (lowest first), then by index.
    """
    returns = np.array([ep.total_return for ep in episodes])
    models = np.array([ep.metadata["robot_model"] for ep in episodes])
    cutoff = {m: np.quantile(returns[models == m], low_return_quantile) for m in set(models)} if low_return_quantile > 0 else {}
    found = []
    for i, ep in enumerate(episodes):
        inter = ep.extras.get("intervention")
        if inter is not None and inter[: ep.num_steps].any():
            found.append((0, returns[i], i, int(np.argmax(inter[: ep.num_steps])), "intervention"))
        elif ep.terminated[-1]:
            found.append((1, returns[i], i, ep.num_steps - 1, "terminated"))
        elif cutoff and returns[i] <= cutoff[models[i]]:
            found.append((2, returns[i], i, int(np.argmin(ep.reward)), "low_return"))
    found.sort(key=lambda f: (f[0], f[1], f[2]))
    return [(i, step, reason) for _, _, i, step, reason in found]


def failure_scenarios(
    episodes: Sequence[Episode], profiles: Mapping[str, VariationProfile], config: ProposalConfig = ProposalConfig()
) -> list[ScenarioSpec]:
    """Scenarios starting ``lookback`` steps before each fleet failure (at most ``max_failures``)."""
    specs = []
    for i, step, reason in find_failures(episodes, config.low_return_quantile)[: config.max_failures]:
        ep = episodes[i]
        start = max(0, step - config.lookback)
        specs.append(_spec_at(ep, start, profiles.get(ep.robot_id, VariationProfile()), f"failure:{reason}", config))
    return specs


@torch.no_grad()
def uncertain_scenarios(
    model: DynamicsEnsemble,
    episodes: Sequence[Episode],
    profiles: Mapping[str, VariationProfile],
    config: ProposalConfig = ProposalConfig(),
    batch_size: int = 65_536,
) -> list[ScenarioSpec]:
    """Scenarios at the ``num_uncertain`` recorded steps where the ensemble disagrees most (one per episode).

    A body-conditioned model (``model.spec.context_dim > 0``) reads each row with its robot's profile from
    ``profiles`` (nominal where it has none), the body the proposed scenario then simulates.
    """
    mine = [ep for ep in episodes if ep.metadata["robot_model"] == model.spec.robot]
    if not mine or config.num_uncertain < 1:
        return []
    obs = np.concatenate([ep.observation[:-1] for ep in mine])
    act = np.concatenate([ep.action for ep in mine])
    owner = np.concatenate([np.full(ep.num_steps, i) for i, ep in enumerate(mine)])
    step = np.concatenate([np.arange(ep.num_steps) for ep in mine])
    context = _row_contexts(mine, owner, profiles) if model.spec.context_dim else None
    scores = np.concatenate(
        [
            model.disagreement(*(None if x is None else torch.as_tensor(x[s : s + batch_size], device=model.device) for x in (obs, act, context)))
            .cpu()
            .numpy()
            for s in range(0, len(obs), batch_size)
        ]
    )
    order = np.lexsort((np.arange(len(scores)), -scores))  # highest disagreement first, ties by position
    specs, used = [], set()
    for j in order:
        if len(specs) == config.num_uncertain:
            break
        if owner[j] in used:
            continue
        used.add(owner[j])
        ep = mine[owner[j]]
        specs.append(_spec_at(ep, int(step[j]), profiles.get(ep.robot_id, VariationProfile()), "uncertainty", config))
    return specs


def _row_contexts(episodes: Sequence[Episode], owner: np.ndarray, profiles: Mapping[str, VariationProfile]) -> np.ndarray:
    """(len(owner), CONTEXT_DIM) float32: row j's body features, those of its episode's robot's profile (nominal where
    ``profiles`` has none), computed once per episode."""
    per_episode = contexts([profiles.get(ep.robot_id, VariationProfile()) for ep in episodes])
    return per_episode[owner]


def randomized_scenarios(robot: str, robot_id: str, profile: VariationProfile, config: ProposalConfig = ProposalConfig()) -> list[ScenarioSpec]:
    """``num_randomized`` domain-randomised scenarios around ``profile`` (robot model ``robot``)."""
    specs = config.randomization.sample(robot, config.num_randomized, seed=_seed(config.seed, robot_id), base=profile, tag=f"dr:{robot_id}")
    return [dataclasses.replace(s, max_steps=config.max_steps) for s in specs]


def propose(
    episodes: Sequence[Episode],
    profiles: Mapping[str, VariationProfile] | None = None,
    model: DynamicsEnsemble | None = None,
    config: ProposalConfig = ProposalConfig(),
) -> list[ScenarioSpec]:
    """All proposals for a batch of fleet episodes: failures, then uncertainty (when a model is given), then
    domain randomisation for every robot id in ``episodes``; duplicates removed, order kept.

    profiles: robot_id -> calibrated profile (robots without one use the nominal profile).
    """
    profiles = dict(profiles or {})
    specs = failure_scenarios(episodes, profiles, config)
    if model is not None:
        specs += uncertain_scenarios(model, episodes, profiles, config)
    robots = {}
    for ep in episodes:
        robots.setdefault(ep.robot_id, ep.metadata["robot_model"])
    for robot_id, robot in robots.items():
        specs += randomized_scenarios(robot, robot_id, profiles.get(robot_id, VariationProfile()), config)
    return list(dict.fromkeys(specs))
