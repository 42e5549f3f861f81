"""Sensor correction (sim/sensors.py): a robot that takes its calibrated sensor offset out before its
policy acts exactly as an unbiased robot would, and the pipeline's corrected view of its telemetry
is what that policy saw."""

import dataclasses

import numpy as np
import pytest

from fleet.agent.config import SimRobotConfig
from fleet.agent.policy import Policy
from fleet.agent.recorder import EpisodeRecorder
from fleet.agent.robot import SimRobot, run_episode
from sim.calibration import CalibrationResult, Identifiability
from sim.sensors import OffsetBelief, SensorCorrectionError, corrected_act, corrected_view, offset_vectors, parse_offset, track_offsets
from sim.variation import VariationProfile


def balance(obs):
    """A linear pendulum controller: push the cart toward where the pole leans."""
    return np.clip(obs @ np.array([[0.5], [6.0], [0.8], [1.2]], np.float32), -1.0, 1.0)


def episode_on(profile: VariationProfile, act, seed=3):
    robot = SimRobot(SimRobotConfig(robot_id="r", model="pendulum", max_steps=120, profile=profile.to_dict()))
    recorder = EpisodeRecorder(robot_id="r", robot_model="pendulum", source="real", hardware={})
    try:
        return run_episode(robot, Policy("v", act), recorder, seed=seed)
    finally:
        robot.close()


def test_a_corrected_biased_robot_acts_as_an_unbiased_one():
    biased = VariationProfile(obs_bias=0.05)
    offset = offset_vectors({"r": 0.05}, obs_dim=4)
    assert offset == {"r": [0.05] * 4}
    reference = episode_on(VariationProfile(), balance)
    corrected = episode_on(biased, corrected_act(balance, parse_offset(offset["r"], 4)))
    uncorrected = episode_on(biased, balance)
    np.testing.assert_allclose(corrected.action, reference.action, atol=1e-5)
    assert not np.allclose(uncorrected.action, reference.action, atol=1e-3)
    # the telemetry stays raw; the pipeline's corrected view is what the policy saw, in the unbiased world
    (view,), profiles = corrected_view([corrected], {"r": biased}, {"r": 0.05})
    np.testing.assert_allclose(corrected.observation - view.observation, 0.05, atol=1e-6)
    np.testing.assert_allclose(view.observation, reference.observation, atol=1e-5)
    assert profiles["r"].obs_bias == pytest.approx(0.0)


@pytest.mark.parametrize("bad", [[0.1, 0.2], [0.1, "x", 0.0, 0.0], [True, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1e6], "0.1", None])
def test_malformed_offsets_are_refused(bad):
    with pytest.raises(SensorCorrectionError, match="sensor offset"):
        parse_offset(bad, 4)


def calibrated(fit: float, stderr: float, kept: float = 0.0) -> CalibrationResult:
    """A calibration's outcome for the sensor offset: its fit, standard error and verdict (0: not kept)."""
    diagnostics = Identifiability({}, {}, {}, {"obs_bias": stderr}, {"obs_bias": kept != 0}, {"obs_bias": kept == 0}, {})
    return CalibrationResult("pendulum", VariationProfile(obs_bias=kept), {"obs_bias": kept}, {"obs_bias": kept != 0}, diagnostics, 0.5, 0.6, [], 200, 100, {"obs_bias": fit})


def test_pooled_offsets_beat_one_calibrations_verdict():
    """Three rounds of 8-episode fits (spread 0.006 around the true 0.02, as measured on the demo's
    noisy pendulum): the pooled offset is closer to the truth than what one round keeps at 3 SE,
    and a clean sensor rarely gets an offset."""
    rng = np.random.default_rng(0)
    pooled_err, kept_err, false_offsets = [], [], 0
    for trial in range(400):
        beliefs = {}
        for k in range(3):
            fits = {"biased": 0.02 + 0.006 * rng.standard_normal(), "clean": 0.006 * rng.standard_normal()}
            rounds = {r: calibrated(f, 0.006, kept=f if abs(f) >= 0.018 else 0.0) for r, f in fits.items()}
            beliefs, offsets = track_offsets(beliefs, rounds, {"biased": 4 * (k + 1), "clean": 4 * (k + 1)}, {"biased": 4, "clean": 4}, floor=0.005)
        pooled_err.append(abs(offsets.get("biased", 0.0) - 0.02))
        kept_err.append(abs(rounds["biased"].profile.obs_bias - 0.02))
        false_offsets += "clean" in offsets
    assert np.mean(pooled_err) < 0.6 * np.mean(kept_err), (np.mean(pooled_err), np.mean(kept_err))
    assert false_offsets / 400 < 0.02


def test_overlapping_rounds_add_only_their_new_episodes_and_a_changed_sensor_restarts():
    belief = OffsetBelief().update(0.02, 0.006, episodes=8, used=8, z=3.0)
    assert belief.precision == pytest.approx(1 / 0.006**2)
    same_data = belief.update(0.02, 0.006, episodes=8, used=8, z=3.0)  # no new episode: no new evidence
    assert same_data.precision == pytest.approx(belief.precision)
    half_new = belief.update(0.026, 0.006, episodes=12, used=8, z=3.0)
    assert half_new.precision == pytest.approx(1.5 / 0.006**2) and half_new.estimate == pytest.approx(0.022)
    remounted = half_new.update(-0.03, 0.006, episodes=20, used=8, z=3.0)  # 7 combined SE away: start over
    assert remounted.estimate == -0.03 and remounted.precision == pytest.approx(1 / 0.006**2)
    assert remounted.offset(floor=0.005, z=3.0) == -0.03 and OffsetBelief().update(0.01, 0.006, 8, 8, 3.0).offset(0.005, 3.0) == 0.0


def test_a_delivered_offset_stays_until_the_evidence_for_it_is_gone():
    """Hysteresis: 3 standard errors to start delivering an offset, 1 to keep delivering it; a robot
    whose pooled estimate drifts to 2.7 standard errors keeps its correction (demo run m2 lost it)."""
    first = calibrated(0.0225, 0.006, kept=0.0225)
    beliefs, offsets = track_offsets({}, {"r": first}, {"r": 8}, {"r": 8}, floor=0.005)
    assert offsets == {"r": pytest.approx(0.0225)} and beliefs["r"].delivered
    drifted = OffsetBelief(0.015, 1 / 0.0055**2, 12)  # 2.7 standard errors from 0
    assert drifted.offset(floor=0.005, z=3.0) == 0.0  # never delivered: not enough to start
    assert dataclasses.replace(drifted, delivered=True).offset(floor=0.005, z=3.0) == pytest.approx(0.015)
    gone = OffsetBelief(0.004, 1 / 0.0055**2, 20, delivered=True)  # under 1 standard error and the floor: dropped
    assert gone.offset(floor=0.005, z=3.0) == 0.0
    later, offsets = track_offsets(beliefs, {"r": calibrated(0.0, 0.006)}, {"r": 16}, {"r": 8}, floor=0.005)
    assert later["r"].estimate == pytest.approx(0.01125) and later["r"].precision == pytest.approx(2 / 0.006**2)  # 2.7 SE from 0
    assert later["r"].delivered and offsets == {"r": pytest.approx(0.01125)}
