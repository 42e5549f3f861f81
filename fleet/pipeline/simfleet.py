"""The simulated fleet: each robot a Ray actor running the real robot agent.

A simulated robot has a hidden physical profile and operating condition (heavy payload, weak
motor, noisy sensor ...). It acts with the policy it trusts, records, spools and uploads its
episodes over HTTP like a real robot, and between episodes pulls, verifies and swaps signed
policies. The pipeline only sees what comes back through the server.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ray

from sim.variation import VariationProfile

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


def fleet_specs(num_robots: int, conditions: list[str]) -> list[RobotSpec]:
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        raise ValueError(f"unknown robot conditions {unknown}; known: {sorted(CONDITIONS)}")
    return [
        RobotSpec(f"robot-{i}", conditions[i % len(conditions)], VariationProfile(**CONDITIONS[conditions[i % len(conditions)]]))
        for i in range(num_robots)
    ]


@ray.remote(num_cpus=0)
class SimulatedRobot:
    """One robot: SimRobot physics + RobotAgent (spool, upload) + SignedPolicySource (pull, verify, swap)."""

    def __init__(self, spec: RobotSpec, robot_model: str, episode_steps: int, server_url: str, token: str, root_metadata: bytes, state_dir: str, seed: int):
        from fleet.agent.agent import RobotAgent
        from fleet.agent.config import AgentConfig, SimRobotConfig
        from fleet.agent.policy import builtin_policy
        from fleet.agent.recorder import EpisodeRecorder
        from fleet.agent.robot import SimRobot
        from fleet.registry.pull import SignedPolicySource
        from fleet.registry.trust import PolicyTrust

        self.spec, self.seed = spec, seed
        root = Path(state_dir) / spec.robot_id
        self.robot = SimRobot(SimRobotConfig(robot_id=spec.robot_id, model=robot_model, source="real", seed=seed, max_steps=episode_steps, profile=spec.profile.to_dict()))
        self.recorder = EpisodeRecorder(robot_id=spec.robot_id, robot_model=robot_model, source="real", hardware={"condition": spec.condition})
        agent_cfg = AgentConfig(server_url=server_url, spool_dir=str(root / "spool"), backoff_initial_s=0.2, backoff_max_s=2.0, status_interval_s=60.0)
        self.agent = RobotAgent(agent_cfg, spec.robot_id, token=token, seed=seed).start()
        trust = PolicyTrust(robot_model=robot_model, obs_dim=self.robot.obs_dim, act_dim=self.robot.act_dim, state_dir=root / "policy")
        self.policy = SignedPolicySource(
            server_url, token, spec.robot_id, trust, builtin_policy("zero", self.robot.act_dim).current(), root=root_metadata, min_healthy_steps=5
        )
        self.episodes_run = 0

    def run(self, episodes: int) -> list[dict]:
        """Run ``episodes`` episodes (pulling a policy before each); returns one summary per episode."""
        from fleet.agent.robot import run_episode

        out = []
        for _ in range(episodes):
            policy = self.policy.current()
            episode = run_episode(self.robot, policy, self.recorder, seed=self.seed * 1_000_003 + self.episodes_run)
            self.episodes_run += 1
            self.agent.submit(episode)
            self.policy.report_episode(episode)
            out.append(
                {"robot_id": self.spec.robot_id, "policy_version": policy.version, "return": episode.total_return, "steps": episode.num_steps, "episode_id": episode.episode_id}
            )
        return out

    def drain(self, timeout_s: float) -> bool:
        return self.agent.wait_drained(timeout_s)

    def status(self) -> dict:
        return {
            **self.agent.status(),
            "condition": self.spec.condition,
            **self.policy.status(),
        }

    def stop(self) -> None:
        self.agent.stop()
        self.policy.close()
        self.robot.close()
