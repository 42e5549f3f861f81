"""Upload ROS 2 bags from a robot: each bag becomes one episode in the robot agent's spool, and the
agent's uploader sends it to the fleet server (retried with backoff, large ones resumably).

    python examples/ros2/bag_uploader.py BAG [BAG ...] --robot-id arm-3 --robot-model so100 \\
        --server http://fleet:8700 [--action-topic /arm/commands] [--reward-topic /reward] [--wait 60]

A bag is a rosbag2 folder (with metadata.yaml) or a single .db3 / .mcap file; the mapping of its
topics to the episode is fleet.interop.rosbag's (examples/ros2/README.md). Every episode is on disk
in ``<spool-dir>/<robot-id>/`` before anything is sent, so a server that is down, a dropped
connection or a reboot loses nothing: what was not acknowledged within ``--wait`` seconds stays
spooled and goes first on the next run (with no BAG, a run only drains the spool). Episode ids come
from the bags' content, so uploading a bag twice stores it once (the server answers "duplicate").

Needs the light robot package and rosbags: ``pip install "./robot[ros2]"`` (robot/README.md). The
robot's token is read from ``--token-file`` or ``$FLYWHEEL_ROBOT_TOKEN``. Prints one JSON line (the
episode ids and the agent's status); exits 0 when everything was acknowledged, 3 when episodes wait
in the spool for the next run, 1 when the server refused some for good (kept in the spool's
rejected/ folder with its reasons), 2 on a mistake in the input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from fleet.agent.agent import RobotAgent
from fleet.agent.config import AgentConfig
from fleet.interop.common import ImportOptions, InteropError
from fleet.interop.rosbag import import_rosbag
from sim.episode import SOURCES

DEFAULT_SPOOL = "runs/fleet/bag-spool"  # apart from a running agent's spool: one uploader per spool folder


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Turn ROS 2 bags into episodes and upload them through the robot agent's spool.")
    p.add_argument("bags", nargs="*", help="rosbag2 folders or .db3 / .mcap files, one episode each (none: only drain the spool)")
    p.add_argument("--robot-id", required=True, help="this robot's id (its token must be issued for it)")
    p.add_argument("--robot-model", required=True, help="the robot model the episodes are of (e.g. so100)")
    p.add_argument("--server", default=AgentConfig.server_url, help=f"fleet server URL (default {AgentConfig.server_url})")
    p.add_argument("--token-file", help=f"file holding the robot token (default: ${AgentConfig.token_env})")
    p.add_argument("--spool-dir", default=DEFAULT_SPOOL, help=f"spool parent folder, kept across runs (default {DEFAULT_SPOOL})")
    p.add_argument("--observation-topic", help="sensor_msgs/JointState topic (default: /joint_states, else the only JointState topic)")
    p.add_argument("--action-topic", help="command topic (default: the only Float64MultiArray/Float32MultiArray/JointState/Twist topic left)")
    p.add_argument("--reward-topic", help="std_msgs/Float64 or Float32 topic (default: none, reward 0)")
    p.add_argument("--source", default="real", choices=SOURCES)
    p.add_argument("--policy-version", default="none", help="the policy that drove the robot while the bag was recorded")
    p.add_argument("--hardware", help="JSON text stored as the episodes' hardware metadata")
    p.add_argument("--calibration", help="JSON text stored as the episodes' calibration metadata")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the server to acknowledge everything (default 60)")
    return p


def json_text(text: str | None, flag: str) -> str | None:
    """``text`` if it is JSON (it is stored as is), else InteropError naming ``flag``."""
    if text is not None:
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise InteropError(f"{flag} must be JSON text ({exc})") from None
    return text


def read_bags(args: argparse.Namespace) -> list:
    """Every bag as its episode (all read before any is spooled, so a bad bag spools nothing)."""
    options = ImportOptions(
        args.robot_id, args.robot_model, args.source, args.policy_version, json_text(args.hardware, "--hardware"), json_text(args.calibration, "--calibration")
    )
    topics = {"observation_topic": args.observation_topic, "action_topic": args.action_topic, "reward_topic": args.reward_topic}
    return [episode for bag in args.bags for episode in import_rosbag(bag, options, **topics)]


def upload(episodes: Sequence, config: AgentConfig, robot_id: str, wait_s: float) -> dict:
    """Spool ``episodes`` (durable on return), then let the agent upload them and whatever earlier runs left."""
    agent = RobotAgent(config, robot_id)
    for episode in episodes:
        agent.submit(episode)
    with agent:
        drained = agent.wait_drained(wait_s)
    return {**agent.status(), "drained": drained}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = AgentConfig(server_url=args.server, token_file=args.token_file, spool_dir=args.spool_dir)
    try:
        config.load_token()  # before reading any bag: a robot without its token can do nothing here
        episodes = read_bags(args)
    except (InteropError, ValueError, FileNotFoundError) as exc:
        return fail(2, str(exc))
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "rosbags":
            raise
        return fail(2, "reading ROS 2 bags needs rosbags: pip install \"./robot[ros2]\" (or rosbags>=0.11,<0.12)")
    status = upload(episodes, config, args.robot_id, args.wait)
    print(json.dumps({"bags": len(args.bags), "episode_ids": [ep.episode_id for ep in episodes], **status}))
    spool = f"{args.spool_dir}/{args.robot_id}"
    if status["rejected"] or status["set_aside"]:
        return fail(1, f"the server refused {status['rejected'] + status['set_aside']} episodes for good; they are in {spool}/rejected/ with its reasons")
    if not status["drained"]:
        return fail(3, f"{status['queue_depth']} episodes wait in {spool} ({status['last_error']}); run again, with or without bags, once the server is reachable")
    return 0


def fail(code: int, message: str) -> int:
    print(f"bag_uploader: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
