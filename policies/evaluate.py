"""Evaluate a policy against a set of robot profiles (the fleet's), fixed seeds, batched.

Every profile gets the same ``episodes_per_profile`` scenario seeds (common random
numbers), and all profiles x episodes run in one :meth:`BatchedStepper.simulate` call. Per
profile: the per-episode returns in scenario-seed order (what the promotion gate pairs, see
``fleet/pipeline/gate.py``), mean/std return, success and failure counts.

Success is per task: reacher succeeds when the fingertip ends within 0.05 of the target;
every other built-in robot (pendulum, ant, half_cheetah) succeeds when it reaches the time
limit without terminating. A failure is a termination (fell / diverged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from sim.batched import BatchedStepper, derive_seed
from sim.episode import Episode
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile

REACHER_SUCCESS_DISTANCE = 0.05


def _survived(ep: Episode) -> bool:
    return bool(ep.truncated[-1]) and not bool(ep.terminated[-1])


def _reached(ep: Episode) -> bool:
    # the last two observation entries are fingertip - target (x, y), see sim/robots/reacher.py
    return bool(np.linalg.norm(ep.observation[-1, -2:]) < REACHER_SUCCESS_DISTANCE)


SUCCESS: dict[str, Callable[[Episode], bool]] = {"reacher": _reached}  # default: _survived


@dataclasses.dataclass(frozen=True)
class ProfileResult:
    profile: VariationProfile
    episodes: int  # episodes asked for
    mean_return: float
    std_return: float
    successes: int
    failures: int  # terminations, plus diverged episodes (dropped by the stepper)
    # per-episode returns, episode j (scenario seed derive_seed(seed, "eval", j)) at index j;
    # NaN where the stepper dropped the episode (diverged). mean/std above are over finished ones.
    returns: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        """JSON-able; a return with no finished episode (all diverged) is None, as is a diverged episode's."""
        out = {**dataclasses.asdict(self), "profile": self.profile.to_dict()}
        for key in ("mean_return", "std_return"):
            out[key] = out[key] if np.isfinite(out[key]) else None
        out["returns"] = [float(r) if np.isfinite(r) else None for r in self.returns]
        return out


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    robot: str
    seed: int
    profiles: list[ProfileResult]

    @property
    def mean_return(self) -> float:
        return float(np.mean([p.mean_return for p in self.profiles]))

    def metrics(self) -> dict[str, float]:
        """``eval/...`` metrics: overall means, and ``eval/profile<i>/...`` per profile."""
        out = {
            "eval/mean_return": self.mean_return,
            "eval/min_profile_return": float(min(p.mean_return for p in self.profiles)),
            "eval/success_rate": float(sum(p.successes for p in self.profiles) / sum(p.episodes for p in self.profiles)),
            "eval/failures": float(sum(p.failures for p in self.profiles)),
        }
        for i, p in enumerate(self.profiles):
            out[f"eval/profile{i}/return"] = p.mean_return
            out[f"eval/profile{i}/successes"] = float(p.successes)
            out[f"eval/profile{i}/failures"] = float(p.failures)
        return out

    def to_dict(self) -> dict:
        """JSON-able (goes into the export manifest)."""
        mean = self.mean_return
        return {
            "robot": self.robot,
            "seed": self.seed,
            "mean_return": mean if np.isfinite(mean) else None,
            "profiles": [p.to_dict() for p in self.profiles],
        }


def evaluate(
    policy,
    robot: str,
    profiles: Sequence[VariationProfile],
    episodes_per_profile: int,
    seed: int,
    *,
    num_worlds: int | None = None,
    nthread: int | None = 1,
    sensor_filters=None,
) -> EvaluationResult:
    """Run ``policy`` (torch module or numpy callable (N, D) -> (N, A)) on every profile.

    Episode j of every profile uses scenario seed ``derive_seed(seed, "eval", j)``.
    ``num_worlds``: worlds stepped together (default: all episodes at once, at most 256).
    ``sensor_filters``: {profile: SensorFilter} for bodies whose robot filters its sensor on board.
    """
    profiles = list(profiles)
    if not profiles or episodes_per_profile < 1:
        raise ValueError(f"evaluate needs at least one profile and one episode per profile, got {len(profiles)}, {episodes_per_profile}")
    scenarios = [
        ScenarioSpec(robot=robot, seed=derive_seed(seed, "eval", j), profile=p, tag=f"eval:{i}")
        for i, p in enumerate(profiles)
        for j in range(episodes_per_profile)
    ]
    n = num_worlds or min(len(scenarios), 256)
    with BatchedStepper(robot, n, nthread=nthread, record=True, policy_version="eval", sensor_filters=sensor_filters) as stepper:
        episodes = stepper.simulate(scenarios, policy)
    success = SUCCESS.get(robot, _survived)
    by_profile: dict[str, list[Episode]] = {str(i): [] for i in range(len(profiles))}
    for ep in episodes:
        by_profile[ep.json_metadata("scenario")["tag"].split(":", 1)[1]].append(ep)
    episode_index: dict[int, list[int]] = {}  # scenario seed -> episode index j (a list, in case seeds collide)
    for j in range(episodes_per_profile):
        episode_index.setdefault(derive_seed(seed, "eval", j), []).append(j)
    results = []
    for i, p in enumerate(profiles):
        eps = by_profile[str(i)]
        returns = np.array([ep.total_return for ep in eps]) if eps else np.zeros(0)
        per_episode = [float("nan")] * episodes_per_profile  # a diverged (dropped) episode stays NaN
        free = {s: list(js) for s, js in episode_index.items()}
        for ep in eps:
            per_episode[free[int(ep.json_metadata("scenario")["seed"])].pop(0)] = float(ep.total_return)
        results.append(
            ProfileResult(
                profile=p,
                episodes=episodes_per_profile,
                mean_return=float(returns.mean()) if eps else float("nan"),
                std_return=float(returns.std()) if eps else float("nan"),
                successes=sum(success(ep) for ep in eps),
                failures=sum(bool(ep.terminated[-1]) for ep in eps) + (episodes_per_profile - len(eps)),
                returns=tuple(per_episode),
            )
        )
    return EvaluationResult(robot=robot, seed=seed, profiles=results)
