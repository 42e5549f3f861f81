"""RobotAgent: episodes in (from the control loop), durable spool, background upload out."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fleet.agent.config import AgentConfig, SimRobotConfig, check_robot_id
from fleet.agent.policy import PolicySource, builtin_policy
from fleet.agent.recorder import EpisodeRecorder
from fleet.agent.spool import EpisodeTooLarge, Spool, SpoolFullError
from fleet.agent.uploader import Uploader
from sim.episode import Episode

log = logging.getLogger(__name__)


class RobotAgent:
    """Spools each submitted episode durably, uploads in the background, reports its queue.

    Survives a server that is down (retries with backoff, forever) and its own restart (the
    spool is on disk; a new agent on the same spool directory uploads what is left).
    """

    def __init__(self, config: AgentConfig, robot_id: str, *, token: str | None = None, on_ack=None, seed: int | None = None):
        check_robot_id(robot_id)  # it names the spool's folder
        self.config, self.robot_id, self.dropped, self.too_large = config, robot_id, 0, 0
        self.spool = Spool(Path(config.spool_dir) / robot_id, config.spool_max_bytes)
        self.uploader = Uploader(
            self.spool,
            config.server_url,
            token if token is not None else config.load_token(),
            backoff_initial_s=config.backoff_initial_s,
            backoff_max_s=config.backoff_max_s,
            request_timeout_s=config.request_timeout_s,
            status_interval_s=config.status_interval_s,
            max_attempts=config.max_attempts,
            compress=config.compress_uploads,
            resumable_threshold_bytes=config.resumable_threshold_bytes,
            on_ack=on_ack,
            seed=seed,
        )

    def start(self) -> RobotAgent:
        self.uploader.start()
        return self

    def submit(self, episode: Episode) -> bool:
        """Spool one episode (durable on return); the uploader sends it when it can. False (the episode dropped,
        counted in ``dropped``, the reason in ``last_error``) when it does not fit: the spool's disk is full even after
        evicting every older episode, or the episode alone is larger than ``spool_max_bytes`` (counted in
        ``too_large`` too; nothing is evicted for it). The robot goes on working either way."""
        if episode.robot_id != self.robot_id:
            raise ValueError(f"episode robot_id {episode.robot_id!r} is not this agent's robot {self.robot_id!r}")
        try:
            self.spool.put(episode.to_bytes(), episode.episode_id)
        except (SpoolFullError, EpisodeTooLarge) as exc:
            self.dropped += 1
            self.too_large += isinstance(exc, EpisodeTooLarge)
            self.uploader.last_error = str(exc)
            log.error("episode %s dropped: %s", episode.episode_id, exc)
            return False
        return True

    def status(self) -> dict:
        """Queue depth and counters: queue_depth, queue_bytes, created, duplicate, rejected, set_aside, evicted (lost
        to the spool's bound: an evicted episode the server acknowledged anyway is not counted), rejected_evicted,
        dropped (never spooled: a full spool disk, or larger than the spool), too_large (of those, the ones larger than
        spool_max_bytes), failed_attempts, last_error (the last failed attempt's reason; None once one is acknowledged
        after it), uploader_alive."""
        return {
            "robot_id": self.robot_id,
            "queue_depth": self.spool.depth,
            "queue_bytes": self.spool.nbytes,
            **self.uploader.stats,
            "evicted": self.spool.evicted,
            "rejected_evicted": self.spool.rejected_evicted,
            "dropped": self.dropped,
            "too_large": self.too_large,
            "last_error": self.uploader.last_error,
            "uploader_alive": self.uploader.alive,
        }

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the spool is empty (everything acknowledged or rejected); False on timeout."""
        deadline = time.monotonic() + timeout
        while self.spool.depth > 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop uploading; what is still spooled stays on disk for the next start."""
        self.uploader.stop(timeout)

    def __enter__(self) -> RobotAgent:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run_sim_robot(
    robot_cfg: SimRobotConfig, agent_cfg: AgentConfig, *, episodes: int, drain_timeout_s: float, policy: PolicySource | None = None
) -> dict:
    """flywheel-robot's loop: run ``episodes`` episodes (0: until interrupted), spool and upload them.

    Returns the agent's final status; ``drained`` says whether the spool emptied in time, ``interrupted``
    whether Ctrl-C ended it.
    """
    from fleet.agent.loop import run_episode
    from fleet.agent.robot import SimRobot  # here: MuJoCo, which RobotAgent on a robot does without

    robot = SimRobot(robot_cfg)
    source = policy or builtin_policy("random", robot.act_dim, robot_cfg.seed)
    recorder = EpisodeRecorder(robot_id=robot.robot_id, robot_model=robot.robot_model, source=robot.source, hardware=robot.hardware())
    agent = RobotAgent(agent_cfg, robot.robot_id).start()
    k, interrupted = 0, False
    try:
        while episodes == 0 or k < episodes:
            episode = run_episode(robot, source.current(), recorder, seed=robot_cfg.seed * 1_000_003 + k)
            agent.submit(episode)
            if hasattr(source, "report_episode"):  # a pulled policy's first episode is its health check
                source.report_episode(episode)
            k += 1
            log.info("episode %d: %d steps, return %.2f; %s", k, episode.num_steps, episode.total_return, agent.status())
        drained = agent.wait_drained(drain_timeout_s)
    except KeyboardInterrupt:  # Ctrl-C (how episodes=0 ends): an episode cut short is dropped, the spooled ones go at the next start
        interrupted, drained = True, agent.spool.depth == 0
    finally:
        agent.stop()
        robot.close()
    return {**agent.status(), **(source.status() if hasattr(source, "status") else {}), "episodes": k, "drained": drained, "interrupted": interrupted}
