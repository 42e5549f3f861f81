"""``flywheel-server``: the ingestion server as a Hydra app (config: fleet/conf/server.yaml).

    flywheel-server fleet.store.path=runs/fleet/store fleet.server.port=8700
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import fleet.conf.schema_fleet  # noqa: F401  (registers the config's schema)
from fleet.apps.config_path import CONF_DIR
from fleet.conf.schema_tools import check
from fleet.registry.store import open_registry
from fleet.server.runner import run


@hydra.main(config_path=CONF_DIR, config_name="server", version_base="1.3")
def main(cfg: DictConfig) -> None:
    check(cfg)
    reg = cfg.fleet.registry
    registry = open_registry(reg.dir, reg.online_key, root_keys=list(reg.root_keys or []), root_threshold=reg.root_threshold, expiry_s=dict(reg.expiry_s))
    run(instantiate(cfg.fleet.server), instantiate(cfg.fleet.store), policy_registry=registry)


if __name__ == "__main__":
    main()
