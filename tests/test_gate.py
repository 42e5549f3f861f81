"""The promotion gate (paired bootstrap CIs) and the canary judge.

Noisy inputs are constructed with seeded numpy: per robot, 20 paired episodes; the current
policy's return is N(100, 15) per episode (the scenario's difficulty), the candidate's is the
same episode's return plus a true effect plus its own (smaller) noise.
"""

import json
import math

import numpy as np
import pytest

from fleet.pipeline.canary import judge_canary
from fleet.pipeline.gate import gate

ROBOTS = [f"robot-{i}" for i in range(4)]
EPISODES = 20


def _paired(seed: int, effect: dict[str, float], noise: dict[str, float] | float) -> tuple[dict, dict]:
    """(candidate, current) per-episode returns; candidate_j = current_j + effect + N(0, noise)."""
    rng = np.random.default_rng(seed)
    current = {r: rng.normal(100.0, 15.0, EPISODES) for r in ROBOTS}
    sd = noise if isinstance(noise, dict) else dict.fromkeys(ROBOTS, noise)
    candidate = {r: current[r] + effect.get(r, 0.0) + rng.normal(0.0, sd[r], EPISODES) for r in ROBOTS}
    return candidate, current


def test_a_true_improvement_under_noise_is_promoted():
    cand, cur = _paired(0, dict.fromkeys(ROBOTS, 10.0), 5.0)
    result = gate(cand, cur)
    assert result.promote, result.reason
    assert "no robot confidently regresses" in result.reason
    assert 0.0 < result.fleet_ci[0] < result.fleet_difference < result.fleet_ci[1]
    assert result.fleet_difference == pytest.approx(np.mean([np.mean(cand[r] - cur[r]) for r in ROBOTS]))
    assert result.fleet_candidate - result.fleet_current == pytest.approx(result.fleet_difference)
    assert result.episodes == EPISODES and result.confidence == 0.95
    for r in ROBOTS:
        v = result.per_robot[r]
        d = cand[r] - cur[r]
        assert not v["regressed"] and v["n"] == EPISODES
        assert v["ci_low"] < v["difference"] < v["ci_high"]
        assert v["allowed"] == pytest.approx(max(0.05 * abs(np.mean(cur[r])), 2.0))
        # the bootstrap interval is about as wide as the normal one, 2 * 1.96 * sd / sqrt(n)
        normal_width = 2 * 1.96 * d.std(ddof=1) / math.sqrt(EPISODES)
        assert 0.7 < (v["ci_high"] - v["ci_low"]) / normal_width < 1.3


def test_a_fluke_is_not_promoted():
    cand, cur = _paired(4, {}, 15.0)  # no true improvement, only noise
    result = gate(cand, cur)
    assert result.fleet_difference > 0  # the sample mean says "better" ...
    assert result.fleet_ci[0] <= 0.0  # ... but we are not confident of it
    assert not result.promote and "no confident fleet improvement" in result.reason
    assert not any(v["regressed"] for v in result.per_robot.values())


def test_a_real_regression_on_one_robot_blocks_and_is_named():
    for others in (10.0, 40.0):  # with +40 elsewhere the fleet confidently improves: still blocked
        cand, cur = _paired(0, {"robot-0": others, "robot-1": -30.0, "robot-2": others, "robot-3": others}, 5.0)
        result = gate(cand, cur)
        assert not result.promote
        assert "robot-1" in result.reason and "regression" in result.reason
        assert not any(r in result.reason for r in ("robot-0", "robot-2", "robot-3"))
        assert [r for r, v in result.per_robot.items() if v["regressed"]] == ["robot-1"]
        assert result.per_robot["robot-1"]["ci_high"] < -result.per_robot["robot-1"]["allowed"]
    assert result.fleet_ci[0] > 0


def test_a_noisy_dip_within_tolerance_does_not_block_a_real_improvement():
    effect = {"robot-0": 10.0, "robot-1": 10.0, "robot-2": -3.0, "robot-3": 10.0}
    noise = {"robot-0": 5.0, "robot-1": 5.0, "robot-2": 10.0, "robot-3": 5.0}
    result = gate(*_paired(0, effect, noise))
    dip = result.per_robot["robot-2"]
    assert dip["difference"] < 0 and dip["worse_than_tolerance_possible"]  # a loss beyond tolerance is possible ...
    assert not dip["regressed"] and dip["ci_high"] > -dip["allowed"]  # ... but not established
    assert result.promote, result.reason
    assert "robot-2" in result.reason  # mentioned as "not ruled out"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("side", ["candidate", "current"])
def test_a_non_finite_return_blocks_promotion(bad, side):
    cand, cur = _paired(0, dict.fromkeys(ROBOTS, 10.0), 5.0)
    assert gate(cand, cur).promote
    (cand if side == "candidate" else cur)["robot-2"][7] = bad
    result = gate(cand, cur)
    assert not result.promote
    assert "NaN or infinite" in result.reason and f"robot-2 ({side})" in result.reason
    assert math.isnan(result.fleet_ci[0]) and not result.per_robot["robot-2"]["regressed"]
    assert math.isfinite(result.per_robot["robot-0"]["ci_low"])  # other robots are still reported


def test_invalid_inputs_raise():
    cand, cur = _paired(0, {}, 5.0)
    with pytest.raises(ValueError, match="same robots"):
        gate({r: cand[r] for r in ROBOTS[:3]}, cur)
    with pytest.raises(ValueError, match="same robots"):
        gate({}, {})
    with pytest.raises(ValueError, match="robot-1.*equal counts"):
        gate({**cand, "robot-1": cand["robot-1"][:-1]}, cur)
    with pytest.raises(ValueError, match="robot-3.*at least 2"):
        gate({**cand, "robot-3": [101.0]}, {**cur, "robot-3": [100.0]})
    with pytest.raises(ValueError, match="confidence"):
        gate(cand, cur, confidence=1.0)


def test_deterministic_and_both_at_the_maximum():
    cand, cur = _paired(1, dict.fromkeys(ROBOTS, 2.0), 5.0)
    a, b = gate(cand, cur, seed=3), gate(cand, cur, seed=3)
    assert a == b and a.to_dict() == b.to_dict()
    assert gate(cand, cur, seed=4).fleet_ci != a.fleet_ci  # the seed is what drives the resamples
    wider = gate(cand, cur, seed=3, confidence=0.99)
    assert wider.fleet_ci[0] < a.fleet_ci[0] and wider.fleet_ci[1] > a.fleet_ci[1]

    top = {r: [200.0] * 4 for r in ROBOTS}
    same = gate(top, {r: list(v) for r, v in top.items()})
    assert not same.promote and "no confident fleet improvement" in same.reason
    assert same.fleet_difference == 0.0 and same.fleet_ci == (0.0, 0.0)
    assert all(not v["regressed"] and (v["ci_low"], v["ci_high"]) == (0.0, 0.0) for v in same.per_robot.values())
    # a noiseless shift has a degenerate interval too, and a sure improvement is promoted
    shifted = gate({r: [x + 5.0 for x in v] for r, v in cur.items()}, cur)
    assert shifted.promote and shifted.fleet_ci == pytest.approx((5.0, 5.0))


def test_to_dict_is_json_serialisable():
    cand, cur = _paired(0, {"robot-1": -30.0}, 5.0)
    record = gate(cand, cur).to_dict()
    assert json.loads(json.dumps(record, allow_nan=False)) == record
    assert isinstance(record["fleet_ci"], list) and len(record["fleet_ci"]) == 2
    assert set(record["per_robot"]["robot-1"]) == {
        "current", "candidate", "difference", "ci_low", "ci_high", "allowed", "regressed", "worse_than_tolerance_possible", "n",
    }
    floats = [record["fleet_current"], record["fleet_difference"], *record["fleet_ci"], *(
        v[k] for v in record["per_robot"].values() for k in ("current", "candidate", "difference", "ci_low", "ci_high", "allowed"))]
    assert all(type(x) is float for x in floats)
    assert all(type(v["regressed"]) is bool and type(v["n"]) is int for v in record["per_robot"].values())
    cand["robot-0"][0] = math.nan
    assert "NaN" in json.dumps(gate(cand, cur).to_dict())  # NaN survives only where a return was NaN


def test_evaluate_places_each_return_at_its_seed_index_and_a_diverged_one_blocks(monkeypatch):
    from policies.evaluate import evaluate
    from sim.batched import BatchedStepper, derive_seed
    from sim.variation import VariationProfile

    def zero(obs):
        return np.zeros((obs.shape[0], 1), np.float32)

    profiles = [VariationProfile(), VariationProfile(actuator_strength=0.5)]
    full = evaluate(zero, "pendulum", profiles, 3, seed=7)
    for p in full.profiles:
        assert len(p.returns) == 3 and len(set(p.returns)) > 1  # distinct seeds, distinct returns
        assert p.mean_return == pytest.approx(np.mean(p.returns))
    simulate = BatchedStepper.simulate

    def drop_and_shuffle(self, scenarios, policy):  # the stepper drops diverged episodes; order must not matter
        eps = simulate(self, scenarios, policy)
        diverged = {"tag": "eval:1", "seed": derive_seed(7, "eval", 1)}
        return [e for e in eps if {k: e.json_metadata("scenario")[k] for k in diverged} != diverged][::-1]

    monkeypatch.setattr(BatchedStepper, "simulate", drop_and_shuffle)
    part = evaluate(zero, "pendulum", profiles, 3, seed=7)
    assert part.profiles[0].returns == full.profiles[0].returns
    kept = part.profiles[1].returns
    assert math.isnan(kept[1]) and (kept[0], kept[2]) == (full.profiles[1].returns[0], full.profiles[1].returns[2])
    assert part.profiles[1].failures == full.profiles[1].failures and part.to_dict()["profiles"][1]["returns"][1] is None
    result = gate({f"robot-{i}": p.returns for i, p in enumerate(part.profiles)}, {f"robot-{i}": p.returns for i, p in enumerate(full.profiles)})
    assert not result.promote and "robot-1 (candidate)" in result.reason


def test_canary_judge_widen_wait_rollback():
    before = {"robot-0": [100.0, 110.0]}
    assert judge_canary(before, {"robot-0": [105.0, 108.0]}).action == "widen"
    assert judge_canary(before, {"robot-0": [105.0]}).action == "wait"
    verdict = judge_canary(before, {"robot-0": [40.0, 50.0]})
    assert verdict.action == "rollback" and "robot-0" in verdict.reason
    assert judge_canary(before, {"robot-0": [math.nan, 100.0]}).action == "rollback"


def test_the_intervals_are_the_documented_paired_bootstrap_at_the_stated_confidence():
    """A 90 % interval reported as 95 % (quantiles alpha, 1 - alpha) passed the width check above: recompute it."""
    cand, cur = _paired(0, dict.fromkeys(ROBOTS, 10.0), 5.0)
    result = gate(cand, cur, resamples=2000, seed=3)
    rng, boot = np.random.default_rng(3), []
    for r in sorted(ROBOTS):
        d = np.asarray(cand[r]) - np.asarray(cur[r])
        means = d[rng.integers(0, d.size, size=(2000, d.size))].mean(axis=1)
        boot.append(means)
        assert (result.per_robot[r]["ci_low"], result.per_robot[r]["ci_high"]) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])))
    assert result.fleet_ci == pytest.approx(tuple(np.quantile(np.mean(boot, axis=0), [0.025, 0.975])))


def test_a_robot_at_its_ceiling_does_not_turn_the_fleet_interval_into_a_point():
    """One noiseless robot (200 every episode under both policies) once made a fluke's fleet interval a point: promoted."""
    cand, cur = _paired(4, {}, 15.0)
    cand[ROBOTS[-1]] = cur[ROBOTS[-1]] = np.full(EPISODES, 200.0)
    result = gate(cand, cur)
    assert not result.promote and "no confident fleet improvement" in result.reason
    assert result.fleet_ci[0] < result.fleet_difference < result.fleet_ci[1]


def test_min_improvement_is_the_bar_the_fleet_lower_bound_must_clear():
    cand, cur = _paired(0, dict.fromkeys(ROBOTS, 10.0), 5.0)
    low = gate(cand, cur).fleet_ci[0]
    assert gate(cand, cur, min_improvement=low - 1.0).promote
    refused = gate(cand, cur, min_improvement=low + 1.0)
    assert not refused.promote and "min_improvement" in refused.reason


def test_the_tolerance_scales_with_the_size_of_negative_returns_too():
    """Returns are negative on the reacher: a tolerance of rel * mean (not |mean|) fell to the absolute floor."""
    cand, cur = _paired(0, {}, 5.0)
    cand, cur = {r: v - 300.0 for r, v in cand.items()}, {r: v - 300.0 for r, v in cur.items()}
    for r, v in gate(cand, cur).per_robot.items():
        assert v["allowed"] == pytest.approx(0.05 * abs(np.mean(cur[r])))
    assert judge_canary({"r": [-200.0, -200.0]}, {"r": [-205.0, -205.0]}).action == "widen"  # 5 within 0.1 x 200
    assert judge_canary({"r": [-200.0, -200.0]}, {"r": [-240.0, -240.0]}).action == "rollback"
