"""Run folders: which app's run a folder holds (the file each app writes first, so `flywheel` and `flywheel-train`
never continue, overwrite or mix into the other's run when given its run_dir), the settings a flywheel run started
with (a rerun in its folder must have them), and the run's JSON files read with what to do when one is damaged."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from policies.settings import flat_keys, settings_differ
from sim.durable import write_durably

FLYWHEEL_RUN = "flywheel_run.json"  # the loop's settings (fleet/pipeline/loop.py)
RUN_ID = "run_id.json"  # the loop's run id, made at its first start: its store's and registry's key on object storage (services.run_location)
TRAIN_JOB = "train_job.json"  # flywheel-train's job (fleet/train_job.py): what a rerun must match (workers, bodies, checkpoint storage)
MARKERS = {FLYWHEEL_RUN: "flywheel", RUN_ID: "flywheel", "state.json": "flywheel", TRAIN_JOB: "flywheel-train"}
# a resumed flywheel run may go on longer, with more robots, and read more or less of its store an iteration (a run
# folder of a build before the data windows resumes with them)
RESUMABLE = ("loop.iterations", "loop.num_robots", "loop.real_window_steps", "loop.sim_window_steps")
DERIVED = ("policy.trainer.robot",)  # loop.robot_model's (flywheel.yaml); an earlier build recorded the policy group's placeholder
RUN_SETTINGS = ("seed", "robot_modules", "loop", "policy", "worldmodel", "scenarios")  # what its data, models and learner came from


def other_app_run(run_dir: Path, app: str) -> str | None:
    """Why ``run_dir`` cannot be ``app``'s (it holds another app's run), or None."""
    for name, owner in MARKERS.items():
        if owner != app and (Path(run_dir) / name).exists():
            return f"run_dir {run_dir} is a {owner} run ({name}): set a new run_dir"
    return None


def read_run_file(path: Path) -> dict | None:
    """A run folder's JSON file (None when absent); a ValueError that says what to do when it is damaged."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): restore it from a backup, or set a new run_dir") from None


def flywheel_run_settings(cfg: DictConfig, run_dir: Path) -> dict:
    """The flywheel run's settings (flat keys, but ``RESUMABLE``), for ``FLYWHEEL_RUN``; ValueError (saying what to do)
    for a ``run_dir`` that holds another app's run, or a flywheel run started with other settings. A run's store,
    models and learner come from its settings: resuming it with others would mix two experiments, or fail later."""
    if (other := other_app_run(run_dir, "flywheel")) is not None:
        raise ValueError(other)
    container = OmegaConf.to_container(cfg, resolve=True)
    now = {k: v for k, v in flat_keys({key: container.get(key) for key in RUN_SETTINGS}).items() if k not in RESUMABLE}
    then = read_run_file(run_dir / FLYWHEEL_RUN)
    if then is None:
        _check_unrecorded_run(run_dir, now)
    differ = [] if then is None else settings_differ(now, then, keep=DERIVED)
    if differ:
        shown = ", ".join(f"{k}={then.get(k)!r} (now {now.get(k)!r})" for k in differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise ValueError(f"run_dir {run_dir} holds a run with other settings: {shown}; rerun with its settings to resume it, or set a new run_dir")
    return now


def _check_unrecorded_run(run_dir: Path, now: dict) -> None:
    """A run of a build before ``FLYWHEEL_RUN`` records no settings: what it does record is checked (the robot model of
    its current policy), so that a resume with another robot model is refused before it writes into the run's store."""
    state = read_run_file(run_dir / "state.json")
    export = ((state or {}).get("current") or {}).get("export")
    manifest = read_run_file(run_dir / export / "manifest.json") if export else None  # relative to the run folder, or absolute
    model = (manifest or {}).get("robot_model")
    if model is not None and now.get("loop.robot_model") not in (None, model):
        raise ValueError(
            f"run_dir {run_dir} holds a run of robot model {model!r} (made by an earlier build, which recorded no settings), not "
            f"{now.get('loop.robot_model')!r}: rerun with loop.robot_model={model} to resume it, or set a new run_dir"
        )


def record_run_settings(run_dir: Path, settings: dict) -> None:
    """Write ``FLYWHEEL_RUN`` as a run starts (kept when it is there: the settings of the run's first start)."""
    if not (run_dir / FLYWHEEL_RUN).exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_durably(run_dir / FLYWHEEL_RUN, json.dumps(settings, indent=1, sort_keys=True).encode())


def recorded_run_id(run_dir: Path) -> str | None:
    """The flywheel run's id (``RUN_ID``), or None for a fresh run. A run of a build before ``RUN_ID`` (its settings or
    state recorded, no id) keeps its store and registry on object storage under its folder's name: that is its id."""
    run_dir = Path(run_dir)
    recorded = read_run_file(run_dir / RUN_ID)
    if recorded is not None:
        return recorded["run_id"]
    if (run_dir / FLYWHEEL_RUN).exists() or (run_dir / "state.json").exists():
        return run_dir.name
    return None


def new_run_id(run_dir: Path) -> str:
    """A fresh run's id: its folder's name (legible in a bucket listing) and a random part, so that runs whose folders
    share a name (``runs/exp1`` in two checkouts, the jobs ``0``, ``1``, ... of two sweeps) never share a store."""
    return f"{Path(run_dir).name}-{uuid.uuid4().hex[:8]}"


def record_run_id(run_dir: Path, run_id: str) -> None:
    """Write ``RUN_ID`` (kept when it is there: the id of the run's first start, which a resume finds again)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_ID).exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_durably(run_dir / RUN_ID, json.dumps({"run_id": run_id}).encode())
