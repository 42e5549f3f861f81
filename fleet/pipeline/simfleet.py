"""The simulated fleet: each robot a Ray actor running the real robot agent.

A simulated robot has a hidden physical profile and operating condition (heavy payload, weak
motor, noisy sensor ...). It acts with the policy it trusts, records, spools and uploads its
episodes over HTTP like a real robot, and between episodes pulls, verifies and swaps signed
policies. The pipeline only sees what comes back through the server.

A robot actor is restartable (``Services.robot_options``: Ray restarts it after its process or
node dies and retries its calls): what it carries over lives in its folder,
``<state_dir>/<robot id>``: the spool of episodes not yet acknowledged, the policy it trusts, and
``robot.json`` (:data:`LEDGER`: episodes run, which give the next one's seed and episode id, and
the episodes of its current ``run`` call). A restarted robot, on any node that reaches that
folder, uploads what its spool holds (the server answers a duplicate for an episode stored before
the crash but never acknowledged: idempotent by episode id) and a retried ``run`` returns the
episodes already run for that call and runs only the rest: no acknowledged episode lost, none
stored twice. An episode spooled just before the crash, but not yet in ``robot.json``, is run
again under the same episode id: the server keeps the first (the second is a duplicate, or
refused with 409 where its bytes differ).
"""

from __future__ import annotations

import re

import dataclasses
import functools
import json
import uuid
from collections.abc import Sequence
from pathlib import Path

import ray

from fleet.agent.config import AgentConfig
from sim.durable import write_durably
from sim.variation import VariationProfile

LEDGER = "robot.json"  # in a robot's folder: what a restarted robot resumes from

# Named operating conditions; a fleet of N robots cycles through them.
CONDITIONS: dict[str, dict] = {
    "nominal": {},
    "heavy_payload": {"payload_mass": 2.0},
    "weak_motor": {"actuator_strength": 0.5},
    "noisy_sensor": {"obs_noise_std": 0.05, "obs_bias": 0.02},
    "worn_joints": {"damping_scale": 4.0},
    "laggy_controller": {"action_latency": 1},
    "slippery_floor": {"friction_scale": 0.3},
}


@dataclasses.dataclass(frozen=True)
class RobotSpec:
    robot_id: str
    condition: str
    profile: VariationProfile  # hidden from the pipeline: it only sees telemetry


def condition_profiles(conditions: Sequence[str]) -> list[VariationProfile]:
    """The body of each named condition; a ValueError naming the unknown ones."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions:
        raise ValueError(f"unknown robot conditions {unknown or '[] (none given)'}; known: {sorted(CONDITIONS)}")
    return [VariationProfile(**CONDITIONS[c]) for c in conditions]


def robot_order(ids) -> list[str]:
    """Robot ids in their numbers' order (robot-2 before robot-10): the table's rows, the canaries, each robot's seed.
    Sorted as text, a fleet grown past ten robots reordered them, and changed who was a canary and each one's seed."""
    return sorted(ids, key=lambda r: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", r)])


def fleet_specs(num_robots: int, conditions: list[str]) -> list[RobotSpec]:
    profiles = condition_profiles(conditions)
    return [RobotSpec(f"robot-{i}", conditions[i % len(conditions)], profiles[i % len(conditions)]) for i in range(num_robots)]


@ray.remote(num_cpus=0)
class SimulatedRobot:
    """One robot: SimRobot physics + RobotAgent (spool, upload) + SignedPolicySource (pull, verify, swap).
    ``agent``: how it spools and uploads (``fleet.agent``; its server URL and spool folder are replaced).
    ``record_state``: its episodes carry its physics state (qpos/qvel extras), as a robot's encoders log it (loop.record_state)."""

    def __init__(
        self, spec: RobotSpec, robot_model: str, episode_steps: int, server_url: str, token: str, root_metadata: bytes, state_dir: str, seed: int,
        agent: AgentConfig, record_state: bool = False,
    ):  # fmt: skip
        from fleet.agent.agent import RobotAgent
        from fleet.agent.config import SimRobotConfig
        from fleet.agent.policy import builtin_policy
        from fleet.agent.recorder import EpisodeRecorder
        from fleet.agent.robot import SimRobot
        from fleet.registry.pull import SignedPolicySource
        from fleet.registry.trust import PolicyTrust

        self.spec, self.seed = spec, seed
        root = Path(state_dir) / spec.robot_id
        root.mkdir(parents=True, exist_ok=True)
        self.ledger_path = root / LEDGER
        fresh = {"id": str(uuid.uuid4()), "episodes_run": 0, "call": None, "done": [], "nodes": []}  # id: of this robot in this run
        self.ledger = json.loads(self.ledger_path.read_bytes()) if self.ledger_path.exists() else fresh
        self.ledger["nodes"].append(ray.get_runtime_context().get_node_id())  # where each start of this robot ran
        self._save_ledger()
        self.robot = SimRobot(SimRobotConfig(robot_id=spec.robot_id, model=robot_model, source="real", seed=seed, max_steps=episode_steps, profile=spec.profile.to_dict(), record_state=record_state))
        self.recorder = functools.partial(EpisodeRecorder, robot_id=spec.robot_id, robot_model=robot_model, source="real", hardware={"condition": spec.condition})
        agent_cfg = dataclasses.replace(agent, server_url=server_url, spool_dir=str(root / "spool"))  # loop_config.LOOP_SETS
        self.agent = RobotAgent(agent_cfg, spec.robot_id, token=token, seed=seed).start()
        trust = PolicyTrust(robot_model=robot_model, obs_dim=self.robot.obs_dim, act_dim=self.robot.act_dim, state_dir=root / "policy")
        self.policy = SignedPolicySource(
            server_url, token, spec.robot_id, trust, builtin_policy("zero", self.robot.act_dim).current(), root=root_metadata
        )  # the first-episode health check with every robot's default, MIN_HEALTHY_STEPS (fleet/registry/trust.py)

    def run(self, episodes: int, call: str | None = None) -> list[dict]:
        """Run ``episodes`` episodes (pulling a policy before each); returns one summary per episode.
        ``call`` names the call: the same name again (Ray's retry after a restart) returns the episodes
        already run for it and runs only the rest."""
        from fleet.agent.loop import run_episode

        ledger = self.ledger
        if call is None or ledger["call"] != call:
            ledger["call"], ledger["done"] = call, []
        while len(ledger["done"]) < episodes:
            policy, k = self.policy.current(), ledger["episodes_run"]
            recorder = self.recorder(episode_id=str(uuid.uuid5(uuid.UUID(ledger["id"]), str(k))))  # the k-th episode's id, whoever runs it
            episode = run_episode(self.robot, policy, recorder, seed=self.seed * 1_000_003 + k)
            self.agent.submit(episode)  # durable in the spool: this robot, or its next start, uploads it
            self.policy.report_episode(episode)
            ledger["episodes_run"] = k + 1  # a crash before this line runs episode k again, under its id
            ledger["done"].append(
                {"robot_id": self.spec.robot_id, "policy_version": policy.version, "return": episode.total_return, "steps": episode.num_steps, "episode_id": episode.episode_id}
            )
            self._save_ledger()
        return list(ledger["done"])

    def _save_ledger(self) -> None:
        write_durably(self.ledger_path, json.dumps(self.ledger).encode())

    def drain(self, timeout_s: float) -> bool:
        return self.agent.wait_drained(timeout_s)

    def status(self) -> dict:
        return {
            **self.agent.status(),
            "condition": self.spec.condition,
            **self.policy.status(),
            "episodes_run": self.ledger["episodes_run"],
            "nodes": list(self.ledger["nodes"]),  # Ray node ids, one per start of this robot (restarts)
        }

    def stop(self) -> None:
        self.agent.stop()
        self.policy.close()
        self.robot.close()
