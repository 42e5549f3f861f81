"""A robot defined outside the project's packages (gymnasium's hopper MJCF, written to a temporary
folder) works in every command: found by entry point or by ``robot_modules`` / FLYWHEEL_ROBOT_MODULES,
in the driver and in the Ray workers that calibrate and simulate it; `flywheel` runs a short loop
on it and `flywheel-robot` runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_flywheel_e2e import TINY

BIN = Path(sys.executable).parent
PLUGIN = '''
import numpy as np

from sim.calibration import register_state_from_observation
from sim.robots import Task, register
from sim.robots.base import GYMNASIUM_ASSETS


@register
class Hopper(Task):
    name, mjcf, frame_skip, max_steps, payload_body = "hopper", GYMNASIUM_ASSETS / "hopper.xml", 4, 1000, "torso"

    def observe(self, state):
        return np.concatenate([state.qpos[:, 1:], state.qvel], axis=1).astype(np.float32)

    def reward_terms(self, before, after, action):
        forward = (after.qpos[:, 0] - before.qpos[:, 0]) / self.control_dt
        return {"forward": forward, "healthy": np.ones_like(forward), "control": -1e-3 * np.square(action).sum(axis=1)}

    def terminated(self, state):
        return ~((state.qpos[:, 1] > 0.7) & (np.abs(state.qpos[:, 2]) < 0.2) & np.isfinite(state.qpos).all(axis=1))


def _state(task, obs):  # x is not observed; the floor is flat, so x = 0
    nq = task.model.nq
    return np.concatenate([np.zeros((len(obs), 1)), obs[:, : nq - 1]], 1), obs[:, nq - 1 :]


register_state_from_observation("hopper", _state)
'''


@pytest.fixture
def outside(tmp_path):
    """A folder holding the package ``outside_robots`` (not installed, not in the project)."""
    site = tmp_path / "site"
    (site / "outside_robots").mkdir(parents=True)
    (site / "outside_robots" / "__init__.py").write_text(PLUGIN)
    return site


def run(args, site: Path, cwd: Path, timeout: int, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "FLYWHEEL_ROBOT_MODULES"} | {"PYTHONPATH": str(site), **env}
    return subprocess.run(args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout)


PROBE = "from sim.robots import get_task, robot_names; t = get_task('hopper'); print(t.obs_dim, t.act_dim, 'hopper' in robot_names())"


def test_found_by_entry_point_or_by_the_module_list_and_not_otherwise(outside, tmp_path):
    unknown = run([sys.executable, "-c", PROBE], outside, tmp_path, 60)
    assert unknown.returncode != 0 and "unknown robot 'hopper'" in unknown.stderr and "docs/robots.md" in unknown.stderr
    by_env = run([sys.executable, "-c", PROBE], outside, tmp_path, 60, FLYWHEEL_ROBOT_MODULES="outside_robots")
    assert by_env.stdout.split() == ["11", "3", "True"], by_env.stderr
    dist = outside / "outside_robots-0.1.dist-info"  # what `pip install` of a package declaring the entry point leaves
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-robots\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[flywheel.robots]\nhopper = outside_robots\n")
    by_entry_point = run([sys.executable, "-c", PROBE], outside, tmp_path, 60)
    assert by_entry_point.stdout.split() == ["11", "3", "True"], by_entry_point.stderr
    missing = run([sys.executable, "-c", PROBE], outside, tmp_path, 60, FLYWHEEL_ROBOT_MODULES="no_such_robots")
    assert missing.returncode != 0 and "robot module 'no_such_robots' could not be imported" in missing.stderr


def test_the_robot_agent_runs_it(outside, tmp_path):
    result = run(
        [str(BIN / "flywheel-robot"), "robot_modules=[outside_robots]", "robot.model=hopper", "episodes=2", "drain_timeout_s=0",
         "fleet.agent.server_url=http://127.0.0.1:9", f"fleet.agent.spool_dir={tmp_path / 'spool'}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        outside, tmp_path, 120, FLYWHEEL_ROBOT_TOKEN="offline",
    )  # fmt: skip
    status = json.loads(result.stdout.strip().splitlines()[-1])
    assert status["episodes"] == 2 and status["queue_depth"] == 2  # recorded and spooled (no server to upload to)


@pytest.mark.slow
def test_a_short_flywheel_loop_on_it(outside, tmp_path):
    run_dir = tmp_path / "run"
    cheaper = ("loop.num_robots", "loop.iterations", "loop.train_env_steps", "policy.algorithm.model_train.max_steps")
    overrides = [o for o in TINY if not o.startswith(cheaper)]
    result = run(
        [str(BIN / "flywheel"), "robot_modules=[outside_robots]", "loop.robot_model=hopper", "loop.num_robots=1", "loop.iterations=1",
         "loop.train_env_steps=200", "policy.algorithm.sac.learning_starts=100", "policy.algorithm.model_train.max_steps=100",
         *overrides, f"run_dir={run_dir}"],
        outside, tmp_path, 300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    (first,) = summary["iterations"]
    assert set(first["calibration"]) == {"robot-0"}  # calibrated in a Ray worker, which imported the robot
    assert first["scenarios"]["sim_episodes"] > 0  # and simulated its scenarios there
    assert summary["final"]["real_steps"]["robot-0"] > first["real_steps"]["robot-0"] > 0


ARM = """<mujoco><worldbody><body name="link"><joint name="hinge" type="hinge" axis="0 0 1"/>
<geom type="capsule" fromto="0 0 0 0.3 0 0" size="0.02"/></body></worldbody>
<actuator><motor name="m" joint="hinge" {range}/></actuator></mujoco>"""


@pytest.mark.parametrize(
    "change, says",
    [
        ({"range": ""}, "actuator(s) ['m'] have no ctrlrange"),  # it never moved: action -> the middle of [0, 0]
        ({"payload_body": "hand"}, "payload_body 'hand' is not a body of its MJCF; bodies: ['link']"),
        ({"payload_body": "world"}, "payload_body 'world' is the world, so a heavy-payload profile's mass there would change nothing"),
        ({"mjcf": "/nowhere/arm.xml"}, "does not compile"),
        ({"observe": lambda self, s: s.qpos[0]}, "observe on 2 world(s) returned float64 (1,)"),
        ({"observe": None}, "observe is not implemented"),
        ({"observe": lambda self, s: np.concatenate([s.qpos, s.qvel], 1).squeeze()}, "observe on 1 world(s) returned float64 (2,)"),  # passed with 2
        ({"observe": lambda self, s: np.concatenate([s.qpos, s.qvel], 1).astype(np.int64)}, "returned int64 (2, 2)"),
        ({"reward_terms": lambda self, b, a, act: {"alive": 1.0}}, "reward_terms on 2 world(s) returned {'alive': 'float'}"),
        ({"reward_terms": lambda self, b, a, act: {}}, "a non-empty dict"),
        ({"initial_state": lambda self, rng, scale, goal: (np.zeros(2), np.zeros(1))}, "initial_state returned qpos (2,)"),
    ],
)
def test_a_robot_that_does_not_fit_the_interface_is_named_with_the_fix_when_first_used(tmp_path, change, says):
    """Each once failed later, elsewhere: a bare NotImplementedError, an IndexError in Task.obs_dim, a KeyError in a Ray
    actor naming neither robot nor payload_body, AttributeError 'float' has no 'astype' in the stepper, or (no
    ctrlrange) nothing at all: the actuator silently never moved."""
    from sim.robots import Task
    from sim.robots.registry import _TASKS, RobotDefinitionError, get_task

    xml = tmp_path / "arm.xml"
    xml.write_text(ARM.format(range=change.get("range", 'ctrlrange="-1 1"')))
    name = f"arm_{len(_TASKS)}"
    attrs = {"name": name, "mjcf": change.get("mjcf", xml), "frame_skip": 2, "max_steps": 50, "payload_body": change.get("payload_body", "link")}
    attrs["observe"] = lambda self, s: np.concatenate([s.qpos, s.qvel], axis=1).astype(np.float32)
    attrs["reward_terms"] = lambda self, before, after, action: {"alive": np.ones(len(after.qpos))}
    attrs.update({k: v for k, v in change.items() if k in ("observe", "reward_terms", "initial_state")})
    if attrs["observe"] is None:
        del attrs["observe"]
    _TASKS[name] = type("Arm", (Task,), attrs)
    try:
        with pytest.raises(RobotDefinitionError, match="robot 'arm_") as raised:
            get_task(name)
        assert says in str(raised.value) and "docs/robots.md" in str(raised.value)
    finally:
        del _TASKS[name]
        get_task.cache_clear()


def test_a_robot_module_that_raises_while_importing_is_named(tmp_path, monkeypatch):
    """Only ImportError was wrapped: a module raising anything else gave a bare RuntimeError naming no module."""
    from sim.robots.registry import RobotPluginError, load_robot_plugins

    (tmp_path / "raising_robots.py").write_text("raise RuntimeError('no licence for the arm driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RobotPluginError, match=r"robot module 'raising_robots' could not be imported \(RuntimeError: no licence for the arm driver\)"):
        load_robot_plugins(["raising_robots"])


def test_a_payload_on_the_world_or_a_body_fixed_to_it_is_refused():
    """payload_body = "world" passed check_task, then heavy_payload added 2 kg to the world: no effect, silently."""
    import mujoco

    from sim.variation import VariationProfile

    model = mujoco.MjModel.from_xml_string(
        '<mujoco><worldbody><body name="base"><geom size=".1"/><body name="link"><joint type="hinge"/><geom size=".05"/></body></body>'
        "</worldbody></mujoco>"
    )
    for body in ("world", "base"):
        with pytest.raises(ValueError, match=f"payload_mass=2.0 on '{body}', which is the world or fixed to it, changes nothing"):
            VariationProfile(payload_mass=2.0).apply(model, body)
    assert VariationProfile(payload_mass=2.0).apply(model, "link").body_mass[2] == pytest.approx(model.body_mass[2] + 2.0)
    VariationProfile(mass_scale=2.0).apply(model, "world")  # no payload: nothing to refuse
