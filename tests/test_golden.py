"""Physics sanity on the pinned MuJoCo: each robot's short trajectory matches its stored golden one.

A failure here means the physics changed (a MuJoCo upgrade, a model or stepper edit): check it
on purpose (docs/physics.md), then run tests/golden/regenerate.py.
"""

import mujoco
import numpy as np
import pytest

from sim.episode import parse_safetensors
from sim.robots import robot_names
from tests.golden.regenerate import GOLDEN_DIR, golden_trajectory


@pytest.mark.parametrize("robot", robot_names())
def test_trajectory_matches_golden(robot):
    path = GOLDEN_DIR / f"{robot}.safetensors"
    if not path.exists():
        pytest.fail(f"no golden trajectory for {robot}: run tests/golden/regenerate.py")
    golden, meta = parse_safetensors(path.read_bytes())
    assert meta["mujoco_version"] == mujoco.__version__, "golden made on another MuJoCo: check physics, then regenerate"
    now = golden_trajectory(robot)
    for key in ("qpos", "qvel", "observation", "reward"):
        np.testing.assert_allclose(now[key], golden[key], rtol=1e-5, atol=1e-5, err_msg=f"{robot} {key}")
    assert np.abs(golden["qpos"][-1] - golden["qpos"][0]).max() > 1e-3  # the robot actually moved
