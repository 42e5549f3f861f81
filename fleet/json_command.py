"""The shape of the project's small shell commands (`flywheel export|import`, `flywheel store ...`): one JSON line
out on success (exit 0), one line `<prog>: error: <what to do>` on stderr for a fault the user can fix (exit 2)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable


def json_command(prog: str, work: Callable[[], dict], faults: tuple[type[BaseException], ...], say: Callable[[BaseException], object] = str) -> int:
    """Run ``work``; print its summary as one JSON line, or ``say(fault)`` as one error line for any of ``faults``."""
    try:
        summary = work()
    except faults as exc:
        print(f"{prog}: error: {say(exc)}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
