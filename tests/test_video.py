"""Evaluation videos: the apps load MuJoCo's offscreen backend, and a process without one goes on without videos.

`make demo` once aborted (SIGABRT) at its second release: an import chain loaded MuJoCo before the app set
MUJOCO_GL, so MuJoCo took GLFW; without a display its first context failed (a warning) and its second
aborted the process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEADLESS = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY", "PYOPENGL_PLATFORM")}


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=HEADLESS)


@pytest.mark.parametrize("app", ["fleet.apps.flywheel", "fleet.apps.train"])
def test_the_rendering_apps_load_mujocos_offscreen_backend_whatever_they_import_first(app):
    result = _python(f"import {app}, mujoco; print(mujoco.GLContext.__module__)")
    assert result.returncode == 0 and result.stdout.split() == ["mujoco.egl"], result.stderr[-2000:]


def test_without_a_usable_backend_the_loop_gets_no_video_and_is_not_aborted():
    code = (
        "import os, mujoco\n"  # GLFW, and no display
        "os.environ['MUJOCO_GL'] = 'egl'\n"  # too late for MuJoCo: what the app once did
        "from fleet.pipeline.video import render_episode\n"
        "from sim.policy_fn import zero_policy\n"
        "from sim.variation import VariationProfile\n"
        "print([render_episode(zero_policy(1), 'pendulum', VariationProfile(), seed=0, max_frames=3) for _ in range(3)])\n"
    )
    result = _python(code)
    assert result.returncode == 0 and result.stdout.split() == ["[None,", "None,", "None]"], (result.returncode, result.stderr[-2000:])
    assert result.stderr.count("evaluation videos are skipped") == 1, result.stderr[-2000:]
