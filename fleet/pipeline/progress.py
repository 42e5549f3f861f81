"""Progress display (rich) for the loop's long steps: a spinner with elapsed time per step."""

from __future__ import annotations

import contextlib
import logging
import time

from rich.console import Console
from rich.progress import Progress as RichProgress
from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

log = logging.getLogger(__name__)  # the apps' log file only (fleet/conf/logging.yaml): the console has the rich lines


class Progress:
    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None):
        start = time.perf_counter()
        columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn())
        with RichProgress(*columns, console=self.console, transient=True) as bar:
            bar.add_task(description, total=total)
            yield
        seconds = time.perf_counter() - start
        self.console.print(f"[green]done[/green] {description} [dim]({seconds:.1f} s)[/dim]")
        log.info("done %s (%.1f s)", description, seconds)

    def note(self, text: str) -> None:
        """One line between the steps (a resume, a gate's or a canary's decision): on the console and in the log file (a
        run's flywheel.log held nothing after 24 iterations, a SIGTERM and two resumes)."""
        self.console.print(text, markup=False, highlight=False)
        log.info("%s", text)
