"""The promotion gate: a candidate ships only if no robot regresses and the fleet improves.

Inputs are per-robot mean returns of the candidate and of the current policy, each measured on
that robot's own profile (MuJoCo, fixed seeds). A NaN anywhere blocks promotion.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class GateResult:
    promote: bool
    reason: str
    fleet_current: float
    fleet_candidate: float
    per_robot: dict[str, dict[str, float | bool]]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def gate(
    candidate: dict[str, float],
    current: dict[str, float],
    *,
    rel_tolerance: float = 0.05,
    abs_tolerance: float = 1.0,
    min_improvement: float = 0.0,
) -> GateResult:
    """Decide promotion.

    A robot regresses when candidate < current - max(rel_tolerance * |current|, abs_tolerance).
    The fleet improves when mean(candidate) > mean(current) + min_improvement.
    """
    if set(candidate) != set(current) or not candidate:
        raise ValueError(f"gate needs the same robots on both sides, got {sorted(candidate)} vs {sorted(current)}")
    per_robot = {}
    for robot in sorted(candidate):
        cand, cur = float(candidate[robot]), float(current[robot])
        allowed = max(rel_tolerance * abs(cur), abs_tolerance)
        per_robot[robot] = {"current": cur, "candidate": cand, "regressed": not (cand >= cur - allowed)}
    fleet_cur = sum(current.values()) / len(current)
    fleet_cand = sum(candidate.values()) / len(candidate)
    values = [fleet_cur, fleet_cand, *[v for r in per_robot.values() for v in (r["current"], r["candidate"])]]
    if not all(math.isfinite(v) for v in values):
        return GateResult(False, "a metric is NaN or infinite", fleet_cur, fleet_cand, per_robot)
    regressed = [r for r, v in per_robot.items() if v["regressed"]]
    if regressed:
        return GateResult(False, f"regresses on {regressed}", fleet_cur, fleet_cand, per_robot)
    if not fleet_cand > fleet_cur + min_improvement:
        return GateResult(False, f"fleet mean {fleet_cand:.2f} does not beat {fleet_cur:.2f} + {min_improvement}", fleet_cur, fleet_cand, per_robot)
    return GateResult(True, f"fleet mean {fleet_cur:.2f} -> {fleet_cand:.2f}, no robot regresses", fleet_cur, fleet_cand, per_robot)
