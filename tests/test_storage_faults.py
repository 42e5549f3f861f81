"""Object storage that does not answer, as the apps say it: one line with the cause and what to check, and for the
loop how to resume. Before, `flywheel` ended a run whose S3 endpoint died mid-run in Icechunk's 45-line traceback
(no "rerun with run_dir=..."), and a `flywheel-server` replica started while S3 was down in the registry's S3Error
traceback. A closed loopback port is the storage that does not answer (tests/test_store_s3.py stops a real moto
under an open store)."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fleet.server.auth import add_token

ROOT = Path(__file__).resolve().parents[1]


def _closed_port_env() -> dict[str, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_REGION": "us-east-1"}
    env.pop("AWS_ENDPOINT_URL_S3", None)
    return env


def test_a_server_started_while_the_registrys_object_storage_is_down_says_so_in_one_line(tmp_path):
    tokens = tmp_path / "tokens.json"
    add_token(tokens, "operator")
    started = subprocess.run(
        [sys.executable, "-m", "fleet.apps.server", "fleet.registry.dir=s3://fleet/reg", f"fleet.store.path={tmp_path / 'store'}", "fleet.server.port=0", f"fleet.server.token_file={tokens}"],
        cwd=tmp_path, env=_closed_port_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 1 and "Traceback" not in started.stderr, started.stderr[-3000:]
    (line,) = started.stderr.strip().splitlines()
    assert line.startswith("flywheel-server: S3 GET http://127.0.0.1:") and "Connection refused" in line, line  # the registry's listing
    assert "check AWS_ENDPOINT_URL, the bucket and the credentials" in line, line


# the loop's run, stood in for by Icechunk's error from a commit its S3 store did not answer (what a real one ended in)
STORE_DIED_MID_RUN = textwrap.dedent(
    """
    import sys

    import icechunk

    from fleet.apps.flywheel import main
    from fleet.pipeline.loop import Flywheel
    from fleet.store.backend import answering
    from fleet.store.location import Location

    def run(self):
        with answering(Location.parse("s3://fleet/runs/run8")):
            raise icechunk.IcechunkError("x error getting object from object store dispatch failure\\n  |-> tcp connect error\\n  `-> Connection refused (os error 111)")

    Flywheel.run = run
    sys.argv = ["flywheel", *sys.argv[1:]]
    main()
    """
)


def test_a_run_whose_store_stops_answering_ends_in_one_line_that_says_how_to_resume(tmp_path):
    run_dir = tmp_path / "run"
    ended = subprocess.run(
        [sys.executable, "-c", STORE_DIED_MID_RUN, f"run_dir={run_dir}", "wandb.mode=disabled"],
        cwd=tmp_path, env={**_closed_port_env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ended.returncode == 1 and "Traceback" not in ended.stderr, ended.stderr[-3000:]
    (line,) = [line for line in ended.stderr.splitlines() if line.startswith("flywheel:")]
    assert "the episode store at s3://fleet/runs/run8 did not answer (Connection refused (os error 111)); check the bucket" in line, line
    assert line.endswith(f"; then rerun with run_dir={run_dir} to resume it"), line


# the loop's run, stood in for by a registry error raised in it (sys.argv[1]: which one)
REGISTRY_ERROR_IN_RUN = textwrap.dedent(
    """
    import sys

    from fleet.apps.flywheel import main
    from fleet.pipeline.loop import Flywheel
    from fleet.registry.store import NoCanary, PublishRefused, RegistryOpenError

    ERRORS = {
        "open": RegistryOpenError("the online key 0123 is not the key root v1 names for snapshot and timestamp: start the server with that key"),
        "publish": PublishRefused("weights", "a robot would refuse it: non-finite weights"),
        "canary": NoCanary("no canary to widen"),
    }

    def run(self):
        raise ERRORS[which]

    which = sys.argv.pop(1)
    Flywheel.run = run
    sys.argv = ["flywheel", *sys.argv[1:]]
    main()
    """
)


@pytest.mark.parametrize("which", ["open", "publish", "canary"])
def test_a_registry_that_cannot_be_opened_is_one_line_and_the_loops_own_refused_release_keeps_its_traceback(tmp_path, which):
    """A registry refusing what the loop built (PublishRefused, NoCanary) is the loop's bug: a resume repeats it, so it
    keeps its traceback; a registry that cannot be opened as configured is the operator's to fix, in one line."""
    run_dir = tmp_path / "run"
    ended = subprocess.run(
        [sys.executable, "-c", REGISTRY_ERROR_IN_RUN, which, f"run_dir={run_dir}", "wandb.mode=disabled"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ended.returncode == 1, ended.stderr[-3000:]
    if which == "open":
        assert "Traceback" not in ended.stderr, ended.stderr[-3000:]
        (line,) = [line for line in ended.stderr.splitlines() if line.startswith("flywheel:")]
        assert line == f"flywheel: the online key 0123 is not the key root v1 names for snapshot and timestamp: start the server with that key; then rerun with run_dir={run_dir} to resume it"
    else:
        assert "Traceback" in ended.stderr and "to resume it" not in ended.stderr, ended.stderr[-3000:]
        raised = {"publish": "fleet.registry.store.PublishRefused: weights: a robot would refuse it: non-finite weights", "canary": "fleet.registry.store.NoCanary: no canary to widen"}
        assert raised[which] in ended.stderr.splitlines(), ended.stderr[-3000:]  # Hydra's traceback ends in the error
