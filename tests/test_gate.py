"""The promotion gate and the canary judge: a worse candidate is never promoted; NaN blocks."""

import math

import pytest

from fleet.pipeline.canary import judge_canary
from fleet.pipeline.gate import gate

CURRENT = {"robot-0": 100.0, "robot-1": 50.0, "robot-2": -20.0}


def test_better_everywhere_is_promoted():
    result = gate({"robot-0": 120.0, "robot-1": 60.0, "robot-2": -10.0}, CURRENT)
    assert result.promote and "no robot regresses" in result.reason


def test_one_regressing_robot_blocks_even_if_the_fleet_improves():
    result = gate({"robot-0": 300.0, "robot-1": 30.0, "robot-2": -10.0}, CURRENT)
    assert not result.promote and "robot-1" in result.reason and result.per_robot["robot-1"]["regressed"]


def test_within_tolerance_is_not_a_regression_but_the_fleet_must_improve():
    assert gate({"robot-0": 96.0, "robot-1": 60.0, "robot-2": -20.5}, CURRENT).promote
    equal = gate(dict(CURRENT), CURRENT)
    assert not equal.promote and "does not beat" in equal.reason


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nan_metric_blocks_promotion(bad):
    result = gate({"robot-0": bad, "robot-1": 60.0, "robot-2": -10.0}, CURRENT)
    assert not result.promote


def test_worse_candidate_is_never_promoted():
    worse = {k: v - 10.0 for k, v in CURRENT.items()}
    assert not gate(worse, CURRENT).promote


def test_gate_needs_the_same_robots():
    with pytest.raises(ValueError, match="same robots"):
        gate({"robot-0": 1.0}, CURRENT)


def test_canary_judge_widen_wait_rollback():
    before = {"robot-0": [100.0, 110.0]}
    assert judge_canary(before, {"robot-0": [105.0, 108.0]}).action == "widen"
    assert judge_canary(before, {"robot-0": [105.0]}).action == "wait"
    verdict = judge_canary(before, {"robot-0": [40.0, 50.0]})
    assert verdict.action == "rollback" and "robot-0" in verdict.reason
    assert judge_canary(before, {"robot-0": [math.nan, 100.0]}).action == "rollback"
