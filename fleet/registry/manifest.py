"""The policy manifest a registry signs and a robot verifies.

Fields (all covered by the signature):
    format        "flywheel-policy/1"
    version       int, strictly increasing per registry (a rollback republishes old weights
                  under a new version, so robots never have to accept a lower one)
    robot_model   the robot the policy is for ("ant", ...)
    obs_dim, act_dim
    weights       {"sha256": hex, "size": bytes}
    policy        the exporter's own manifest (architecture, normaliser, training data...)
    data_snapshot the store snapshot the policy was trained on
    gate          the evaluation gate's results
    sensor_offsets  {robot_id: [obs_dim floats]}: each listed robot subtracts its calibrated
                  sensor offset from every observation before this policy sees it (the policy
                  was trained and gated in that corrected view; sim/sensors.py). Robots not
                  listed run uncorrected. A malformed entry is refused as "malformed".
    issued_at, expires_at   unix seconds; robots refuse an expired manifest (freeze attack)
    note          free text ("promoted", "rollback of v7", ...)
"""

from __future__ import annotations

import hashlib
import time

FORMAT = "flywheel-policy/1"
REQUIRED = ("format", "version", "robot_model", "obs_dim", "act_dim", "weights", "issued_at", "expires_at")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_manifest(
    *,
    version: int,
    robot_model: str,
    obs_dim: int,
    act_dim: int,
    weights: bytes,
    policy: dict | None = None,
    data_snapshot: str = "",
    gate: dict | None = None,
    sensor_offsets: dict[str, list[float]] | None = None,
    ttl_s: float = 7 * 24 * 3600,
    now: float | None = None,
    note: str = "",
) -> dict:
    issued = time.time() if now is None else now
    return {
        "format": FORMAT,
        "version": int(version),
        "robot_model": robot_model,
        "obs_dim": int(obs_dim),
        "act_dim": int(act_dim),
        "weights": {"sha256": sha256_hex(weights), "size": len(weights)},
        "policy": policy or {},
        "data_snapshot": data_snapshot,
        "gate": gate or {},
        "sensor_offsets": sensor_offsets or {},
        "issued_at": issued,
        "expires_at": issued + ttl_s,
        "note": note,
    }
