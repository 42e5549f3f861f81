"""Hydra's output folders given on the command line: a --multirun run_dir that differs per job is taken (it was refused
as "every job the same folder"), and a refused start leaves no hydra.run.dir or hydra.sweep.dir it made behind
(each held .hydra/ and the log). Each start is refused for its settings (torch_threads=0) before it trains."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFUSED = "policy.trainer.torch_threads=0"  # checked after the run folder, before anything trains


def _train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fleet.apps.train", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_multirun_run_dir_per_job_is_taken_and_refused_starts_leave_no_hydra_folders(tmp_path):
    swept = _train(tmp_path, "--multirun", "policy.trainer.seed=0,1", "run_dir=mysweep/s${policy.trainer.seed}", "hydra.sweep.dir=sw/a", REFUSED)
    assert swept.returncode == 1 and "torch_threads=0 (must be >= 1)" in swept.stderr, swept.stderr[-1500:]
    assert "same folder" not in swept.stderr
    single = _train(tmp_path, "hydra.run.dir=hr/x", REFUSED)
    assert single.returncode == 1 and "torch_threads=0" in single.stderr, single.stderr[-1500:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], sorted(str(p) for p in tmp_path.rglob("*"))
    fixed = _train(tmp_path, "--multirun", "policy.trainer.seed=0,1", "run_dir=mysweep/fixed", REFUSED)
    assert fixed.returncode == 1 and "run_dir=mysweep/fixed in a --multirun gives every job the same folder" in fixed.stderr, fixed.stderr[-1500:]
    assert not (tmp_path / "mysweep").exists()


def test_a_hydra_run_dir_of_an_accepted_start_and_one_there_before_stay(tmp_path):
    (tmp_path / "kept").mkdir()
    refused = _train(tmp_path, "hydra.run.dir=kept", REFUSED)
    assert refused.returncode == 1 and (tmp_path / "kept").is_dir()
