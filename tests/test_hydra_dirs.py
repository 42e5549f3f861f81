"""Hydra's output folders given on the command line: a --multirun run_dir that differs per job is taken (it was refused
as "every job the same folder"), and a refused start leaves no hydra.run.dir or hydra.sweep.dir it made behind
(each held .hydra/ and the log). Each start is refused for its settings (torch_threads=0) before it trains. And
flywheel-train's --help lists a --config-dir's options."""

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


def test_a_hydra_run_dir_that_was_there_before_stays(tmp_path):
    (tmp_path / "kept").mkdir()
    refused = _train(tmp_path, "hydra.run.dir=kept", REFUSED)
    assert refused.returncode == 1 and (tmp_path / "kept").is_dir()


def test_train_help_lists_a_config_dirs_policies_and_says_which_are_the_loops(tmp_path):
    """train.yaml's help listed a fixed set of policies: a --config-dir's own (which run) were missing."""
    (tmp_path / "myconf" / "policy").mkdir(parents=True)
    (tmp_path / "myconf" / "policy" / "my_ppo.yaml").write_text((ROOT / "fleet" / "conf" / "policy" / "ppo.yaml").read_text())
    out = _train(tmp_path, "--config-dir", "myconf", "--help")
    assert out.returncode == 0 and "\npolicy: mbpo, mbpo_fleet, my_ppo, ppo, sac, sac_fleet\nray: local\nwandb: offline\n" in out.stdout, out.stdout[:800]
    assert "for `flywheel` only" in out.stdout
