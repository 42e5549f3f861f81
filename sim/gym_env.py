"""Gymnasium face of the robots: one registered env id per robot, plus a vector env.

Both run on :class:`sim.batched.BatchedStepper`, so a gymnasium user, the policy trainers
and the fleet see the same physics, observations, rewards and time limits.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv

from sim.batched import BatchedStepper, derive_seed
from sim.robots import get_task
from sim.scenario import ScenarioSpec
from sim.variation import VariationProfile

ENV_IDS = {
    "ant": "flywheel/Ant-v0",
    "half_cheetah": "flywheel/HalfCheetah-v0",
    "pendulum": "flywheel/Pendulum-v0",
    "reacher": "flywheel/Reacher-v0",
}


def _spaces(robot: str) -> tuple[gym.spaces.Box, gym.spaces.Box]:
    task = get_task(robot)
    obs = gym.spaces.Box(-np.inf, np.inf, shape=(task.obs_dim,), dtype=np.float32)
    act = gym.spaces.Box(-1.0, 1.0, shape=(task.act_dim,), dtype=np.float32)
    return obs, act


class FlywheelEnv(gym.Env):
    """One robot as a gymnasium env. Actions in [-1, 1]; the time limit is the task's.

    ``reset(options={"scenario": ScenarioSpec})`` replays a scenario exactly.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, robot: str, profile: VariationProfile | None = None, render_mode: str | None = None):
        self.robot, self.profile = robot, profile or VariationProfile()
        self.observation_space, self.action_space = _spaces(robot)
        self.render_mode = render_mode
        self._stepper = BatchedStepper(robot, 1, nthread=1, record=False)
        self.metadata = {**self.metadata, "render_fps": int(round(1 / self._stepper.task.control_dt))}
        self._renderer = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        scenario = (options or {}).get("scenario")
        if scenario is None:
            scenario = ScenarioSpec(robot=self.robot, seed=int(self.np_random.integers(2**31)), profile=self.profile)
        obs = self._stepper.reset_to([scenario])
        return obs[0], {"scenario": scenario}

    def step(self, action):
        if not self._stepper.active[0]:
            raise RuntimeError("step() after the episode ended: call reset() first")
        obs, reward, terminated, truncated, info = self._stepper.step(np.asarray(action, np.float32)[None])
        if info["_final_observation"][0]:
            obs = info["final_observation"]
        terms = {k: float(v[0]) for k, v in info["reward_terms"].items()}
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), {"reward_terms": terms}

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        import mujoco

        stepper = self._stepper
        model, data = stepper.model_for(self.profile)
        mujoco.mj_setState(model, data, stepper.state[0], mujoco.mjtState.mjSTATE_FULLPHYSICS)
        mujoco.mj_forward(model, data)
        if self._renderer is None:
            try:
                self._renderer = mujoco.Renderer(model, 240, 320)
            except Exception as exc:  # GL missing: say how to get one
                raise RuntimeError(f"cannot render ({exc}); set MUJOCO_GL=egl or MUJOCO_GL=osmesa") from exc
        self._renderer.update_scene(data)
        return self._renderer.render()

    def close(self):
        if self._renderer is not None:
            self._renderer.close()
        self._stepper.close()


class FlywheelVectorEnv(VectorEnv):
    """N worlds of one robot as a gymnasium vector env (same-step autoreset) over the batched stepper.

    A step where worlds finished carries gymnasium's same-step keys, as its ``SyncVectorEnv`` gives them:
    ``final_obs`` (an object array, the finished worlds' last observations, None elsewhere), ``final_info``
    (their step infos) and their masks ``_final_obs`` and ``_final_info``. Every step also carries the stepper's
    ``final_observation`` / ``_final_observation`` (an (N, obs_dim) array) and ``reward_terms``.
    """

    metadata = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, robot: str, num_envs: int, profiles=None, nthread: int | None = None):
        self.robot, self.num_envs, self._profiles = robot, num_envs, profiles
        self.single_observation_space, self.single_action_space = _spaces(robot)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._stepper = BatchedStepper(robot, num_envs, nthread=nthread, record=False)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Every world to a fresh episode. No options: a finished world resets in the step it finishes (same-step
        autoreset), so gymnasium's ``reset_mask`` has nothing to do here, and it was once ignored silently."""
        if options:
            raise ValueError(
                f"FlywheelVectorEnv.reset takes no options, got {sorted(options)}: finished worlds reset in the step they finish "
                "(AutoresetMode.SAME_STEP), so there is no reset_mask to give; call reset() to restart every world"
            )
        base = derive_seed("vector", seed) if seed is not None else int(np.random.default_rng().integers(2**31))
        return self._stepper.reset(seed=base, profiles=self._profiles), {}

    def step(self, actions):
        obs, reward, terminated, truncated, info = self._stepper.step(actions)
        done = info["_final_observation"]
        if done.any():
            info = self._same_step_infos(info, done)
        return obs, reward, terminated, truncated, info

    def _same_step_infos(self, info: dict, done: np.ndarray) -> dict:
        """``info`` with gymnasium's same-step keys for the finished worlds (gymnasium 1.x names them ``final_obs``,
        ``final_info``; the stepper's ``final_observation`` is gymnasium 0.29's name, kept for the trainers)."""
        final_obs = np.full(self.num_envs, None, dtype=object)
        final_info: dict = {}
        for i in np.flatnonzero(done):
            final_obs[i] = info["final_observation"][i]
            final_info = self._add_info(final_info, {"reward_terms": {k: float(v[i]) for k, v in info["reward_terms"].items()}}, i)
        return {**info, "final_obs": final_obs, "_final_obs": done.copy(), "final_info": final_info, "_final_info": done.copy()}

    def close_extras(self, **kwargs):
        self._stepper.close()


def register_envs() -> None:
    """Register ``flywheel/<Robot>-v0`` ids (idempotent)."""
    for robot, env_id in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point="sim.gym_env:FlywheelEnv", kwargs={"robot": robot})


register_envs()
