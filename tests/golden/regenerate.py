"""Regenerate the golden trajectories: `.venv/bin/python tests/golden/regenerate.py`.

Each robot: a fixed scenario and a fixed open-loop action sequence, stepped by the batched
stepper; qpos/qvel/observation/reward are stored (safetensors) with the MuJoCo version.
Regenerate only after checking a physics change on purpose (docs/physics.md).
"""

from pathlib import Path

import mujoco
import numpy as np

from sim.batched import BatchedStepper
from sim.episode import encode_safetensors
from sim.robots import get_task, robot_names
from sim.scenario import ScenarioSpec

GOLDEN_DIR = Path(__file__).parent
STEPS = 30


def golden_actions(robot: str) -> np.ndarray:
    return np.random.default_rng(1234).uniform(-0.5, 0.5, (STEPS, get_task(robot).act_dim)).astype(np.float32)


def golden_trajectory(robot: str) -> dict[str, np.ndarray]:
    actions = iter(golden_actions(robot))
    spec = ScenarioSpec(robot=robot, seed=2024, max_steps=STEPS)
    (ep,) = BatchedStepper(robot, 1, nthread=1).simulate([spec], lambda obs: next(actions)[None])
    return {"qpos": ep.extras["qpos"], "qvel": ep.extras["qvel"], "observation": ep.observation, "reward": ep.reward}


def main() -> None:
    for robot in robot_names():
        path = GOLDEN_DIR / f"{robot}.safetensors"
        trajectory = golden_trajectory(robot)
        assert all(np.isfinite(v).all() for v in trajectory.values()), f"{robot}: non-finite golden trajectory, not written"
        path.write_bytes(encode_safetensors(trajectory, {"mujoco_version": mujoco.__version__, "steps": str(STEPS)}))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
