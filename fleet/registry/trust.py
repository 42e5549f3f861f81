"""Robot-side policy trust: what a robot checks on a manifest TUF has verified, and what it keeps.

No torch, no Ray: this runs on the robot. TUF's client (fleet/registry/pull.py) has already
checked signatures, thresholds, versions, expiry and each file's length and hash. On top of it a
robot refuses, and keeps its last good policy, a version lower than the one it trusts (rollback,
also across a registry's key rotation) or equal to it with other content (replay), a spec that
does not fit the robot (mix-and-match), and a version that failed its own health check before.
The trusted version persists across restarts, so a reboot does not reopen the rollback window.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

from fleet.registry.manifest import FORMAT, REQUIRED, sha256_hex
from fleet.registry.signing import canonical_json
from sim.durable import fsync_dir, write_durably

log = logging.getLogger(__name__)
# A new release's first episode on this robot is its health check: ending terminated (the robot fell, a joint
# limit, a safety stop) within this many control steps fails it, and the robot goes back to its previous policy
# and blocks the release. The one default of flywheel-robot (policy.min_healthy_steps), SignedPolicySource and the
# simulated fleet; 0 turns the check off. Set it below the shortest episode a good policy may end by finishing its task.
MIN_HEALTHY_STEPS = 5


class PolicyRejected(Exception):
    """A policy the robot must not run. ``reason`` is one of REASONS."""

    REASONS = ("signature", "malformed", "rollback", "replay", "freeze", "spec", "size", "hash", "health")

    def __init__(self, reason: str, detail: str):
        assert reason in self.REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"policy rejected ({reason}): {detail}")


def adopt_shared_state(state_dir: str | Path, robot_id: str) -> bool:
    """Move a robot's policy state kept by a build before per-robot folders (``runs/fleet/robot-policy/``, the parent
    of the per-robot default ``.../<robot_id>``) into ``state_dir``, where that holds none: the trusted policy and its
    version floor survive the upgrade (left behind, the robot started from nothing and could be sent back a
    version). Only for the default layout (``state_dir`` named after the robot); True if it moved anything."""
    state_dir = Path(state_dir)
    parent = state_dir.parent
    if state_dir.name != robot_id or (state_dir / "trusted.json").exists() or (state_dir / "tuf").exists():
        return False
    if not (parent / "trusted.json").is_file():
        return False
    moved = [p for p in (parent / "trusted.json", parent / "blocked.json", parent / "tuf", *parent.glob("weights*.safetensors")) if p.exists()]
    state_dir.mkdir(parents=True, exist_ok=True)
    for path in moved:
        try:
            os.replace(path, state_dir / path.name)
        except FileNotFoundError:  # another robot of the same host adopted it first (a fleet of simulated robots)
            return False
    fsync_dir(state_dir)
    fsync_dir(parent)
    log.warning("moved robot %s's policy state (%s) from %s, where an earlier build kept it, into %s", robot_id, ", ".join(p.name for p in moved), parent, state_dir)
    return True


class PolicyTrust:
    """What a robot trusts: its own spec, and the last accepted manifest (the registry's keys are
    TUF's business: the root metadata in the policy source's metadata folder).

    ``state_dir`` holds ``trusted.json`` (the accepted manifest) and the weights it names,
    ``weights-v<version>.safetensors``. A swap writes the new weights under their own name, then
    replaces ``trusted.json`` (write, fsync, rename), then deletes the other weights: a power cut
    at any point leaves a manifest whose weights are on disk intact, the old pair or the new one
    (tests/test_power_cut.py kills a robot mid-swap 100 times). The older layout's single
    ``weights.safetensors`` is still read, when its hash is the manifest's.
    """

    def __init__(self, *, robot_model: str, obs_dim: int, act_dim: int, state_dir: Path):
        self.spec = {"robot_model": robot_model, "obs_dim": int(obs_dim), "act_dim": int(act_dim)}
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.refusals: Counter[str] = Counter()
        self.floor = 0  # the lowest version accepted while no manifest is trusted (one recovered from an unreadable trusted.json)
        self.manifest: dict | None = self._read_trusted()
        self.blocked: set[int] = self._read_blocked()

    def _read_trusted(self) -> dict | None:
        """``trusted.json``, or None when there is none or it is unreadable (empty, not JSON, not a manifest: a damaged
        disk). Then the robot runs its fallback and installs the registry's policy again, as for damaged weights; the
        weights kept beside it (``weights-v<version>``) still name the version floor, so no lower version gets in."""
        path = self.state_dir / "trusted.json"
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_bytes())
            if not isinstance(manifest, dict) or [k for k in REQUIRED if k not in manifest] or not isinstance(manifest["version"], int):
                raise ValueError("not a policy manifest")
            if not {"size", "sha256"} <= set(manifest["weights"]):
                raise ValueError("names no weights")
            return manifest
        except (OSError, ValueError, TypeError) as exc:
            versions = [int(m[1]) for p in self.state_dir.glob("weights-v*.safetensors") if (m := re.fullmatch(r"weights-v(\d+)\.safetensors", p.name))]
            self.floor = max(versions, default=0)
            floor = f"; versions below v{self.floor} (the weights kept beside it) are still refused" if self.floor else ""
            log.error("%s is unreadable (%s: %s): running the fallback policy and fetching the registry's again%s", path, exc.__class__.__name__, exc, floor)
            return None

    def _read_blocked(self) -> set[int]:
        path = self.state_dir / "blocked.json"
        if not path.exists():
            return set()
        try:
            blocked = json.loads(path.read_bytes())
            if not isinstance(blocked, list) or not all(isinstance(v, int) for v in blocked):
                raise ValueError("not a list of versions")
            return set(blocked)
        except (OSError, ValueError) as exc:  # a version that failed here before fails its health check again, and is blocked again
            log.error("%s is unreadable (%s: %s): no version is blocked on this robot until one fails its health check again", path, exc.__class__.__name__, exc)
            return set()

    @property
    def version(self) -> int:
        """The trusted version: no lower one is accepted (0: none yet)."""
        return self.manifest["version"] if self.manifest else self.floor

    @property
    def weights_path(self) -> Path:
        """Where the trusted manifest's weights live."""
        return self._weights_file(self.version)

    def _weights_file(self, version: int) -> Path:
        return self.state_dir / f"weights-v{int(version):08d}.safetensors"

    def trusted_weights(self) -> bytes:
        """The trusted manifest's weights, checked against its size and hash (OSError or PolicyRejected if not intact)."""
        if self.manifest is None:
            raise PolicyRejected("malformed", "no trusted policy on this robot")
        path = self.weights_path
        legacy = self.state_dir / "weights.safetensors"
        data = path.read_bytes() if path.exists() or not legacy.exists() else legacy.read_bytes()
        if len(data) != self.manifest["weights"]["size"] or sha256_hex(data) != self.manifest["weights"]["sha256"]:
            raise PolicyRejected("hash", f"weights on disk differ from trusted v{self.version}'s")
        return data

    # -- checks ---------------------------------------------------------------------------
    def check(self, manifest: dict, *, running: bool = True) -> dict | None:
        """``manifest`` (as TUF delivered it) if it should be installed, None if the robot runs it already.
        Raises PolicyRejected (and counts it) otherwise. ``running``: whether the robot runs the trusted policy; when
        it does not (its weights on disk were damaged or missing, it fell back), the trusted manifest itself is one to
        install again: the registry still lists its weights with their hash."""
        try:
            return self._check(manifest, running)
        except PolicyRejected as exc:
            self.refusals[exc.reason] += 1
            raise

    def _check(self, manifest: dict, running: bool) -> dict | None:
        if not isinstance(manifest, dict):
            raise PolicyRejected("malformed", f"a manifest is a JSON object, got {type(manifest).__name__}")
        missing = [k for k in REQUIRED if k not in manifest]
        if missing or manifest.get("format") != FORMAT or not isinstance(manifest.get("version"), int):
            raise PolicyRejected("malformed", f"manifest lacks {missing} or has format {manifest.get('format')!r} (want {FORMAT!r})")
        if manifest["version"] in self.blocked:
            raise PolicyRejected("health", f"version {manifest['version']} failed this robot's health check before")
        if self.manifest is not None and manifest["version"] == self.version:
            if canonical_json(manifest) == canonical_json(self.manifest):
                return None if running else manifest  # already running it, or to fetch again
            raise PolicyRejected("replay", f"version {manifest['version']} is already trusted with other content")
        if manifest["version"] < self.version:
            raise PolicyRejected("rollback", f"version {manifest['version']} is lower than the trusted {self.version}")
        theirs = {k: manifest[k] for k in self.spec}
        if theirs != self.spec:
            raise PolicyRejected("spec", f"policy spec {theirs} does not fit this robot {self.spec}")
        return manifest

    # -- state ----------------------------------------------------------------------------
    def accept(self, manifest: dict, weights: bytes) -> None:
        """Make (manifest, weights) the trusted policy: its weights under their own name, then the
        manifest that names them (the switch), then the others go."""
        write_durably(self._weights_file(manifest["version"]), weights)
        write_durably(self.state_dir / "trusted.json", canonical_json(manifest))
        self.manifest = manifest
        keep = self.weights_path.name
        for old in self.state_dir.glob("weights*.safetensors"):
            if old.name != keep:
                old.unlink(missing_ok=True)

    def restore(self, manifest: dict | None, weights: bytes | None, failed_version: int) -> None:
        """Return to the previously trusted policy after ``failed_version`` failed its health check.

        The failed version is blocked for good on this robot, so it is not fetched again.
        """
        self.refusals["health"] += 1
        if manifest is None:
            (self.state_dir / "trusted.json").unlink(missing_ok=True)
            self.manifest = None
        else:
            self.accept(manifest, weights)
        # blocked last: a power cut before this leaves the previous policy trusted and the failed
        # version unblocked, so it is fetched, fails its health check and is blocked again
        self.blocked.add(int(failed_version))
        write_durably(self.state_dir / "blocked.json", json.dumps(sorted(self.blocked)).encode())
