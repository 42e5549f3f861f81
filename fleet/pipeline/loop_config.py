"""What `flywheel` takes from the ``fleet`` group, and the keys it sets itself, in one place.

The loop embeds a fleet server, a policy registry and simulated robots: it builds them from ``fleet.server``,
``fleet.registry`` and ``fleet.agent``, with the few fields it must own replaced (where they listen, whose tokens
and keys, where they keep their files: all in the run folder). Each key it owns (:data:`LOOP_SETS`) is refused at
start when given another value than its default, naming the key and what to set instead: a value there was
silently ignored (`flywheel fleet.server.port=1` ran on a free port, `policy.trainer.robot=reacher` trained the
pendulum) while the run's recorded config showed it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from fleet.agent.config import AgentConfig
from fleet.conf import CONF_DIR
from fleet.conf.schema_tools import instantiated
from fleet.registry.tuf_repo import check_expiry_s
from fleet.server.config import ServerConfig
from fleet.store.location import Location

ROOT_KEYS = 3  # the loop makes its registry's root keys, <run_dir>/keys/root-{1,2,3}.pem (services.py)
_KEYS = "the loop makes and keeps its registry's keys in <run_dir>/keys, where a resumed run signs with them again"
_TOKENS = "each simulated robot is handed its token, from the fresh <run_dir>/tokens.json of each start"

# key -> why the loop sets it, and what to set instead ({value}: the value given)
LOOP_SETS: dict[str, str] = {
    "policy.trainer.seed": "iteration k's learner is seeded from the run's seed (seed + k); set seed={value} instead",
    "policy.trainer.robot": "the learner trains on the fleet's robot model; set loop.robot_model={value} instead",
    "fleet.server.host": "the loop's server listens on this driver's Ray address, where its robots reach it; set ray.node_ip_address instead",
    "fleet.server.port": "the loop's server takes a free port, so that runs on one machine never collide (its address is in the log)",
    "fleet.server.token_file": "the loop writes <run_dir>/tokens.json, fresh tokens for its simulated robots, each start",
    "fleet.agent.server_url": "the simulated robots upload to the loop's own server",
    "fleet.agent.token_env": _TOKENS,
    "fleet.agent.token_file": _TOKENS,
    "fleet.agent.spool_dir": "each simulated robot spools in <run_dir>/robots/<robot id>/spool, where its restart finds it",
    "fleet.registry.online_key": _KEYS,
    "fleet.registry.release_key": _KEYS,
    "fleet.registry.root_keys": f"{_KEYS} ({ROOT_KEYS} root keys; fleet.registry.root_threshold of them sign each root)",
    "fleet.store.path": "a local store is <run_dir>/store; set run_dir instead (or s3://bucket/prefix: the run's store is then s3://bucket/prefix/<run id>, the run folder name and a random part)",
    "fleet.registry.dir": "a local registry is <run_dir>/registry; set run_dir instead (or s3://bucket/prefix: the run's registry is then s3://bucket/prefix/<run id>, the run folder name and a random part)",
}  # fmt: skip
ANY_URL = ("fleet.store.path", "fleet.registry.dir")  # object storage is read (services.run_location): only a local path is the loop's


@functools.cache
def _fleet_defaults() -> DictConfig:
    """The ``fleet`` group's own values (fleet/conf/fleet/default.yaml): what a key the loop sets must keep."""
    return OmegaConf.load(Path(CONF_DIR) / "fleet" / "default.yaml")


def _expected(cfg: DictConfig, key: str):
    if key == "policy.trainer.robot":
        return cfg.loop.robot_model  # flywheel.yaml sets it so
    if key == "policy.trainer.seed":
        return 0
    return _plain(OmegaConf.select(_fleet_defaults(), key.removeprefix("fleet.")))


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def check_loop_sets(cfg: DictConfig) -> None:
    """ValueError naming the first key of :data:`LOOP_SETS` given another value than the loop's, and what to set instead."""
    for key, why in LOOP_SETS.items():
        value = _plain(OmegaConf.select(cfg, key))
        if key in ANY_URL and not Location.parse(str(value)).is_local:
            continue
        if value != _expected(cfg, key):
            raise ValueError(f"{key}={value} is not read by flywheel: {why.format(value=value)}")


@dataclasses.dataclass(frozen=True)
class LoopFleet:
    """The loop's fleet parts, built from the ``fleet`` group once, and so checked before anything runs (with the
    classes and checks `flywheel-server` and `flywheel-robot` use): the server's and the robots' configs, whose fields
    of :data:`LOOP_SETS` the loop replaces, and the registry's root threshold and role lifetimes."""

    server: ServerConfig
    agent: AgentConfig
    root_threshold: int
    expiry_s: dict[str, float]

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> LoopFleet:
        check_loop_sets(cfg)
        reg = cfg.fleet.registry
        if not 1 <= reg.root_threshold <= ROOT_KEYS:
            raise ValueError(f"fleet.registry.root_threshold={reg.root_threshold}: it must be 1..{ROOT_KEYS}, the root keys the loop makes")
        return cls(
            server=instantiated(cfg.fleet.server, "fleet.server"), agent=instantiated(cfg.fleet.agent, "fleet.agent"),
            root_threshold=reg.root_threshold, expiry_s=check_expiry_s(_plain(reg.expiry_s), "fleet.registry.expiry_s"),
        )  # fmt: skip
