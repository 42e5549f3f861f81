"""MuJoCo's GL backend for the apps that render evaluation videos (`flywheel`, `flywheel-train`): offscreen EGL
unless MUJOCO_GL says otherwise. MuJoCo picks its backend when it is first imported, so this module is the
first of the project's that those apps import; set after anything has imported MuJoCo it is ignored, and
MuJoCo's default (GLFW) aborts the process on its second try without a display (fleet/pipeline/video.py)."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
