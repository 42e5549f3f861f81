"""The TUF client of docs/security.md ("A client of your own"), run as written against a real server:
a third party's robot verifies and downloads a release with python-tuf alone."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tests.conftest import registry_server
from tests.test_registry_tuf import publish

DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"


def test_the_documented_tuf_client_installs_what_the_registry_released(tmp_path):
    section = DOC.read_text().split("## A client of your own", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
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
