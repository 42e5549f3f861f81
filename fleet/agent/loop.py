"""The robot a control loop drives, and the loop that records one episode from it: numpy only, so
the light package flywheel-robot-agent ships it (robot/pyproject.toml).

A real robot implements :class:`Robot` (reset, step, identity; optionally ``extras``) and
:func:`run_episode` drives it with a policy; :class:`fleet.agent.robot.SimRobot` is a MuJoCo stand-in
(robot-flywheel only).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol

import numpy as np

from fleet.agent.policy import Policy
from fleet.agent.recorder import EpisodeRecorder
from sim.episode import Episode, EpisodeValidationError
from sim.policy_fn import actuator_command

log = logging.getLogger(__name__)


class Robot(Protocol):
    robot_id: str
    robot_model: str
    source: str
    obs_dim: int
    act_dim: int

    def hardware(self) -> dict:
        """This robot's hardware profile (stored as the episode's ``hardware`` metadata)."""
        ...

    def reset(self, seed: int) -> tuple[np.ndarray, float]:
        """Start an episode: (observation (obs_dim,), timestamp in seconds)."""
        ...

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, float]:
        """Apply ``action`` (act_dim,) in [-1, 1]: (observation, reward, terminated, truncated, timestamp)."""
        ...

    # Optional: ``extras() -> dict[str, np.ndarray]``, arrays measured with the observation the last reset or
    # step returned (``qpos`` (nq,) and ``qvel`` (nv,) from joint encoders and a state estimator, say);
    # :func:`run_episode` records them as the episode's extras (T+1 rows). Calibration and scenarios start
    # from recorded qpos/qvel where an episode has them, else from states rebuilt from observations.


def run_episode(robot: Robot, policy: Policy, recorder: EpisodeRecorder, seed: int) -> Episode:
    """Drive ``robot`` with ``policy`` until the episode ends; return it as recorded (with the robot's ``extras()``, where it has them).

    The robot never gets an action with a NaN or infinite value: it gets zeros instead (the zero policy's command;
    np.clip keeps NaN), and the step records them. An observation with a NaN or infinite value (a sensor dropout) ends
    the episode at its last step; it is not recorded. The episode ends terminated when that step terminated (a bad
    release whose robot falls, its IMU reading NaN at the fall, still ends terminated, and SignedPolicySource.report_episode's
    first-episode health check sees the early termination), truncated otherwise. When that leaves no step (the reset's observation, or
    the first step's), there is no episode: EpisodeValidationError, and the next call starts one as usual. A step stamped
    no later than the one before (the robot's wall clock stepped back, NTP), or with no finite number, ends the episode
    the same way at its last step: the steps recorded so far are kept and in order."""
    extras = getattr(robot, "extras", None) or dict  # a robot that measures more than its observation (Robot.extras)
    obs, t = robot.reset(seed)
    if not np.isfinite(obs).all():
        raise _no_episode(robot, obs, "its reset")
    recorder.reset(obs, t, extras())
    act = policy.for_episode()
    while not recorder.done:
        action, zeroed = actuator_command(np.asarray(act(obs[None]), np.float32)[0], clip=False)
        if zeroed:
            log.warning("robot %s: policy %s gave a NaN or infinite action; sending zeros", robot.robot_id, policy.version)
        obs, reward, terminated, truncated, t = robot.step(action)
        if not np.isfinite(obs).all():
            if not recorder.num_steps:
                raise _no_episode(robot, obs, "its first step")
            how = "terminated" if terminated else "truncated"
            log.warning("robot %s: NaN or infinite observation at %.9f s; the episode ends (%s) at its last step (%d)", robot.robot_id, t, how, recorder.num_steps)
            recorder.terminate() if terminated else recorder.truncate()  # a fall read as NaN still ends the episode terminated
            break
        if not (math.isfinite(t) and t > recorder.last_timestamp):  # its clock stepped back (NTP), stood still, or read no number
            if not recorder.num_steps:
                raise EpisodeValidationError("timestamp", f"robot {robot.robot_id}'s first step is stamped {t!r} s, not a number after its reset's {recorder.last_timestamp!r}: no step to record; stamp steps with a monotonic clock (time.monotonic())")
            how = "terminated" if terminated else "truncated"
            log.warning(
                "robot %s: step stamped %r s, not a number after the last one (%.9f s): its clock stepped back, stood still or failed; the episode ends (%s) "
                "at its last step (%d). Stamp steps with a monotonic clock (time.monotonic()) to keep whole episodes",
                robot.robot_id, t, recorder.last_timestamp, how, recorder.num_steps,
            )  # fmt: skip
            recorder.terminate() if terminated else recorder.truncate()  # as for a NaN reading: a fall on that step still ends it terminated
            break
        recorder.step(action, reward, obs, terminated, truncated, t, extras())
    return recorder.finish(policy_version=policy.version)


def _no_episode(robot: Robot, obs: np.ndarray, when: str) -> EpisodeValidationError:
    where = np.flatnonzero(~np.isfinite(obs)).tolist()
    return EpisodeValidationError("observation", f"robot {robot.robot_id}'s observation after {when} has NaN or infinite values (at {where}): no step to record")
