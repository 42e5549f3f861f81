"""ROS 2 bags (a bag folder with metadata.yaml, or a single .db3 / .mcap file) -> one episode per bag.

Read with rosbags 0.11 and its ROS 2 Humble message types. The mapping (docs/interop.md):

    observation topic  sensor_msgs/msg/JointState: one observation per message,
                       observation = [position..., velocity...]; qpos = position,
                       qvel = velocity, actuator_force = effort (when present)
    action topic       std_msgs/msg/Float64MultiArray or Float32MultiArray (data),
                       sensor_msgs/msg/JointState (position, else velocity, else effort),
                       geometry_msgs/msg/Twist (linear xyz, angular xyz)
    reward topic       std_msgs/msg/Float64 or Float32 (data); optional, else 0
    time               observations keep their header stamps (else their log time) as the
                       episode's timestamps; messages are matched on the header stamps when every
                       message of those topics has one (non-zero), else on every message's log
                       time: one clock for all (a robot's header clock, or sim time, against a
                       recorder's log clock once matched every step to the last command)

T + 1 observation messages make T steps. The action (and reward) of step t is the last one
received before observation t + 1 (zero-order hold). The episode ends truncated (the
recording stopped), never terminated. Its id is derived from its content, so a re-import
is idempotent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fleet.interop.common import ImportOptions, InteropError, foreign_episode
from fleet.interop.rosbag_clock import refuse_a_clock_step_back
from sim.episode import Episode, EpisodeValidationError, schema_cast

JOINT_STATE = "sensor_msgs/msg/JointState"
ACTION_TYPES = ("std_msgs/msg/Float64MultiArray", "std_msgs/msg/Float32MultiArray", JOINT_STATE, "geometry_msgs/msg/Twist")
REWARD_TYPES = ("std_msgs/msg/Float64", "std_msgs/msg/Float32")


def import_rosbag(
    path: str | Path,
    options: ImportOptions,
    *,
    observation_topic: str | None = None,
    action_topic: str | None = None,
    reward_topic: str | None = None,
) -> list[Episode]:
    """The bag at ``path`` as one episode (a list, like the other importers)."""
    from rosbags.rosbag2 import Reader
    from rosbags.rosbag2.errors import ReaderError
    from rosbags.typesys import Stores, get_typestore

    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path} does not exist; pass a ROS 2 bag folder (with metadata.yaml) or a .db3 / .mcap bag file")
    typestore = get_typestore(Stores.ROS2_HUMBLE)
    try:
        with Reader(path) as reader:
            topics = {c.topic: c.msgtype for c in reader.connections}
            obs_topic = _pick(topics, observation_topic, (JOINT_STATE,), "observation", path, prefer="/joint_states")
            act_topic = _pick(topics, action_topic, ACTION_TYPES, "action", path, exclude=obs_topic)
            rew_topic = _pick(topics, reward_topic, REWARD_TYPES, "reward", path) if reward_topic else None
            wanted = [c for c in reader.connections if c.topic in {obs_topic, act_topic, rew_topic}]
            raw_streams: dict[str, list[tuple[int | None, int, object]]] = {t: [] for t in (obs_topic, act_topic, rew_topic) if t}
            for conn, log_time, raw in reader.messages(connections=wanted):
                msg = typestore.deserialize_cdr(raw, conn.msgtype)
                raw_streams[conn.topic].append((_header_ns(msg), int(log_time), msg))
    except InteropError:  # the bag reads, but its topics do not say which to take: said as it is
        raise
    except Exception as exc:  # noqa: BLE001  (rosbags' reader and CDR decoder raise many kinds for a damaged bag)
        raise InteropError(f"{path} is not a readable ROS 2 bag ({exc.__class__.__name__}: {exc}); check that it is a rosbag2 folder, .db3 or .mcap file") from None
    refuse_a_clock_step_back(path, raw_streams, obs_topic)
    headers = all(h is not None for stream in raw_streams.values() for h, _, _ in stream)
    # (the time messages are matched on: one clock for every topic; the time recorded: the header stamp where there is one)
    streams = {topic: [(h if headers else log, log if h is None else h, msg) for h, log, msg in stream] for topic, stream in raw_streams.items()}
    arrays = _episode_arrays(streams, obs_topic, topics[act_topic], act_topic, rew_topic, path)
    extra = {"x.rosbag": bag_name(path), "x.rosbag_topics": f"observation={obs_topic} action={act_topic} reward={rew_topic or '-'}"}
    return [foreign_episode(arrays, options, f"ROS 2 bag {path}", extra)]


def bag_name(path: Path) -> str:
    """The bag's own name, whichever form it is given in: its folder's for the folder or a storage file in it (beside its
    metadata.yaml), else the lone .db3 / .mcap file's. It is the episode's ``x.rosbag``, so each form stores the same
    episode (the path as typed, ``b1``, ``b1/b1.db3`` or ``.``, made a re-import a conflict)."""
    path = path.resolve()
    return path.parent.name if path.is_file() and (path.parent / "metadata.yaml").is_file() else path.name


def _pick(topics: dict[str, str], chosen: str | None, types: tuple, role: str, path: Path, *, prefer: str | None = None, exclude: str | None = None) -> str:
    if chosen is not None:
        if chosen not in topics:
            raise InteropError(f"{path} has no topic {chosen!r} (--{role}-topic); its topics: {topics}")
        if topics[chosen] not in types:
            raise InteropError(f"{role} topic {chosen!r} is {topics[chosen]}; supported for {role}: {list(types)}")
        return chosen
    candidates = sorted(t for t, m in topics.items() if m in types and t != exclude)
    if prefer in candidates:
        return prefer
    if len(candidates) == 1:
        return candidates[0]
    found = f"candidates {candidates}" if candidates else f"no topic of {list(types)}"
    raise InteropError(f"{path}: cannot choose the {role} topic ({found}; topics: {topics}); pass --{role}-topic")


def _header_ns(msg) -> int | None:
    """The message's header stamp (ns), None without a header or with a zero stamp."""
    header = getattr(msg, "header", None)
    if header is not None and (header.stamp.sec or header.stamp.nanosec):
        return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
    return None


def _action_vector(msg, msgtype: str) -> np.ndarray:
    if msgtype == JOINT_STATE:
        for field in ("position", "velocity", "effort"):
            if len(getattr(msg, field)):
                return np.asarray(getattr(msg, field), np.float64)
        return np.zeros(0)
    if msgtype == "geometry_msgs/msg/Twist":
        return np.array([msg.linear.x, msg.linear.y, msg.linear.z, msg.angular.x, msg.angular.y, msg.angular.z])
    return np.asarray(msg.data, np.float64)


def _stack(rows: list[np.ndarray], what: str, path: Path) -> np.ndarray:
    sizes = sorted({len(r) for r in rows})
    if len(sizes) != 1 or sizes[0] == 0:
        raise InteropError(f"{path}: {what} messages have {sizes} values; every message needs the same, non-zero number")
    return np.stack(rows)


def _held(times: np.ndarray, until: np.ndarray) -> np.ndarray:
    """Index of the last message strictly before each ``until`` time (-1 when none)."""
    if not len(times):
        return np.full(len(until), -1)
    order = np.argsort(times, kind="stable")
    before = np.searchsorted(times[order], until, side="left") - 1  # -1: none before (never index -1: the last message)
    return np.where(before >= 0, order[np.maximum(before, 0)], -1)


def _episode_arrays(streams: dict, obs_topic: str, act_type: str, act_topic: str, rew_topic: str | None, path: Path) -> dict[str, np.ndarray]:
    def f32(name: str, values: np.ndarray) -> np.ndarray:  # float32 as before (an import's id hashes these bytes), checked
        try:
            return schema_cast(name, values, np.float32)
        except EpisodeValidationError as exc:
            raise InteropError(f"{path}: {exc}") from None

    obs_msgs = sorted(streams[obs_topic], key=lambda m: m[0])
    if len(obs_msgs) < 2:
        raise InteropError(f"{path}: observation topic {obs_topic!r} has {len(obs_msgs)} message(s); an episode needs at least 2")
    times, stamps = (np.array([m[k] for m in obs_msgs], np.int64) for k in (0, 1))
    for clock in (times, stamps):
        if not (np.diff(clock) > 0).all():
            step = int(np.argmax(np.diff(clock) <= 0))
            gap = int(clock[step + 1] - clock[step])
            if gap == 0:
                raise InteropError(f"{path}: observations {step} and {step + 1} on {obs_topic!r} share a time stamp; record with distinct header stamps")
            raise InteropError(  # stamps out of the log order the steps were matched in (a topic without header stamps)
                f"{path}: observation {step + 1} on {obs_topic!r} is stamped {-gap / 1e9:.6g} s before observation {step}, which the recorder "
                "logged first: with a topic that has no header stamps the steps follow the log times, and these stamps disagree with them. "
                "Record every topic with header stamps (then they order the steps), or none"
            )
    position = _stack([np.asarray(m.position, np.float64) for _, _, m in obs_msgs], f"{obs_topic} position", path)
    velocity = np.stack([np.asarray(m.velocity, np.float64) for _, _, m in obs_msgs]) if all(len(m.velocity) == position.shape[1] for _, _, m in obs_msgs) else None
    effort = np.stack([np.asarray(m.effort, np.float64) for _, _, m in obs_msgs]) if all(len(m.effort) == position.shape[1] for _, _, m in obs_msgs) else None
    T = len(obs_msgs) - 1
    act_times = np.array([t for t, _, _ in streams[act_topic]], np.int64)
    held = _held(act_times, times[1:])
    if len(act_times) == 0 or held[0] < 0:
        raise InteropError(f"{path}: no message on action topic {act_topic!r} before the second observation; the recording must start with a command")
    actions = _stack([_action_vector(m, act_type) for _, _, m in streams[act_topic]], f"{act_topic}", path)[held]
    reward = np.zeros(T, np.float32)
    if rew_topic:
        rew_times = np.array([t for t, _, _ in streams[rew_topic]], np.int64)
        rew_held = _held(rew_times, times[1:])
        values = np.array([m.data for _, _, m in streams[rew_topic]], np.float64)
        reward = np.where(rew_held >= 0, values[np.maximum(rew_held, 0)] if len(values) else 0.0, 0.0).astype(np.float32)
    truncated = np.zeros(T, bool)
    truncated[-1] = True
    arrays = {
        "observation": f32("observation", np.concatenate([position, velocity] if velocity is not None else [position], axis=1)),
        "action": f32("action", actions),
        "reward": reward,
        "terminated": np.zeros(T, bool),
        "truncated": truncated,
        "timestamp": stamps.astype(np.float64) / 1e9,
        "qpos": f32("qpos", position),
    }
    if velocity is not None:
        arrays["qvel"] = f32("qvel", velocity)
    if effort is not None:
        arrays["actuator_force"] = f32("actuator_force", effort)
    return arrays
