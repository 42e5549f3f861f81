"""Every Hydra config composes, and every `_target_` in it imports and instantiates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml"))
GROUP_OPTIONS = sorted((g.name, p.stem) for g in CONF.iterdir() if g.is_dir() for p in g.glob("*.yaml"))


def _compose(name: str, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _targets(node, path="") -> list[tuple[str, DictConfig]]:
    """Top-most nodes with a _target_ (instantiate builds the nested ones itself)."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            return [(path, node)]
        return [t for k, v in node.items_ex(resolve=False) for t in _targets(v, f"{path}.{k}")]
    if isinstance(node, ListConfig):
        return [t for i, v in enumerate(node) for t in _targets(v, f"{path}[{i}]")]
    return []


def _check(cfg: DictConfig) -> None:
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # every interpolation resolves
    for path, node in _targets(cfg):
        assert instantiate(node) is not None, f"{path}: {node._target_} instantiated to None"


def test_there_is_a_config_per_floor():
    assert {"flywheel"} <= set(PRIMARY)
    assert {"sim", "ray", "wandb"} <= {g for g, _ in GROUP_OPTIONS}


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes(name):
    _check(_compose(name))


@pytest.mark.parametrize("group, option", GROUP_OPTIONS)
def test_every_group_option_composes(group, option):
    primary = next((p for p in PRIMARY if group in _defaults(p)), "flywheel")
    prefix = "" if group in _defaults(primary) else "+"
    _check(_compose(primary, [f"{prefix}{group}={option}"]))


def _defaults(primary: str) -> set[str]:
    entries = OmegaConf.load(CONF / f"{primary}.yaml").get("defaults", [])
    return {k for e in entries if isinstance(e, DictConfig) for k in e}
