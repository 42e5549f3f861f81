"""``flywheel-server``: the ingestion server as a Hydra app (config: fleet/conf/server.yaml).

    flywheel-server fleet.store.path=runs/fleet/store fleet.server.port=8700
"""

from __future__ import annotations

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

import fleet.conf.schema_fleet  # noqa: F401  (registers the config's schema)
from fleet.apps.config_path import CONF_DIR
from fleet.apps.errors import one_line_errors
from fleet.conf.schema_tools import check
from fleet.registry.store import open_registry
from fleet.server.auth import TokenRegistry
from fleet.server.runner import bind_socket, run
from fleet.store.backend import StoreUnreachableError


@hydra.main(config_path=CONF_DIR, config_name="server", version_base="1.3")
def main(cfg: DictConfig) -> None:
    check(cfg)
    server, store = instantiate(cfg.fleet.server), instantiate(cfg.fleet.store)
    # the settings' faults (files, keys, the address, the store) stop it at the start with what to fix; Ctrl-C stops it as SIGTERM does
    with one_line_errors("flywheel-server", (OSError, ValueError, StoreUnreachableError)):
        TokenRegistry(server.token_file)  # the tokens and the address, checked before the registry and the store are created
        sock = bind_socket(server)
        reg = cfg.fleet.registry
        registry = open_registry(reg.dir, reg.online_key, root_keys=list(reg.root_keys or []), root_threshold=reg.root_threshold, expiry_s=dict(reg.expiry_s))
        run(server, store, policy_registry=registry, sock=sock)


if __name__ == "__main__":
    main()
