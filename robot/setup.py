"""flywheel-robot-agent's build steps (robot/pyproject.toml holds the package itself).

The sources are the repository's, one folder up (``package-dir``), so setuptools' default build
folders would be robot/build/ and robot/*.egg-info/ in the checkout, and its wheel packs whatever
robot/build/lib holds: a module an earlier build left there (one since dropped from ``py-modules``,
``import torch`` and all) went into the next wheel. Here both live in a temporary folder of this
build's own, removed when it ends: the wheel holds what this build wrote and nothing else, and the
checkout stays as it was (tests/test_robot_package.py builds from a copy with a stale robot/build/).
"""

import atexit
import shutil
import tempfile

from setuptools import setup
from setuptools.command.build import build
from setuptools.command.egg_info import egg_info

_scratch: str | None = None


def scratch() -> str:
    """This build's temporary folder, made on first use (a metadata-only hook makes none)."""
    global _scratch
    if _scratch is None:
        _scratch = tempfile.mkdtemp(prefix="flywheel-robot-agent-build-")
        atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
    return _scratch


class FreshBuild(build):
    def initialize_options(self):
        super().initialize_options()
        self.build_base = f"{scratch()}/build"  # build/lib, and bdist_wheel's build/bdist.*


class ScratchEggInfo(egg_info):
    def initialize_options(self):
        super().initialize_options()
        self.egg_base = scratch()  # not robot/, nor the repository root beside the sources, where Python would take it for an installed package


setup(cmdclass={"build": FreshBuild, "egg_info": ScratchEggInfo})
