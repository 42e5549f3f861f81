"""Shared benchmark helpers: JSON-line output and medians of repeats."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def emit(metric: str, value: float, unit: str, baseline: float | None = None, ratio: float | None = None) -> None:
    """Print one benchmark result as a JSON line."""
    finite = value is not None and math.isfinite(value)  # JSON has no NaN: an unmeasured value is null
    print(json.dumps({"metric": metric, "value": round(value, 6) if finite else None, "unit": unit, "baseline": baseline, "ratio": ratio}), flush=True)


def quiet_sb3(model: Any) -> Any:
    """``model`` (a Stable-Baselines3 algorithm) with a logger that writes nothing: SB3's default logger makes an
    empty ``$TMPDIR/SB3-<date>`` folder on every ``learn()`` (``tensorboard_log=None`` still names one), which the
    benchmarks never read and left behind by the dozen. Returns ``model``."""
    from stable_baselines3.common.logger import Logger

    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def median_rate(work: Callable[[], float], repeats: int = 3) -> float:
    """Median over ``repeats`` of (units of work done) / (seconds); ``work`` returns its unit count."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        units = work()
        rates.append(units / (time.perf_counter() - start))
    return statistics.median(rates)


def interleaved_rates(works: dict[str, Callable[[], float]], repeats: int = 5) -> dict[str, float]:
    """Median rate of each of ``works`` (as :func:`median_rate`), their runs taken in turn (a, b, a, b, ...) after one
    untimed run of each: on a VM whose speed drifts by 10-30 % within a minute, a ratio of two rates measured one
    after the other reads the drift; taken in turn, both see it alike."""
    for work in works.values():
        work()
    rates: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            start = time.perf_counter()
            units = work()
            rates[name].append(units / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def current_build() -> str:
    """This checkout's commit (short), ``+dirty`` with uncommitted changes to tracked files; ``unknown`` outside git
    (fleet.code_version: the one place that asks git which code runs, as the apps record it too)."""
    from fleet.code_version import source_commit

    return source_commit(short=True) or "unknown"


def cached_json(path: Path, compute: Callable[[], Any], fresh: bool = False, complete: Callable[[Any], bool] = lambda out: True, build: str | None = None) -> Any:
    """``compute()``'s JSON result, kept at ``path``: read back unless ``fresh`` or not ``complete``
    (cached before a field existed), so a benchmark's seeds may run in separate processes. The build
    that computed it is kept beside it (``<path>.build``); a result of another build is still read
    back, with a line on stderr that says so (``--fresh`` recomputes)."""
    build = build or current_build()
    stamp = path.with_name(path.name + ".build")
    if path.exists() and not fresh:
        out = json.loads(path.read_text())
        if complete(out):
            then = stamp.read_text().strip() if stamp.exists() else "an unrecorded build"
            if then != build:
                print(f"# {path}: computed by {then}, this is {build} (--fresh recomputes)", file=sys.stderr)
            return out
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    stamp.write_text(build + "\n")
    return out


def pooled_seed_args(description: str, steps_help: str = "real steps, pooled over the four bodies", conditions: list[str] | None = None) -> argparse.Namespace:
    """The learning benchmarks' command line: ``--steps``, ``--seeds``, ``--fresh`` (ignore cached
    seeds), ``--conditions`` (a subset of ``conditions``, when given); and one torch thread, so seeds
    can run side by side on 2 cores."""
    import torch

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help=steps_help)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fresh", action="store_true", help="ignore cached seeds")
    if conditions:
        parser.add_argument("--conditions", nargs="+", choices=conditions, default=conditions)
    args = parser.parse_args()
    torch.set_num_threads(1)
    return args
