"""Which code made a run: the package version and the git commit of the source tree it was imported from.

W&B finds git from the process's working folder, so a run started from an experiments folder (the apps never
chdir) recorded no commit at all; this asks git about the package's own folder instead, wherever the app starts.
The apps record it in the W&B config, ``summary.json`` and the trained policy's artifact; the benchmarks stamp
their cached results with it. It is information, never a setting: a resumed run may run newer code.
"""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DISTRIBUTION = "robot-flywheel"  # pyproject's [project] name
SOURCE = Path(__file__).resolve().parent  # fleet/, inside the checkout or an installed copy


@functools.cache
def code_version() -> dict[str, str | None]:
    """``{"package": <installed version>, "git_commit": <commit>[+dirty]}``; either None where it is not known
    (the package not installed; the source not in a git checkout, as an installed wheel is)."""
    try:
        package = version(DISTRIBUTION)
    except PackageNotFoundError:
        package = None
    return {"package": package, "git_commit": source_commit()}


def source_commit(short: bool = False) -> str | None:
    """The commit of the checkout that holds this package's source, ``+dirty`` with uncommitted changes to tracked
    files; None outside git. The package's own files must be tracked there: an installed copy in a virtualenv that
    sits in some repository is not that repository's code."""
    git = lambda *args: subprocess.run(["git", *args], cwd=SOURCE, capture_output=True, text=True, timeout=30)  # noqa: E731
    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return None
        rev = git("rev-parse", *(["--short"] if short else []), "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git here
        return None
    return (rev + ("+dirty" if dirty else "")) or None
