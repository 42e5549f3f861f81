"""The policy manifest a registry publishes and a robot checks, and the TUF target names.

A release is three TUF targets (fleet/registry/tuf_repo.py), all listed with their length and
sha256 in the signed targets metadata:

    rollout.json                           {"stable", "canary", "cohort"}: which version each robot
                                           runs (the director's word, as Uptane's director for vehicles)
    policies/<version:08d>/manifest.json   this manifest
    policies/<version:08d>/weights.safetensors

Manifest fields:
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
    body_contexts   {robot_id: [C floats in [-1, 1]]}, for a body-conditioned policy (its
                  ``policy.observation.context``): each listed robot's calibrated body features,
                  which it appends to every observation (sim/body_context.py); a robot not listed
                  runs as the nominal body (zeros). A malformed entry is refused as "malformed".
    sensor_filters  {robot_id: {"A", "B", "c", "Q", "R"}}: each listed robot runs this Kalman filter
                  on its observations (after the offset correction) and its policy sees the
                  estimates (sim/sensor_filter.py); robots not listed see their readings. A
                  malformed entry is refused as "malformed".
    issued_at     unix seconds (freshness is TUF's: the timestamp, snapshot and targets metadata expire)
    note          free text ("promoted", "rollback of v7", ...)
"""

from __future__ import annotations

import hashlib
import time

FORMAT = "flywheel-policy/1"
REQUIRED = ("format", "version", "robot_model", "obs_dim", "act_dim", "weights", "issued_at")
ROLLOUT_TARGET = "rollout.json"
MAX_JSON_BYTES = 1 << 20  # a robot refuses a rollout or manifest target listed larger than this, unread; a registry publishes none


def manifest_target(version: int) -> str:
    return f"policies/{int(version):08d}/manifest.json"


def weights_target(version: int) -> str:
    return f"policies/{int(version):08d}/weights.safetensors"


def version_for(rollout: dict, robot_id: str) -> int | None:
    """The version ``robot_id`` should run under ``rollout`` (the canary if it is in the cohort), None before any release."""
    canary, cohort = rollout.get("canary"), rollout.get("cohort", [])
    if not isinstance(cohort, list) or not all(isinstance(r, str) for r in cohort):  # a string's `in` would match substrings
        raise ValueError(f"the rollout's cohort is {type(cohort).__name__} {str(cohort)[:80]!r}, not a list of robot ids")
    return canary if canary is not None and robot_id in cohort else rollout.get("stable")


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
    body_contexts: dict[str, list[float]] | None = None,
    sensor_filters: dict[str, dict] | None = None,
    now: float | None = None,
    note: str = "",
) -> dict:
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
        "body_contexts": body_contexts or {},
        "sensor_filters": sensor_filters or {},
        "issued_at": time.time() if now is None else now,
        "note": note,
    }
