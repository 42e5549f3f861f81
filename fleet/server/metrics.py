"""Prometheus text metrics of the ingestion server (exposition format 0.0.4, no extra dependency).

Metric names (documented in docs/protocol.md):
    flywheel_uploads_total{status}           created | duplicate uploads acknowledged
    flywheel_episode_bytes_total             canonical bytes of created episodes
    flywheel_transitions_total               control steps of created episodes
    flywheel_rejections_total{reason}        refused uploads by error code
    flywheel_upload_latency_seconds          histogram, request start to response
    flywheel_commits_total                   group commits that stored episodes
    flywheel_commit_failures_total           group commits that failed (uploads got 503)
    flywheel_commit_seconds                  histogram, one group commit incl. fsync
    flywheel_commit_episodes                 histogram, episodes per group commit
    flywheel_pending_uploads                 gauge, uploads waiting for a commit
    flywheel_store_episodes                  gauge, episodes in the store
"""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        return [*out, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Metrics:
    """Thread-safe counters and histograms of one server process."""

    def __init__(self):
        self._lock = threading.Lock()
        self.uploads: dict[str, int] = defaultdict(int)
        self.rejections: dict[str, int] = defaultdict(int)
        self.episode_bytes = 0
        self.transitions = 0
        self.commits = 0
        self.commit_failures = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.commit_seconds = Histogram(LATENCY_BUCKETS)
        self.commit_episodes = Histogram(BATCH_BUCKETS)

    def uploaded(self, status: str, nbytes: int, steps: int) -> None:
        with self._lock:
            self.uploads[status] += 1
            if status == "created":
                self.episode_bytes += nbytes
                self.transitions += steps

    def rejected(self, reason: str) -> None:
        with self._lock:
            self.rejections[reason] += 1

    def observe_latency(self, seconds: float) -> None:
        with self._lock:
            self.latency.observe(seconds)

    def committed(self, seconds: float, episodes: int, ok: bool) -> None:
        with self._lock:
            if ok:
                self.commits += 1
                self.commit_seconds.observe(seconds)
                self.commit_episodes.observe(episodes)
            else:
                self.commit_failures += 1

    def render(self, pending: int, store_episodes: int) -> str:
        with self._lock:
            lines = ["# TYPE flywheel_uploads_total counter"]
            lines += [f'flywheel_uploads_total{{status="{s}"}} {n}' for s, n in sorted(self.uploads.items())]
            lines += ["# TYPE flywheel_episode_bytes_total counter", f"flywheel_episode_bytes_total {self.episode_bytes}"]
            lines += ["# TYPE flywheel_transitions_total counter", f"flywheel_transitions_total {self.transitions}"]
            lines += ["# TYPE flywheel_rejections_total counter"]
            lines += [f'flywheel_rejections_total{{reason="{r}"}} {n}' for r, n in sorted(self.rejections.items())]
            lines += ["# TYPE flywheel_upload_latency_seconds histogram", *self.latency.lines("flywheel_upload_latency_seconds")]
            lines += ["# TYPE flywheel_commits_total counter", f"flywheel_commits_total {self.commits}"]
            lines += ["# TYPE flywheel_commit_failures_total counter", f"flywheel_commit_failures_total {self.commit_failures}"]
            lines += ["# TYPE flywheel_commit_seconds histogram", *self.commit_seconds.lines("flywheel_commit_seconds")]
            lines += ["# TYPE flywheel_commit_episodes histogram", *self.commit_episodes.lines("flywheel_commit_episodes")]
            lines += ["# TYPE flywheel_pending_uploads gauge", f"flywheel_pending_uploads {pending}"]
            lines += ["# TYPE flywheel_store_episodes gauge", f"flywheel_store_episodes {store_episodes}"]
        return "\n".join(lines) + "\n"
