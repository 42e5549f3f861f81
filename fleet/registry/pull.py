"""Robot side: pull, verify and swap signed policies between episodes (a PolicySource).

Runs on the robot: numpy, httpx and cryptography only (no torch, no Ray). At each episode
start the agent asks :meth:`SignedPolicySource.current`; at most every ``poll_interval_s`` that
asks the registry for this robot's latest manifest, verifies it (signature, version, expiry,
spec), streams the weights with a size cap and checks their hash, loads them with the numpy
runtime (behind this robot's signed sensor correction, if the manifest carries one:
``sim/sensors.py``), runs a health check, and only then swaps. Any failure keeps the last good policy,
and is logged and counted (``refusals``). A failed health check rolls back to the previous
policy and blocks that version on this robot.
"""

from __future__ import annotations

import logging
import time

import httpx
import numpy as np

from fleet.agent.policy import Policy
from fleet.registry.trust import PolicyRejected, PolicyTrust
from policies.runtime import PolicyLoadError, load_policy_bytes
from sim.sensors import SensorCorrectionError, corrected_act, robot_offset

log = logging.getLogger(__name__)


class SignedPolicySource:
    def __init__(
        self,
        server_url: str,
        token: str,
        robot_id: str,
        trust: PolicyTrust,
        fallback: Policy,
        *,
        poll_interval_s: float = 0.0,
        request_timeout_s: float = 10.0,
        probe_obs: np.ndarray | None = None,
        min_healthy_steps: int = 0,
    ):
        self.url, self.robot_id, self.trust, self.fallback = server_url.rstrip("/"), robot_id, trust, fallback
        self.poll_interval_s = poll_interval_s
        self._client = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=request_timeout_s)
        self._last_poll = -np.inf
        self.probe_obs = probe_obs if probe_obs is not None else np.zeros((4, trust.spec["obs_dim"]), np.float32)
        self.min_healthy_steps = min_healthy_steps
        self._probation: tuple | None = None  # (previous manifest, weights, policy) while a new policy runs its first episode
        self.swaps = 0
        self.errors = 0  # network/server trouble (not refusals): the robot just keeps its policy
        self._policy = self._load_trusted() or fallback

    @property
    def refusals(self) -> dict[str, int]:
        return dict(self.trust.refusals)

    def current(self) -> Policy:
        if time.monotonic() - self._last_poll >= self.poll_interval_s:
            self._last_poll = time.monotonic()
            self.poll()
        return self._policy

    def poll(self) -> bool:
        """Check the registry once; True if a new policy was swapped in."""
        try:
            response = self._client.get(f"{self.url}/v1/policies/latest", params={"robot_id": self.robot_id})
        except httpx.HTTPError as exc:
            self.errors += 1
            log.warning("policy poll failed (%s); keeping v%s", exc, self.trust.version)
            return False
        if response.status_code == 404:
            return False  # nothing published for this robot yet
        if response.status_code != 200:
            self.errors += 1
            log.warning("policy poll: HTTP %s %s; keeping v%s", response.status_code, response.text[:200], self.trust.version)
            return False
        try:
            return self._consider(response.json())
        except PolicyRejected as exc:
            log.warning("robot %s refused a policy: %s", self.robot_id, exc)
            return False
        except (ValueError, httpx.HTTPError) as exc:
            self.errors += 1
            log.warning("policy fetch failed (%s); keeping v%s", exc, self.trust.version)
            return False

    def _consider(self, envelope: dict) -> bool:
        manifest = self.trust.check(envelope)
        if manifest is None:
            return False
        with self._client.stream("GET", f"{self.url}/v1/policies/{manifest['version']}/weights") as response:
            if response.status_code != 200:
                raise ValueError(f"weights of v{manifest['version']}: HTTP {response.status_code}")
            weights = self.trust.receive_weights(manifest, response.iter_bytes())
        policy = self._runtime(manifest, weights)  # raises PolicyRejected("malformed")
        try:  # what a failed health check returns to: the trusted pair, if its weights are intact
            kept = self.trust.trusted_weights() if self.trust.manifest else None
        except (OSError, PolicyRejected):
            kept = None
        previous = (self.trust.manifest if kept is not None else None, kept, self._policy)
        self.trust.accept(manifest, weights)
        if not self._healthy(policy):
            self._roll_back(previous, manifest["version"], "gave bad actions on probe observations")
            return False
        self._policy = policy
        self._probation = previous
        self.swaps += 1
        log.info("robot %s swapped to policy v%s", self.robot_id, manifest["version"])
        return True

    def report_episode(self, episode) -> None:
        """After each episode: the first one on a newly swapped policy is its health check.

        An episode that terminated within ``min_healthy_steps`` steps rolls the robot back to
        its previous policy and blocks the new version here.
        """
        if self._probation is None or episode.metadata["policy_version"] != self._policy.version:
            return
        previous, self._probation = self._probation, None
        if bool(episode.terminated[-1]) and episode.num_steps < self.min_healthy_steps:
            self._roll_back(previous, int(self._policy.version), f"first episode terminated after {episode.num_steps} steps")

    def _roll_back(self, previous: tuple, failed_version: int, why: str) -> None:
        manifest, weights, policy = previous
        self.trust.restore(manifest, weights, failed_version=failed_version)
        self._policy = policy
        log.warning("robot %s: v%s failed its health check (%s); back on %s", self.robot_id, failed_version, why, policy.version)

    def _runtime(self, manifest: dict, weights: bytes) -> Policy:
        spec = self.trust.spec
        try:
            runtime = load_policy_bytes(manifest["policy"], weights, robot_model=spec["robot_model"], obs_dim=spec["obs_dim"], act_dim=spec["act_dim"])
            offset = robot_offset(manifest.get("sensor_offsets", {}), self.robot_id, spec["obs_dim"])
        except (PolicyLoadError, SensorCorrectionError) as exc:
            self.trust.refusals["malformed"] += 1
            raise PolicyRejected("malformed", f"policy does not load: {exc}") from None
        return Policy(str(manifest["version"]), corrected_act(runtime.act, offset))

    def _healthy(self, policy: Policy) -> bool:
        """The policy gives finite actions in [-1, 1] of the right shape on probe observations."""
        try:
            actions = np.asarray(policy.act(self.probe_obs))
        except Exception as exc:  # any crash of a freshly loaded policy is a failed health check
            log.warning("health check raised %s", exc)
            return False
        return actions.shape == (len(self.probe_obs), self.trust.spec["act_dim"]) and bool(np.isfinite(actions).all()) and bool(np.abs(actions).max() <= 1.0)

    def _load_trusted(self) -> Policy | None:
        """After a robot restart: the policy it trusted before, if its files are intact and it passes the health check."""
        if self.trust.manifest is None or self.trust.version in self.trust.blocked:
            return None
        try:
            policy = self._runtime(self.trust.manifest, self.trust.trusted_weights())
        except (PolicyRejected, OSError) as exc:
            log.warning("trusted policy on disk is unusable (%s); using the fallback", exc)
            return None
        return policy if self._healthy(policy) else None

    def close(self) -> None:
        self._client.close()


def signed_policy_source(
    public_key: str, server_url: str, token: str, robot_id: str, robot_model: str, state_dir: str, poll_interval_s: float
) -> SignedPolicySource:
    """A robot's signed policy source pinned to the registry key at ``public_key`` (falls back to a zero policy)."""
    from fleet.agent.policy import builtin_policy
    from fleet.registry.signing import load_public_key
    from sim.robots import get_task

    task = get_task(robot_model)
    trust = PolicyTrust(load_public_key(public_key), robot_model=robot_model, obs_dim=task.obs_dim, act_dim=task.act_dim, state_dir=state_dir)
    fallback = builtin_policy("zero", task.act_dim).current()
    return SignedPolicySource(server_url, token, robot_id, trust, fallback, poll_interval_s=poll_interval_s)
