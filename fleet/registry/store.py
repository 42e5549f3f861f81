"""The policy registry on disk: signed versions and the staged-rollout state.

Layout (every file replaced atomically; weights before the manifest that names them):

    <root>/versions/<version>/weights.safetensors
    <root>/versions/<version>/manifest.json      signed envelope (see signing.py)
    <root>/rollout.json                          {"stable", "canary", "cohort", "history"}

Rollout: a new version goes to the canary cohort first; ``widen()`` makes it stable for all,
``rollback()`` republishes the last stable weights under a new, higher version (robots never
accept a lower version) and ends the canary. The registry serves; W&B only mirrors.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from fleet.registry.manifest import build_manifest
from fleet.registry.signing import canonical_json, generate_keypair, load_private_key, sign
from fleet.registry.trust import atomic_write


class RegistryError(ValueError):
    pass


class PolicyRegistry:
    def __init__(self, root: Path, private_key, ttl_s: float = 7 * 24 * 3600):
        self.root = Path(root)
        (self.root / "versions").mkdir(parents=True, exist_ok=True)
        self.private_key, self.ttl_s = private_key, ttl_s
        self._lock = threading.Lock()

    # -- state ----------------------------------------------------------------------------
    def rollout(self) -> dict:
        path = self.root / "rollout.json"
        return json.loads(path.read_text()) if path.exists() else {"stable": None, "canary": None, "cohort": [], "history": []}

    def _save_rollout(self, state: dict) -> None:
        atomic_write(self.root / "rollout.json", canonical_json(state))

    def versions(self) -> list[int]:
        return sorted(int(p.name) for p in (self.root / "versions").iterdir() if (p / "manifest.json").exists())

    def envelope(self, version: int) -> dict:
        path = self.root / "versions" / f"{int(version):08d}" / "manifest.json"
        if not path.exists():
            raise RegistryError(f"no policy version {version}; published: {self.versions()}")
        return json.loads(path.read_text())

    def weights_path(self, version: int) -> Path:
        path = self.root / "versions" / f"{int(version):08d}" / "weights.safetensors"
        if not path.exists():
            raise RegistryError(f"no weights for policy version {version}")
        return path

    def latest_for(self, robot_id: str) -> dict | None:
        """The signed envelope this robot should run (canary-aware), or None before any release."""
        state = self.rollout()
        version = state["canary"] if state["canary"] is not None and robot_id in state["cohort"] else state["stable"]
        return None if version is None else self.envelope(version)

    # -- changes --------------------------------------------------------------------------
    def publish(self, weights: bytes, *, robot_model: str, obs_dim: int, act_dim: int, cohort: list[str] | None = None, **fields) -> dict:
        """Sign and store a new version. With a non-empty ``cohort`` it starts as a canary, else it is stable."""
        with self._lock:
            state = self.rollout()
            version = max(self.versions(), default=0) + 1
            manifest = build_manifest(
                version=version, robot_model=robot_model, obs_dim=obs_dim, act_dim=act_dim, weights=weights, ttl_s=self.ttl_s, **fields
            )
            envelope = sign(manifest, self.private_key)
            folder = self.root / "versions" / f"{version:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / "weights.safetensors", weights)
            atomic_write(folder / "manifest.json", canonical_json(envelope))
            if cohort:
                state.update(canary=version, cohort=sorted(cohort))
            else:
                state.update(stable=version, canary=None, cohort=[])
            state["history"].append({"version": version, "event": "canary" if cohort else "stable", "at": time.time()})
            self._save_rollout(state)
            return envelope

    def widen(self) -> int:
        """Promote the canary to stable for the whole fleet; returns its version."""
        with self._lock:
            state = self.rollout()
            if state["canary"] is None:
                raise RegistryError("no canary to widen")
            version = state["canary"]
            state.update(stable=version, canary=None, cohort=[])
            state["history"].append({"version": version, "event": "widened", "at": time.time()})
            self._save_rollout(state)
            return version

    def rollback(self, reason: str) -> dict | None:
        """End the canary; republish the last stable weights as a new version for everyone.

        Returns the new envelope (None when there was no stable version to return to).
        """
        state = self.rollout()
        if state["canary"] is None:
            raise RegistryError("no canary to roll back")
        bad, stable = state["canary"], state["stable"]
        envelope = None
        if stable is not None:  # a new stable version carrying the old weights (publish ends the canary)
            old = self.envelope(stable)["manifest"]
            envelope = self.publish(
                self.weights_path(stable).read_bytes(),
                robot_model=old["robot_model"],
                obs_dim=old["obs_dim"],
                act_dim=old["act_dim"],
                policy=old["policy"],
                data_snapshot=old["data_snapshot"],
                gate=old["gate"],
                sensor_offsets=old.get("sensor_offsets", {}),
                note=f"rollback of v{bad} to the weights of v{stable}: {reason}",
            )
        with self._lock:
            state = self.rollout()
            state.update(canary=None, cohort=[])
            state["history"].append({"version": bad, "event": "rolled_back", "reason": reason, "at": time.time()})
            self._save_rollout(state)
        return envelope


def open_registry(directory: str | Path, private_key: str | Path) -> PolicyRegistry:
    """The registry at ``directory``, signing with ``private_key`` (a new key pair is made if it is missing)."""
    key = Path(private_key)
    if not key.exists():
        generate_keypair(key, key.with_suffix(".pub"))
    return PolicyRegistry(Path(directory), load_private_key(key))
