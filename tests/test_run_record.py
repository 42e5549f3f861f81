"""What a W&B run records about how it ended and which code made it, read back from real offline run files (what
W&B shows after `wandb sync`): an interrupted or failed run was recorded as finished (exit 0), and a run started
outside the git checkout recorded no code version at all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.code_version import code_version, source_commit
from fleet.tracking import exit_status
from fleet.wandb_offline import offline_run

ROOT = Path(__file__).resolve().parents[1]


def _stopped(exc: BaseException, context: BaseException | None = None) -> BaseException:
    exc.__context__ = context
    return exc


@pytest.mark.parametrize(
    "exc, status",
    [
        (None, (0, None)),
        (KeyboardInterrupt("SIGTERM"), (130, "interrupted (SIGTERM)")),  # stop_on_signals names the signal
        (KeyboardInterrupt(), (130, "interrupted (SIGINT)")),  # Python's own Ctrl-C handler
        (_stopped(SystemExit(130), KeyboardInterrupt("SIGINT")), (130, "interrupted (SIGINT)")),  # one_line_errors' exit after Ctrl-C
        (SystemExit("flywheel-train: a damaged checkpoint\nmore"), (1, "flywheel-train: a damaged checkpoint")),  # a one-line error
        (SystemExit(0), (0, None)),
        (ValueError("bad value\ntraceback lines"), (1, "ValueError: bad value")),  # a bug: its first line
    ],
)
def test_the_exit_status_is_what_the_process_exits_with(exc, status):
    assert exit_status(exc) == status


LOOP_STOPPED = """
import sys
from pathlib import Path
from fleet.pipeline.services import Services
from fleet.tracking import Tracker

run = Path(sys.argv[1])
svc = Services.__new__(Services)  # only what __exit__ touches: the tracker (a real offline W&B run), the server, Ray
svc.tracker, svc._robot_group, svc._started_ray = Tracker(run, mode="offline", job_type="loop"), None, False
svc.server = type("Server", (), {"stop": lambda self: None})()
svc.tracker.log({"fleet/return_mean": 1.0}, 0)
try:
    with svc:
        raise KeyboardInterrupt("SIGTERM")  # stop_on_signals' SIGTERM, mid-iteration
except KeyboardInterrupt:
    pass
"""


def test_a_stopped_loop_is_recorded_as_stopped_not_finished(tmp_path):
    """The loop's W&B run ends in Services.__exit__, before the app turns the interrupt into exit 130: it said 0."""
    done = subprocess.run([sys.executable, "-c", LOOP_STOPPED, str(tmp_path / "run")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    wandb = offline_run(tmp_path / "run" / "wandb")
    assert wandb["exit_code"] == 130 and wandb["summary"]["stopped"] == "interrupted (SIGTERM)", wandb["summary"]


def test_the_code_version_is_the_packages_own_checkout_wherever_the_app_starts(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert code_version()["git_commit"].removesuffix("+dirty") == head and code_version()["package"]
    assert source_commit(short=True).removesuffix("+dirty") == head[: len(source_commit(short=True).removesuffix("+dirty"))]
    ask = "import sys; sys.path.insert(0, sys.argv[1]); import code_version; print(code_version.source_commit())"
    outside = tmp_path / "installed"  # a copy outside any git checkout, as an installed wheel is
    outside.mkdir()
    for name in ("code_version.py", "__init__.py"):
        shutil.copy(ROOT / "fleet" / name, outside / name)
    assert subprocess.run([sys.executable, "-c", ask, str(outside)], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "None"
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)  # an untracked copy inside a repository (a venv in a checkout) is not its code
    assert subprocess.run([sys.executable, "-c", ask, str(outside)], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "None"
