"""Staged rollout: judge a canary cohort from the telemetry it uploads on the new version."""

from __future__ import annotations

import dataclasses
import math
import statistics


@dataclasses.dataclass(frozen=True)
class CanaryVerdict:
    action: str  # "widen" | "rollback" | "wait"
    reason: str
    per_robot: dict[str, dict[str, float]]


def judge_canary(
    before: dict[str, list[float]],
    after: dict[str, list[float]],
    *,
    min_episodes: int = 2,
    rel_tolerance: float = 0.1,
    abs_tolerance: float = 1.0,
) -> CanaryVerdict:
    """Compare each canary robot's episode returns on the new version (``after``) with the
    returns it had on the previous one (``before``).

    Roll back if any canary's mean return drops by more than max(rel * |before|, abs), or is NaN;
    wait while a canary has fewer than ``min_episodes`` episodes on the new version; else widen.
    """
    per_robot, regressed, waiting = {}, [], []
    for robot in sorted(after):
        new = after.get(robot, [])
        old = before.get(robot, [])
        if len(new) < min_episodes or not old:
            waiting.append(robot)
            continue
        mean_new, mean_old = statistics.fmean(new), statistics.fmean(old)
        per_robot[robot] = {"before": mean_old, "after": mean_new, "episodes": float(len(new))}
        allowed = max(rel_tolerance * abs(mean_old), abs_tolerance)
        if not math.isfinite(mean_new) or mean_new < mean_old - allowed:
            regressed.append(robot)
    if regressed:
        return CanaryVerdict("rollback", f"canaries {regressed} regressed", per_robot)
    if waiting or not per_robot:
        return CanaryVerdict("wait", f"canaries {waiting or sorted(after)} have too few episodes on the new version", per_robot)
    return CanaryVerdict("widen", "no canary regressed", per_robot)
