"""The Hydra config tree of the `flywheel`, `flywheel-server` and `flywheel-robot` apps: the YAML
files in this package (shipped in the wheel) and their schemas (``schema_*.py``).

Importing ``fleet.conf.schema_flywheel`` (or ``schema_fleet`` for the server and robot configs)
registers the schemas in Hydra's ConfigStore; the YAML's ``defaults`` name them (``base_flywheel``,
...), so compose after that import::

    import fleet.conf.schema_flywheel
    from hydra import compose, initialize_config_module
    with initialize_config_module("fleet.conf", version_base="1.3"):
        cfg = compose("flywheel", overrides=["loop.iterations=1"])
"""

import os
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent)


def _run_folder(default: str, *, _root_) -> str:
    """``hydra.run.dir`` of the apps with a ``run_dir``: the ``run_dir`` set on the command line (a run to resume
    or continue), so Hydra's own files (.hydra/, the app's log) go into that run's folder too; else ``default``."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(_root_, resolve=False).get("run_dir")
    if raw is None or str(raw).startswith("${"):
        return default
    check_run_dir(Path(str(raw)))
    return str(raw)


def check_run_dir(path: Path) -> None:
    """A run_dir the app can create and write, or a ValueError that says why not (before Hydra's own mkdir fails)."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"run_dir={path}: {folder} is a file, not a folder; set run_dir to a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(f"run_dir={path}: {folder} is not writable; set run_dir to a folder you can write")
            return


def _register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_folder"):
        OmegaConf.register_new_resolver("run_folder", _run_folder)


_register()
