"""Ingestion server configuration (a Hydra ``_target_``)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """flywheel-server settings.

    host/port: where to listen; loopback by default (put a TLS proxy in front for a real fleet).
        port 0 picks a free port (written to ``ready_file``).
    token_file: JSON/YAML map sha256(token) -> {role, robot_id} (``python -m fleet.server.auth``).
    max_body_bytes: uploads larger than this are refused with 413 before their body is read.
    commit_wait_ms: while other uploads are still arriving, wait up to this long to commit
        them together (group commit); an upload never waits when nothing else is in flight.
    commit_rejoin_ms: when a commit's oldest upload was queued while the previous commit ran, it
        waits up to this long for the robots of that commit that came straight back last time (their
        acknowledgement to their next upload took no longer than this): robots that upload back to
        back then share one commit instead of splitting into two cohorts that take turns. 0 (the
        default): never; 60 suits a few robots that upload back to back (docs/protocol.md, Group commit).
    commit_max_bytes / commit_max_episodes: cap one group commit.
    commit_timeout_s: an upload whose commit has not settled this long after it was queued gets 503
        commit_slow (a slow or unreachable store: Icechunk retries S3 for ~30 s). It stays queued and its
        admission slot held: if that commit stores it, the robot's retry gets 200 duplicate. Keep it below
        the robots' request_timeout_s (30 s), so that they read the answer rather than time out.
    list_limit: most episodes one GET /v1/episodes returns.
    body_timeout_s: an upload whose body has not fully arrived this long after its headers gets 408.
    head_timeout_s: a connection whose request line and headers have not fully arrived this long after it
        opened (or after its first byte of a next request) is closed: idle or half-sent connections never
        pile up (the keep-alive timeout, 30 s, closes idle ones between requests).
    max_concurrent_uploads / upload_rate_per_s / upload_burst: per token, uploads in flight and a
        token-bucket rate; over either, 429 with Retry-After (fleet/server/limits.py). Every POST and
        PUT of the resumable upload routes counts as one upload here.
    Resumable uploads (POST /v1/uploads, fleet/server/uploads.py, docs/protocol.md):
    max_episode_bytes: the largest upload (its declared size) the resumable routes take; 413 beyond.
    max_chunk_bytes: the largest chunk one PUT may carry (the server holds one chunk per PUT in memory).
    upload_dir: where uploads are staged; None: ``<store path>.uploads`` beside a local store, or
        ``uploads/`` beside the token file for an ``s3://`` store. Replicas behind a load balancer
        need one shared staging folder, or sticky routing per robot.
    upload_ttl_s: a staged upload untouched this long is removed (its robot then starts a new one).
    max_open_uploads: per robot, uploads created and neither completed nor aborted; 429 beyond.
    maintenance_every_s: run the store's maintenance this often (``EpisodeStore.maintain``: the history older
        than ``StoreConfig.keep_history_s`` expired, what nothing reaches any more deleted; docs/store.md,
        Maintenance); 0: never (then run ``flywheel store maintain`` on a schedule). Replicas of one store may
        each run it: runs that overlap both finish, Icechunk logging the objects the other deleted first.
    ready_file: if set, written (JSON: url, pid) once the server accepts connections, and removed at a clean stop
        (SIGTERM, Ctrl-C) where it still holds this pid. Its folder must be writable: checked at the start.
    log_level: uvicorn log level.
    """

    host: str = "127.0.0.1"
    port: int = 8700
    token_file: str = "runs/fleet/tokens.json"
    max_body_bytes: int = 64 << 20
    commit_wait_ms: float = 5.0
    commit_rejoin_ms: float = 0.0
    commit_max_bytes: int = 64 << 20
    commit_max_episodes: int = 256
    commit_timeout_s: float = 20.0
    list_limit: int = 1000
    body_timeout_s: float = 60.0
    head_timeout_s: float = 10.0
    max_concurrent_uploads: int = 4
    upload_rate_per_s: float = 20.0
    upload_burst: int = 100
    max_episode_bytes: int = 4 << 30
    max_chunk_bytes: int = 8 << 20
    upload_dir: str | None = None
    upload_ttl_s: float = 86400.0
    max_open_uploads: int = 4
    ready_file: str | None = None
    log_level: str = "warning"
    maintenance_every_s: float = 900.0

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.body_timeout_s > 0 or not self.head_timeout_s > 0 or self.max_concurrent_uploads < 1 or not self.upload_rate_per_s > 0 or self.upload_burst < 1:
            raise ValueError("body_timeout_s, head_timeout_s and upload_rate_per_s must be > 0, max_concurrent_uploads and upload_burst >= 1")
        if self.commit_wait_ms < 0 or self.commit_rejoin_ms < 0 or self.commit_max_bytes < 1 or self.commit_max_episodes < 1 or not self.commit_timeout_s > 0:
            raise ValueError("commit_wait_ms and commit_rejoin_ms must be >= 0, commit_max_bytes, commit_max_episodes >= 1 and commit_timeout_s > 0")
        if not 0 <= self.maintenance_every_s < float("inf"):
            raise ValueError(f"maintenance_every_s must be >= 0 seconds (0: never), got {self.maintenance_every_s}")
        if self.max_episode_bytes < 1 or self.max_chunk_bytes < 1 or self.max_open_uploads < 1 or not self.upload_ttl_s > 0:
            raise ValueError(
                f"max_episode_bytes, max_chunk_bytes and max_open_uploads must be >= 1 and upload_ttl_s > 0; got "
                f"{self.max_episode_bytes}, {self.max_chunk_bytes}, {self.max_open_uploads}, {self.upload_ttl_s}"
            )
