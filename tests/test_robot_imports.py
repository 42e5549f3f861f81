"""The robot side imports light: the Episode record and the agent's spool, recorder and uploader load
numpy, httpx and zstandard, never MuJoCo, torch, Ray, gymnasium, the store or the server."""

import json
import subprocess
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])
HEAVY = ["mujoco", "torch", "ray", "gymnasium", "zarr", "icechunk", "wandb", "fastapi", "starlette", "uvicorn", "hydra"]
ROBOT_MODULES = ["sim.episode", "fleet.agent.config", "fleet.agent.spool", "fleet.agent.recorder", "fleet.agent.uploader"]

PROBE = """
import importlib, json, sys
for module in ROBOT_MODULES:
    importlib.import_module(module)
import numpy as np
import sim
from fleet.agent.recorder import EpisodeRecorder
from sim.episode import Episode
rec = EpisodeRecorder(robot_id="r", robot_model="arm", source="real")
rec.reset(np.zeros(3), 0.0)
rec.step(np.zeros(2), 1.0, np.ones(3), True, False, 0.1)
ep = rec.finish()
assert Episode.from_bytes(ep.to_bytes()).equals(ep) and sim.Episode is Episode
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)))
"""


def test_robot_modules_import_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", f"HEAVY, ROBOT_MODULES = {HEAVY!r}, {ROBOT_MODULES!r}\n{PROBE}"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_sim_names_still_resolve_lazily():
    import sim

    assert sim.ScenarioSpec.__module__ == "sim.scenario" and sim.VariationProfile.__module__ == "sim.variation"
    assert set(sim.__all__) <= set(dir(sim))
