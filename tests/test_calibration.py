"""Calibration (real to sim): states from observations, batched open-loop replay, CEM recovery
of planted profiles, and honest identifiability flags. Real MuJoCo throughout."""

import dataclasses
import json

import numpy as np
import pytest

from sim.batched import BatchedStepper
from sim.calibration import (
    CalibrationConfig,
    Replayer,
    calibrate,
    estimate_sensor_bias,
    estimate_sensor_noise,
    make_windows,
    observe_states,
    state_from_observation,
)
from sim.policy_fn import random_policy
from sim.robots import get_task, robot_names
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile


def telemetry(robot: str, profile: VariationProfile, count: int, steps: int, seed: int = 0, keep_state: bool = True):
    """``count`` episodes of a simulated robot with a planted ``profile``; without qpos/qvel when keep_state=False."""
    with BatchedStepper(robot, count, nthread=1, robot_id="robot-1") as stepper:
        specs = [ScenarioSpec(robot, seed=seed * 100 + i, profile=profile, max_steps=steps) for i in range(count)]
        episodes = stepper.simulate(specs, random_policy(stepper.task.act_dim, seed))
    if not keep_state:  # real telemetry: observations only
        for ep in episodes:
            ep.extras.clear()
    return episodes


@pytest.mark.parametrize("robot", robot_names())
def test_state_from_observation_recovers_the_state(robot):
    episodes = telemetry(robot, VariationProfile(), 2, 20)
    task = get_task(robot)
    obs = np.concatenate([ep.observation for ep in episodes]).astype(np.float64)
    qpos, qvel = state_from_observation(task, obs)
    true_qpos = np.concatenate([ep.extras["qpos"] for ep in episodes])
    true_qvel = np.concatenate([ep.extras["qvel"] for ep in episodes])
    unobserved = {"half_cheetah": 1, "ant": 2}.get(robot, 0)  # a walker's position on the floor
    np.testing.assert_allclose(qpos[:, unobserved:], true_qpos[:, unobserved:], atol=1e-6)
    np.testing.assert_allclose(qvel, true_qvel, atol=1e-6)
    # the stepper's sensor readings are taken before a step's last integration (MuJoCo's mj_step
    # order), so the reacher's fingertip offset lags its joint angles by one physics substep
    lagged = slice(8, 10) if robot == "reacher" else slice(0, 0)
    again = observe_states(task, qpos, qvel)
    np.testing.assert_allclose(np.delete(again, lagged, axis=1), np.delete(obs, lagged, axis=1), atol=1e-5)
    np.testing.assert_allclose(again[:, lagged], obs[:, lagged], atol=0.05)


def test_state_from_observation_says_what_to_do_for_an_unknown_robot():
    class Other:
        name, obs_dim = "other", 3

    with pytest.raises(ValueError, match="record qpos/qvel extras"):
        state_from_observation(Other(), np.zeros((1, 3)))


def test_a_wrong_state_map_is_refused_on_clean_states(monkeypatch):
    """A registered map is checked once, on clean observations of the robot's own reset states."""
    import sim.calibration as calibration

    wrong = lambda task, obs: (np.zeros((len(obs), task.model.nq)), np.zeros((len(obs), task.model.nv)))  # noqa: E731
    monkeypatch.setattr(calibration, "_STATE_FROM_OBS", {**calibration._STATE_FROM_OBS})
    monkeypatch.setattr(calibration, "_CHECKED", {})
    calibration.register_state_from_observation("reacher", wrong)
    with pytest.raises(ValueError, match="does not reproduce a clean observation.*register_state_from_observation"):
        state_from_observation(get_task("reacher"), np.zeros((1, get_task("reacher").obs_dim)))


def test_noisy_offset_readings_of_derived_observations_still_give_states():
    """The reacher's observation has derived entries (cos/sin of its angles, the fingertip's offset):
    a noisy, offset reading matches no state exactly. It is rebuilt all the same (near the truth),
    and a calibration that searches the sensor offset runs on such telemetry (both raised before)."""
    episodes = telemetry("reacher", VariationProfile(obs_noise_std=0.05, obs_bias=0.02), 2, 30, seed=3)
    obs = np.concatenate([ep.observation for ep in episodes]).astype(np.float64)
    qpos, _ = state_from_observation(get_task("reacher"), obs)
    true_qpos = np.concatenate([ep.extras["qpos"] for ep in episodes])
    assert np.median(np.abs(qpos[:, :2] - true_qpos[:, :2])) < 0.1  # the arm's angles, through the noise
    for ep in episodes:
        ep.extras.clear()  # observations only
    config = CalibrationConfig(params=("actuator_strength", "obs_bias"), windows_per_episode=5, population=8, num_elites=3, iterations=2)
    result = calibrate("reacher", episodes, config)
    assert np.isfinite(result.loss) and result.num_windows == 10 and result.evaluations > 0


def test_replay_reproduces_recorded_observations():
    profile = VariationProfile(mass_scale=1.2, actuator_strength=0.9)
    episodes = telemetry("half_cheetah", profile, 4, 30)
    task = get_task("half_cheetah")
    windows = make_windows(task, episodes, CalibrationConfig(window=10, windows_per_episode=2))
    model = profile.apply(task.model, task.payload_body)
    with Replayer(task, nthread=1) as replayer:
        obs = replayer.replay([model] * len(windows.qpos), windows.qpos, windows.qvel, windows.actions)
        nominal = replayer.replay([task.model] * len(windows.qpos), windows.qpos, windows.qvel, windows.actions)
    np.testing.assert_allclose(obs, windows.target, atol=2e-3)  # float32 recording of the start state only
    assert np.abs(nominal - windows.target).max() > 0.05  # the profile matters


def test_replay_gives_nan_from_the_step_a_candidate_blows_up():
    """A candidate profile MuJoCo cannot integrate once came back finite (MuJoCo reset it to qpos0, or the rollout
    froze it), so the calibration scored a blow-up as a fit; now its observations are NaN from that step on."""
    task = get_task("pendulum")
    episodes = telemetry("pendulum", VariationProfile(), 2, 12)
    windows = make_windows(task, episodes, CalibrationConfig(window=8, windows_per_episode=1))
    n = len(windows.qpos)
    models = [VariationProfile(damping_scale=1e9).apply(task.model, task.payload_body)] * n
    with Replayer(task, nthread=1) as replayer:
        blown = replayer.replay(models, windows.qpos, windows.qvel, windows.actions)
        valid = replayer.replay([task.model] * n, windows.qpos, windows.qvel, windows.actions)
    assert np.isnan(blown).all()  # from the first step: damping 1e9 blows up at once
    assert np.isfinite(valid).all()
    np.testing.assert_allclose(valid, windows.target, atol=2e-3)


def test_calibration_recovers_a_planted_profile_from_observations_only():
    """Reacher telemetry without qpos/qvel: motor strength, damping and link mass come back;
    friction (the reacher has no contacts) is flagged and kept at its base value, not guessed."""
    truth = VariationProfile(actuator_strength=0.8, damping_scale=1.3, mass_scale=1.5, friction_scale=0.7)
    episodes = telemetry("reacher", truth, 20, 50, keep_state=False)
    config = CalibrationConfig(population=32, num_elites=6, iterations=12, window=8, windows_per_episode=2, seed=1)
    result = calibrate("reacher", episodes, config)
    errors = result.relative_errors(truth)
    assert max(errors[p] for p in ("actuator_strength", "damping_scale", "mass_scale")) < 0.01, result.estimates
    assert result.identifiable == {"actuator_strength": True, "damping_scale": True, "mass_scale": True, "friction_scale": False, "obs_noise_std": True, "obs_bias": False}
    assert result.estimates["obs_noise_std"] == 0.0  # noise-free telemetry: no sensor noise invented
    assert result.estimates["friction_scale"] == 1.0 and "no measurable effect" in result.notes["friction_scale"]
    assert result.loss < 1e-6 * result.base_loss and result.history == sorted(result.history, reverse=True)
    assert json.loads(result.to_json())["profile"]["actuator_strength"] == result.profile.actuator_strength


def test_sensor_noise_hides_weak_fields():
    """With sensor noise, the reacher's link masses (dwarfed by its joints' armature) are lost in
    the noise: flagged and kept at the base value; the motor strength still comes back."""
    truth = VariationProfile(actuator_strength=0.8, mass_scale=1.5, obs_noise_std=0.01)
    episodes = telemetry("reacher", truth, 20, 50, keep_state=False)
    config = CalibrationConfig(params=("mass_scale", "actuator_strength"), population=24, num_elites=5, iterations=8, seed=1, sensor_noise=False, sensor_bias=False)
    result = calibrate("reacher", episodes, config)
    assert result.identifiable == {"mass_scale": False, "actuator_strength": True}
    assert result.estimates["mass_scale"] == 1.0 and "below the noise" in result.notes["mass_scale"]
    assert result.relative_errors(truth)["actuator_strength"] < 0.03


def test_calibration_on_a_legged_robot_with_contacts():
    truth = VariationProfile(mass_scale=1.15, friction_scale=0.75, actuator_strength=0.9)
    episodes = telemetry("half_cheetah", truth, 10, 60, seed=2)
    config = CalibrationConfig(
        params=("mass_scale", "friction_scale", "actuator_strength"), population=24, num_elites=5, iterations=10, windows_per_episode=3
    )
    result = calibrate("half_cheetah", episodes, config)
    assert max(result.relative_errors(truth).values()) < 0.05, result.estimates
    assert all(result.identifiable.values())


def test_degenerate_fields_are_flagged():
    """The pendulum has no armature or springs: scaling mass, motor strength and damping together
    changes nothing, so only their ratios are determined."""
    truth = VariationProfile(mass_scale=1.2, actuator_strength=0.8, damping_scale=1.1)
    episodes = telemetry("pendulum", truth, 20, 40)
    config = CalibrationConfig(params=("mass_scale", "actuator_strength", "damping_scale"), population=24, num_elites=5, iterations=8)
    result = calibrate("pendulum", episodes, config)
    assert not any(result.identifiable[p] for p in config.params), result.diagnostics
    assert all("jointly" in note for note in result.notes.values())
    est = result.estimates  # the ratios, which is what the data determine, are right
    assert est["actuator_strength"] / est["mass_scale"] == pytest.approx(0.8 / 1.2, rel=0.02)
    assert est["damping_scale"] / est["mass_scale"] == pytest.approx(1.1 / 1.2, rel=0.05)


def test_calibration_config_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="choose from"):
        CalibrationConfig(params=("gravity",))
    short = telemetry("reacher", VariationProfile(), 1, 5)
    with pytest.raises(ValueError, match="no episode has more than 5 steps"):
        calibrate("reacher", short, CalibrationConfig(window=8), base=VariationProfile(action_latency=5))


def test_a_robot_whose_episodes_all_end_early_is_calibrated_on_shorter_windows():
    """A robot that falls within a few steps in every episode must not stop its fleet's calibration."""
    config = CalibrationConfig(params=("actuator_strength",), window=8, population=8, num_elites=3, iterations=2)
    result = calibrate("pendulum", telemetry("pendulum", VariationProfile(actuator_strength=0.7), 3, 5, keep_state=False), config)
    assert result.num_windows == 3 and np.isfinite(result.loss)  # one 5-step window per 5-step episode


def test_calibration_at_a_bound_differences_one_sided():
    """A robot without payload puts payload_mass at its lower bound (0): the Jacobian must not step below it."""
    from sim.batched import BatchedStepper
    from sim.calibration import CalibrationConfig, calibrate
    from sim.policy_fn import random_policy
    from sim.scenario import ScenarioSpec

    episodes = BatchedStepper("pendulum", 4).simulate(
        [ScenarioSpec("pendulum", seed=s, max_steps=40) for s in range(6)], lambda o: 0.2 * random_policy(1, 0)(o)
    )
    config = CalibrationConfig(params=("payload_mass", "actuator_strength"), iterations=3, polish_steps=3)
    result = calibrate("pendulum", episodes, config)
    assert 0.0 <= result.estimates["payload_mass"] < 0.2


GAINS = np.array([[-0.23], [-2.22], [-0.30], [-0.35]], np.float32)  # an LQR balance of the pendulum (u = -K obs)


def test_sensor_noise_is_estimated_from_telemetry_alone():
    def telemetry(profile):  # a gentle controller (the demo's robots act on a policy, not random torques)
        with BatchedStepper("pendulum", 8, nthread=1) as stepper:
            return stepper.simulate([ScenarioSpec("pendulum", seed=s, profile=profile, max_steps=100) for s in range(8)], lambda obs: np.clip(-(obs @ GAINS), -1, 1))

    assert estimate_sensor_noise(telemetry(VariationProfile())) == 0.0
    noisy = estimate_sensor_noise(telemetry(VariationProfile(obs_noise_std=0.05, obs_bias=0.02)))
    assert abs(noisy - 0.05) < 0.01


def test_sensor_bias_is_estimated_from_telemetry_alone():
    """Positions integrate velocities: the offset shows in the velocities' sum and cancels in the
    positions' ends. Under the demo's noisy sensor (std 0.05, offset 0.02) too; 0 on a clean
    sensor; exact from true states; None where the observations cannot show it (the reacher's angles are cos/sin)."""

    def balancing(profile, keep_state=False):
        with BatchedStepper("pendulum", 8, nthread=1) as stepper:
            episodes = stepper.simulate([ScenarioSpec("pendulum", seed=s, profile=profile, max_steps=200) for s in range(8)], lambda obs: np.clip(-(obs @ GAINS), -1, 1))
        for ep in episodes if not keep_state else []:
            ep.extras.clear()
        return episodes

    pendulum = get_task("pendulum")
    assert abs(estimate_sensor_bias(pendulum, balancing(VariationProfile(obs_noise_std=0.05, obs_bias=0.02))) - 0.02) < 0.005
    assert estimate_sensor_bias(pendulum, balancing(VariationProfile())) == 0.0
    assert estimate_sensor_bias(pendulum, balancing(VariationProfile(obs_bias=-0.05), keep_state=True)) == pytest.approx(-0.05, abs=1e-4)
    assert estimate_sensor_bias(get_task("reacher"), telemetry("reacher", VariationProfile(obs_bias=0.05), 4, 30, keep_state=False)) is None
    result = calibrate("pendulum", balancing(VariationProfile(obs_noise_std=0.05, obs_bias=0.02)), CalibrationConfig(params=("actuator_strength",), population=8, num_elites=3, iterations=2))
    assert abs(result.profile.obs_bias - 0.02) < 0.005 and result.identifiable["obs_bias"]


def _noisy_balancing(profile, count=8, steps=200, seed=0):
    """Telemetry without states under a balancing controller with exploration noise (the demo's robots)."""
    from sim.policy_fn import noisy_policy

    with BatchedStepper("pendulum", count, nthread=1, robot_id="robot-1") as stepper:
        specs = [ScenarioSpec("pendulum", seed=seed * 100 + s, profile=profile, max_steps=steps) for s in range(count)]
        episodes = stepper.simulate(specs, noisy_policy(lambda obs: np.clip(-(obs @ GAINS), -1, 1), 0.3, seed))
    for ep in episodes:
        ep.extras.clear()
    return episodes


def test_sensor_offset_is_fitted_in_the_replay():
    """With obs_bias among params the replay takes a candidate offset out of the rebuilt start
    states and puts it back on the replayed observations: a pendulum read 0.02 rad off falls the
    other way. It is kept only when 3 window-robust standard errors from 0, so a noisy but
    unbiased sensor reports 0, with the reason."""
    config = CalibrationConfig(params=("actuator_strength", "obs_bias"), windows_per_episode=25, population=16, num_elites=4, iterations=4)
    biased = calibrate("pendulum", _noisy_balancing(VariationProfile(obs_noise_std=0.05, obs_bias=0.02)), config)
    assert abs(biased.profile.obs_bias - 0.02) < 0.006 and biased.identifiable["obs_bias"], biased.notes
    assert 0 < biased.diagnostics.stderr["obs_bias"] < 0.008 and biased.num_windows > 100
    unbiased = calibrate("pendulum", _noisy_balancing(VariationProfile(obs_noise_std=0.05)), config)
    assert unbiased.profile.obs_bias == 0.0 and not unbiased.identifiable["obs_bias"]
    assert "stderr" in unbiased.notes["obs_bias"]
    assert abs(unbiased.profile.obs_noise_std - 0.05) < 0.01  # the noise is still estimated


def test_calibration_runs_as_a_job_of_bytes_and_json():
    """The fleet fans calibrations out (one Ray task per robot): episodes go in as bytes, the result
    comes back as JSON and reads back equal."""
    from sim.calibration import CalibrationResult, calibrate_job

    episodes = telemetry("pendulum", VariationProfile(actuator_strength=0.7), 4, 40)
    config = CalibrationConfig(params=("actuator_strength",), iterations=3, population=16, num_elites=4)
    text = calibrate_job({"robot": "pendulum", "episodes": [ep.to_bytes() for ep in episodes], "config": json.loads(json.dumps(dataclasses.asdict(config)))})
    result = CalibrationResult.from_json(text)
    direct = calibrate("pendulum", episodes, config)
    assert result.profile == direct.profile and result.estimates == direct.estimates
    assert result.diagnostics == direct.diagnostics and abs(result.profile.actuator_strength - 0.7) < 0.01


def test_a_warm_start_at_the_previous_calibration_finds_the_same_body_with_fewer_replays():
    """The flywheel starts each robot's search at its previous calibration: an unchanged body is
    found again, the search stops early, and a field the data cannot identify still falls back
    to the base (the start moves only where the search begins)."""
    from sim.calibration import CalibrationResult, calibrate_job

    truth = VariationProfile(payload_mass=1.5, damping_scale=1.4)
    config = CalibrationConfig(params=("payload_mass", "damping_scale", "friction_scale"), population=32, num_elites=6, iterations=12, seed=0)
    first = calibrate("pendulum", telemetry("pendulum", truth, 6, 60, seed=0), config)
    later = telemetry("pendulum", truth, 6, 60, seed=1)
    cold = calibrate("pendulum", later, config)
    plain = json.loads(json.dumps({"config": dataclasses.asdict(config), "start": first.profile.to_dict()}))  # what a Ray task gets
    warm = CalibrationResult.from_json(calibrate_job({"robot": "pendulum", "episodes": [ep.to_bytes() for ep in later], **plain}))
    for result in (cold, warm):
        assert abs(result.estimates["payload_mass"] - 1.5) < 0.02 and abs(result.estimates["damping_scale"] - 1.4) < 0.02, result.estimates
        assert result.estimates["friction_scale"] == 1.0  # no contacts: not identifiable, the base's value
    assert warm.evaluations < 0.6 * cold.evaluations, (warm.evaluations, cold.evaluations)


def test_a_search_subset_that_cannot_see_the_payload_does_not_end_the_search():
    """A payload that shows only in some windows (a pushed ball; here a reacher left at rest in most episodes): the
    CEM's subset held only windows at rest, fit at loss 0 from the start, and the search stopped after one
    iteration with payload 0 (5 seeds of 6) while the loss on all windows had not moved from the base loss."""
    truth = VariationProfile(payload_mass=1.0)
    with BatchedStepper("reacher", 12, nthread=1, robot_id="robot-1") as stepper:
        still = [ScenarioSpec("reacher", seed=i, profile=truth, max_steps=30, init_noise_scale=0.0) for i in range(11)]
        episodes = stepper.simulate(still, lambda obs: np.zeros((len(obs), 2), np.float32))  # no gravity in its plane: never moves
        episodes += stepper.simulate([ScenarioSpec("reacher", seed=99, profile=truth, max_steps=30)], random_policy(2, 0))
    config = CalibrationConfig(params=("payload_mass",), window=8, windows_per_episode=4, search_windows=4, population=12, num_elites=3,
                               iterations=10, seed=3, sensor_noise=False, sensor_bias=False, polish_steps=0)  # fmt: skip
    result = calibrate("reacher", episodes, config)
    assert abs(result.fitted["payload_mass"] - 1.0) < 0.05 and result.loss < 1e-3 * result.base_loss, (result.fitted, result.history)
