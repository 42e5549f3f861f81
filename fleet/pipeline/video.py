"""Evaluation videos: one episode of a policy on a robot's profile, rendered offscreen.

Needs a GL backend (MUJOCO_GL=egl or osmesa). Without one, a single clear warning and no
video; the loop goes on.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from sim.gym_env import FlywheelEnv
from sim.policy_fn import as_conditioned_policy
from sim.scenario import ScenarioSpec

log = logging.getLogger(__name__)
_warned = False


def render_episode(policy, robot: str, profile, seed: int, max_frames: int = 200) -> np.ndarray | None:
    """Frames (T, H, W, 3) uint8 of one episode, or None when no GL backend is available."""
    global _warned
    if os.environ.get("MUJOCO_GL") not in ("egl", "osmesa") and not os.environ.get("DISPLAY"):
        # MuJoCo's default (GLFW) aborts the process without a display: never try it headless
        if not _warned:
            log.warning("evaluation videos are skipped: no display and MUJOCO_GL is not egl/osmesa (set MUJOCO_GL=egl)")
            _warned = True
        return None
    act = as_conditioned_policy(policy)
    context = profile.context()[None]  # what a conditioned policy reads of this body
    env = FlywheelEnv(robot, profile=profile, render_mode="rgb_array")
    try:
        obs, _ = env.reset(options={"scenario": ScenarioSpec(robot=robot, seed=seed, profile=profile, max_steps=max_frames)})
        try:
            frames = [env.render()]
        except RuntimeError as exc:
            if not _warned:
                log.warning("evaluation videos are skipped: %s", exc)
                _warned = True
            return None
        done = False
        while not done:
            obs, _, terminated, truncated, _ = env.step(np.asarray(act(obs[None], context), np.float32)[0])
            frames.append(env.render())
            done = terminated or truncated
        return np.stack(frames)
    finally:
        env.close()
