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
import sys
from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent)


def _run_folder(default: str, *, _root_) -> str:
    """``hydra.run.dir`` of the apps with a ``run_dir``: the ``run_dir`` set on the command line (a run to resume
    or continue), so Hydra's own files (.hydra/, the app's log) go into that run's folder too; else ``default``."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(_root_, resolve=False).get("run_dir")
    if raw is not None and str(raw).startswith("${") and "hydra:" not in str(raw):  # e.g. ${oc.env:RUN}: the folder it names
        try:
            raw = OmegaConf.create({"run_dir": raw}).run_dir
        except Exception:  # noqa: BLE001  (an interpolation of other keys: the app's own check reports it)
            raw = None
    if raw is None or str(raw).startswith("${"):
        return _unique_folder(default)
    raw = os.path.expanduser(str(raw)) if str(raw) == "~" or str(raw).startswith("~/") else str(raw)  # as the app's check expands run_dir
    check_run_dir(Path(raw))
    return raw


_MADE: dict[str, str] = {}  # a new folder's name -> the folder this process made for it
_MADE_AT: list[Path] = []  # those folders, absolute (a hydra.job.chdir would move what a relative name means)
_PARENTS_MADE: list[Path] = []  # folders made above them (a first run's runs/), deepest first


def _unique_folder(name: str) -> str:
    """``name`` (``runs/<time>``), made now, or ``name-2``, ``name-3``... when another process made it first: two
    runs started in the same second never share a folder. The same name gives the same folder within a process."""
    if ".." in Path(name).parts:  # a robot.robot_id of ../../x in runs/fleet/logs/robot/<id>/<time> would climb out: it
        name = str(Path(*("_" if part == ".." else part for part in Path(name).parts)))  # stays inside; the app refuses the id
    if name not in _MADE:
        try:
            _make_unique(name)
        except OSError as exc:  # a service started in / or another read-only folder: say which setting moves it, in one line
            # (SystemExit: Hydra and OmegaConf wrap an Exception from a resolver in two screens of traceback)
            raise SystemExit(
                f"{_app_name()}: cannot make the folder {Path(name).absolute()} for this run's log and Hydra files "
                f"({exc.strerror or exc}): start it in a folder you can write (a service's WorkingDirectory=), or set "
                "hydra.run.dir=<a folder you can write> (hydra.sweep.dir under --multirun; docs/config.md, Running as a service)"
            ) from None
    return _MADE[name]


def _app_name() -> str:
    """The app's command name, also when started as ``python -m fleet.apps.<app>``."""
    name = Path(sys.argv[0]).name
    if name.endswith(".py"):
        stem = name.removesuffix(".py")
        return "flywheel" if stem == "flywheel" else f"flywheel-{stem}"
    return name


def _make_unique(name: str) -> None:
    parent = Path(name).parent
    _PARENTS_MADE.extend(p.resolve() for p in (parent, *parent.parents) if not p.exists())
    parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        candidate = name if k == 1 else f"{name}-{k}"
        try:
            os.mkdir(candidate)  # atomic: exactly one process makes each
        except FileExistsError:
            continue
        _MADE[name] = candidate
        _MADE_AT.append(Path(candidate).resolve())
        return
    raise ValueError(f"{name}: 10,000 folders of that name exist; clean up runs/")


def folders_made() -> list[Path]:
    """The new folders this process made for settings-named folders (a new run's, a sweep's, a log folder)."""
    return list(_MADE_AT)


def parents_made() -> list[Path]:
    """The folders this process made above those (``runs/`` in a fresh checkout), deepest first."""
    return list(_PARENTS_MADE)


def check_run_dir(path: Path) -> None:
    """A run_dir the app can create and write, or a ValueError that says why not (before Hydra's own mkdir fails)."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"run_dir={path}: {folder} is a file, not a folder; set run_dir to a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(f"run_dir={path}: {folder} is not writable; set run_dir to a folder you can write")
            return


def _group_options(*groups: str) -> str:
    """``--help``'s lines for ``groups`` (``${app_groups:policy,ray}``): each with its options on Hydra's config search
    path, a ``--config-dir``'s own too, as Hydra's ``$APP_CONFIG_GROUPS`` lists them, but only the groups the app
    reads (``$APP_CONFIG_GROUPS`` lists every group of the shared tree)."""
    from hydra.core.global_hydra import GlobalHydra

    hydra = GlobalHydra.instance()
    if hydra.is_initialized():
        options = {g: hydra.config_loader().get_group_options(g) for g in groups}
    else:  # resolved outside an app: this package's own
        options = {g: sorted(p.stem for p in (Path(CONF_DIR) / g).glob("*.yaml")) for g in groups}
    return "\n".join(f"{g}: {', '.join(options[g])}" for g in groups)


def _register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("run_folder"):
        OmegaConf.register_new_resolver("run_folder", _run_folder)
    if not OmegaConf.has_resolver("app_groups"):
        OmegaConf.register_new_resolver("app_groups", _group_options)
    if not OmegaConf.has_resolver("new_folder"):
        OmegaConf.register_new_resolver("new_folder", _unique_folder)


_register()
