"""What the apps print when a user's setting or Ctrl-C stops them: one line, no traceback.

    with one_line_errors("flywheel-server", (OSError, ValueError)):
        ...

A listed error becomes ``<app>: <its message>`` and exit status 1 (the messages say what to do); Ctrl-C
becomes ``<app>: interrupted`` plus ``on_interrupt`` (how to go on) and exit status 130, as a shell
reports a SIGINT. Anything else keeps its traceback: that is a bug to report.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from sim.robots.registry import RobotPluginError, UnknownRobotError

ROBOT_ERRORS = (RobotPluginError, UnknownRobotError)  # robot_modules and robot names, in every app that takes them


@contextlib.contextmanager
def one_line_errors(app: str, errors: tuple[type[BaseException], ...] = (), on_interrupt: str = "") -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        print(f"{app}: interrupted{'; ' + on_interrupt if on_interrupt else ''}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (*errors, *ROBOT_ERRORS) as exc:
        raise SystemExit(f"{app}: {exc}") from None


def stop_on_signals() -> None:
    """SIGTERM (how service managers stop a process) and SIGINT both raise ``KeyboardInterrupt``, the app's one way
    to stop cleanly: SIGINT even where the process inherited it ignored (a shell's background job starts so, and
    Python then installs no Ctrl-C handler of its own)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)


def multirun_run_dir_error(run_dir: str) -> str | None:
    """Why a ``--multirun`` job cannot use ``run_dir`` (every job would share one folder), or None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    if hydra.mode == RunMode.MULTIRUN and Path(run_dir).resolve() != Path(hydra.runtime.output_dir).resolve():
        return f"run_dir={run_dir} in a --multirun would give every job the same folder: leave run_dir unset (each job gets <hydra.sweep.dir>/<job number>)"
    return None


def check_run_dir_argument(app: str, argv: list[str]) -> None:
    """A ``run_dir=`` on the command line that cannot be a run folder (a file, not writable) stops ``app`` with one
    line before Hydra starts (Hydra's own mkdir would fail with a traceback)."""
    from fleet.conf import check_run_dir

    for arg in argv:
        if arg.startswith("run_dir="):
            try:
                check_run_dir(Path(arg.removeprefix("run_dir=")))
            except ValueError as exc:
                raise SystemExit(f"{app}: {exc}") from None


def start_app(app: str, cfg) -> None:
    """What the apps with a run folder (`flywheel`, `flywheel-train`) do first: keys no code reads refused, the
    fleet's logs at WARNING, a --multirun's run_dir checked, the user's robot modules imported; faults in one line."""
    from fleet.conf.schema_tools import check
    from sim.robots.registry import use_robot_modules

    check(cfg)
    logging.getLogger("fleet").setLevel(logging.WARNING)
    if error := multirun_run_dir_error(cfg.run_dir):
        raise SystemExit(f"{app}: {error}")
    with one_line_errors(app):
        use_robot_modules(cfg.robot_modules)  # the user's robots, here and in every Ray worker
