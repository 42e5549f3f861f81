"""The light robot package, flywheel-robot-agent (robot/pyproject.toml): its wheel, built offline from
this repository's sources, holds the robot modules and nothing of the training side, depends on the
light list alone (robot-flywheel's `robot` extra is the same list), and runs from the unpacked wheel
alone, with the heavy packages refused."""

import email.parser
import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.test_robot_imports import REPO, robot_modules, robot_package, run_light

LIGHT = {"numpy", "httpx", "safetensors", "cryptography", "zstandard", "tuf", "securesystemslib"}


STALE = {"policies/sac.py": "import torch\n", "worldmodel/__init__.py": "import torch\n"}  # what an earlier build may have left in robot/build/lib


def checkout_with_a_stale_build(root: Path) -> Path:
    """A copy of the files the wheel is built from (robot/ and the robot modules), its robot/build/lib holding
    training modules an earlier build left there (setuptools packed them into the next wheel): its robot/ folder."""
    shutil.copytree(REPO / "robot", root / "robot", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    for name in expected_files():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, root / name)
    for name, text in STALE.items():
        (root / "robot" / "build" / "lib" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "robot" / "build" / "lib" / name).write_text(text)
    return root / "robot"


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built with this environment's setuptools and nothing from the network, from a copy of the checkout
    with a stale robot/build/ (the checkout itself is not written to)."""
    robot = checkout_with_a_stale_build(tmp_path_factory.mktemp("checkout"))
    before = tree(robot)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check", "-q", "-w", str(out), str(robot)]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    assert tree(robot) == before  # no robot/build/lib of its own, no egg-info: the build leaves the checkout as it was
    (path,) = out.glob("flywheel_robot_agent-*.whl")
    return path


def expected_files() -> set[str]:
    """The robot modules' files and their packages' __init__.py files."""
    files = set()
    for module in robot_modules():
        parts = module.split(".")
        files.add("/".join(parts) + ("/__init__.py" if (REPO / Path(*parts)).is_dir() else ".py"))
        files.update("/".join(parts[:i]) + "/__init__.py" for i in range(1, len(parts)))
    return files


def test_the_wheel_holds_the_robot_modules_and_no_training_code(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n for n in names if not n.startswith("flywheel_robot_agent-")} == expected_files()  # not what robot/build/lib held (STALE)
    assert {"sim/episode.py", "fleet/agent/uploader.py", "fleet/registry/pull.py", "policies/runtime.py"} <= set(names)
    training = ("policies/sac.py", "policies/trainer.py", "worldmodel/", "fleet/server/", "fleet/pipeline/", "fleet/store/", "sim/batched.py", "sim/variation.py")
    assert not [n for n in names if n.startswith(training)]


def test_the_wheel_depends_on_the_light_list_which_is_the_robot_extra(wheel):
    with zipfile.ZipFile(wheel) as z:
        metadata = email.parser.Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    core = {str(r) for r in requires if r.marker is None}
    assert {Requirement(r).name for r in core} == LIGHT
    assert core == {str(Requirement(r)) for r in robot_package()["project"]["dependencies"]}
    main = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert main["optional-dependencies"]["robot"] == robot_package()["project"]["dependencies"]  # one list: robot/pyproject.toml's
    assert metadata["Version"] == main["version"]
    ros2 = [r for r in requires if r.marker is not None]
    assert [r.name for r in ros2] == ["rosbags", "mcap"] and all(str(r.marker) == 'extra == "ros2"' for r in ros2)  # mcap: a bag's stored order
    assert set(robot_package()["project"]["optional-dependencies"]["ros2"]) <= set(main["optional-dependencies"]["interop"])


FROM_THE_WHEEL_ALONE = """
import importlib, json
root, site_packages, modules = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path[:0] = [root, site_packages]  # python -S: no .pth files, so not the checkout's editable install
for module in modules:
    importlib.import_module(module)
ours = {m.__name__: m.__file__ for m in list(sys.modules.values()) if m.__name__.split(".")[0] in ("fleet", "sim", "policies")}
assert all(f.startswith(root) for f in ours.values()), ours
import fleet.agent
assert fleet.agent.run_episode.__module__ == fleet.agent.Robot.__module__ == "fleet.agent.loop"  # a robot's own loop (docs/protocol.md)
try:
    fleet.agent.SimRobot
    raise SystemExit("fleet.agent.SimRobot resolved, but its module is not in the wheel")
except ModuleNotFoundError as exc:
    assert "install robot-flywheel" in str(exc), exc
print(json.dumps(sorted(ours)))
"""


def test_the_wheel_runs_alone_with_the_heavy_packages_refused(wheel, tmp_path):
    root = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(root)
    out = run_light(FROM_THE_WHEEL_ALONE, str(root), sysconfig.get_paths()["purelib"], json.dumps(robot_modules()), cwd=tmp_path, python=("-S",))
    assert set(robot_modules()) <= set(json.loads(out.strip().splitlines()[-1]))
