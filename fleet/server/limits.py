"""Per-token admission of uploads: a bound on uploads in flight and a rate (token bucket).

A stolen or runaway robot token can then hold at most ``max_concurrent`` bodies in the server's
memory (each up to ``max_body_bytes``) and send at most ``rate_per_s`` uploads a second on
average (``burst`` at once). Over either it gets 429 with ``Retry-After``; the agent waits that
long (fleet/agent/uploader.py).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator

from fleet.server.errors import ApiError


class UploadLimits:
    def __init__(self, max_concurrent: int, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if max_concurrent < 1 or not rate_per_s > 0 or burst < 1:
            raise ValueError(f"upload limits need max_concurrent >= 1, rate_per_s > 0, burst >= 1; got {max_concurrent}, {rate_per_s}, {burst}")
        self.max_concurrent, self.rate_per_s, self.burst, self.clock = max_concurrent, rate_per_s, burst, clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._bucket: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    @contextlib.contextmanager
    def admit(self, key: str) -> Iterator[None]:
        """Hold one upload slot of ``key`` (a token's principal) for the ``with`` body; ApiError 429 when over a limit."""
        with self._lock:
            if self._in_flight.get(key, 0) >= self.max_concurrent:
                raise ApiError(429, "too_many_uploads", f"{self.max_concurrent} uploads of this token are already in flight; retry when one ends", None, {"Retry-After": "1"})
            now = self.clock()
            tokens, at = self._bucket.get(key, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
            if tokens < 1.0:
                wait = math.ceil((1.0 - tokens) / self.rate_per_s)
                self._bucket[key] = (tokens, now)
                raise ApiError(429, "rate_limited", f"over {self.rate_per_s:g} uploads/s for this token (burst {self.burst})", None, {"Retry-After": str(wait)})
            self._bucket[key] = (tokens - 1.0, now)
            self._in_flight[key] = self._in_flight.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[key] -= 1
