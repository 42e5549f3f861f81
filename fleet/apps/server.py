"""``flywheel-server``: the ingestion server as a Hydra app (config: fleet/conf/server.yaml).

    flywheel-server fleet.store.path=runs/fleet/store fleet.server.port=8700
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

import fleet.conf.schema_fleet  # noqa: F401  (registers the config's schema)
from fleet.apps.config_path import CONF_DIR
from fleet.apps.errors import accept_start, discard_log_folder_if_refused, one_line_errors
from fleet.conf.schema_tools import check, instantiated
from fleet.registry.s3 import S3Error
from fleet.registry.store import open_registry
from fleet.registry.tuf_repo import RepositoryNotInitialised
from fleet.server.auth import TokenRegistry
from fleet.server.runner import bind_socket, check_ready_file, run
from fleet.store.backend import StoreCorruptionError, StoreUnreachableError

log = logging.getLogger(__name__)


@hydra.main(config_path=CONF_DIR, config_name="server", version_base="1.3")
def main(cfg: DictConfig) -> None:
    discard_log_folder_if_refused()  # a start refused below leaves no empty runs/fleet/logs/server/<time>/ behind
    check(cfg, "flywheel-server")
    # the settings' faults (values, files, keys, the address, the store and its damaged files, the registry's object storage) stop it at the start with what to fix; Ctrl-C stops it as SIGTERM does
    with one_line_errors("flywheel-server", (OSError, ValueError, StoreUnreachableError, StoreCorruptionError, S3Error, RepositoryNotInitialised)):
        server, store = instantiated(cfg.fleet.server, "fleet.server"), instantiated(cfg.fleet.store, "fleet.store")
        TokenRegistry(server.token_file)  # the tokens, the ready file and the address, checked before the registry and the store are created
        check_ready_file(server.ready_file)
        sock = bind_socket(server)
        reg = cfg.fleet.registry
        registry = open_registry(reg.dir, reg.online_key, release_key=reg.release_key, root_keys=list(reg.root_keys or []), root_threshold=reg.root_threshold, expiry_s=dict(reg.expiry_s))
        held = [str(p) for p in reg.root_keys or [] if Path(p).is_file()]
        if held:  # the single-machine default: say at every start what it costs
            log.warning(
                "this server holds %d root key file(s) beside its online key (%s): whoever takes this host can sign a new root "
                "and so any release. Fine for trying out on one machine; for a fleet, run `flywheel-registry init` where the "
                "root keys are kept offline and start the server with fleet.registry.root_keys=[] (docs/security.md, Roles and keys)",
                len(held), ", ".join(held),
            )  # fmt: skip
        accept_start()
        run(server, store, policy_registry=registry, sock=sock)


if __name__ == "__main__":
    main()
