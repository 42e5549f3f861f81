"""A MuJoCo stand-in for a robot, :class:`SimRobot` (used by ``flywheel-robot`` and the demo, with its own
hardware variation). The :class:`Robot` protocol it implements and :func:`run_episode`, the loop that records
one episode from a robot, are numpy only: :mod:`fleet.agent.loop` (in the light package too).
"""

from __future__ import annotations

import numpy as np

from fleet.agent.config import SimRobotConfig
from fleet.agent.loop import Robot, run_episode  # noqa: F401  (their home is fleet.agent.loop; callers that take SimRobot take them here too)
from sim.batched import BatchedStepper
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile


class SimRobot:
    """One simulated robot (a 1-world BatchedStepper); its episodes are time-limited to ``max_steps``."""

    def __init__(self, config: SimRobotConfig):
        self.config = config
        self.robot_id, self.robot_model, self.source = config.robot_id, config.model, config.source
        self.profile = VariationProfile.from_dict(dict(config.profile))
        self._stepper = BatchedStepper(config.model, 1, nthread=1, record=False, robot_id=config.robot_id, source=config.source)
        self.obs_dim, self.act_dim = self._stepper.task.obs_dim, self._stepper.task.act_dim
        self.control_dt = self._stepper.task.control_dt
        self._t = 0.0

    def hardware(self) -> dict:
        return {"kind": "sim", "model": self.robot_model, "profile": self.profile.to_dict()}

    def extras(self) -> dict[str, np.ndarray]:
        """The physics state now, {"qpos": (nq,), "qvel": (nv,)} float32, where ``config.record_state``; else none."""
        if not self.config.record_state:
            return {}
        qpos, qvel = self._stepper.physics_state()  # an episode's world stops when it ends: its last state stays
        return {"qpos": qpos[0].astype(np.float32), "qvel": qvel[0].astype(np.float32)}

    def reset(self, seed: int) -> tuple[np.ndarray, float]:
        spec = ScenarioSpec(robot=self.robot_model, seed=seed, profile=self.profile, max_steps=self.config.max_steps)
        obs = self._stepper.reset_to([spec])
        self._t += self.control_dt  # the robot clock keeps running across episodes
        return obs[0], self._t

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, float]:
        obs, reward, terminated, truncated, info = self._stepper.step(np.asarray(action, np.float32)[None])
        self._t += self.control_dt
        if info["_final_observation"][0]:
            obs = info["final_observation"]
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), self._t

    def close(self) -> None:
        self._stepper.close()
