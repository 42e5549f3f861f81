"""Which app's run a run folder holds: the file each app writes first (so `flywheel` and `flywheel-train` never
continue, overwrite or mix into the other's run when given its run_dir)."""

from __future__ import annotations

from pathlib import Path

FLYWHEEL_RUN = "flywheel_run.json"  # the loop's settings (fleet/pipeline/loop.py)
TRAIN_JOB = "train_job.json"  # flywheel-train's job (fleet/train_job.py)
MARKERS = {FLYWHEEL_RUN: "flywheel", "state.json": "flywheel", TRAIN_JOB: "flywheel-train"}


def other_app_run(run_dir: Path, app: str) -> str | None:
    """Why ``run_dir`` cannot be ``app``'s (it holds another app's run), or None."""
    for name, owner in MARKERS.items():
        if owner != app and (Path(run_dir) / name).exists():
            return f"run_dir {run_dir} is a {owner} run ({name}): set a new run_dir"
    return None
