"""Hydra's output folders given on the command line: a --multirun run_dir that differs per job is taken (it was refused
as "every job the same folder"), and a refused start leaves no hydra.run.dir or hydra.sweep.dir it made behind
(each held .hydra/ and the log). Each start is refused for its settings (torch_threads=0) before it trains. A
--multirun job whose run_dir resolves to a folder an earlier job took is refused (the jobs run in one process, which
holds the folder's lock: the later one extended the earlier one's run). And flywheel-train's --help lists a
--config-dir's options."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import hydra

from fleet.apps.errors import multirun_run_dir_error

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


def _sweep(monkeypatch, tmp_path: Path, app: str, *overrides: str) -> list[str | None]:
    """A tiny Hydra app swept in this process, as the apps' jobs are: what each job's run_dir check says."""
    said: list[str | None] = []

    @hydra.main(config_path=None, config_name=None, version_base="1.3")
    def job(cfg) -> None:
        said.append(multirun_run_dir_error(app, cfg))

    tmp_path.mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["app", "--multirun", "hydra.sweep.dir=sw", *overrides])
    job()
    return said


def test_multirun_jobs_whose_run_dir_meets_in_one_folder_are_refused(monkeypatch, tmp_path):
    """Both jobs were taken: the second (loop.iterations=4) extended the first's run in runs/pendulum."""
    met = _sweep(monkeypatch, tmp_path, "flywheel", "+model=pendulum", "+iterations=2,4", "+seed=0", "+run_dir=runs/${model}")
    assert met[0] is None
    assert met[1] == (
        "run_dir=runs/${model} gives job 1 of this --multirun the folder runs/pendulum that job 0 took: it would extend or "
        "overwrite that job's run; put a key you sweep in it, e.g. 'run_dir=sweep/s${seed}'"
    )
    assert _sweep(monkeypatch, tmp_path / "again", "flywheel", "+seed=0,1", "+run_dir=runs/s${seed}") == [None, None]


def test_the_multirun_run_dir_hint_names_a_key_the_app_sweeps(monkeypatch, tmp_path):
    """The hint said ${policy.trainer.seed} to flywheel too, which refuses that key (the loop sets it from seed)."""
    fixed = {app: _sweep(monkeypatch, tmp_path / app, app, "+seed=0,1", "+run_dir=runs/fixed")[0] for app in ("flywheel", "flywheel-train")}
    assert fixed["flywheel"].endswith("e.g. 'run_dir=sweep/s${seed}'")
    assert fixed["flywheel-train"].endswith("e.g. 'run_dir=sweep/s${policy.trainer.seed}'")


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
    assert out.stderr == "", out.stderr[-1500:]  # the at-exit folder cleanup once read the output folder no --help job has


def test_a_swept_run_dir_gives_each_job_its_folder_and_a_new_sweep_its_own_claims(monkeypatch, tmp_path):
    """run_dir=runs/a,runs/b (two folders) was refused as "every job the same folder"; and a second sweep in this
    process with the same sweep folder was refused the folders the first one's jobs had taken."""
    assert _sweep(monkeypatch, tmp_path, "flywheel", "+seed=0", "+run_dir=runs/a,runs/b") == [None, None]
    assert _sweep(monkeypatch, tmp_path, "flywheel", "+seed=0,1", "+run_dir=runs/s${seed}") == [None, None]
    assert _sweep(monkeypatch, tmp_path, "flywheel", "+seed=1,0", "+run_dir=runs/s${seed}") == [None, None]  # same sweep folder


def _app(cwd: Path, app: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"fleet.apps.{app}", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_a_refused_server_or_robot_start_leaves_no_log_folder_and_an_accepted_one_keeps_it(tmp_path):
    """flywheel-server and flywheel-robot refused for a setting left runs/fleet/logs/<app>/.../<time>/ with .hydra/ and
    an empty log (the reason only on stderr); flywheel and flywheel-train remove what a refused start made."""
    server = _app(tmp_path, "server", "fleet.server.max_body_bytes=100")
    assert server.returncode == 1 and "flywheel-server: " in server.stderr and "max_body_bytes" in server.stderr, server.stderr[-1500:]
    robot = _app(tmp_path, "robot", "robot.model=nope", "episodes=1")
    assert robot.returncode == 1 and "flywheel-robot: " in robot.stderr and "nope" in robot.stderr, robot.stderr[-1500:]
    assert sorted(tmp_path.rglob("*")) == [], sorted(str(p) for p in tmp_path.rglob("*"))  # runs/ too: this start made it
    with socket.socket() as s:  # an address nothing listens on: the robot runs its episode, then cannot upload it
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    ran = _app(tmp_path, "robot", "robot.model=pendulum", "robot.max_steps=5", "episodes=1", "drain_timeout_s=0", f"fleet.agent.server_url={url}",
               env={**os.environ, "FLYWHEEL_ROBOT_TOKEN": "t"})  # fmt: skip
    assert ran.returncode == 1 and "not uploaded within drain_timeout_s" in ran.stderr, ran.stderr[-1500:]
    (log,) = (tmp_path / "runs" / "fleet" / "logs" / "robot").glob("*/*/robot.log")  # accepted: its record stays
    assert (log.parent / ".hydra" / "config.yaml").is_file()


def test_a_server_started_in_a_folder_it_cannot_write_says_which_setting_moves_its_logs(tmp_path):
    """A service's working directory is / or another read-only folder: the server ended with two Hydra tracebacks
    ("PermissionError raised while resolving interpolation ... hydra.run.dir") and no word of what to set."""
    locked = tmp_path / "ro"
    locked.mkdir()
    (locked / "runs").write_text("a file where the log folders' parent would go")  # unwritable for root too
    server = _app(locked, "server", f"fleet.store.path={tmp_path / 'store'}")
    assert server.returncode == 1, server.stderr[-1500:]
    assert "Traceback" not in server.stderr and "cannot make the folder" in server.stderr and "hydra.run.dir=" in server.stderr, server.stderr[-1500:]


def test_a_site_configs_hydra_run_dir_leaves_no_default_log_folder_in_the_working_directory(tmp_path):
    """OmegaConf resolves the shipped ${new_folder:runs/fleet/logs/server/<time>} it merges the site's value over: an
    empty runs/fleet/logs/server/<time>/ was made in the working directory, at every start."""
    conf, cwd, logs = tmp_path / "conf", tmp_path / "cwd", tmp_path / "logs"
    conf.mkdir(), cwd.mkdir()
    (conf / "site.yaml").write_text(f"defaults:\n  - server\n  - _self_\nfleet:\n  server:\n    max_body_bytes: 100\nhydra:\n  run:\n    dir: {logs}\n")
    server = _app(cwd, "server", "--config-dir", str(conf), "--config-name", "site")
    assert server.returncode == 1 and "max_body_bytes" in server.stderr, server.stderr[-1500:]  # refused: it stops at once
    assert sorted(cwd.rglob("*")) == [], sorted(str(p) for p in cwd.rglob("*"))
