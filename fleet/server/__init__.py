"""Ingestion server (``flywheel-server``): FastAPI + uvicorn over the episode store.

* :class:`ServerConfig` - settings (a Hydra ``_target_``)
* :func:`serve` - in-process server on a background thread -> handle with ``.url``, ``.stop()``
* :func:`run` - foreground server (the Hydra app)
* :class:`ServerProcess` - the Hydra app as a child process (SIGKILL tests, benchmarks)
* :func:`add_token` / ``python -m fleet.server.auth`` - create bearer tokens (stored hashed)

Protocol: docs/protocol.md. Only :mod:`fleet.server.config` loads eagerly.
"""

from __future__ import annotations

from sim.lazy import lazy_getattr

from fleet.server.config import ServerConfig

_LAZY = {
    "serve": "fleet.server.runner",
    "run": "fleet.server.runner",
    "ServerHandle": "fleet.server.runner",
    "ServerProcess": "fleet.server.runner",
    "create_app": "fleet.server.app",
    "TokenRegistry": "fleet.server.auth",
    "add_token": "fleet.server.auth",
    "hash_token": "fleet.server.auth",
}


__getattr__ = lazy_getattr("fleet.server", _LAZY)


__all__ = ["ServerConfig", *_LAZY]
