"""``flywheel-server``: the ingestion server as a Hydra app (config: conf/server.yaml).

    flywheel-server fleet.store.path=runs/fleet/store fleet.server.port=8700
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from fleet.apps.config_path import CONF_DIR
from fleet.registry.store import open_registry
from fleet.server.runner import run


@hydra.main(config_path=CONF_DIR, config_name="server", version_base="1.3")
def main(cfg: DictConfig) -> None:
    reg = cfg.fleet.registry
    registry = open_registry(reg.dir, reg.online_key, root_keys=list(reg.root_keys or []), root_threshold=reg.root_threshold, expiry_s=dict(reg.expiry_s))
    run(instantiate(cfg.fleet.server), instantiate(cfg.fleet.store), policy_registry=registry)


if __name__ == "__main__":
    main()
