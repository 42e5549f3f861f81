"""The promotion gate: decide on confidence intervals of the paired per-robot difference.

Why not compare means?  Each robot's profile is evaluated with a handful of episodes, and an
episode's return varies a lot with its scenario (start state, noise). Comparing two noisy means
with a fixed tolerance lets noise decide: a lucky draw promotes a candidate that is no better
(a fluke), an unlucky one blocks a real improvement. This gate asks instead how sure we are.

Inputs, per robot (same robot set on both sides): the list of per-episode returns of the
candidate and of the current policy, equal length ``n >= 2``. Episode ``j`` of both policies was
run with the same scenario seed (common random numbers, see ``policies.evaluate``), so the
difference ``d_j = candidate_j - current_j`` is *paired*: the scenario's own difficulty cancels
and the noise left is only the policies' disagreement, much smaller than either return's spread.

Statistics (paired percentile bootstrap, ``resamples`` resamples, ``numpy`` Generator seeded with
``seed``, vectorised):

* per robot: the mean paired difference ``mean(d)`` and the two-sided ``confidence`` interval of
  the bootstrap means of ``d`` (episodes resampled with replacement). When every ``d_j`` is
  equal there is no noise: the interval is ``[d, d]``.
* fleet: the difference of fleet means (mean over robots of the per-robot mean difference) and
  its interval from the same resamples (within one resample index every robot's episodes are
  resampled independently, and the per-robot resampled means are averaged over robots).

Decision, with ``allowed = max(rel_tolerance * |mean current return of the robot|, abs_tolerance)``:

* any NaN/inf return blocks promotion;
* a robot *regresses* when the upper bound of its interval is below ``-allowed``: we are
  confident it got worse by more than the tolerance. Any regressing robot blocks promotion.
  (``worse_than_tolerance_possible``, lower bound below ``-allowed``, is recorded but does not
  block: a noisy dip that might be a loss is not evidence of one.)
* the fleet must confidently improve: the lower bound of the fleet interval must be above
  ``min_improvement``.

So a real improvement is promoted even when single episodes are noisy (the interval of the
paired difference sits above zero), and a fluke (a positive sample mean from noise alone) is
refused (its interval still reaches zero).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class GateResult:
    """The gate's decision and the statistics it was made on (``to_dict`` goes into the records).

    ``per_robot[robot]``: ``current``, ``candidate`` (mean returns), ``difference`` (mean paired
    difference), ``ci_low``, ``ci_high`` (its interval), ``allowed`` (the tolerance), ``regressed``,
    ``worse_than_tolerance_possible`` (bools) and ``n`` (episodes).
    """

    promote: bool
    reason: str
    fleet_current: float  # mean over robots of the current policy's mean return
    fleet_candidate: float  # same for the candidate
    fleet_difference: float  # mean over robots of the mean paired difference
    fleet_ci: tuple[float, float]
    confidence: float
    episodes: int  # episodes per robot (the smallest count when robots differ)
    per_robot: dict[str, dict]

    def to_dict(self) -> dict:
        """JSON-serialisable (plain Python floats/ints/bools; NaN/inf only where a return was)."""
        out = dataclasses.asdict(self)
        out["fleet_ci"] = list(self.fleet_ci)
        return out


def _returns(robot: str, candidate, current) -> tuple[np.ndarray, np.ndarray]:
    cand = np.asarray(candidate, dtype=float)
    cur = np.asarray(current, dtype=float)
    if cand.ndim != 1 or cur.ndim != 1:
        raise ValueError(f"gate: {robot}: returns must be flat lists of per-episode returns, got shapes {cand.shape} and {cur.shape}")
    if cand.shape != cur.shape:
        raise ValueError(f"gate: {robot}: candidate has {cand.size} episodes, current has {cur.size}; paired episodes need equal counts")
    if cand.size < 2:
        raise ValueError(f"gate: {robot}: needs at least 2 paired episodes, got {cand.size}")
    return cand, cur


def _fmt(x: float) -> str:
    return f"{x:+.2f}"


def check_gate_settings(*, confidence: float = 0.95, rel_tolerance: float = 0.05, abs_tolerance: float = 2.0, resamples: int = 2000, **_) -> None:
    """ValueError unless the gate's settings make sense (the loop checks ``loop.gate`` with it before it starts)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"gate: confidence must be in (0, 1), got {confidence}")
    if int(resamples) != resamples or resamples < 1:
        raise ValueError(f"gate: resamples must be a positive integer, got {resamples}")
    if not (rel_tolerance >= 0 and abs_tolerance >= 0):
        raise ValueError(f"gate: rel_tolerance and abs_tolerance must be >= 0, got {rel_tolerance} and {abs_tolerance}")


def gate(
    candidate: Mapping[str, Sequence[float]],
    current: Mapping[str, Sequence[float]],
    *,
    confidence: float = 0.95,
    rel_tolerance: float = 0.05,
    abs_tolerance: float = 2.0,
    min_improvement: float = 0.0,
    resamples: int = 2000,
    seed: int = 0,
) -> GateResult:
    """Decide promotion from paired per-episode returns (see the module docstring for the rule).

    ``candidate[robot][j]`` and ``current[robot][j]`` are the returns of episode ``j`` (same
    scenario seed) on that robot's profile. Raises ``ValueError`` for different robot sets, no
    robots, unequal lengths or fewer than 2 episodes for a robot, or bad parameters.
    """
    if set(candidate) != set(current) or not candidate:
        raise ValueError(f"gate needs the same robots on both sides, got {sorted(candidate)} vs {sorted(current)}")
    check_gate_settings(confidence=confidence, rel_tolerance=rel_tolerance, abs_tolerance=abs_tolerance, resamples=resamples)
    robots = sorted(candidate)
    data = {r: _returns(r, candidate[r], current[r]) for r in robots}

    # Paired bootstrap: resample indices depend only on (seed, robots, episode counts), never on values.
    rng = np.random.default_rng(seed)
    alpha = 1.0 - confidence
    q = [alpha / 2.0, 1.0 - alpha / 2.0]
    boot = np.empty((len(robots), int(resamples)))  # per robot, the resampled mean differences
    per_robot: dict[str, dict] = {}
    bad: list[str] = []  # "robot (which side)" with a non-finite return
    for i, r in enumerate(robots):
        cand, cur = data[r]
        d = cand - cur
        n = d.size
        idx = rng.integers(0, n, size=(int(resamples), n))
        sides = [name for name, x in (("candidate", cand), ("current", cur)) if not np.isfinite(x).all()]
        cur_mean, cand_mean = float(cur.mean()), float(cand.mean())
        diff = float(d.mean())
        if sides:
            bad.append(f"{r} ({', '.join(sides)})")
            boot[i] = np.nan
            lo = hi = math.nan
        elif np.all(d == d[0]):  # no noise: the interval is the point
            diff = float(d[0])
            boot[i] = diff
            lo = hi = diff
        else:
            boot[i] = d[idx].mean(axis=1)
            lo, hi = (float(v) for v in np.quantile(boot[i], q))
        allowed = float(max(rel_tolerance * abs(cur_mean), abs_tolerance)) if math.isfinite(cur_mean) else math.nan
        per_robot[r] = {
            "current": cur_mean,
            "candidate": cand_mean,
            "difference": diff,
            "ci_low": lo,
            "ci_high": hi,
            "allowed": allowed,
            "regressed": bool(hi < -allowed),
            "worse_than_tolerance_possible": bool(lo < -allowed),
            "n": int(n),
        }

    fleet_cur = float(np.mean([v["current"] for v in per_robot.values()]))
    fleet_cand = float(np.mean([v["candidate"] for v in per_robot.values()]))
    fleet_diff = float(np.mean([v["difference"] for v in per_robot.values()]))
    if bad:
        fleet_ci = (math.nan, math.nan)
    elif all(v["ci_low"] == v["ci_high"] for v in per_robot.values()):
        fleet_ci = (fleet_diff, fleet_diff)
    else:
        fleet_ci = tuple(float(v) for v in np.quantile(boot.mean(axis=0), q))
    pct = f"{100 * confidence:.4g}%"  # 95%, 99.99% (":.0%" printed 0.9999 as 100%)

    def result(promote: bool, reason: str) -> GateResult:
        return GateResult(
            promote=promote, reason=reason, fleet_current=fleet_cur, fleet_candidate=fleet_cand,
            fleet_difference=fleet_diff, fleet_ci=fleet_ci, confidence=float(confidence),
            episodes=min(v["n"] for v in per_robot.values()), per_robot=per_robot,
        )

    fleet_text = f"fleet difference {_fmt(fleet_diff)} ({fleet_cur:.2f} -> {fleet_cand:.2f}), {pct} CI [{fleet_ci[0]:.2f}, {fleet_ci[1]:.2f}]"
    if bad:
        return result(False, f"not promoted: NaN or infinite returns for {', '.join(bad)}")
    regressed = [r for r in robots if per_robot[r]["regressed"]]
    if regressed:
        details = "; ".join(
            f"{r}: difference {_fmt(per_robot[r]['difference'])}, {pct} CI [{per_robot[r]['ci_low']:.2f}, {per_robot[r]['ci_high']:.2f}] "
            f"entirely below -{per_robot[r]['allowed']:.2f}"
            for r in regressed
        )
        return result(False, f"not promoted: confident regression beyond tolerance on {', '.join(regressed)} ({details})")
    if not fleet_ci[0] > min_improvement:
        return result(False, f"not promoted: no confident fleet improvement: {fleet_text}, lower bound not above min_improvement {min_improvement:g}")
    possible = [r for r in robots if per_robot[r]["worse_than_tolerance_possible"]]
    note = f" (a loss beyond tolerance is not ruled out on {', '.join(possible)})" if possible else ""
    return result(True, f"promoted: {fleet_text} above {min_improvement:g}; no robot confidently regresses{note}")
