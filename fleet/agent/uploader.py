"""Background upload of spooled episodes: oldest first, retries with jittered exponential backoff.

Per server answer (docs/protocol.md):
    201 created, 200 duplicate         acknowledged: the spool file is deleted
    400, 409, 413, 422                 refused for good: moved to spool/rejected/ with the reason
    401, 403, 404, other 4xx           configuration problem (token, URL): kept, retried slowly
    5xx, timeouts, connection errors   kept, retried with backoff (server down, restarting, busy)
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

import httpx

from fleet.agent.spool import Spool, SpoolEntry

log = logging.getLogger(__name__)
PERMANENT = (400, 409, 413, 422)


class Uploader:
    """Drains a :class:`Spool` to ``POST {server_url}/v1/episodes`` on a background thread."""

    def __init__(
        self,
        spool: Spool,
        server_url: str,
        token: str,
        *,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        request_timeout_s: float = 30.0,
        status_interval_s: float = 10.0,
        on_ack: Callable[[str, str], None] | None = None,
        seed: int | None = None,
    ):
        self.spool = spool
        self.server_url = server_url.rstrip("/")
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.status_interval_s = status_interval_s
        self.on_ack = on_ack  # called with (episode_id, "created" | "duplicate") after each acknowledgement
        self._client = httpx.Client(
            timeout=request_timeout_s, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"}
        )
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0  # consecutive failed attempts
        self.stats = {"created": 0, "duplicate": 0, "rejected": 0, "failed_attempts": 0}
        self.last_error: str | None = None

    # -- one attempt ------------------------------------------------------------------
    def upload_once(self) -> str:
        """Try the oldest spooled episode once: "empty", "acked", "rejected" or "retry"."""
        entry = self.spool.oldest()
        if entry is None:
            return "empty"
        data = self.spool.read(entry)
        if data is None:  # evicted between oldest() and read(): try the next one
            return self.upload_once()
        try:
            response = self._client.post(f"{self.server_url}/v1/episodes", content=data)
        except httpx.HTTPError as exc:
            return self._failed(entry, f"{exc.__class__.__name__}: {exc}")
        if response.status_code in (200, 201):
            status = "created" if response.status_code == 201 else "duplicate"
            self.spool.remove(entry)
            self.stats[status] += 1
            self._failures = 0
            if self.on_ack is not None:
                self.on_ack(entry.episode_id, status)
            return "acked"
        body = _json_or_text(response)
        if response.status_code in PERMANENT:
            self.spool.reject(entry, {"status": response.status_code, **body})
            self.stats["rejected"] += 1
            log.error("server refused episode %s for good (%d %s); moved to %s", entry.episode_id, response.status_code, body, self.spool.rejected_dir)
            return "rejected"
        return self._failed(entry, f"HTTP {response.status_code}: {body}")

    def _failed(self, entry: SpoolEntry, message: str) -> str:
        self._failures += 1
        self.stats["failed_attempts"] += 1
        self.last_error = message
        log.warning("upload of %s failed (%s); %d episodes queued, retrying", entry.episode_id, message, self.spool.depth)
        return "retry"

    def backoff_s(self) -> float:
        """Delay before the next attempt after ``self._failures`` consecutive failures."""
        if self._failures == 0:
            return 0.0
        base = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(self._failures - 1, 30))
        return base * self._rng.uniform(0.5, 1.0)

    # -- background thread ------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("uploader already started")
        self._thread = threading.Thread(target=self._run, name="flywheel-uploader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self.spool.changed.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._client.close()

    def _run(self) -> None:
        next_status = time.monotonic() + self.status_interval_s
        while not self._stop.is_set():
            outcome = self.upload_once()
            if time.monotonic() >= next_status:
                log.info("upload queue: %d episodes (%d bytes), stats %s", self.spool.depth, self.spool.nbytes, self.stats)
                next_status = time.monotonic() + self.status_interval_s
            if outcome == "empty":
                self.spool.changed.wait(timeout=min(1.0, self.status_interval_s))
                self.spool.changed.clear()
            elif outcome == "retry":
                self._stop.wait(self.backoff_s())


def _json_or_text(response: httpx.Response) -> dict:
    try:
        body = response.json()
        return body if isinstance(body, dict) else {"body": body}
    except ValueError:
        return {"body": response.text[:500]}
