"""`flywheel`: the Hydra app of the flywheel loop (local Ray, local server, simulated fleet, W&B offline).

`flywheel export ...` and `flywheel import ...` go to the interop CLI (fleet/interop/cli.py,
docs/interop.md), `flywheel store ...` to the store's (fleet/store/cli.py, docs/store.md), before Hydra sees the
command line."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.console import Console

import fleet.apps.gl_backend  # noqa: F401  (first of the project's modules: MUJOCO_GL before anything imports mujoco)
from fleet.apps.config_path import CONF_DIR
from fleet.apps.errors import accept_run_folder, check_run_dir_argument, one_line_errors, start_app


INTEROP_COMMANDS = ("export", "import")
STORE_COMMAND = "store"  # `flywheel store maintain|pin|pins ...` (fleet/store/cli.py)


def main() -> None:
    """`flywheel export|import ...`: the interop CLI; anything else: the Hydra app."""
    if len(sys.argv) > 1 and sys.argv[1] in INTEROP_COMMANDS:
        from fleet.interop.cli import main as interop_main
        from fleet.json_command import exit_process

        exit_process(interop_main(sys.argv[1:]))
    if len(sys.argv) > 1 and sys.argv[1] == STORE_COMMAND:
        from fleet.json_command import exit_process
        from fleet.store.cli import main as store_main

        exit_process(store_main(sys.argv[2:]))
    import fleet.conf.schema_flywheel  # noqa: F401  (registers the config's schema, which flywheel.yaml names)

    check_run_dir_argument("flywheel", sys.argv[1:])
    run_flywheel()


@hydra.main(config_path=CONF_DIR, config_name="flywheel", version_base="1.3")
def run_flywheel(cfg: DictConfig) -> None:
    from fleet.pipeline.loop import Flywheel
    from fleet.pipeline.ray_start import RayJoinError
    from fleet.pipeline.report import summary_table
    from fleet.registry.s3 import S3Error
    from fleet.registry.store import RegistryOpenError
    from fleet.store.backend import StoreCorruptionError, StoreUnreachableError, UnknownSnapshotError
    from fleet.tracking import TrackerError, run_files_line

    start_app("flywheel", cfg)
    console = Console()
    with one_line_errors("flywheel", (ValueError,)):  # the settings (and the robot), checked before anything runs: what is wrong, no traceback
        flywheel = Flywheel(cfg, Path(cfg.run_dir))
    if reason := flywheel.nothing_to_do():  # a finished run: said, and left as it was (its record, summary.json, W&B runs)
        console.print(f"flywheel: {reason}", soft_wrap=True)
        return
    accept_run_folder("flywheel", Path(cfg.run_dir))
    resume = f"rerun with run_dir={cfg.run_dir} to resume it"
    # what the operator fixes; a registry refusing the loop's own release (PublishRefused, NoCanary) is a bug: its traceback
    faults = (RayJoinError, StoreCorruptionError, StoreUnreachableError, UnknownSnapshotError, S3Error, RegistryOpenError, TrackerError)
    with one_line_errors("flywheel", faults, on_interrupt=resume, on_error=resume):
        summary = flywheel.run()  # the cluster, the store, the registry or W&B fail (at the start, or storage mid-run): what to check, then how to resume
    console.print(summary_table([*summary["iterations"], summary["final"]], flywheel.specs))
    console.print(f"run folder: {cfg.run_dir}  (metrics.jsonl, report.png, summary.json)")
    if line := run_files_line(cfg.wandb.mode, summary["wandb_dir"]):
        console.print(line)


if __name__ == "__main__":
    main()
