"""What the apps print when a user's setting or Ctrl-C stops them: one line, no traceback.

    with one_line_errors("flywheel-server", (OSError, ValueError)):
        ...

A listed error becomes ``<app>: <its message>`` (plus ``on_error``: how to go on once it is fixed) and exit
status 1 (the messages say what to do); Ctrl-C becomes ``<app>: interrupted`` plus ``on_interrupt`` (how to go
on) and exit status 130, as a shell reports a SIGINT. Anything else keeps its traceback: that is a bug to report.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from sim.robots.registry import RobotPluginError, UnknownRobotError

ROBOT_ERRORS = (RobotPluginError, UnknownRobotError)  # robot_modules and robot names, in every app that takes them
STOP_LOG = "fleet.apps.stop"  # the line an app stopped with, for its log file (_note_in_log_file)


@contextlib.contextmanager
def one_line_errors(app: str, errors: tuple[type[BaseException], ...] = (), on_interrupt: str = "", on_error: str = "") -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        line = f"{app}: interrupted{'; ' + on_interrupt if on_interrupt else ''}"
        print(line, file=sys.stderr, flush=True)
        _note_in_log_file(line)
        raise SystemExit(130) from None
    except (*errors, *ROBOT_ERRORS) as exc:
        line = f"{app}: {exc}{'; then ' + on_error if on_error else ''}"
        _note_in_log_file(line)
        raise SystemExit(line) from None


def _note_in_log_file(line: str) -> None:
    """The app's log file says why it stopped too (it went on from its last line to "resuming ..." the next start):
    through ``STOP_LOG``, which the apps' logging config sends to the file alone, the console having the line already."""
    stop_log = logging.getLogger(STOP_LOG)
    if stop_log.handlers:  # configured (fleet/conf/logging.yaml); else the record would reach the console a second time
        stop_log.warning(line)


def stop_on_signals() -> None:
    """SIGTERM (how service managers stop a process), SIGINT and SIGHUP (a closed terminal; a unit's ``ExecReload=kill
    -HUP``: these apps have nothing to reload, and SIGHUP's default killed them on the spot) all raise
    ``KeyboardInterrupt``, the app's one way to stop cleanly: SIGINT even where the process inherited it ignored (a
    shell's background job starts so, and Python then installs no Ctrl-C handler of its own); SIGHUP not where it
    is ignored (``nohup``: the run outlives its terminal)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, interrupt)


SWEPT_KEY = {"flywheel": "seed", "flywheel-train": "policy.trainer.seed"}  # a key each app sweeps, for run_dir's hint


def multirun_run_dir_error(app: str, cfg) -> str | None:
    """Why a ``--multirun`` job of ``app`` cannot use ``cfg.run_dir``, or None. A value with no interpolation gives every
    job the same folder. One that interpolates (``run_dir=sweep/s${seed}``) may differ per job, and is taken, unless it
    resolves to a folder an earlier job of this sweep took: Hydra's default launcher runs the jobs one after another in
    this process, which holds that folder's lock already, so the later job would extend or overwrite the earlier one's
    run. A job that may use it takes it here."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hydra = HydraConfig.get()
    run_dir = Path(cfg.run_dir).resolve()
    if hydra.mode != RunMode.MULTIRUN or run_dir == Path(hydra.runtime.output_dir).resolve():
        return None
    raw = str(OmegaConf.to_container(cfg, resolve=False)["run_dir"])
    hint = f"put a key you sweep in it, e.g. 'run_dir=sweep/s${{{SWEPT_KEY.get(app, 'seed')}}}'"
    if "${" not in raw and not _swept("run_dir", sys.argv[1:]):
        return f"run_dir={raw} in a --multirun gives every job the same folder: leave run_dir unset (each job gets <hydra.sweep.dir>/<job number>), or {hint}"
    sweep, job = Path(hydra.sweep.dir).resolve(), hydra.job.num
    if job == 0:  # a new sweep: another one earlier in this process (a notebook, tests) took its folders for itself
        _SWEEP_TAKEN.clear()
    taken = _SWEEP_TAKEN.get(run_dir)
    if taken is not None and taken[0] == sweep and taken[1] != job:
        return f"run_dir={raw} gives job {job} of this --multirun the folder {cfg.run_dir} that job {taken[1]} took: it would extend or overwrite that job's run; {hint}"
    _SWEEP_TAKEN[run_dir] = (sweep, job)
    return None


def _swept(key: str, argv: list[str]) -> bool:
    """Whether the command line sweeps ``key`` (``run_dir=runs/a,runs/b``, ``range(...)``, ``choice(...)``), as
    Hydra's own override parser reads it: each job then has its own value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for arg in argv:
        if arg.lstrip("+~").partition("=")[0] == key:
            try:
                return OverridesParser.create().parse_overrides([arg])[0].is_sweep_override()
            except Exception:  # noqa: BLE001 - Hydra refuses such an override itself, with its own message
                return False
    return False


def check_run_dir_argument(app: str, argv: list[str]) -> None:
    """A ``run_dir=`` on the command line that cannot be a run folder (a file, not writable) stops ``app`` with one
    line before Hydra starts (Hydra's own mkdir would fail with a traceback). For a folder that holds a run, the
    record Hydra is about to replace (``.hydra/``, the logs) is kept until the app accepts the rerun
    (:func:`accept_run_folder`): a rerun the app refuses leaves the folder as it was. A folder not there yet, and the
    folders above it not there yet, go again if the app refuses the start, as a new ``runs/<time>/`` does."""
    from fleet.conf import check_run_dir

    atexit.register(_discard_empty_sweeps)
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in HYDRA_DIRS and "${" not in value and not Path(value).exists():  # Hydra makes it: it goes as a new run_dir does
            _GIVEN_MADE.append(_discard_if_refused(Path(value)))
        if arg.startswith("run_dir="):
            run_dir = Path(arg.removeprefix("run_dir="))
            try:
                check_run_dir(run_dir)
            except ValueError as exc:
                raise SystemExit(f"{app}: {exc}") from None
            if run_dir.is_dir():
                _RECORD.update(folder=run_dir, files={p: p.read_bytes() for p in _record_files(run_dir)})
                atexit.register(_restore_record)
            else:  # made by this start (Hydra's output folder): it held .hydra/ and the log after a refused start
                _discard_if_refused(run_dir)


def _discard_if_refused(folder: Path) -> Path:
    """``folder`` (not there yet) and the folders above it not there yet go again at exit if the app refuses the
    start; returns the topmost of them, absolute."""
    made = [p.resolve() for p in (folder, *folder.parents) if not p.exists()]
    atexit.register(_discard_unaccepted, made[0], tuple(made[1:]))
    return made[0]


HYDRA_DIRS = ("hydra.run.dir", "hydra.sweep.dir")  # Hydra's output folders, when given on the command line
_GIVEN_MADE: list[Path] = []  # those this start makes (not there before it), absolute
_ACCEPTED: set[Path] = set()  # Hydra's output folders of the starts the app accepted: their record stands
_RECORD: dict = {}  # the run folder's record before Hydra wrote this start's, while the app has not accepted the rerun
_HELD: dict = {}  # run folder -> its lock file, open (and locked) for the process's life
_SWEEP_TAKEN: dict[Path, tuple[Path, int]] = {}  # a --multirun's run folder -> its sweep folder and the number of the job that took it


def _new_job_folder() -> Path | None:
    """Hydra's output folder of this job where this process made it, or the sweep folder it is in (a new run's
    ``runs/<time>`` or a --multirun job's ``runs/<time>/<n>``, or under a ``hydra.run.dir`` or ``hydra.sweep.dir``
    given that was not there before; not a run_dir given); None otherwise."""
    from hydra.core.hydra_config import HydraConfig

    from fleet.conf import folders_made

    out = Path(HydraConfig.get().runtime.output_dir).resolve()
    made = {*folders_made(), *_GIVEN_MADE}
    return out if out in made or out.parent in made else None


def _record_files(run_dir: Path) -> list[Path]:
    return [p for p in (*run_dir.glob(".hydra/*"), *run_dir.glob("*.log")) if p.is_file()]


def _restore_record() -> None:
    if not _RECORD:
        return
    folder, files = _RECORD["folder"], _RECORD["files"]
    for path in _record_files(folder):
        if path not in files:
            path.unlink(missing_ok=True)  # this start's own, from a start that was refused
    for path, data in files.items():
        path.write_bytes(data)
    _RECORD.clear()


def _discard_unaccepted(run_dir: Path, parents: tuple[Path, ...] = ()) -> None:
    """At exit: a run folder this start made and the app refused (a bad setting) goes, if it holds only Hydra's files
    (``.hydra/``, logs, a sweep's ``multirun.yaml``: a ``hydra.sweep.dir`` given, its refused jobs' folders; then :func:`_discard_empty_sweeps`, registered before, takes its --multirun sweep folder if nothing else is left),
    and the ``parents`` made for it (deepest first), if that leaves them empty."""
    if run_dir in _HELD or any(run_dir == out or run_dir in out.parents for out in _ACCEPTED):
        return
    if run_dir.is_dir() and all(".hydra" in p.relative_to(run_dir).parts or p.suffix == ".log" or p.name == "multirun.yaml" for p in run_dir.rglob("*") if not p.is_dir()):
        shutil.rmtree(run_dir, ignore_errors=True)
    for parent in parents:  # also when an earlier discard took run_dir (a hydra.run.dir is this job's folder too)
        with contextlib.suppress(OSError):  # not empty: something else is in it
            parent.rmdir()


def _discard_empty_sweeps() -> None:
    """At exit (the last of these discards): a --multirun sweep folder this process made that holds only Hydra's
    ``multirun.yaml`` goes (Hydra refused every job before the app ran: a misspelt key composes in no job); then the
    folders it made above its run folders (``runs/``), if a refused start left them empty."""
    from fleet.conf import folders_made, parents_made

    discard_stray_folders()
    for made in folders_made():
        if made.is_dir() and [p.name for p in made.iterdir()] == ["multirun.yaml"]:
            shutil.rmtree(made, ignore_errors=True)
    for parent in parents_made():
        with contextlib.suppress(OSError):  # not empty: a run is in it
            parent.rmdir()


def discard_log_folder_if_refused() -> None:
    """What the apps without a run folder (``flywheel-server``, ``flywheel-robot``) do first: the log folder Hydra made
    for this start (``runs/fleet/logs/<app>/.../<time>/``, and the folders made above it) goes at exit unless the app
    accepted the start (:func:`accept_start`), as a refused ``flywheel`` start leaves no ``runs/<time>/`` behind."""
    from fleet.conf import parents_made

    discard_stray_folders()
    if (new := _new_job_folder()) is not None:
        atexit.register(_discard_unaccepted, new, tuple(parents_made()))


def accept_start() -> None:
    """The app's checks passed: this start's record (Hydra's output folder: ``.hydra/``, its log) stands."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        _ACCEPTED.add(Path(HydraConfig.get().runtime.output_dir).resolve())
        discard_stray_folders()


def discard_stray_folders() -> None:
    """Empty folders this process made for a setting's value that the config then replaced, and the empty folders made
    above them: OmegaConf resolves an interpolation it merges a value over, so a site config's ``hydra.run.dir`` still
    made the shipped default's ``runs/fleet/logs/<app>/<time>/`` in the working directory. Hydra's output folder of
    this job, and the folders above it, stay."""
    from hydra.core.hydra_config import HydraConfig

    from fleet.conf import folders_made, parents_made

    from omegaconf import OmegaConf

    output_dir = OmegaConf.select(HydraConfig.get(), "runtime.output_dir", default=None) if HydraConfig.initialized() else None
    if output_dir is None:  # no job ran (--help, --cfg): nothing to tell apart
        return
    out = Path(output_dir).resolve()
    for folder in (*folders_made(), *parents_made()):  # the made folders, then their parents, deepest first
        if folder != out and folder not in out.parents:
            with contextlib.suppress(OSError):  # not empty, or gone
                folder.rmdir()


def accept_run_folder(app: str, run_dir: Path) -> None:
    """The app's checks passed: this start's record (``.hydra/``, its log) stands, and ``run_dir`` is this process's
    until it exits (an exclusive lock on ``run_dir/.lock``): a second process on the same run folder is refused."""
    _RECORD.clear()
    accept_start()  # a hydra.run.dir given apart from run_dir holds this start's record
    run_dir.mkdir(parents=True, exist_ok=True)
    if run_dir.resolve() in _HELD:  # this process's already (an app run twice in one process; a --multirun's jobs may not share one: multirun_run_dir_error)
        return
    lock = open(run_dir / ".lock", "a+")  # noqa: SIM115  (held open until the process exits)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise SystemExit(f"{app}: run_dir {run_dir} is in use by another process{f' (pid {holder})' if holder else ''}: wait for it to end, or set another run_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _HELD[run_dir.resolve()] = lock


def start_app(app: str, cfg, *, uses_ray: bool = True) -> None:
    """What the apps with a run folder (`flywheel`, `flywheel-train`) do first: keys no code reads refused, the
    fleet's logs at WARNING, a --multirun's run_dir and hydra.job.chdir checked, SIGTERM handled as Ctrl-C, the user's
    robot modules imported; faults in one line."""
    from hydra.core.hydra_config import HydraConfig

    from fleet.conf.schema_tools import check
    from fleet.pipeline.ray_start import RayJoinError, check_ray_settings
    from fleet.tracking import TrackerError, check_mode
    from sim.robots.registry import use_robot_modules

    if (new := _new_job_folder()) is not None:  # a new run's folder: a start refused below leaves no empty runs/<time>/ behind
        atexit.register(_discard_unaccepted, new)
    check(cfg, app)
    logging.getLogger("fleet").setLevel(logging.WARNING)
    if error := multirun_run_dir_error(app, cfg):
        raise SystemExit(f"{app}: {error}")
    if HydraConfig.get().job.chdir:
        raise SystemExit(f"{app}: hydra.job.chdir=true is not supported: the apps read and write paths (run_dir, the store, keys) from where they are started; leave it false")
    stop_on_signals()  # SIGTERM (timeout, Slurm, Kubernetes) stops a run as Ctrl-C does: cleanly, saying how to go on
    with one_line_errors(app, (RayJoinError, TrackerError)):  # W&B's and Ray's settings, before Ray, the server or a run start
        check_mode(cfg.wandb.mode)
        if uses_ray:
            check_ray_settings(cfg.ray)
    with one_line_errors(app):
        use_robot_modules(cfg.robot_modules)  # the user's robots, here and in every Ray worker

