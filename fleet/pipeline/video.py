"""Evaluation videos: one episode of a policy on a robot's profile, rendered offscreen.

Needs a GL backend (MUJOCO_GL=egl or osmesa, set before MuJoCo is first imported: the apps do,
fleet/apps/gl_backend.py). Without one, a single clear warning and no video; the loop goes on.
"""

from __future__ import annotations

import logging
import os

import mujoco
import numpy as np

from sim.gym_env import FlywheelEnv
from sim.policy_fn import as_conditioned_policy
from sim.scenario import ScenarioSpec

log = logging.getLogger(__name__)
_unavailable: str | None = None  # why rendering failed in this process: it is not tried again


def render_episode(policy, robot: str, profile, seed: int, max_frames: int = 200) -> np.ndarray | None:
    """Frames (T, H, W, 3) uint8 of one episode, or None when no GL backend is available."""
    global _unavailable
    # the backend MuJoCo loaded (MUJOCO_GL as it was at its first import), not the variable now: GLFW without a
    # display fails its first context and aborts the process on its second
    backend = getattr(getattr(mujoco, "GLContext", None), "__module__", None)
    if _unavailable is None and backend is None:
        _skip("MuJoCo's rendering is disabled in this process (MUJOCO_GL=disable)")
    elif _unavailable is None and backend == "mujoco.glfw" and not os.environ.get("DISPLAY"):
        _skip("no display, and MuJoCo loaded GLFW (set MUJOCO_GL=egl or osmesa before it is imported)")
    if _unavailable is not None:
        return None
    act = as_conditioned_policy(policy)
    context = profile.context()[None]  # what a conditioned policy reads of this body
    env = FlywheelEnv(robot, profile=profile, render_mode="rgb_array")
    try:
        obs, _ = env.reset(options={"scenario": ScenarioSpec(robot=robot, seed=seed, profile=profile, max_steps=max_frames)})
        try:
            frames = [env.render()]
        except RuntimeError as exc:
            _skip(str(exc))
            return None
        done = False
        while not done:
            obs, _, terminated, truncated, _ = env.step(np.asarray(act(obs[None], context), np.float32)[0])
            frames.append(env.render())
            done = terminated or truncated
        return np.stack(frames)
    finally:
        env.close()


def _skip(reason: str) -> None:
    """No videos in this process from now on, with one warning saying why."""
    global _unavailable
    _unavailable = reason
    log.warning("evaluation videos are skipped: %s", reason)
