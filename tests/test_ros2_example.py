"""examples/ros2: the bag uploader, run as a robot runs it (the heavy packages refused), turns ROS 2
bags (sqlite3 and MCAP storage) into episodes in the robot agent's spool; a real fleet server on
loopback stores them (read back with an operator's GET); a second run is a duplicate, the same
recording with other metadata is refused for good, and a server that is down leaves the episode
spooled for the next run. The rclpy node compiles, and without ROS 2 (as here) says what to do."""

import json
import py_compile
import subprocess
import sys

import httpx
import numpy as np
import pytest

from fleet.server import ServerConfig, add_token, serve
from fleet.store import StoreConfig
from sim.episode import Episode
from tests.test_interop import write_bag
from tests.test_robot_imports import REFUSE_HEAVY, REPO

EXAMPLES = REPO / "examples" / "ros2"
RUN_SCRIPT = "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def uploader(tmp_path, *args, server: str, wait: float = 20) -> tuple[int, dict | None, str]:
    """Run bag_uploader.py as robot arm-3 with the heavy packages refused: (exit code, its JSON line, stderr)."""
    argv = [str(EXAMPLES / "bag_uploader.py"), *map(str, args), "--robot-id", "arm-3", "--robot-model", "so100", "--server", server]
    argv += ["--token-file", str(tmp_path / "robot.token"), "--spool-dir", str(tmp_path / "spool"), "--wait", str(wait)]
    out = subprocess.run([sys.executable, "-c", REFUSE_HEAVY + RUN_SCRIPT, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    lines = out.stdout.strip().splitlines()
    return out.returncode, json.loads(lines[-1]) if lines else None, out.stderr


@pytest.fixture
def fleet(tmp_path):
    """A fleet server on loopback: (url, operator token); robot arm-3's token is in tmp_path/robot.token."""
    tokens = tmp_path / "tokens.json"
    (tmp_path / "robot.token").write_text(add_token(tokens, "robot", "arm-3"))
    operator = add_token(tokens, "operator")
    server = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "store"), fsync=False))
    yield server.url, operator
    server.stop()


def stored(url: str, operator: str) -> dict[str, Episode]:
    headers = {"Authorization": f"Bearer {operator}"}
    listing = httpx.get(f"{url}/v1/episodes", params={"robot_id": "arm-3"}, headers=headers).json()
    return {e["episode_id"]: Episode.from_bytes(httpx.get(f"{url}/v1/episodes/{e['episode_id']}", headers=headers).content) for e in listing["episodes"]}


def write_mcap_bag(path, steps: int) -> None:
    """tests/test_interop.py's bag, stored as MCAP instead of sqlite3."""
    write_bag(path, steps=steps, mcap=True)
    assert list(path.glob("*.mcap"))


def test_bags_go_through_the_robot_agent_into_the_fleet_store(tmp_path, fleet):
    url, operator = fleet
    pos, vel, cmd, t0 = write_bag(tmp_path / "sqlite-bag")
    write_mcap_bag(tmp_path / "mcap-bag", steps=4)
    code, out, err = uploader(tmp_path, tmp_path / "sqlite-bag", tmp_path / "mcap-bag", "--hardware", '{"arm": "v2"}', server=url)
    assert code == 0, err
    assert out["created"] == 2 and out["queue_depth"] == 0 and out["drained"]
    episodes = stored(url, operator)
    assert set(episodes) == set(out["episode_ids"])
    ep = episodes[out["episode_ids"][0]]
    assert np.array_equal(ep.observation, np.concatenate([pos, vel], 1).astype(np.float32)) and np.array_equal(ep.action, cmd.astype(np.float32))
    assert np.allclose(ep.timestamp, (t0 + np.arange(7) * 50_000_000) / 1e9, rtol=0, atol=1e-6)  # header stamps
    assert ep.robot_id == "arm-3" and ep.source == "real" and ep.metadata["x.rosbag"] == "sqlite-bag" and ep.json_metadata("hardware") == {"arm": "v2"}
    assert episodes[out["episode_ids"][1]].num_steps == 4
    code, again, _ = uploader(tmp_path, tmp_path / "sqlite-bag", "--hardware", '{"arm": "v2"}', server=url)
    assert code == 0 and again["duplicate"] == 1 and again["episode_ids"] == out["episode_ids"][:1]  # ids from the content
    code, other, err = uploader(tmp_path, tmp_path / "sqlite-bag", server=url)  # the same recording told with other metadata
    assert code == 1 and other["rejected"] == 1 and "refused 1 episodes for good" in err
    assert len(list((tmp_path / "spool" / "arm-3" / "rejected").glob("*.reason.json"))) == 1


def test_a_bag_waits_in_the_spool_while_the_server_is_down(tmp_path, fleet):
    url, operator = fleet
    write_bag(tmp_path / "bag")
    code, out, err = uploader(tmp_path, tmp_path / "bag", server="http://127.0.0.1:9", wait=0.5)  # nothing listens on port 9
    assert code == 3 and out["queue_depth"] == 1 and "run again" in err
    code, drained, err = uploader(tmp_path, server=url)  # the next run, no bag: what the spool holds goes first
    assert code == 0 and drained["created"] == 1 and drained["queue_depth"] == 0, err
    assert set(stored(url, operator)) == set(out["episode_ids"])


def test_the_uploader_says_what_is_wrong(tmp_path, fleet):
    url, _ = fleet
    code, _, err = uploader(tmp_path, tmp_path / "missing-bag", server=url)
    assert code == 2 and "does not exist" in err
    (tmp_path / "robot.token").unlink()
    code, _, err = uploader(tmp_path, server=url)
    assert code == 2 and "robot token file" in err


def test_the_rclpy_node_compiles_and_without_ros_says_what_to_do(tmp_path):
    py_compile.compile(str(EXAMPLES / "flywheel_node.py"), cfile=str(tmp_path / "node.pyc"), doraise=True)
    script = [sys.executable, "-c", REFUSE_HEAVY + RUN_SCRIPT, str(EXAMPLES / "flywheel_node.py")]
    out = subprocess.run(script, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "source /opt/ros/" in out.stderr, out.stderr[-2000:]


def test_a_clock_that_steps_back_stops_the_recording_not_the_robot(tmp_path):
    """EpisodeLoop skipped joint states stamped before the previous one, and answered None: a robot in drive mode whose
    clock was set back an hour (an NTP step) got no commands, and recorded nothing, for that hour."""
    import importlib.util

    from fleet.agent import AgentConfig, RobotAgent
    from fleet.agent.policy import Policy
    from fleet.agent.recorder import EpisodeRecorder

    spec = importlib.util.spec_from_file_location("flywheel_node", REPO / "examples" / "ros2" / "flywheel_node.py")
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)

    class Half:
        def current(self):
            return Policy("1", lambda obs: np.full((len(obs), 1), 0.5, np.float32))

    agent = RobotAgent(AgentConfig(server_url="http://127.0.0.1:9", spool_dir=str(tmp_path / "spool")), "arm-3", token="t")
    loop = node.EpisodeLoop(agent, EpisodeRecorder(robot_id="arm-3", robot_model="arm", source="real"), Half(), max_steps=100)
    loop.command(np.zeros(1, np.float32))
    obs = np.zeros(2, np.float32)
    assert loop.observe(obs, 3600.0)[0] == 0.5 and loop.observe(obs, 3600.1)[0] == 0.5
    assert loop.observe(obs, 3600.05)[0] == 0.5 and loop.recorder.num_steps == 1  # a stale stamp: driven, not recorded
    assert loop.observe(obs, 10.0)[0] == 0.5  # an hour back: still driven, and the clock's new time starts an episode
    assert agent.spool.depth == 1 and loop.recorder.num_steps == 0  # the one before it ended (truncated) and spooled
    assert loop.observe(obs, 10.1)[0] == 0.5 and loop.recorder.num_steps == 1  # recording goes on at once
    (entry,) = agent.spool.entries()
    cut = Episode.from_bytes(agent.spool.read(entry))
    assert cut.num_steps == 1 and cut.truncated[-1] and list(cut.timestamp) == [3600.0, 3600.1]


def node_loop(tmp_path, act, max_steps: int):
    """examples/ros2/flywheel_node.py's EpisodeLoop (no ROS) for robot arm-3 running policy "1" (``act``), a command heard."""
    import importlib.util

    from fleet.agent import AgentConfig, RobotAgent
    from fleet.agent.policy import Policy
    from fleet.agent.recorder import EpisodeRecorder

    spec = importlib.util.spec_from_file_location("flywheel_node", EXAMPLES / "flywheel_node.py")
    node = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node)

    class Source:
        def current(self):
            return Policy("1", act)

    agent = RobotAgent(AgentConfig(server_url="http://127.0.0.1:9", spool_dir=str(tmp_path / "spool")), "arm-3", token="t")
    loop = node.EpisodeLoop(agent, EpisodeRecorder(robot_id="arm-3", robot_model="arm", source="real"), Source(), max_steps=max_steps)
    loop.command(np.zeros(1, np.float32))
    return loop


def spooled(loop) -> list[Episode]:
    return [Episode.from_bytes(loop.agent.spool.read(entry)) for entry in loop.agent.spool.entries()]


def test_a_run_of_joint_states_with_a_nan_entry_commands_zeros_after_max_non_finite_run(tmp_path):
    """A joint driver that never measures one joint's velocity: every joint state had a NaN entry, the policy (its sensor
    filter estimating the entry) drove the robot on an estimate nothing corrected. After ``max_non_finite_run`` such
    joint states in a row the command is zeros, until a finite joint state, when the policy drives again."""
    loop = node_loop(tmp_path, lambda obs: np.full((len(obs), 1), 0.5, np.float32), max_steps=100)
    assert loop.max_non_finite_run == 3
    obs = lambda k: np.full(2, 0.1 * k, np.float32)  # noqa: E731
    assert loop.observe(obs(0), 1.0).tolist() == [0.5]
    bad = np.array([0.1, np.nan], np.float32)
    assert [loop.observe(bad, 1.1 + 0.1 * k).tolist() for k in range(5)] == [[0.5]] * 3 + [[0.0]] * 2
    assert loop.observe(obs(7), 1.7).tolist() == [0.5]  # a finite reading: driven again, and the count starts over
    assert [loop.observe(bad, 1.8 + 0.1 * k).tolist() for k in range(4)] == [[0.5]] * 3 + [[0.0]]


def test_a_nan_joint_reading_cuts_the_episode_and_never_reaches_the_motors(tmp_path):
    """One JointState with a NaN velocity: EpisodeLoop returned a NaN action (published x action_scale in drive mode; np.clip
    keeps NaN), the episode's finish() then raised, and the recorder, never reset, raised on every later joint state: the
    node stopped commanding and recording for good, and the good steps before the NaN were lost."""
    loop = node_loop(tmp_path, lambda obs: np.tanh(obs.sum(axis=1, keepdims=True)), max_steps=3)
    obs = lambda k: np.full(2, 0.1 * k, np.float32)  # noqa: E731
    for k in range(3):
        assert np.isfinite(loop.observe(obs(k), 1.0 + 0.1 * k)).all()
    bad = obs(3)
    bad[1] = np.nan
    assert loop.observe(bad, 1.3).tolist() == [0.0]  # the policy's NaN is never a command: zeros in its place
    assert loop.recorder.num_steps == 0 and loop.non_finite_readings == 1 and loop.non_finite_actions == 1
    (cut,) = spooled(loop)  # the two good steps, ended (truncated) at the last finite reading
    assert cut.num_steps == 2 and cut.truncated[-1] and not cut.terminated.any() and np.allclose(cut.timestamp, [1.0, 1.1, 1.2])
    assert loop.observe(bad, 1.35).tolist() == [0.0] and loop.non_finite_readings == 2  # a run of them: still driven, nothing recorded
    for k in range(4, 8):  # the next finite reading begins an episode; recording and driving go on
        action = loop.observe(obs(k), 1.0 + 0.1 * k)
        assert np.isfinite(action).all() and action[0] > 0
    first, second = spooled(loop)
    assert first.episode_id == cut.episode_id and second.num_steps == 3 and np.allclose(second.timestamp, [1.4, 1.5, 1.6, 1.7])
    assert np.isfinite(second.observation).all() and loop.dropped_episodes == 0


def test_an_episode_that_does_not_validate_is_dropped_and_recording_goes_on(tmp_path):
    """A NaN command from another node on the command topic: finish() refused the episode and the loop raised on every
    later joint state. Now the episode is dropped (counted, logged) and the recorder is clear for the next one."""
    loop = node_loop(tmp_path, lambda obs: np.full((len(obs), 1), 0.5, np.float32), max_steps=2)
    loop.observe(np.zeros(2, np.float32), 1.0)
    loop.command(np.array([np.nan], np.float32))
    loop.observe(np.zeros(2, np.float32), 1.1)
    loop.command(np.zeros(1, np.float32))
    assert loop.observe(np.zeros(2, np.float32), 1.2)[0] == 0.5  # the episode ends here and is refused
    assert loop.dropped_episodes == 1 and loop.agent.spool.depth == 0 and loop.recorder.num_steps == 0
    for k in range(3, 5):
        assert loop.observe(np.zeros(2, np.float32), 1.0 + 0.1 * k)[0] == 0.5
    (episode,) = spooled(loop)
    assert episode.num_steps == 2 and np.allclose(episode.timestamp, [1.2, 1.3, 1.4])
