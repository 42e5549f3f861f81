"""A robot whose observation cannot be turned back into a physics state (a derived one: a tilt, sensors) runs in the
loop: its simulated robots record their physics state (qpos/qvel extras) in the telemetry, as a real robot logs its
encoders, and calibration starts from those. Where nothing could work, the loop refuses at start, saying what to do.

Once the robots acted and uploaded, then a Ray task failed: "robot 'probe_blob' has no observation->state map: record
qpos/qvel extras in its telemetry ...", which neither SimRobot nor run_episode could do."""

import dataclasses
import json

import numpy as np
import pytest

from fleet.agent.config import SimRobotConfig
from fleet.agent.policy import builtin_policy
from fleet.agent.recorder import EpisodeRecorder
from fleet.agent.robot import SimRobot, run_episode
from sim.calibration import CalibrationConfig, calibrate_job
from sim.robots import get_task
from tests.test_config import _compose
from tests.tiny_robots import registered


def _episode(record_state: bool, seed: int = 0, profile: dict | None = None):
    robot = SimRobot(SimRobotConfig(robot_id="r1", model="tiny_tilt", max_steps=20, profile=profile or {}, record_state=record_state))
    recorder = EpisodeRecorder(robot_id="r1", robot_model="tiny_tilt", hardware=robot.hardware())
    try:
        return run_episode(robot, builtin_policy("random", robot.act_dim, seed).current(), recorder, seed=seed), robot
    finally:
        robot.close()


def test_a_sim_robot_records_its_physics_state_in_its_episodes_when_asked():
    with registered():
        episode, robot = _episode(record_state=True)
        task = get_task("tiny_tilt")
        qpos, qvel = episode.extras["qpos"], episode.extras["qvel"]
        assert qpos.shape == (episode.num_steps + 1, task.model.nq) and qvel.shape == (episode.num_steps + 1, task.model.nv)
        assert qpos.dtype == np.float32 and np.abs(qpos[-1] - qpos[0]).max() > 1e-3
        # each row is the state of the observation beside it, the final one included (the world stopped there)
        np.testing.assert_allclose(episode.observation, np.concatenate([np.cos(qpos), qvel], 1), atol=1e-5)
        plain, _ = _episode(record_state=False)
        assert plain.extras == {}  # the default: observations and actions, as before
        np.testing.assert_array_equal(plain.observation, episode.observation)  # recording changes nothing it does


def test_calibration_of_a_robot_without_a_state_map_runs_from_recorded_states():
    """What the loop's Ray task does with the robots' uploads (bytes in, JSON out): it raised where they had no extras."""
    with registered():
        weak = [_episode(record_state=True, seed=s, profile={"actuator_strength": 0.5})[0] for s in range(3)]
        config = dataclasses.asdict(CalibrationConfig(params=("actuator_strength",), population=16, num_elites=4, iterations=6, windows_per_episode=4))
        result = json.loads(calibrate_job({"robot": "tiny_tilt", "episodes": [ep.to_bytes() for ep in weak], "config": config}))
        assert result["estimates"]["actuator_strength"] == pytest.approx(0.5, rel=0.05)
        bare = [_episode(record_state=False, seed=0)[0]]
        with pytest.raises(ValueError, match="no observation->state map: record qpos/qvel extras .* loop.record_state=true"):
            calibrate_job({"robot": "tiny_tilt", "episodes": [ep.to_bytes() for ep in bare], "config": config})


def test_the_loop_records_the_state_of_a_robot_without_a_map_and_refuses_what_cannot_work_at_start():
    from fleet.pipeline.loop import LoopSettings

    with registered():
        assert LoopSettings.from_cfg(_compose("flywheel", ["loop.robot_model=tiny_tilt"])).record_state is True  # null: no map, so recorded
        assert LoopSettings.from_cfg(_compose("flywheel", ["loop.robot_model=pendulum"])).record_state is False  # a map: telemetry as before
        assert LoopSettings.from_cfg(_compose("flywheel", ["loop.robot_model=pendulum", "loop.record_state=true"])).record_state is True
        with pytest.raises(ValueError, match=r"loop.record_state=false: robot 'tiny_tilt' has no observation->state map: .*set loop.record_state=true"):
            LoopSettings.from_cfg(_compose("flywheel", ["loop.robot_model=tiny_tilt", "loop.record_state=false"]))


def test_a_wrong_state_map_is_refused_at_loop_start():
    from fleet.pipeline.loop import LoopSettings
    from sim.calibration import _STATE_FROM_OBS, register_state_from_observation

    with registered():
        register_state_from_observation("tiny_tilt", lambda task, obs: (np.arccos(np.clip(obs[:, :1], -1, 1)), 0 * obs[:, 1:]))  # drops the rate
        try:
            with pytest.raises(ValueError, match="its observation->state map does not reproduce a clean observation"):
                LoopSettings.from_cfg(_compose("flywheel", ["loop.robot_model=tiny_tilt"]))
        finally:
            del _STATE_FROM_OBS["tiny_tilt"]
