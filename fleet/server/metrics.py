"""Prometheus metrics of the ingestion server, on ``prometheus-client`` (exposition format 0.0.4).

Each server owns its own ``CollectorRegistry`` (several servers may share a process in tests).
Metric names (documented in docs/protocol.md, each with HELP text):
    flywheel_uploads_total{status}                       created | duplicate uploads acknowledged
    flywheel_episode_bytes_total                         canonical bytes of created episodes
    flywheel_transitions_total                           control steps of created episodes
    flywheel_rejections_total{reason}                    refused requests by error code
    flywheel_upload_latency_seconds                      histogram, upload request start to response
    flywheel_commits_total                               group commits that stored episodes
    flywheel_commit_failures_total                       group commits that failed (uploads got 503)
    flywheel_commit_seconds                              histogram, one group commit incl. fsync
    flywheel_commit_episodes                             histogram, episodes per group commit
    flywheel_commit_races_total{outcome}                 commits that lost a race to another writer (object storage):
                                                         rebased onto the winner's, or redone on the new tip
    flywheel_pending_uploads                             gauge, uploads waiting for a commit
    flywheel_commit_running_seconds                      gauge, how long the commit running now has taken (0: none)
    flywheel_store_episodes                              gauge, episodes in the store
    flywheel_store_maintenance_runs_total{outcome}       store maintenance runs (ServerConfig.maintenance_every_s): ok | failed |
                                                         skipped (another replica on this host was maintaining the store)
    flywheel_store_maintenance_deleted_bytes_total       bytes those runs deleted (expired history, unreferenced objects)
    flywheel_http_requests_total{method,route,status}    every HTTP request, by route template (method: one of HTTP_METHODS,
                                                         else "other"; route: unmatched when no route took it)
    flywheel_http_request_duration_seconds{method,route} histogram, request start to response
    process_*                                            the server process: CPU, resident memory, open files
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
UNMATCHED = "unmatched"  # the route label of a request no route took (bounded cardinality: no raw paths)
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")  # the method labels; any other method is OTHER_METHOD
OTHER_METHOD = "other"


class Metrics:
    """The server's counters, gauges and histograms (prometheus-client objects are thread-safe)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.uploads = Counter("flywheel_uploads", "Uploads acknowledged, by outcome (created or duplicate).", ["status"], registry=r)
        self.episode_bytes = Counter("flywheel_episode_bytes", "Canonical bytes of created episodes.", registry=r)
        self.transitions = Counter("flywheel_transitions", "Control steps of created episodes.", registry=r)
        self.rejections = Counter("flywheel_rejections", "Refused requests, by error code (docs/protocol.md, Refusals).", ["reason"], registry=r)
        self.latency = Histogram("flywheel_upload_latency_seconds", "Upload request start to response.", buckets=LATENCY_BUCKETS, registry=r)
        self.commits = Counter("flywheel_commits", "Group commits that stored episodes.", registry=r)
        self.commit_failures = Counter("flywheel_commit_failures", "Group commits that failed (their uploads got 503).", registry=r)
        self.commit_seconds = Histogram("flywheel_commit_seconds", "One group commit, fsync included.", buckets=LATENCY_BUCKETS, registry=r)
        self.commit_episodes = Histogram("flywheel_commit_episodes", "Episodes per group commit.", buckets=BATCH_BUCKETS, registry=r)
        self.commit_races = Counter(
            "flywheel_commit_races", "Group commits that lost a race to another writer of the store: rebased onto the winner's, or redone.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.pending = Gauge("flywheel_pending_uploads", "Uploads waiting for a group commit.", registry=r)
        self.commit_running = Gauge("flywheel_commit_running_seconds", "How long the group commit running now has taken (0: none running).", registry=r)
        self.store_episodes = Gauge("flywheel_store_episodes", "Episodes in the store.", registry=r)
        self.maintenance_runs = Counter("flywheel_store_maintenance_runs", "Store maintenance runs, by outcome (ok, failed, or skipped: another process was maintaining the store).", ["outcome"], registry=r)
        self.maintenance_bytes = Counter("flywheel_store_maintenance_deleted_bytes", "Bytes store maintenance deleted (expired history, unreferenced objects).", registry=r)
        self.requests = Counter("flywheel_http_requests", "HTTP requests, by method, route template and status.", ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram(
            "flywheel_http_request_duration_seconds", "HTTP request start to response, by method and route template.", ["method", "route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        ProcessCollector(registry=r)

    def uploaded(self, status: str, nbytes: int, steps: int) -> None:
        self.uploads.labels(status).inc()
        if status == "created":
            self.episode_bytes.inc(nbytes)
            self.transitions.inc(steps)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()

    def observe_latency(self, seconds: float) -> None:
        self.latency.observe(seconds)

    def committed(self, seconds: float, episodes: int, ok: bool) -> None:
        if ok:
            self.commits.inc()
            self.commit_seconds.observe(seconds)
            self.commit_episodes.observe(episodes)
        else:
            self.commit_failures.inc()

    def raced(self, rebased: int, redone: int) -> None:
        if rebased:
            self.commit_races.labels("rebased").inc(rebased)
        if redone:
            self.commit_races.labels("redone").inc(redone)

    def request(self, method: str, route: str | None, status: int, seconds: float) -> None:
        """``route``: the template of the route that took the request (None: none did). Both labels come from fixed
        sets: a client names the method, and each made-up one (no token needed, answered 405) was once a new series
        of the counter and the histogram, growing /metrics and the server's memory without bound."""
        method = method if method in HTTP_METHODS else OTHER_METHOD
        route = route or UNMATCHED
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route).observe(seconds)

    def render(self, pending: int, store_episodes: int, commit_running_s: float = 0.0) -> str:
        self.pending.set(pending)
        self.commit_running.set(commit_running_s)
        self.store_episodes.set(store_episodes)
        return generate_latest(self.registry).decode()
