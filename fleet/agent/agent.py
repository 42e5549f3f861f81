"""RobotAgent: episodes in (from the control loop), durable spool, background upload out."""

from __future__ import annotations

import errno
import logging
import time
from pathlib import Path

from fleet.agent.config import AgentConfig, SimRobotConfig, check_robot_id
from fleet.agent.policy import PolicySource, builtin_policy
from fleet.agent.recorder import EpisodeRecorder
from fleet.agent.spool import EpisodeTooLarge, EvictionRefused, Spool, SpoolFullError
from fleet.agent.uploader import Uploader
from sim.durable import disk_full
from sim.episode import Episode

log = logging.getLogger(__name__)


class RobotAgent:
    """Spools each submitted episode durably, uploads in the background, reports its queue.

    Survives a server that is down (retries with backoff, forever) and its own restart (the
    spool is on disk; a new agent on the same spool directory uploads what is left).
    """

    def __init__(self, config: AgentConfig, robot_id: str, *, token: str | None = None, on_ack=None, seed: int | None = None):
        check_robot_id(robot_id)  # it names the spool's folder
        self.config, self.robot_id = config, robot_id
        self.dropped_by_reason: dict[str, int] = {}  # too_large, disk_full, or the errno name of another write error (EROFS, EIO)
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
        counted in ``dropped`` and by reason in ``dropped_by_reason``, the reason in ``last_error``) when it cannot be
        spooled: the spool's disk is full even after evicting every older episode (``disk_full``), the episode alone is
        larger than ``spool_max_bytes`` (``too_large``, counted in ``too_large`` too; nothing is evicted for it), or the
        spool's disk refuses the write otherwise, or the delete of the oldest episode a full spool makes room with (its
        errno's name: ``EROFS`` for a disk remounted read-only, ``EIO``, ``EACCES``; that oldest episode stays queued).
        The robot goes on working either way, and the episodes already spooled still upload."""
        if episode.robot_id != self.robot_id:
            raise ValueError(f"episode robot_id {episode.robot_id!r} is not this agent's robot {self.robot_id!r}")
        try:
            self.spool.put(episode.to_bytes(), episode.episode_id)
        except (OSError, EpisodeTooLarge) as exc:
            self._dropped(episode, exc)
            return False
        return True

    def _dropped(self, episode: Episode, exc: OSError | EpisodeTooLarge) -> None:
        """Count and log an episode the spool could not take. A write error other than a full disk once went out of
        submit and ended flywheel-robot (a spool disk remounted read-only): recording stopped with it."""
        reason = _drop_reason(exc)
        self.dropped_by_reason[reason] = self.dropped_by_reason.get(reason, 0) + 1
        self.uploader.last_error = str(exc)
        if reason in ("too_large", "disk_full"):
            log.error("episode %s dropped: %s", episode.episode_id, exc)
        else:  # a full spool deletes its oldest episode first: say which of the two the disk refused
            failed = "delete the oldest episode %s to make room" if isinstance(exc, EvictionRefused) else "write %s"
            log.error("episode %s dropped: the spool could not " + failed + " (%s, errno %s: %s); the robot goes on and the episodes already "
                      "spooled still upload: check the disk holding spool_dir (a disk remounted read-only after errors, a failing card, its permissions)",
                      episode.episode_id, exc.filename or self.spool.directory, reason, exc.errno, exc.strerror or exc)  # fmt: skip

    @property
    def dropped(self) -> int:
        """Episodes never spooled, whatever the reason."""
        return sum(self.dropped_by_reason.values())

    @property
    def too_large(self) -> int:
        """Of those, the ones larger than spool_max_bytes."""
        return self.dropped_by_reason.get("too_large", 0)

    def status(self) -> dict:
        """Queue depth and counters: queue_depth, queue_bytes, created, duplicate, rejected, set_aside, evicted (lost
        to the spool's bound: an evicted episode the server acknowledged anyway is not counted), rejected_evicted,
        lost (spooled, then their file deleted by something other than the agent before upload), dropped (never
        spooled: a full spool disk, larger than the spool, a write the disk refused), dropped_by_reason (too_large,
        disk_full, or an errno name such as EROFS), too_large (of those, the ones larger than spool_max_bytes),
        failed_attempts, last_error (the last failed attempt's reason; None once one is acknowledged after it),
        uploader_alive."""
        return {
            "robot_id": self.robot_id,
            "queue_depth": self.spool.depth,
            "queue_bytes": self.spool.nbytes,
            **self.uploader.stats,
            "evicted": self.spool.evicted,
            "rejected_evicted": self.spool.rejected_evicted,
            "lost": self.spool.lost,
            "dropped": self.dropped,
            "dropped_by_reason": dict(self.dropped_by_reason),
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


def _drop_reason(exc: OSError | EpisodeTooLarge) -> str:
    """``dropped_by_reason``'s key for what kept an episode out of the spool."""
    if isinstance(exc, EpisodeTooLarge):
        return "too_large"
    if isinstance(exc, SpoolFullError) or disk_full(exc):
        return "disk_full"
    return errno.errorcode.get(exc.errno, "OSError") if exc.errno is not None else exc.__class__.__name__


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
