"""A ROS 2 node on the robot: records episodes from a JointState topic and a command topic, uploads
them with the robot agent, and (``drive:=true``) runs the fleet's released policy on every joint state.

    python examples/ros2/flywheel_node.py --ros-args \\
        -p robot_id:=arm-3 -p robot_model:=so100 -p obs_dim:=12 -p act_dim:=6 \\
        -p server_url:=http://fleet:8700 -p policy_root:=/etc/flywheel/root.json -p drive:=true

The mapping is the bag importer's (fleet/interop/rosbag.py; examples/ros2/README.md):
observation = [position, velocity] of each ``sensor_msgs/msg/JointState`` (position alone when the
message has no velocity per joint), timestamp = its header stamp (the node's clock when the stamp is
zero), action = the last ``std_msgs/msg/Float64MultiArray`` on the command topic before the next
joint state, divided by ``action_scale``, reward = the last ``std_msgs/msg/Float64`` on
``reward_topic`` (none: 0). An episode is ``max_steps`` steps, ending truncated; the next one starts
at the observation that ended it. Episodes are spooled on disk by the robot agent and uploaded in the
background (docs/protocol.md, "Robot agent").

With ``policy_root`` (the registry's root metadata, provisioned once), the node updates its policy
from ``policy_url`` (where the registry is served; empty: ``server_url``, which also takes the uploads) with TUF
between episodes (fleet.registry.pull: signatures, rollback protection, the release's sensor
offset, filter and body features for this robot, a health check; the robot's token goes to ``policy_url`` only
where it is the fleet server: a static registry never gets it) and, with ``drive:=true``, publishes
``action_scale`` x the policy's action for each joint state on the command topic. Without it the node
only records (the episodes' policy_version is ``zero``: whatever drives the robot is not a release).

rclpy is ROS 2's (source /opt/ros/<distro>/setup.bash); the rest is the light robot package
(``pip install ./robot``). :class:`EpisodeLoop` holds the logic and needs no ROS.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from fleet.agent.agent import RobotAgent
from fleet.agent.config import AgentConfig, check_server_url
from fleet.agent.policy import PolicySource, builtin_policy
from fleet.agent.recorder import EpisodeRecorder
from fleet.registry.pull import SignedPolicySource, registry_token
from fleet.registry.trust import PolicyTrust
from sim.policy_fn import actuator_command

try:
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from rclpy.node import Node
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64, Float64MultiArray
except ImportError as exc:  # not a ROS 2 environment: EpisodeLoop still imports, main() says what to do
    ROS_MISSING: ImportError | None = exc
    Node = object
else:
    ROS_MISSING = None

log = logging.getLogger("flywheel_node")
CLOCK_STEP_BACK_S = 1.0  # a joint state stamped this much before the previous one: the clock was set back (NTP, a restarted time source)


class EpisodeLoop:
    """Joint states in, episodes out to the agent, the policy's action back: the node without ROS.

    ``observe(obs, t)`` for each joint state: it records a step (the action and reward last heard,
    set by ``command`` and ``reward``), hands each finished episode to the agent, and returns the
    current policy's action for ``obs`` (act_dim,) in [-1, 1].
    """

    def __init__(self, agent: RobotAgent, recorder: EpisodeRecorder, source: PolicySource, max_steps: int, max_non_finite_run: int = 3):
        """``max_non_finite_run``: how many joint states in a row with a NaN or infinite entry the policy still drives
        the robot through (its sensor filter estimating the unread entries); from the next one on, and until a finite
        joint state, the command is zeros (logged once per run): a persistent NaN (an unmeasured joint's velocity) would
        drive the robot on an estimate of it that nothing corrects."""
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if max_non_finite_run < 0:
            raise ValueError(f"max_non_finite_run must be >= 0, got {max_non_finite_run}")
        self.agent, self.recorder, self.source, self.max_steps = agent, recorder, source, max_steps
        self.max_non_finite_run = max_non_finite_run
        self._non_finite_run = 0  # joint states in a row with a NaN or infinite entry
        self._act_dim = 0  # the length of the policy's actions (set by _drive, called with every _begin)
        self._action: np.ndarray | None = None
        self._reward = 0.0
        self._last_t = -np.inf
        self._policy = self._act = None
        self._gap = self._zeroed = False  # in a run of non-finite readings / of non-finite actions (each logged once)
        self.non_finite_readings = 0  # joint states with a NaN or infinite value: not recorded
        self.non_finite_actions = 0  # actions the policy gave with a NaN or infinite value: zeros published instead
        self.dropped_episodes = 0  # episodes finish() refused (a NaN command or reward heard, say): logged, not spooled

    def command(self, action: np.ndarray) -> None:
        self._action = np.asarray(action, np.float32)

    def reward(self, value: float) -> None:
        self._reward = float(value)

    def observe(self, obs: np.ndarray, t: float) -> np.ndarray | None:
        """Record ``obs`` (obs_dim,) seen at ``t`` seconds; the policy's action for it (None before the first episode).
        A stamp not after the previous one is not recorded, but the robot is still driven (a clock set back an hour once
        left a driven robot without commands for that hour); one more than ``CLOCK_STEP_BACK_S`` before it means the
        clock was set back: the episode ends (truncated) at its last step and a new one begins here. A reading with a
        NaN or infinite value (a joint driver's unmeasured joint) is not recorded either: the episode ends (truncated) at
        its last step, and the next finite reading begins a new one. The action returned is always finite (:meth:`_drive`)."""
        if not np.isfinite(obs).all():
            self.non_finite_readings += 1
            self._non_finite_run += 1
            if not self._gap:
                log.warning("joint state at %.9f s has NaN or infinite values (at %s): not recorded; the episode ends at its last step and "
                            "the next finite joint state begins one", t, np.flatnonzero(~np.isfinite(obs)).tolist())  # fmt: skip
                self._end()
                self._gap = True
            if self._act is None:
                return None
            if self._non_finite_run > self.max_non_finite_run:  # the policy's estimate of the unread entries is no longer trusted
                if self._non_finite_run == self.max_non_finite_run + 1:
                    log.warning("%d joint states in a row with NaN or infinite values: commanding zeros until a finite one", self._non_finite_run)
                return np.zeros(self._act_dim, np.float32)
            return self._drive(obs)
        self._non_finite_run = 0
        if t <= self._last_t:
            if self._last_t - t > CLOCK_STEP_BACK_S and self._policy is not None:
                log.warning("the clock stepped back %.3f s: episode cut at its last step, a new one begins", self._last_t - t)
                self._end()
                self._begin(obs, t)
                self._last_t = t
            else:
                log.warning("joint state at %.9f s is not after the previous one (%.9f s): not recorded", t, self._last_t)
            return None if self._act is None else self._drive(obs)
        self._last_t = t
        if self._policy is None or self._action is None or self._gap:
            self._begin(obs, t)  # first observation, no command heard yet, or the first after non-finite ones: nothing to record a step with
        else:
            self.recorder.step(self._action, self._reward, obs, False, self.recorder.num_steps + 1 >= self.max_steps, t)
            if self.recorder.done:
                self._finish()
                self._begin(obs, t)
        return self._drive(obs)

    def _drive(self, obs: np.ndarray) -> np.ndarray:
        """The policy's action for ``obs`` in [-1, 1], or zeros (the zero policy's command) when it has a NaN or infinite
        value: np.clip keeps NaN, and a NaN command must never reach the motors."""
        action, zeroed = actuator_command(np.asarray(self._act(obs[None]), np.float32)[0])
        self._act_dim = len(action)
        if not zeroed:
            self._zeroed = False
            return action
        self.non_finite_actions += 1
        if not self._zeroed:
            log.warning("policy %s gave a NaN or infinite action: commanding zeros until it gives finite ones", self._policy.version)
            self._zeroed = True
        return action

    def _begin(self, obs: np.ndarray, t: float) -> None:
        self._policy = self.source.current()  # between episodes: the release a started signed source installed last
        self._act = self._policy.for_episode()
        self.recorder.reset(obs, t)
        self._gap = False

    def _end(self) -> None:
        """End the episode (truncated) at its last step and hand it on; nothing when it has no step yet."""
        if self.recorder.num_steps:
            self.recorder.truncate()
            self._finish()

    def _finish(self) -> None:
        steps = self.recorder.num_steps
        try:
            episode = self.recorder.finish(policy_version=self._policy.version)  # clears the recorder, also when it raises
        except ValueError as exc:  # EpisodeValidationError (a NaN command or reward heard), or commands of other lengths: this episode is lost, recording goes on
            self.dropped_episodes += 1
            log.error("episode of %d steps on policy %s dropped (%d so far): %s", steps, self._policy.version, self.dropped_episodes, exc)
            return
        self.agent.submit(episode)  # on disk when this returns; uploaded in the background
        if hasattr(self.source, "report_episode"):
            self.source.report_episode(episode)  # ends a new release's probation; its early-termination check never fails here (no episode terminates)
        log.info("episode %s: %d steps on policy %s; %s", episode.episode_id, episode.num_steps, self._policy.version, self.agent.status())


def observation_of(msg) -> np.ndarray:
    """A JointState as the observation: [position, velocity], position alone without one velocity per joint."""
    position = np.asarray(msg.position, np.float32)
    velocity = np.asarray(msg.velocity, np.float32)
    return np.concatenate([position, velocity]) if len(velocity) == len(position) else position


class FlywheelNode(Node):
    """The ROS 2 side: parameters, one subscription per topic, the command publisher; see the module docstring."""

    PARAMETERS = {
        "robot_id": "", "robot_model": "", "obs_dim": 0, "act_dim": 0,
        "server_url": AgentConfig.server_url, "token_file": "", "spool_dir": AgentConfig.spool_dir,
        "policy_root": "", "policy_url": "", "policy_state_dir": "runs/fleet/policy", "poll_interval_s": 60.0,
        "joint_state_topic": "/joint_states", "command_topic": "/arm/commands", "reward_topic": "",
        "drive": False, "action_scale": 1.0, "max_steps": 500, "max_non_finite_run": 3,
    }  # fmt: skip

    def __init__(self):
        super().__init__("flywheel")
        p = {name: self.declare_parameter(name, default).value for name, default in self.PARAMETERS.items()}
        if not p["robot_id"] or not p["robot_model"] or p["obs_dim"] < 1 or p["act_dim"] < 1:
            raise ValueError("set the parameters robot_id, robot_model, obs_dim and act_dim (--ros-args -p robot_id:=arm-3 ...)")
        if p["drive"] and not p["policy_root"]:
            raise ValueError("drive:=true runs the fleet's released policy: set policy_root to the registry's root.json")
        if not p["action_scale"] > 0:
            raise ValueError(f"action_scale must be > 0 (commands = action_scale x the policy's [-1, 1] actions), got {p['action_scale']}")
        self.obs_dim, self.drive, self.scale = int(p["obs_dim"]), bool(p["drive"]), float(p["action_scale"])
        config = AgentConfig(server_url=p["server_url"], token_file=p["token_file"] or None, spool_dir=p["spool_dir"])
        source = self._policy_source(p, config)
        self.agent = RobotAgent(config, p["robot_id"]).start()
        recorder = EpisodeRecorder(robot_id=p["robot_id"], robot_model=p["robot_model"], source="real")
        self.loop = EpisodeLoop(self.agent, recorder, source, int(p["max_steps"]), int(p["max_non_finite_run"]))
        self.publisher = self.create_publisher(Float64MultiArray, p["command_topic"], 10) if self.drive else None
        self.create_subscription(JointState, p["joint_state_topic"], self.on_joint_state, 10)
        self.create_subscription(Float64MultiArray, p["command_topic"], self.on_command, 10)
        if p["reward_topic"]:
            self.create_subscription(Float64, p["reward_topic"], lambda msg: self.loop.reward(msg.data), 10)

    def _policy_source(self, p: dict, config: AgentConfig) -> PolicySource:
        if not p["policy_root"]:
            return builtin_policy("zero", p["act_dim"])
        trust = PolicyTrust(robot_model=p["robot_model"], obs_dim=p["obs_dim"], act_dim=p["act_dim"], state_dir=p["policy_state_dir"])
        fallback = builtin_policy("zero", p["act_dim"]).current()
        root = Path(p["policy_root"]).read_bytes()
        url = p["policy_url"] or config.server_url
        check_server_url(url, "policy_url", "the policy registry")
        token = registry_token(url, config.server_url, config.load_token())  # the fleet server's token, never a static host's
        return SignedPolicySource(url, token, p["robot_id"], trust, fallback, root=root, poll_interval_s=p["poll_interval_s"],
                                  root_origin=f"policy_root {p['policy_root']}").start()

    def on_joint_state(self, msg) -> None:
        obs = observation_of(msg)
        if obs.shape != (self.obs_dim,):
            self.get_logger().warning(f"joint state gives {obs.shape[0]} observation values, obs_dim is {self.obs_dim}; skipped")
            return
        ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        action = self.loop.observe(obs, (ns or self.get_clock().now().nanoseconds) / 1e9)
        if action is not None and self.drive:
            self.publisher.publish(Float64MultiArray(data=[float(a) * self.scale for a in action]))
            self.loop.command(action)  # what this step applies, unless another node's command follows it

    def on_command(self, msg) -> None:
        self.loop.command(np.asarray(msg.data, np.float32) / self.scale)

    def close(self) -> None:
        """Stop uploading (the spool keeps what is left for the next start); an unfinished episode is dropped."""
        if self.loop.recorder.num_steps:
            log.warning("dropping the unfinished episode (%d steps): it has no end to record", self.loop.recorder.num_steps)
        self.agent.stop()
        if hasattr(self.loop.source, "close"):
            self.loop.source.close()


def main(args=None) -> int:
    if ROS_MISSING is not None:
        print(f"flywheel_node needs ROS 2's rclpy ({ROS_MISSING}): source /opt/ros/<distro>/setup.bash, then run it again", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rclpy.init(args=args)
    try:
        node = FlywheelNode()
    except (ValueError, FileNotFoundError) as exc:  # a parameter, the token or the root metadata
        print(f"flywheel_node: {exc}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
