"""One small logging interface: a local JSONL log always, W&B (offline by default) as a mirror.

Metric keys are namespaced (``fleet/return/robot-0``, ``policy/actor_loss`` ...); every key is
documented in docs/metrics.md. Nothing here is needed to read the results: ``metrics.jsonl``
and ``report.png`` in the run folder hold them for users without W&B.

W&B axes: every row carries the tracker's ``step_metric`` (the JSONL ``step``): ``iteration`` in the
loop, ``policy/env_steps`` in `flywheel-train`. W&B's own step just counts rows, so the learner's many
log lines per iteration stay separate points. ``policy/*`` plots against ``policy/env_steps`` (the
learner's steps over all iterations), every other namespace against the step metric (``define_metric``).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from sim.durable import write_durably

log = logging.getLogger(__name__)
ITERATION, POLICY_STEPS = "iteration", "policy/env_steps"
ITERATION_NAMESPACES = ("fleet", "data", "scenarios", "worldmodel", "calibration", "gate", "rollout", "canary", "eval")


def run_files_line(mode: str, wandb_dir: str | None) -> str | None:
    """What an app prints at its end about the W&B run (None for ``disabled``)."""
    if mode == "offline":
        return f"W&B offline run: {wandb_dir}  (`wandb sync` it to upload)"
    if mode == "online":
        return f"W&B run files: {wandb_dir}  (synced as the run went)"
    return None


class TrackerError(RuntimeError):
    """W&B could not start the run (the message says what to do)."""


WANDB_MODES = ("offline", "online", "disabled")


def check_mode(mode: str) -> None:
    if mode not in WANDB_MODES:
        raise TrackerError(f"wandb.mode must be offline, online or disabled, got {mode!r}")


def run_names(run_dir: Path, name: str | None = None) -> tuple[str, str]:
    """(W&B run name, group) of a run folder: a --multirun job is ``<sweep>/<job>`` in group ``<sweep>`` (jobs were
    all named "0", "1", ... across sweeps); a run's later starts (a resume, a continued training) are
    ``<name>-resumed-<n>`` in the first start's group, so W&B shows them together and apart from other runs."""
    run_dir = Path(run_dir)
    sweep = (run_dir.parent / "multirun.yaml").exists()
    base = name or (f"{run_dir.parent.name}/{run_dir.name}" if sweep else run_dir.name)
    group = run_dir.parent.name if sweep else base
    earlier = len(list((run_dir / "wandb").glob("*run-*"))) if (run_dir / "wandb").is_dir() else 0
    return (f"{base}-resumed-{earlier}" if earlier else base), group


def recorded_config(cfg, run_dir: Path) -> dict:
    """The app's config as W&B records it: resolved, ``run_dir`` absolute (a relative one means nothing once synced),
    and ``code``, the code that ran (:func:`fleet.code_version.code_version`: W&B's own git lookup sees only the cwd)."""
    from omegaconf import OmegaConf

    from fleet.code_version import code_version

    return {**OmegaConf.to_container(cfg, resolve=True), "run_dir": str(Path(run_dir).resolve()), "code": code_version()}


INTERRUPTED = 130  # the apps' exit status after Ctrl-C or SIGTERM (fleet/apps/errors.py: both raise KeyboardInterrupt)


def exit_status(exc: BaseException | None) -> tuple[int, str | None]:
    """(the exit status the app's process ends with after ``exc``, one line on why it stopped) for the W&B run, which
    otherwise recorded every run as finished (0): None, a finished run, is ``(0, None)``. A KeyboardInterrupt (or the
    SystemExit(130) an app turns it into) is 130 ``interrupted (SIGINT|SIGTERM)``; a SystemExit its own code and
    message; any other exception 1 and its first line."""
    if exc is None:
        return 0, None
    if isinstance(exc, SystemExit) and isinstance(exc.__context__, KeyboardInterrupt):
        exc = exc.__context__  # one_line_errors: the interrupt, said once on the console, then exit 130
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED, f"interrupted ({exc.args[0] if exc.args else 'SIGINT'})"  # stop_on_signals names the signal
    if isinstance(exc, SystemExit):
        return _system_exit_status(exc.code)
    return 1, f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def _system_exit_status(code) -> tuple[int, str | None]:
    """What Python exits with on ``SystemExit(code)``: None is 0, an int itself, anything else (an app's one-line
    error, which Python prints) 1."""
    if code is None or code == 0:
        return 0, None
    if isinstance(code, int):
        return code, f"exit status {code}"
    return 1, str(code).splitlines()[0]


class Tracker:
    def __init__(
        self, run_dir: Path, *, mode: str = "offline", project: str = "flywheel", entity: str | None = None, config: dict | None = None,
        name: str | None = None, step_metric: str = ITERATION, redo_from: int | None = None, job_type: str | None = None,
    ):  # fmt: skip
        """``step_metric``: what :meth:`log`'s ``step`` is, the x axis of every namespace (the loop's iteration;
        `flywheel-train`'s learner steps). ``redo_from``: a resumed run redoes the steps from this one, so the rows
        ``metrics.jsonl`` holds for them (an interrupted attempt's) are dropped first: each step is logged once."""
        check_mode(mode)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if redo_from is not None:
            _drop_rows_from(self.run_dir / "metrics.jsonl", redo_from)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self.wandb_run, self.step_metric = None, step_metric
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_DIR", str(self.run_dir))
            run_name, group = run_names(self.run_dir, name)
            try:
                self.wandb_run = wandb.init(
                    mode=mode, project=project, entity=entity, dir=str(self.run_dir), config=config or {}, name=run_name, group=group,
                    job_type=job_type, reinit="finish_previous",
                )  # fmt: skip
            except wandb.errors.Error as exc:  # online without a key, or W&B unreachable: what to do, not a traceback
                self._jsonl.close()
                raise TrackerError(
                    f"wandb.mode={mode}: W&B refused to start ({str(exc).splitlines()[0]}); log in (`wandb login`, or WANDB_API_KEY), "
                    "or run with wandb.mode=offline and `wandb sync` the run folder later"
                ) from None
            self.online = mode == "online"
            self.wandb_run.define_metric(step_metric)
            self.wandb_run.define_metric(POLICY_STEPS)
            self.wandb_run.define_metric("policy/*", step_metric=POLICY_STEPS)
            for namespace in ITERATION_NAMESPACES:
                self.wandb_run.define_metric(f"{namespace}/*", step_metric=step_metric)

    @property
    def wandb_dir(self) -> str | None:
        return None if self.wandb_run is None else str(Path(self.wandb_run.dir).parent)

    def log(self, metrics: dict[str, float], step: int, *, replace: bool = False) -> None:
        """``replace``: rows ``metrics.jsonl`` holds at ``step`` with none but these keys go first (an evaluation of the
        same checkpoint again, as a rerun that only re-evaluates makes: one row, not a second at the same step)."""
        if replace:
            self._jsonl.close()
            _drop_rows(self.run_dir / "metrics.jsonl", lambda row: row.get("step") == step and set(row) <= {"step", *metrics}, f"at step {step} (logged again now)")
            self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}  # JSON has no NaN
        self._jsonl.write(json.dumps({"step": step, **clean}, sort_keys=True) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({**metrics, self.step_metric: step})

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        with open(self.run_dir / f"{key.replace('/', '_')}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "columns": columns, "rows": rows}) + "\n")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows), self.step_metric: step})

    def video(self, key: str, frames, fps: int, step: int) -> None:
        """frames: (T, H, W, 3) uint8; written as mp4 to the run folder and to W&B."""
        import imageio.v3 as iio

        path = self.run_dir / "videos" / f"{key.replace('/', '_')}_{step}.mp4"
        path.parent.mkdir(exist_ok=True)
        try:
            iio.imwrite(path, frames, fps=fps)
        except OSError as exc:  # no mp4 writer: a missing video must not stop the loop
            log.warning("video %s not written (%s); install imageio-ffmpeg", key, str(exc).splitlines()[0])
            return
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Video(str(path), format="mp4"), self.step_metric: step})

    def learner_log(self, env_steps_before: int = 0, step: int | None = None):
        """A learner's ``log(metrics, env_steps)`` (policies.trainer.LogFn) into ``policy/*``, plotted against
        ``policy/env_steps``: its steps plus ``env_steps_before``; logged at ``step`` (default: the learner's steps)."""

        def log(metrics: dict, env_steps: int) -> None:
            steps = env_steps_before + env_steps
            self.log({f"policy/{key.split('/', 1)[-1]}": v for key, v in metrics.items()} | {POLICY_STEPS: steps}, steps if step is None else step)

        return log

    def config_update(self, values: dict) -> None:
        """Record settings as the run actually used them (after the loop's own overrides)."""
        if self.wandb_run is not None:
            self.wandb_run.config.update(values, allow_val_change=True)

    def artifact(self, name: str, kind: str, files: list[Path], metadata: dict, aliases: tuple[str, ...] = (), uses: tuple[str, ...] = ()) -> None:
        """Mirror files to W&B as an Artifact (our own registry/store stays the source of truth).

        ``uses``: the artifacts ("name:alias") it was made from. They are always recorded in its
        metadata (``lineage``); online they are also declared with ``use_artifact``, so W&B draws
        the graph (W&B 0.31 refuses ``use_artifact`` offline; a synced offline run keeps the metadata).
        """
        if self.wandb_run is None:
            return
        import wandb

        art = wandb.Artifact(name=name, type=kind, metadata={**metadata, "lineage": list(uses)} if uses else metadata)
        for path in files:
            art.add_file(str(path))
        if self.online:
            for ref in uses:
                self.wandb_run.use_artifact(ref)
        self.wandb_run.log_artifact(art, aliases=list(aliases) or None)

    def finish(self, exit_code: int = 0, stopped: str | None = None) -> None:
        """End the run with the app's ``exit_code`` (W&B shows a non-zero one as failed, not finished) and, for a
        run that did not end by itself, the one line why in its summary (``stopped``); :func:`exit_status` gives both."""
        self._jsonl.close()
        if self.wandb_run is not None:
            if stopped is not None:
                self.wandb_run.summary["stopped"] = stopped
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None


def _drop_rows_from(path: Path, step: int) -> None:
    """Rewrite the JSONL log ``path`` without its rows at ``step`` or later."""
    _drop_rows(path, lambda row: row.get("step", -1) >= step, f"of steps >= {step} (an interrupted attempt's; redone now)")


def _drop_rows(path: Path, drop, why: str) -> None:
    """Rewrite the JSONL log ``path`` without the rows ``drop(row)`` is true of (durably: whole or as it was)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and not drop(json.loads(line))]
    if len(kept) < len(lines):
        write_durably(path, "".join(f"{line}\n" for line in kept).encode())
        log.info("metrics.jsonl: dropped %d rows %s", len(lines) - len(kept), why)
