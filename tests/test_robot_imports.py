"""The robot side runs without the training stack. In a fresh interpreter whose importer refuses
MuJoCo, torch, Ray, gymnasium, zarr, Icechunk, W&B, FastAPI, Hydra and OmegaConf, every robot module
(the light package's list, robot/pyproject.toml) imports, an episode is recorded and encoded (with the
recorder, and with run_episode driving a Robot as docs/protocol.md says), and a
robot pulls, verifies and runs a release from a real registry on loopback, with the release's
sensor offset, sensor filter and body context for it."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("mujoco", "torch", "ray", "gymnasium", "zarr", "icechunk", "wandb", "fastapi", "starlette", "uvicorn", "hydra", "omegaconf")
SPEC = {"robot_model": "pendulum", "obs_dim": 4, "act_dim": 1}

# Prepended to every probe: an importer that refuses the heavy packages as if they were not installed.
REFUSE_HEAVY = f"""
import importlib.abc, sys
HEAVY = {HEAVY!r}
class RefuseHeavy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ModuleNotFoundError(f"{{name}} is refused here: the robot side must not import it", name=name)
sys.meta_path.insert(0, RefuseHeavy())
"""


def robot_package() -> dict:
    """robot/pyproject.toml: the light package flywheel-robot-agent."""
    return tomllib.loads((REPO / "robot" / "pyproject.toml").read_text())


def robot_modules() -> list[str]:
    """The robot modules, as robot/pyproject.toml lists them for the wheel."""
    return [m.removesuffix(".__init__") for m in robot_package()["tool"]["setuptools"]["py-modules"]]


def run_light(code: str, *args: str, cwd: Path = REPO, python: tuple[str, ...] = (), timeout: float = 60) -> str:
    """Run ``code`` after REFUSE_HEAVY in a fresh interpreter; its stdout (the test fails with its stderr)."""
    out = subprocess.run([sys.executable, *python, "-c", REFUSE_HEAVY + code, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


IMPORT_AND_RECORD = """
import importlib, json
for module in json.loads(sys.argv[1]):
    importlib.import_module(module)
import numpy as np
import sim
from fleet.agent import EpisodeRecorder, RobotAgent
from sim.episode import Episode
try:
    import mujoco
    raise SystemExit("the importer let mujoco through")
except ModuleNotFoundError:
    pass
rec = EpisodeRecorder(robot_id="r", robot_model="arm", source="real")
rec.reset(np.zeros(3), 0.0)
rec.step(np.zeros(2), 1.0, np.ones(3), True, False, 0.1)
ep = rec.finish()
assert Episode.from_bytes(ep.to_bytes()).equals(ep) and sim.Episode is Episode

from fleet.agent import FixedPolicy, Policy, Robot, run_episode  # docs/protocol.md, "Robot agent": a robot's own loop

class Arm:  # a Robot: numpy only
    robot_id, robot_model, source, obs_dim, act_dim = "r", "arm", "real", 3, 2
    def hardware(self):
        return {"arm": "v2"}
    def reset(self, seed):
        self.k = 0
        return np.zeros(3), 0.0
    def step(self, action):
        self.k += 1
        return np.full(3, self.k, np.float32), 1.0, False, self.k == 4, 0.1 * self.k

arm: Robot = Arm()
ep = run_episode(arm, FixedPolicy(Policy("v1", lambda obs: np.zeros((len(obs), 2), np.float32))).current(), rec, seed=0)
assert ep.num_steps == 4 and ep.truncated[-1] and ep.metadata["policy_version"] == "v1"
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)))
"""


def test_robot_modules_import_and_record_with_the_heavy_packages_refused():
    assert {"fleet.registry.pull", "fleet.agent.agent", "fleet.agent.loop", "policies.runtime", "sim.sensors", "sim.body_context"} <= set(robot_modules())
    out = run_light(IMPORT_AND_RECORD, json.dumps(robot_modules()))
    assert json.loads(out.strip().splitlines()[-1]) == []


PULL_AND_ACT = """
import json
from pathlib import Path
import numpy as np
from fleet.agent.policy import builtin_policy
from fleet.registry.pull import SignedPolicySource
from fleet.registry.trust import PolicyTrust
args = json.loads(sys.argv[1])

def source():
    trust = PolicyTrust(**args["spec"], state_dir=args["state_dir"])
    fallback = builtin_policy("zero", args["spec"]["act_dim"]).current()
    return SignedPolicySource(args["url"], args["token"], "robot-0", trust, fallback, root=Path(args["root"]).read_bytes())

def episode_actions(policy):
    act = policy.for_episode()
    return [np.asarray(act(np.full((1, 4), 0.1 * t, np.float32))).tolist() for t in range(5)]

robot = source()
swapped = robot.poll()
first = episode_actions(robot.current())
restarted = source()  # a reboot: the trusted release comes back from disk, checked again
print(json.dumps({"swapped": swapped, "version": robot.current().version, "refusals": robot.refusals, "filtered": robot.current().episode is not None,
                  "actions": first, "after_restart": restarted.current().version, "again": episode_actions(restarted.current()),
                  "heavy": sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)}))
"""


def publish_conditioned_release(registry, tmp_path: Path) -> dict:
    """A body-conditioned pendulum policy (torch, the publisher's side) released with a sensor offset,
    a sensor filter and body features for robot-0; returns the manifest."""
    import torch

    from policies.export import export_policy
    from policies.networks import Policy, PolicySpec
    from policies.runtime import WEIGHTS_FILE
    from sim.sensor_filter import SensorFilter
    from sim.variation import CONTEXT_DIM

    torch.manual_seed(0)
    exported = export_policy(Policy(PolicySpec(4, 1, (16,), "tanh", True, context_dim=CONTEXT_DIM)), tmp_path / "p", robot_model="pendulum", policy_version="p", algorithm="sac")
    eye = np.eye(4)
    sensor_filter = SensorFilter(A=eye, B=np.zeros((4, 1)), c=np.zeros(4), Q=0.01 * eye, R=0.1 * eye).to_dict()
    return registry.publish(
        (tmp_path / "p" / WEIGHTS_FILE).read_bytes(), policy=exported, **SPEC,
        sensor_offsets={"robot-0": [0.05] * 4}, sensor_filters={"robot-0": sensor_filter}, body_contexts={"robot-0": [0.2] * CONTEXT_DIM},
    )  # fmt: skip


def test_a_robot_pulls_verifies_and_runs_a_release_with_the_heavy_packages_refused(tmp_path):
    from tests.conftest import registry_server

    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    try:
        assert publish_conditioned_release(registry, tmp_path)["version"] == 1
        args = {"url": server.url, "token": token, "root": str(tmp_path / "registry" / "tuf" / "metadata" / "root.json"), "state_dir": str(tmp_path / "robot"), "spec": SPEC}
        got = json.loads(run_light(PULL_AND_ACT, json.dumps(args)).strip().splitlines()[-1])
    finally:
        server.stop()
    assert got["swapped"] and got["version"] == "1" and got["refusals"] == {} and got["filtered"] and got["heavy"] == []
    actions = np.asarray(got["actions"])
    assert actions.shape == (5, 1, 1) and np.isfinite(actions).all() and np.abs(actions).max() <= 1 and np.abs(actions).max() > 0
    assert got["after_restart"] == "1" and got["again"] == got["actions"]  # same release, fresh filter: the same actions


def test_sim_names_still_resolve_lazily():
    import sim

    assert sim.ScenarioSpec.__module__ == "sim.scenario" and sim.VariationProfile.__module__ == "sim.variation"
    assert set(sim.__all__) <= set(dir(sim))
