"""Every registered robot: resets, steps, keeps its shapes, makes no NaN, passes check_env, is
deterministic, and its physical variation really changes its dynamics."""

import copy

import gymnasium as gym
import mujoco
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

from sim.batched import BatchedStepper
from sim.gym_env import ENV_IDS, FlywheelEnv, FlywheelVectorEnv
from sim.policy_fn import random_policy
from sim.robots import Task, get_task, register, robot_names
from sim.robots.pendulum import Pendulum
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile

ROBOTS = robot_names()


def test_builtin_registry_has_a_manipulator_and_legged_robots():
    assert {"reacher", "ant", "half_cheetah", "pendulum"} <= set(ROBOTS)
    with pytest.raises(KeyError, match="registered robots"):
        get_task("spot")


@pytest.mark.parametrize("robot", ROBOTS)
def test_reset_step_shapes_and_no_nan(robot):
    task = get_task(robot)
    with BatchedStepper(robot, 8, nthread=2) as stepper:
        obs = stepper.reset(seed=0)
        assert obs.shape == (8, task.obs_dim) and obs.dtype == np.float32
        policy = random_policy(task.act_dim, seed=1)
        for _ in range(30):
            obs, reward, terminated, truncated, info = stepper.step(policy(obs))
            assert obs.shape == (8, task.obs_dim) and reward.shape == (8,)
            assert np.isfinite(obs).all() and np.isfinite(reward).all()
            assert set(info["reward_terms"]) and all(v.shape == (8,) for v in info["reward_terms"].values())
            np.testing.assert_allclose(sum(info["reward_terms"].values()), reward, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("robot", ROBOTS)
def test_gymnasium_env_passes_check_env(robot):
    env = gym.make(ENV_IDS[robot])
    check_env(env.unwrapped, skip_render_check=True)
    env.close()


@pytest.mark.parametrize("robot", ROBOTS)
def test_same_seed_same_bytes(robot):
    spec = ScenarioSpec(robot=robot, seed=42, profile=VariationProfile(obs_noise_std=0.01, action_latency=1))
    policy = lambda obs: np.tanh(obs[:, : get_task(robot).act_dim])  # noqa: E731  deterministic closed loop
    first = BatchedStepper(robot, 1).simulate([spec], policy)[0]
    again = BatchedStepper(robot, 3).simulate([ScenarioSpec(robot=robot, seed=7), spec, ScenarioSpec(robot=robot, seed=8)], policy)[1]
    assert first.to_bytes() == again.to_bytes()
    other = BatchedStepper(robot, 1).simulate([ScenarioSpec(robot=robot, seed=43)], policy)[0]
    assert not np.array_equal(first.observation[:2], other.observation[:2])


@pytest.mark.parametrize("robot", ROBOTS)
def test_heavier_payload_changes_the_trajectory(robot):
    task = get_task(robot)
    actions = np.random.default_rng(0).uniform(-1, 1, (20, task.act_dim)).astype(np.float32)

    def trajectory(profile):
        env = FlywheelEnv(robot, profile=profile)
        env.reset(options={"scenario": ScenarioSpec(robot=robot, seed=0, profile=profile)})
        out = []
        for a in actions[:10]:
            obs, _, terminated, truncated, _ = env.step(0.3 * a)
            out.append(obs)
            if terminated or truncated:
                break
        env.close()
        return np.array(out)

    light, heavy = trajectory(VariationProfile()), trajectory(VariationProfile(payload_mass=2.0))
    n = min(len(light), len(heavy))
    assert n >= 3 and np.abs(light[:n] - heavy[:n]).max() > 1e-3


def test_every_physical_field_changes_the_model():
    nominal = get_task("ant").model
    varied = VariationProfile(payload_mass=1.0, mass_scale=1.2, friction_scale=0.5, actuator_strength=0.7, damping_scale=2.0).apply(
        nominal, "torso"
    )
    torso = nominal.body("torso").id
    assert varied.body_mass[torso] == pytest.approx(nominal.body_mass[torso] * 1.2 + 1.0)
    np.testing.assert_allclose(varied.geom_friction[:, 0], nominal.geom_friction[:, 0] * 0.5)
    np.testing.assert_allclose(varied.actuator_gainprm[:, 0], nominal.actuator_gainprm[:, 0] * 0.7)  # the motors' force
    np.testing.assert_array_equal(varied.actuator_gear, nominal.actuator_gear)  # not the gear: see the servo test below
    np.testing.assert_allclose(varied.dof_damping, nominal.dof_damping * 2.0)
    assert nominal.body_mass[torso] != varied.body_mass[torso]  # the nominal model is untouched


SERVO = """<mujoco><option timestep="0.002" gravity="0 0 0"/><worldbody><body><joint name="j" type="hinge" axis="0 0 1" damping="1"/>
<geom type="capsule" fromto="0 0 0 .2 0 0" size=".02" mass=".2"/></body></worldbody>
<actuator><{kind} joint="j" {attrs} ctrlrange="-1 1"/></actuator><sensor><actuatorpos actuator="a"/></sensor></mujoco>"""


@pytest.mark.parametrize("kind, attrs", [("position", 'name="a" kp="5"'), ("position", 'name="a" kp="5" gear="2" forcerange="-1 1"'),
                                         ("velocity", 'name="a" kv="2"'), ("motor", 'name="a" gear="3"')])  # fmt: skip
def test_a_weak_actuator_pushes_with_less_force_at_the_same_setpoint(kind, attrs):
    """actuator_strength once scaled the gear: a <position kp> servo of strength 0.5 commanded to 0.5 settled at 1.0
    (q = ctrl / gear), and its actuatorpos sensor read differently. Now every actuator's force scales, nothing else."""
    nominal = mujoco.MjModel.from_xml_string(SERVO.format(kind=kind, attrs=attrs))
    weak = VariationProfile(actuator_strength=0.5).apply(nominal, "world")
    forces, ends = [], []
    for model in (nominal, weak):
        data = mujoco.MjData(model)
        data.qpos[0], data.qvel[0], data.ctrl[0] = 0.2, 0.3, 0.5
        mujoco.mj_forward(model, data)
        forces.append((data.actuator_force[0], data.qfrc_actuator[0], data.sensordata[0]))
        for _ in range(5000):
            mujoco.mj_step(model, data)
        ends.append(data.qpos[0])
    (f_nom, tau_nom, pos_nom), (f_weak, tau_weak, pos_weak) = forces
    assert f_weak == pytest.approx(0.5 * f_nom) and tau_weak == pytest.approx(0.5 * tau_nom) and tau_nom != 0
    assert pos_weak == pos_nom  # the actuator's length (gear * q) is the body's, not the motor's strength
    if kind == "position":  # the same setpoint (ctrl / gear: 0.5, or 0.25 with gear 2), reached slower
        assert ends[1] == pytest.approx(ends[0], abs=1e-3) and ends[0] == pytest.approx(0.5 / nominal.actuator_gear[0, 0], abs=1e-3)


def test_a_weak_built_in_motor_is_the_gear_scaled_motor_it_was():
    """The built-in robots' <motor>s: scaling the gain instead of the gear gives the same torques (exactly for the
    weak_motor condition's 0.5; to rounding for other strengths, gear * (s * ctrl) vs (gear * s) * ctrl)."""
    for robot in ("ant", "half_cheetah", "pendulum", "reacher"):
        nominal = get_task(robot).model
        for strength in (0.5, 0.7):
            new = VariationProfile(actuator_strength=strength).apply(nominal, get_task(robot).payload_body)
            old = copy.copy(nominal)
            old.actuator_gear[:, 0] = nominal.actuator_gear[:, 0] * strength
            mujoco.mj_setConst(old, mujoco.MjData(old))
            rng = np.random.default_rng(0)
            ctrl = rng.uniform(*nominal.actuator_ctrlrange.T, size=(20, nominal.nu))
            runs = []
            for model in (old, new):
                data = mujoco.MjData(model)
                for c in ctrl:
                    data.ctrl[:] = c
                    mujoco.mj_step(model, data)
                runs.append(np.concatenate([data.qpos, data.qvel]))
            if strength == 0.5:
                np.testing.assert_array_equal(runs[0], runs[1], err_msg=robot)
            else:
                np.testing.assert_allclose(runs[0], runs[1], rtol=1e-9, atol=1e-9, err_msg=robot)


def test_a_user_adds_a_robot_with_an_mjcf_and_a_task_class(tmp_path):
    xml = Pendulum.mjcf.read_text().replace('size="0.049 0.3"', 'size="0.03 0.3"')
    (tmp_path / "thin_pole.xml").write_text(xml)

    @register
    class ThinPole(Pendulum):
        name = "thin_pole_test"
        mjcf = tmp_path / "thin_pole.xml"

        def initial_state(self, rng, noise_scale, goal):  # its own start, tilted (the stepper once drew the pendulum's)
            qpos, qvel = super().initial_state(rng, noise_scale, goal)
            return qpos + np.array([0.0, 0.1]), qvel

    assert "thin_pole_test" in robot_names()
    stepper = BatchedStepper("thin_pole_test", 4)
    episodes = stepper.simulate([ScenarioSpec("thin_pole_test", seed=s) for s in range(4)], random_policy(1, seed=0))
    assert len(episodes) == 4 and all(e.metadata["robot_model"] == "thin_pole_test" for e in episodes)
    first = stepper.reset(seed=0)  # free running, batched resets
    assert np.all(np.abs(first[:, 1] - 0.1) < 0.02) and np.all(np.abs(episodes[0].observation[0, 1] - 0.1) < 0.02)
    with pytest.raises(ValueError, match="already registered"):
        register(type("Other", (Task,), {"name": "thin_pole_test"}))


def test_vector_env_same_step_autoreset_keeps_the_final_observation():
    env = FlywheelVectorEnv("pendulum", 4)
    obs, _ = env.reset(seed=0)
    saw_final = False
    for _ in range(200):
        obs, reward, terminated, truncated, info = env.step(np.ones((4, 1), np.float32))
        done = terminated | truncated
        if done.any():
            saw_final = True
            final = info["final_observation"][done]
            assert np.abs(final[:, 1]).max() > 0.2  # the pole had fallen (the termination condition)
            assert np.abs(obs[done, 1]).max() < 0.02  # the returned obs is the fresh reset
    assert saw_final
    env.close()


def _first_finished_step(env, action):
    env.reset(seed=0)
    for _ in range(400):
        out = env.step(action)
        if (out[2] | out[3]).any():
            return out
    raise AssertionError("no world finished")


def test_vector_env_gives_gymnasiums_same_step_keys_as_sync_vector_env():
    """FlywheelVectorEnv declares gymnasium 1.x same-step autoreset but gave only gymnasium 0.29's final_observation
    (a KeyError for final_obs), and reset(options={"reset_mask": ...}) was ignored silently."""
    sync = gym.make_vec("flywheel/Pendulum-v0", num_envs=3, vectorization_mode="sync", vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})
    ours = FlywheelVectorEnv("pendulum", 3, nthread=1)
    push = np.ones((3, 1), np.float32)
    *_, want = _first_finished_step(sync, push)
    obs, _, terminated, truncated, info = _first_finished_step(ours, push)
    done = terminated | truncated
    for key in ("final_obs", "_final_obs", "final_info", "_final_info"):
        assert key in want and key in info, key
    assert info["final_obs"].dtype == want["final_obs"].dtype == object and info["final_obs"].shape == (3,)
    np.testing.assert_array_equal(info["_final_obs"], done)
    np.testing.assert_array_equal(info["_final_info"], done)
    for i in range(3):
        if done[i]:
            np.testing.assert_array_equal(info["final_obs"][i], info["final_observation"][i])  # the stepper's key stays
            assert info["final_obs"][i].shape == want["final_obs"][np.flatnonzero(want["_final_obs"])[0]].shape
        else:
            assert info["final_obs"][i] is None
    assert set(info["final_info"]) == set(want["final_info"]) == {"reward_terms", "_reward_terms"}
    assert set(info["final_info"]["reward_terms"]) == set(want["final_info"]["reward_terms"])
    with pytest.raises(ValueError, match="takes no options.*reset_mask"):
        ours.reset(options={"reset_mask": np.array([True, False, False])})
    sync.close()
    ours.close()

