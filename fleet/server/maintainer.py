"""The server's store maintenance on a schedule (``ServerConfig.maintenance_every_s``; fleet/store/maintenance.py)."""

from __future__ import annotations

import logging
import random
import threading

from fleet.server.metrics import Metrics
from fleet.store import EpisodeStore
from fleet.store.backend import short_reason
from fleet.store.maintenance import MaintenanceBusy

log = logging.getLogger(__name__)


FIRST_RUN_S = (30.0, 90.0)  # the first run comes this long after the start (uniform: replicas started together spread out)
CLOSE_WAIT_S = 10.0  # a stop waits this long for a run in progress (its deletes are idempotent: the next run finishes them)


class Maintainer:
    """A thread that runs ``store.maintain()`` every ``every_s`` seconds, the first run FIRST_RUN_S after the start (at most
    ``every_s``: a server restarted more often than its period still maintains), counting runs and bytes in ``metrics``.
    A failed run is logged and counted; the next one is tried as planned."""

    def __init__(self, store: EpisodeStore, metrics: Metrics, every_s: float):
        self.store, self.metrics, self.every_s = store, metrics, every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.every_s > 0:
            self._thread = threading.Thread(target=self._run, name="flywheel-store-maintenance", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT_S)

    def run_once(self) -> None:
        try:
            report = self.store.maintain()
        except MaintenanceBusy as exc:  # another replica on this host runs it now
            self.metrics.maintenance_runs.labels("skipped").inc()
            log.info("store maintenance: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - a failed run must not stop the server; it is logged and counted
            self.metrics.maintenance_runs.labels("failed").inc()
            log.warning("store maintenance failed (%s: %s); the next run is in %g s", exc.__class__.__name__, short_reason(exc), self.every_s)
            return
        self.metrics.maintenance_runs.labels("ok").inc()
        self.metrics.maintenance_bytes.inc(report.deleted_bytes)
        log.info(
            "store maintenance: %d snapshots expired, %d objects (%d bytes) deleted in %.1f s",
            report.expired_snapshots, report.deleted_objects, report.deleted_bytes, report.seconds,
        )  # fmt: skip

    def _run(self) -> None:
        wait = min(self.every_s, random.uniform(*FIRST_RUN_S))
        while not self._stop.wait(wait):
            self.run_once()
            wait = self.every_s
