"""The shape of the project's small shell commands (`flywheel export|import`, `flywheel store ...`): one JSON line
out on success (exit 0), one line `<prog>: error: <what to do>` on stderr for a fault the user can fix (exit 2)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def json_command(prog: str, work: Callable[[], dict], faults: tuple[type[BaseException], ...], say: Callable[[BaseException], object] = str) -> int:
    """Run ``work``; print its summary as one JSON line, or ``say(fault)`` as one error line for any of ``faults``."""
    try:
        summary = work()
    except faults as exc:
        print(f"{prog}: error: {say(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def exit_process(code: int) -> NoReturn:
    """End a shell command's process with ``code`` once its output is out, without the interpreter's teardown. The
    store's native threads (Icechunk's tokio runtime) can still be completing a Python future as the interpreter
    finalizes; CPython then ends that thread with pthread_exit inside Rust frames, which aborts the process (SIGABRT,
    exit 134, pyo3's known race) after the command had done its work and printed its line: ~5 % of `flywheel store
    pins` runs on a loaded machine (a core dump showed it). Nothing these commands leave needs the teardown."""
    lost = False
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: the shell closed it (`>&-`)
                stream.flush()
        except (OSError, ValueError):  # a pipe whose reader left, a closed file
            lost = lost or stream is sys.stdout
    logging.shutdown()
    os._exit(120 if lost and code == 0 else code)  # as Python's own exit says a result line that could not be written
