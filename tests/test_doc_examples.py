"""Code the docs show, run as written: the TUF client of docs/security.md ("A client of your own") against a
real server, and a learner driven on a gymnasium env (docs/policies.md, "Your own environment")."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tests.conftest import registry_server
from tests.test_registry_tuf import publish

DOCS = Path(__file__).resolve().parents[1] / "docs"
DOC = DOCS / "security.md"


def snippet(doc: Path, section: str) -> str:
    return re.search(r"```python\n(.*?)```", doc.read_text().split(section, 1)[1], re.S).group(1)


def test_the_documented_tuf_client_installs_what_the_registry_released(tmp_path):
    code = snippet(DOC, "## A client of your own")
    registry, token, server = registry_server(tmp_path, "robot", "robot-0")
    state = tmp_path / "third-party"
    (state / "metadata").mkdir(parents=True)
    (state / "targets").mkdir()
    try:
        version = publish(registry, tmp_path, "v1")
        scope = {"server": server.url, "token": token, "root_json": (registry.root / "tuf/metadata/root.json").read_bytes(), "state": state}
        exec(compile(code, str(DOC), "exec"), scope)  # noqa: S102 - the project's own documentation
        assert scope["version"] == version and scope["manifest"]["robot_model"] == "pendulum"
        assert hashlib.sha256(Path(scope["weights_path"]).read_bytes()).hexdigest() == scope["manifest"]["weights"]["sha256"]
    finally:
        server.stop()


def test_a_learner_driven_on_a_gymnasium_env_as_documented_learns_in_its_bounds():
    import numpy as np

    import torch

    scope = {"steps": 400}
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default on 2 cores: the snippet sets its own, as Trainer does (torch_threads)
    try:
        exec(compile(snippet(DOCS / "policies.md", "## Your own environment"), "policies.md", "exec"), scope)  # noqa: S102
        assert torch.get_num_threads() == 1  # without it, gradient steps ran ~70x slower on a busy machine
    finally:
        torch.set_num_threads(before)
    sac, metrics = scope["sac"], scope["metrics"]
    assert sac.env_steps == 400 and metrics["train/gradient_steps"] == 200  # updates from learning_starts on
    assert all(np.isfinite(v) for v in metrics.values())
    acted = sac.explore(np.zeros((5, 3), np.float64))  # a float64 env's observations are taken as float32
    assert acted.shape == (5, 1) and np.abs(acted).max() <= 1
