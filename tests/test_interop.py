"""Interop both ways: export a pinned snapshot -> the format's own reader (minari, mcap, pyarrow +
LeRobot v3.0 layout) -> import -> bit-equal episodes with equal provenance; ROS 2 bag import;
uploads through the robot agent's uploader; clear errors for inputs that do not fit."""

import json
import uuid

import numpy as np
import pytest

from fleet.interop.cli import main as cli
from fleet.interop.common import ImportOptions, InteropError
from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays

HARDWARE = {"arm": "v2", "motors": [1, 2]}


def toy(seed: int, robot_id: str, source: str, steps: int) -> Episode:
    """A small episode with optional arrays of both lengths and hardware/calibration provenance."""
    r = np.random.default_rng(100 + seed)
    arrays = make_episode_arrays(num_steps=steps, obs_dim=3, act_dim=2, seed=seed)
    arrays["timestamp"] = 1_700_000_000.0 + seed * 10 + np.arange(steps + 1) * 0.05 + r.uniform(0, 1e-4, steps + 1)  # jittered real clock
    extras = {"qpos": r.standard_normal((steps + 1, 2)), "actuator_force": r.standard_normal((steps, 2)), "intervention": r.random(steps) < 0.3}
    eid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"interop/{seed}"))
    return Episode.create(
        **arrays, robot_id=robot_id, robot_model="toy", source=source, policy_version=f"p{seed}", episode_id=eid,
        extras=extras, hardware=HARDWARE, calibration={"mass_scale": 1.0 + seed / 10}, **{"x.task": "reach"},
    )  # fmt: skip


def camera_episode() -> Episode:
    r = np.random.default_rng(7)
    extras = {"image.front": r.integers(0, 255, (5, 4, 4, 3), dtype=np.uint8)}
    return Episode.create(**make_episode_arrays(num_steps=4, obs_dim=5, seed=7), robot_id="cam-1", robot_model="camcar", source="worldmodel", model_version="wm-3", extras=extras,
        episode_id=str(uuid.uuid5(uuid.NAMESPACE_URL, "interop/camera")),
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with two commits: three toy episodes (first snapshot), then a camera episode."""
    path = tmp_path_factory.mktemp("interop") / "store"
    st = EpisodeStore.create(StoreConfig(path=str(path), chunk_rows=32, index_rows=4, fsync=False))
    first = [toy(0, "arm-0", "real", 5), toy(1, "arm-1", "sim", 7), toy(2, "arm-0", "real", 3)]
    pinned = st.append(first).snapshot_id
    st.append([camera_episode()])
    return {"path": str(path), "pinned": pinned, "toy": first, "all": [*first, camera_episode()]}


def run_cli(argv, capsys) -> dict:
    assert cli([str(a) for a in argv]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def stored(path) -> dict[str, Episode]:
    snap = EpisodeStore.open(StoreConfig(path=str(path), fsync=False)).snapshot()
    return {ep.episode_id: ep for ep in snap.read_episodes(snap.catalog())}


def assert_same(got: list[Episode], want: list[Episode]) -> None:
    assert [e.episode_id for e in got] == [e.episode_id for e in want]
    for g, w in zip(got, want):
        assert g.metadata == w.metadata  # provenance: robot_id, episode_id, policy_version, source, robot_model, hardware, calibration
        assert g.equals(w) and g.to_bytes() == w.to_bytes()


def test_mcap_round_trip(store, tmp_path, capsys):
    from mcap.reader import make_reader

    summary = run_cli(["export", "--format", "mcap", "--store", store["path"], "--out", tmp_path / "out"], capsys)
    assert summary["episodes"] == 4
    with open(summary["path"], "rb") as f:  # the mcap package's own reader
        reader = make_reader(f)
        meta = {m.name: m.metadata for m in reader.iter_metadata()}
        assert meta["flywheel.export"]["snapshot_id"] == summary["snapshot_id"]
        messages = [(ch.topic, msg.log_time, json.loads(msg.data)) for _, ch, msg in reader.iter_messages()]
    topics = {t for t, _, _ in messages}
    assert {"/flywheel/episode", "/flywheel/observation", "/flywheel/action", "/flywheel/reward", "/flywheel/image/front", "/flywheel/qpos"} <= topics
    heads = [m for t, _, m in messages if t == "/flywheel/episode"]
    assert {h["episode_id"]: h["metadata"] for h in heads} == {e.episode_id: e.metadata for e in store["all"]}
    ep = store["toy"][1]
    obs = [(lt, m) for t, lt, m in messages if t == "/flywheel/observation" and m["episode_id"] == ep.episode_id]
    assert [lt for lt, _ in obs] == [round(s * 1e9) for s in ep.timestamp]  # log times are the episode's timestamps
    assert np.array_equal(np.array([m["data"] for _, m in obs], np.float32), ep.observation)

    out = run_cli(["import", "--format", "mcap", summary["path"], "--store", tmp_path / "back"], capsys)
    assert out["created"] == 4
    back = stored(tmp_path / "back")
    assert_same([back[e.episode_id] for e in store["all"]], store["all"])
    again = run_cli(["import", "--format", "mcap", summary["path"], "--store", tmp_path / "back"], capsys)
    assert again["duplicate"] == 4 and again["created"] == 0  # idempotent
    assert cli(["import", "--format", "mcap", str(summary["path"]), "--store", str(tmp_path / "back"), "--robot-id", "arm-0"]) == 0
    assert "--robot-id arm-0 applies to recordings without flywheel provenance" in capsys.readouterr().err  # once ignored silently


def test_minari_round_trip_of_a_pinned_snapshot(store, tmp_path, capsys, monkeypatch):
    import minari

    argv = ["export", "--format", "minari", "--store", store["path"], "--snapshot", store["pinned"], "--out", tmp_path, "--source", "real", "--source", "sim"]
    summary = run_cli(argv, capsys)
    assert summary["snapshot_id"] == store["pinned"] and summary["episodes"] == 3  # the camera episode came later
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    dataset = minari.load_dataset("flywheel-toy-v0")
    assert dataset.total_episodes == 3 and dataset.total_steps == sum(e.num_steps for e in store["toy"])
    assert dataset.storage.metadata["flywheel"]["snapshot_id"] == store["pinned"]
    metas = list(dataset.storage.get_episode_metadata(range(3)))
    for got, want, meta in zip(dataset.iterate_episodes(), store["toy"], metas):
        assert meta["flywheel_metadata"] == want.metadata and meta["flywheel_snapshot_id"] == store["pinned"]
        assert np.array_equal(got.observations, want.observation) and got.observations.dtype == np.float32
        assert np.array_equal(got.actions, want.action) and np.array_equal(got.rewards, want.reward) and got.rewards.dtype == np.float32
        assert np.array_equal(got.terminations, want.terminated) and np.array_equal(got.truncations, want.truncated)
        assert np.array_equal(got.infos["timestamp"][:, 0], want.timestamp) and got.infos["timestamp"].dtype == np.float64
        assert np.array_equal(got.infos["qpos"], want.extras["qpos"])
        assert np.array_equal(got.infos["actuator_force"][:-1], want.extras["actuator_force"])  # T-length: one padding row


@pytest.mark.parametrize("fmt", ["lerobot", "minari", "mcap"])
def test_an_export_is_whole_or_absent_and_never_mixed_into_an_earlier_one(store, tmp_path, capsys, monkeypatch, fmt):
    """Minari's export once failed for any relative --out (its writer joined the path twice) and left a partial dataset
    that blocked the rerun; a LeRobot export went into any folder that held no info.json."""
    monkeypatch.chdir(tmp_path)
    argv = ["export", "--format", fmt, "--store", store["path"], "--source", "real", "--source", "sim", "--out", "exports/a"]  # relative, as docs/interop.md writes it
    assert run_cli(argv, capsys)["episodes"] == 3
    assert cli(argv) == 2 and "exists already" in capsys.readouterr().err  # never written over
    taken = tmp_path / "taken"
    existing = {"lerobot": taken / "notes.txt", "minari": taken / "flywheel-toy-v0" / "notes.txt", "mcap": taken / "episodes.mcap"}[fmt]
    existing.parent.mkdir(parents=True)
    existing.write_text("mine")
    assert cli([*argv[:-1], str(taken)]) == 2 and "exists already" in capsys.readouterr().err
    assert existing.read_text() == "mine"  # what was there is left as it was

    def failing(*args, **kwargs):
        raise OSError(28, "No space left on device", "somewhere")

    module = {"lerobot": "fleet.interop.lerobot._write_json", "minari": "fleet.interop.minari_export._infos", "mcap": "fleet.interop.mcap_io._episode_message"}[fmt]
    monkeypatch.setattr(module, failing)
    assert cli([*argv[:-1], "exports/b"]) == 2 and "No space left on device" in capsys.readouterr().err
    assert not (tmp_path / "exports/b").exists() or not any((tmp_path / "exports/b").iterdir())  # nothing half-written


def test_lerobot_round_trip_and_v3_layout(store, tmp_path, capsys):
    import pandas as pd
    import pyarrow.parquet as pq

    root = tmp_path / "lerobot"
    run_cli(["export", "--format", "lerobot", "--store", store["path"], "--robot-model", "toy", "--out", root], capsys)
    info = json.loads((root / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["robot_type"] == "toy" and info["fps"] == 20
    assert info["total_episodes"] == 3 and info["total_frames"] == 15 and info["total_tasks"] == 1
    data = pq.read_table(root / info["data_path"].format(chunk_index=0, file_index=0))
    assert set(data.column_names) == set(info["features"])
    for name in ("observation.state", "action", "next.reward", "next.done", "timestamp", "frame_index", "episode_index", "index", "task_index"):
        assert name in info["features"], name
    assert info["features"]["observation.state"] == {"dtype": "float32", "shape": [3], "names": None}
    assert data["index"].to_pylist() == list(range(15))
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [(e["episode_index"], e["length"], e["dataset_from_index"], e["dataset_to_index"]) for e in episodes] == [(0, 5, 0, 5), (1, 7, 5, 12), (2, 3, 12, 15)]
    assert all(e["data/chunk_index"] == 0 and e["data/file_index"] == 0 and e["tasks"] == ["reach"] for e in episodes)
    assert json.loads(episodes[1]["flywheel/metadata"]) == store["toy"][1].metadata
    tasks = pd.read_parquet(root / "meta/tasks.parquet")
    assert tasks.index.name == "task" and tasks.loc["reach", "task_index"] == 0
    stats = json.loads((root / "meta/stats.json").read_text())
    assert set(stats["observation.state"]) == {"min", "max", "mean", "std", "count", "q01", "q10", "q50", "q90", "q99"}
    assert stats["action"]["count"] == [15] and len(stats["observation.state"]["mean"]) == 3

    out = run_cli(["import", "--format", "lerobot", root, "--store", tmp_path / "back"], capsys)
    assert out["created"] == 3
    back = stored(tmp_path / "back")
    assert_same([back[e.episode_id] for e in store["toy"]], store["toy"])


def test_foreign_lerobot_dataset_gets_real_source_and_stable_ids(store, tmp_path, capsys, caplog):
    from fleet.interop.lerobot import import_lerobot

    root = tmp_path / "lerobot"
    run_cli(["export", "--format", "lerobot", "--store", store["path"], "--robot-model", "toy", "--out", root], capsys)
    (root / "meta/flywheel.json").unlink()  # now it reads like any LeRobot dataset
    options = ImportOptions(robot_id="so100-3")
    with caplog.at_level("WARNING", logger="fleet.interop.lerobot"):
        first, again = import_lerobot(root, options), import_lerobot(root, options)
    said = next(r.getMessage() for r in caplog.records if "features not imported" in r.getMessage())  # a camera went without a word
    unread = said.split("docs/interop.md): ")[1].split("; to keep")[0].split(", ")
    assert "next.terminated" in unread and "observation.state" not in unread and "action" not in unread, said
    assert [e.episode_id for e in first] == [e.episode_id for e in again]
    ep, want = first[1], store["toy"][1]
    assert ep.source == "real" and ep.robot_id == "so100-3" and ep.metadata["robot_model"] == "toy" and ep.metadata["task"] == "reach"
    assert ep.metadata["schema_version"] == "1.1" and ep.metadata["control_rate_hz"] == "20"  # info.json fps
    assert ep.num_steps == want.num_steps - 1  # 7 frames -> 6 steps, the last frame's state is the final observation
    assert np.array_equal(ep.observation, want.observation[:-1]) and np.array_equal(ep.action, want.action[:-1])
    assert ep.truncated[-1] and not ep.terminated.any()


def write_bag(
    path, steps: int = 6, header_offset_ns: int = 0, first_command: int = 0, back_at: int | None = None, back_ns: int = 0, recorder_back: bool = True,
    mcap: bool = False, compress: str | None = None, jitter_ns: dict | None = None,
):  # fmt: skip
    """A ROS 2 bag: /joint_states (JointState, header stamps ``header_offset_ns`` off the recorder's log clock, step t's
    ``jitter_ns[t]`` more), /arm/commands (Float64MultiArray, from step ``first_command`` on), /reward (Float64). From
    step ``back_at`` on the robot's clock is ``back_ns`` behind (NTP stepped it back), the recorder's too where
    ``recorder_back``. ``compress``: rosbag2's zstd compression, "file" or "message"."""
    from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    T = ts.types
    r = np.random.default_rng(3)
    pos, vel, cmd = r.standard_normal((steps + 1, 2)), r.standard_normal((steps + 1, 2)), r.standard_normal((steps, 2))
    t0 = 1_700_000_000 * 10**9
    stamp = lambda ns: T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)  # noqa: E731
    writer = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP if mcap else StoragePlugin.SQLITE3)
    if compress:
        writer.set_compression(CompressionMode[compress.upper()], CompressionFormat.ZSTD)
    with writer as bag:
        js = bag.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=ts)
        cm = bag.add_connection("/arm/commands", "std_msgs/msg/Float64MultiArray", typestore=ts)
        rw = bag.add_connection("/reward", "std_msgs/msg/Float64", typestore=ts)
        layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
        for t in range(steps + 1):
            back = back_ns if back_at is not None and t >= back_at else 0
            robot_ns, ns = t0 + t * 50_000_000 - back, t0 + t * 50_000_000 - (back if recorder_back else 0)
            header = T["std_msgs/msg/Header"](stamp=stamp(robot_ns + header_offset_ns + (jitter_ns or {}).get(t, 0)), frame_id="base")
            msg = T["sensor_msgs/msg/JointState"](header=header, name=["a", "b"], position=pos[t], velocity=vel[t], effort=np.zeros(0))
            bag.write(js, ns + 1000, ts.serialize_cdr(msg, "sensor_msgs/msg/JointState"))
            if first_command <= t < steps:
                bag.write(cm, ns + 2_000_000, ts.serialize_cdr(T["std_msgs/msg/Float64MultiArray"](layout=layout, data=cmd[t]), "std_msgs/msg/Float64MultiArray"))
                bag.write(rw, ns + 3_000_000, ts.serialize_cdr(T["std_msgs/msg/Float64"](data=float(t)), "std_msgs/msg/Float64"))
    return pos, vel, cmd, t0


def test_rosbag_import_maps_joint_states_and_commands(tmp_path, capsys):
    pos, vel, cmd, t0 = write_bag(tmp_path / "bag")
    argv = ["import", "--format", "rosbag", tmp_path / "bag", "--store", tmp_path / "store", "--robot-id", "arm-9", "--robot-model", "toy2", "--reward-topic", "/reward"]
    out = run_cli(argv, capsys)
    assert out["created"] == 1
    ep = stored(tmp_path / "store")[out["episode_ids"][0]]
    assert ep.source == "real" and ep.robot_id == "arm-9" and ep.num_steps == 6
    assert np.array_equal(ep.observation, np.concatenate([pos, vel], 1).astype(np.float32))
    assert np.array_equal(ep.extras["qpos"], pos.astype(np.float32)) and np.array_equal(ep.extras["qvel"], vel.astype(np.float32))
    assert np.array_equal(ep.action, cmd.astype(np.float32)) and np.array_equal(ep.reward, np.arange(6, dtype=np.float32))
    assert np.allclose(ep.timestamp, (t0 + np.arange(7) * 50_000_000) / 1e9, rtol=0, atol=1e-6)  # header stamps
    assert ep.truncated[-1] and not ep.terminated.any() and ep.metadata["x.rosbag"] == "bag"
    assert run_cli(argv, capsys)["duplicate"] == 1  # deterministic id: a re-import is idempotent


def test_a_bag_given_by_its_folder_or_its_file_is_one_episode_and_a_refusal_names_what_differs(tmp_path, capsys, monkeypatch):
    """The same bag imported by its folder and then by its .db3 file (both forms documented) was refused as "stored with
    different content": x.rosbag was the path's last part (b1, then b1.db3, or '' for '.'), and the refusal did not say
    which field differed."""
    write_bag(tmp_path / "b1")
    (storage,) = (tmp_path / "b1").glob("*.db3")
    base = ["import", "--format", "rosbag", "--store", tmp_path / "store", "--robot-id", "arm-9", "--robot-model", "toy2"]
    assert run_cli([*base, tmp_path / "b1"], capsys)["created"] == 1
    assert run_cli([*base, storage], capsys)["duplicate"] == 1
    monkeypatch.chdir(tmp_path / "b1")
    assert run_cli([*base, "."], capsys)["duplicate"] == 1
    (ep,) = stored(tmp_path / "store").values()
    assert ep.metadata["x.rosbag"] == "b1"
    assert cli([str(a) for a in [*base, storage, "--source", "sim"]]) == 2  # the same recording said to be another source
    err = capsys.readouterr().err
    assert "stored with different content" in err and "they differ in metadata 'source' 'real' stored, 'sim' imported); nothing was imported" in err
    from fleet.interop.common import write_to_store
    from fleet.interop.rosbag import import_rosbag

    twice = [import_rosbag(storage, ImportOptions("arm-9", "toy2", source))[0] for source in ("real", "sim")]
    with pytest.raises(InteropError, match=r"twice with different content \(they differ in metadata 'source' 'real' first, 'sim' second\)"):
        write_to_store(twice, tmp_path / "other-store")


def test_an_ambiguous_topic_is_said_plainly_not_as_an_unreadable_bag(tmp_path, capsys):
    """The reader's broad except also caught the topic choice's own InteropError: "... is not a readable ROS 2 bag
    (InteropError: ...cannot choose the observation topic...); check that it is a rosbag2 folder"."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    with Writer(tmp_path / "two", version=9) as bag:
        for topic in ("/left/joint_states", "/right/joint_states", "/left/commands", "/right/commands"):
            bag.add_connection(topic, "sensor_msgs/msg/JointState" if topic.endswith("states") else "std_msgs/msg/Float64MultiArray", typestore=ts)
    argv = ["import", "--format", "rosbag", str(tmp_path / "two"), "--store", str(tmp_path / "s"), "--robot-id", "a", "--robot-model", "b"]
    for chosen, role in (([], "observation"), (["--observation-topic", "/left/joint_states"], "action")):
        assert cli([*argv, *chosen]) == 2
        err = capsys.readouterr().err
        assert f"two: cannot choose the {role} topic (candidates [" in err and f"pass --{role}-topic" in err
        assert "not a readable" not in err and "rosbag2 folder" not in err


@pytest.mark.parametrize("old_name", ["b1.db3", ""])
def test_a_bag_stored_under_an_earlier_builds_name_re_imports_as_a_duplicate(tmp_path, capsys, monkeypatch, old_name):
    """A store holding a bag imported before x.rosbag was the bag folder's name (by its file: 'b1.db3'; as '.': '') refused
    every re-import as "stored with different content", though only the name it was read under differed."""
    import dataclasses

    from fleet.interop.common import write_to_store
    from fleet.interop.rosbag import import_rosbag

    write_bag(tmp_path / "b1")
    (storage,) = (tmp_path / "b1").glob("*.db3")
    (ep,) = import_rosbag(storage, ImportOptions("arm-9", "toy2"))
    earlier = dataclasses.replace(ep, metadata={**ep.metadata, "x.rosbag": old_name})  # as an earlier build stored it
    assert write_to_store([earlier], tmp_path / "store")["created"] == 1
    base = ["import", "--format", "rosbag", "--store", tmp_path / "store", "--robot-id", "arm-9", "--robot-model", "toy2"]
    monkeypatch.chdir(tmp_path / "b1")
    for given in (storage, ".", tmp_path / "b1"):
        counts = run_cli([*base, given], capsys)
        assert (counts["created"], counts["duplicate"], counts["conflict"]) == (0, 1, 0), given
    with monkeypatch.context() as m:  # as when another writer stored it after the import looked: the store's own check answers
        m.setattr(EpisodeStore, "lookup", lambda self, episode_id: None)
        counts = run_cli([*base, storage], capsys)
        assert (counts["created"], counts["duplicate"], counts["conflict"]) == (0, 1, 0)
    assert [e.metadata["x.rosbag"] for e in stored(tmp_path / "store").values()] == [old_name]  # stored as it was
    assert cli([str(a) for a in [*base, storage, "--source", "sim"]]) == 2  # other content still is refused, naming what differs
    assert "they differ in metadata 'source' 'real' stored, 'sim' imported; metadata 'x.rosbag'" in capsys.readouterr().err


@pytest.mark.parametrize("mcap", [False, True])
def test_a_bag_recorded_across_a_clock_step_back_is_refused_not_interleaved(tmp_path, mcap):
    """A robot's clock stepped back 1.025 s (NTP) mid-recording: the import sorted the messages by time and stored its steps
    interleaved ([20, 0, 21, 1, ...]: a clean-looking stream at twice the rate, every transition wrong), without a word.
    Seen in the storage's own order (the recorder's clock) or in the header stamps (the robot's alone), it is refused."""
    from fleet.interop.common import ImportOptions, InteropError
    from fleet.interop.rosbag import import_rosbag

    options = ImportOptions(robot_id="a", robot_model="b")
    write_bag(tmp_path / "both", steps=40, back_at=20, back_ns=1_025_000_000, mcap=mcap)
    with pytest.raises(InteropError, match=r"recorder's clock stepped back 0.975 s at message 20 on '/joint_states'.*two bags"):
        import_rosbag(tmp_path / "both", options)
    write_bag(tmp_path / "robot", steps=40, back_at=20, back_ns=1_025_000_000, recorder_back=False, mcap=mcap)
    with pytest.raises(InteropError, match=r"header stamps on '/joint_states' step back 0.975 s at message 20"):
        import_rosbag(tmp_path / "robot", options)
    write_bag(tmp_path / "fine", steps=40, back_at=20, back_ns=10_000_000, mcap=mcap)  # a clock slewed, not stepped back: in order
    assert import_rosbag(tmp_path / "fine", options)[0].num_steps == 40
    for compress in ("file", "message"):  # rosbag2's zstd compression: the stored order read all the same
        write_bag(tmp_path / compress, steps=40, back_at=20, back_ns=1_025_000_000, mcap=mcap, compress=compress)
        with pytest.raises(InteropError, match=r"recorder's clock stepped back 0.975 s at message 20"):
            import_rosbag(tmp_path / compress, options)
    write_bag(tmp_path / "jitter", steps=40, mcap=mcap, jitter_ns={21: 30_000_000, 22: -30_000_000})  # a 10 ms reorder is no clock step
    with pytest.raises(InteropError, match=r"observation 22 on '/joint_states' is stamped 0.01 s before observation 21"):  # (once: 'share a time stamp')
        import_rosbag(tmp_path / "jitter", options)  # its commands have no header stamps: the steps follow the log times


def test_a_step_back_within_a_message_period_is_jitter_not_a_clock_set_back():
    """Header stamps jittered by 30 ms at 20 Hz (two publishers, a late message) are sorted into order as before; a fully
    stamped bag with such jitter was refused as a clock step back."""
    from fleet.interop.rosbag_clock import _step_back

    period = 50_000_000
    times = [k * period for k in range(40)]
    times[21], times[22] = times[21] + 30_000_000, times[22] - 30_000_000
    assert _step_back(times) is None
    times[30:] = [t - 1_025_000_000 for t in times[30:]]
    assert _step_back(times) == (30, 975_000_000)


def test_rosbag_commands_are_matched_on_one_clock_and_a_late_first_command_is_refused(tmp_path, capsys):
    """A robot's header clock 1,000 s ahead of the recorder's (or sim time) matched every step to the bag's last command,
    silently; a recording whose commands start late gave its first steps the last command too (index -1)."""
    from fleet.interop.common import ImportOptions, InteropError
    from fleet.interop.rosbag import import_rosbag

    pos, vel, cmd, t0 = write_bag(tmp_path / "ahead", header_offset_ns=1_000 * 10**9)
    (ep,) = import_rosbag(tmp_path / "ahead", ImportOptions(robot_id="a", robot_model="b"))
    assert np.array_equal(ep.action, cmd.astype(np.float32))  # matched on the log clock every topic has
    assert np.allclose(ep.timestamp, (t0 + 1_000 * 10**9 + np.arange(7) * 50_000_000) / 1e9, rtol=0, atol=1e-6)  # the robot's stamps kept
    write_bag(tmp_path / "late", first_command=3)
    with pytest.raises(InteropError, match="no message on action topic '/arm/commands' before the second observation"):
        import_rosbag(tmp_path / "late", ImportOptions(robot_id="a", robot_model="b"))


def test_import_uploads_through_the_robot_agent(store, tmp_path, capsys, monkeypatch):
    from fleet.server import ServerConfig, add_token, serve

    tokens = tmp_path / "tokens.json"
    monkeypatch.setenv("FLYWHEEL_ROBOT_TOKEN", add_token(tokens, "robot", "arm-9"))
    server = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "server-store"), fsync=False))
    try:
        write_bag(tmp_path / "bag")
        argv = ["import", "--format", "rosbag", tmp_path / "bag", "--server", server.url, "--robot-id", "arm-9", "--robot-model", "toy2"]
        assert run_cli(argv, capsys)["created"] == 1
        assert run_cli(argv, capsys)["duplicate"] == 1
        assert cli([str(a) for a in [*argv[:-4], "--robot-id", "arm-8", "--robot-model", "toy2"]]) == 2  # a robot token uploads only its own episodes
        assert "robot_id_mismatch" in capsys.readouterr().err
    finally:
        server.stop()


def test_an_upload_rerun_queues_nothing_twice_and_another_robots_episodes_do_not_block_it(store, tmp_path, capsys, monkeypatch):
    """An export of two robots uploaded with one robot's token and --spool stopped at the other robot's first episode
    (403), leaving the rest queued; the rerun the error advised spooled every episode again (13 spool files for 8
    episodes after two runs) and stopped at the same episode. Now an episode already queued is not queued again, one
    of another robot is set aside in <spool>/rejected/ with the server's reason while the others go up, and
    --robot-id with --server uploads only that robot's episodes of a flywheel export."""
    from fleet.server import ServerConfig, add_token, serve

    exported = run_cli(["export", "--format", "mcap", "--store", store["path"], "--snapshot", store["pinned"], "--out", tmp_path / "x"], capsys)["path"]
    tokens, spool = tmp_path / "tokens.json", tmp_path / "spool"
    monkeypatch.setenv("FLYWHEEL_ROBOT_TOKEN", add_token(tokens, "robot", "arm-0"))  # the export holds arm-0 (2 episodes) and arm-1 (1)
    server = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "server-store"), fsync=False))
    try:
        argv = ["import", "--format", "mcap", exported, "--server", server.url, "--spool", spool]
        for run in range(2):
            assert cli([str(a) for a in argv]) == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert f"the server refused 1 episodes ({2 * (1 - run)} created, {2 * run} duplicate)" in err
            assert "token is for robot 'arm-0', episode says 'arm-1'" in err and "--robot-id" in err
            assert not list(spool.glob("*.safetensors"))  # nothing left queued, nothing queued twice
            assert [p.name.split("-", 1)[1] for p in spool.glob("rejected/*.safetensors")] == [f"{store['toy'][1].episode_id}.safetensors"]
        assert cli([str(a) for a in [*argv, "--robot-id", "arm-0"]]) == 0
        printed = capsys.readouterr()
        out = json.loads(printed.out)
        assert out["episodes"] == 2 and out["duplicate"] == 2 and out["left_out"] == 1
        assert "left out 1 episodes of other robots (arm-1)" in printed.err
    finally:
        server.stop()


def test_a_refused_spool_entry_is_named_though_another_of_its_id_went_up(tmp_path, monkeypatch):
    """A spool holding one episode id twice with different bytes (an earlier run's queued one, then this run's): the
    first went up (201), the second was refused (409), and the refusal, told apart by episode id, listed no answer."""
    import dataclasses

    from fleet.agent.spool import Spool
    from fleet.interop.common import upload
    from fleet.server import ServerConfig, add_token, serve

    earlier = toy(3, "arm-9", "real", 4)
    now = dataclasses.replace(earlier, metadata={**earlier.metadata, "policy_version": "p-other"})  # the same id, other bytes
    Spool(tmp_path / "spool", max_bytes=1 << 30).put(earlier.to_bytes(), earlier.episode_id)  # queued by a stopped run
    tokens = tmp_path / "tokens.json"
    token = add_token(tokens, "robot", "arm-9")
    server = serve(ServerConfig(port=0, token_file=str(tokens)), StoreConfig(path=str(tmp_path / "server-store"), fsync=False))
    from fleet.agent.uploader import Uploader

    once, real = [], Uploader.upload_once
    monkeypatch.setattr(Uploader, "upload_once", lambda self: "retry" if not once and not once.append(1) else real(self))  # a try that failed first
    try:
        with pytest.raises(InteropError, match=r"the server refused 1 episodes \(1 created, 0 duplicate\): 409 episode_id_conflict: .* \(1 episodes\);") as refused:
            upload([now], server.url, token, spool_dir=tmp_path / "spool")
    finally:
        server.stop()
    assert f"files kept in {tmp_path / 'spool' / 'rejected'}" in str(refused.value)


def test_inputs_that_do_not_fit_get_errors_that_say_what_to_do(store, tmp_path, capsys):
    from mcap.writer import Writer

    foreign = tmp_path / "ros.mcap"  # an MCAP without flywheel channels
    with open(foreign, "wb") as f:
        w = Writer(f)
        w.start()
        w.add_message(w.register_channel("/joint_states", "json", 0), 1, b"{}", 1)
        w.finish()
    assert cli(["import", "--format", "mcap", str(foreign), "--store", str(tmp_path / "s")]) == 2
    assert "use `flywheel import --format rosbag`" in capsys.readouterr().err
    garbage = tmp_path / "garbage.mcap"
    garbage.write_bytes(b"not an mcap file at all")
    assert cli(["import", "--format", "mcap", str(garbage), "--store", str(tmp_path / "s")]) == 2
    assert "not a readable flywheel MCAP file" in capsys.readouterr().err

    old = tmp_path / "v21"
    (old / "meta").mkdir(parents=True)
    (old / "meta/info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": 30}))
    assert cli(["import", "--format", "lerobot", str(old), "--store", str(tmp_path / "s")]) == 2
    assert "convert_dataset_v21_to_v30" in capsys.readouterr().err

    assert cli(["export", "--format", "lerobot", "--store", store["path"], "--out", str(tmp_path / "mixed")]) == 2  # toy + camcar layouts
    err = capsys.readouterr().err
    assert "--source" in err and "--robot-model or --stream" in err and "from ['" in err  # each layout's sources, to choose by
    assert "the selection's streams: " in err  # and the stream names, to choose by
    assert not (tmp_path / "mixed").exists()  # nothing half-written left behind
    assert cli(["export", "--format", "mcap", "--store", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no flywheel episode store at" in capsys.readouterr().err
    assert cli(["import", "--format", "mcap", str(garbage), "--server", "127.0.0.1:8700"]) == 2  # no scheme: said before anything is read
    assert "is not an http:// or https:// URL" in capsys.readouterr().err
    assert cli(["export", "--format", "mcap", "--store", str(garbage), "--out", str(tmp_path / "x")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli(["export", "--format", "mcap", "--store", store["path"], "--snapshot", "1CECHNK5ZQ7YV0ZR3GB0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert store["pinned"] in err and "\n" not in err.strip() and "icechunk/src" not in err  # one line, naming snapshots to pin
    empty = tmp_path / "empty"
    EpisodeStore.create(StoreConfig(path=str(empty), fsync=False))
    assert cli(["export", "--format", "mcap", "--store", str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "holds no episodes yet" in capsys.readouterr().err

    with pytest.raises(InteropError, match="cannot choose the action topic.*pass --action-topic"):
        _bag_without_commands(tmp_path)
    assert not (tmp_path / "s").exists()  # nothing was written by the refused imports


def _bag_without_commands(tmp_path):
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    from fleet.interop.rosbag import import_rosbag

    ts = get_typestore(Stores.ROS2_HUMBLE)
    with Writer(tmp_path / "nocmd", version=9) as bag:
        js = bag.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=ts)
        header = ts.types["std_msgs/msg/Header"](stamp=ts.types["builtin_interfaces/msg/Time"](sec=1, nanosec=0), frame_id="")
        msg = ts.types["sensor_msgs/msg/JointState"](header=header, name=["a"], position=np.ones(1), velocity=np.zeros(0), effort=np.zeros(0))
        bag.write(js, 1, ts.serialize_cdr(msg, "sensor_msgs/msg/JointState"))
    import_rosbag(tmp_path / "nocmd", ImportOptions(robot_id="a", robot_model="b"))


def test_an_export_killed_midway_leaves_no_export_that_looks_complete(tmp_path):
    """SIGKILL, SIGTERM or the OOM killer mid-export left the LeRobot folder with info.json and episodes but no
    flywheel.json: its import then asked for --robot-id and relabelled every robot's episodes as one, each a step short.
    Exports are written under a partial name and renamed into place once whole."""
    import subprocess
    import sys

    code = (
        "import os, sys\nfrom fleet.interop.common import new_output\n"
        "with new_output(sys.argv[1]) as out:\n    out.mkdir()\n    (out / 'info.json').write_text('{}')\n    os._exit(9)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(tmp_path / "export")], capture_output=True, text=True, timeout=120)
    assert killed.returncode == 9 and not (tmp_path / "export").exists()
    assert [p.name.startswith(".export.partial-") for p in tmp_path.iterdir()] == [True]  # only the partial name is left
    from fleet.interop.common import new_output

    with new_output(tmp_path / "whole") as out:
        out.mkdir()
        (out / "info.json").write_text("{}")
    assert (tmp_path / "whole" / "info.json").exists() and not list(tmp_path.glob(".whole.partial-*"))


@pytest.mark.parametrize("fmt", ["lerobot", "minari", "mcap"])
def test_a_rerun_after_a_killed_export_takes_in_nothing_that_export_left(store, tmp_path, capsys, fmt):
    """The partial was named by pid alone (``.<name>.partial-<pid>``) and reused: in a container, where the export is
    pid 1 every time, a rerun wrote into the killed export's leftover and renamed it into place, its truncated parquet
    file in the "finished" dataset. Every export now writes into a partial folder of its own; a killed one's is removed
    by the next export to that --out once no export holds its lock, one of a running export stays."""
    import fcntl
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    name = {"lerobot": "out", "minari": "flywheel-toy-v0", "mcap": "episodes.mcap"}[fmt]
    stale = out / f".{name}.partial-{os.getpid()}" if fmt != "lerobot" else tmp_path / f".out.partial-{os.getpid()}"  # the old name, this pid
    (stale / "data").mkdir(parents=True)
    (stale / "data" / "file-001.parquet").write_bytes(b"PAR1 truncated")
    code = "import os, sys\nfrom fleet.interop.common import new_output\nwith new_output(sys.argv[1]) as o:\n    o.mkdir()\n    os._exit(9)\n"
    assert subprocess.run([sys.executable, "-c", code, str(stale.parent / name)], timeout=120).returncode == 9  # a killed export
    killed = [p for p in stale.parent.glob(f".{name}.partial-*") if p != stale]
    running = stale.parent / f".{name}.partial-running"  # an export still writing: it holds the lock
    running.mkdir()
    (running / "flywheel-export-partial").touch()
    held = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        run_cli(["export", "--format", fmt, "--store", store["path"], "--source", "real", "--source", "sim", "--out", out], capsys)
    finally:
        os.close(held)
    exported = stale.parent / name
    assert not list(exported.rglob("file-001.parquet")) if fmt != "mcap" else exported.read_bytes().startswith(b"\x89MCAP")
    assert len(killed) == 1 and not killed[0].exists()  # the killed export's partial is gone
    assert running.exists() and stale.exists()  # a running export's stays, and so does an older flywheel's (docs: remove by hand)


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_an_export_never_goes_over_one_that_finished_while_it_ran(tmp_path, kind):
    """Two MCAP exports to one --out at once: the later one's os.replace went over the earlier one's file, and both
    reported success. The loser is refused as a rerun is, and what the winner wrote stays."""
    from fleet.interop.common import new_output

    target = tmp_path / "out"
    with pytest.raises(InteropError, match="exists already.*another export wrote it while this one ran"):
        with new_output(target) as mine:
            if kind == "file":
                mine.write_text("mine")
                target.write_text("theirs")  # the other export finished first
            else:
                mine.mkdir()
                (mine / "info.json").write_text("mine")
                target.mkdir()
                (target / "info.json").write_text("theirs")
    assert (target if kind == "file" else target / "info.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing of the loser left


def test_what_a_format_cannot_carry_is_refused_in_one_line_and_an_outside_one_frame_episode_left_out(tmp_path, caplog):
    """A clock in milliseconds crashed the MCAP writer (struct.error); '.' and '/' in array names shared one topic; a
    robot model with a '.' made a default Minari id Minari refused, and an id without -vN crashed Minari's loader; one
    episode of one frame in an outside LeRobot dataset stopped its whole import."""
    from fleet.interop.common import select
    from fleet.interop.lerobot import export_lerobot, import_lerobot
    from fleet.interop.mcap_io import export_mcap
    from fleet.interop.minari_export import export_minari

    arrays = {**make_episode_arrays(num_steps=3, seed=1), "timestamp": 1.7e12 + np.arange(4) * 0.05}  # milliseconds since 1970
    late = Episode.create(**arrays, robot_id="r-1", robot_model="franka.panda", source="real")
    EpisodeStore.create(StoreConfig(path=str(tmp_path / "s"), fsync=False)).append([late])
    with pytest.raises(InteropError, match="64-bit nanosecond"):
        export_mcap(select(tmp_path / "s"), tmp_path / "m")
    assert export_minari(select(tmp_path / "s"), tmp_path / "mi").parent.name == "flywheel-franka_panda-v0"
    with pytest.raises(InteropError, match="no version"):
        export_minari(select(tmp_path / "s"), tmp_path / "mi2", dataset_id="myds")
    image = np.zeros((4, 2, 2, 3), np.uint8)
    twins = Episode.create(**make_episode_arrays(num_steps=3, seed=2), robot_id="r-2", robot_model="cam", source="real", extras={"image.left.ir": image, "image.left/ir": image})
    EpisodeStore.create(StoreConfig(path=str(tmp_path / "t"), fsync=False)).append([twins])
    with pytest.raises(InteropError, match="both map to MCAP topic"):
        export_mcap(select(tmp_path / "t"), tmp_path / "m2")
    short, long = (Episode.create(**make_episode_arrays(num_steps=n, seed=n), robot_id="r-3", robot_model="toy", source="real") for n in (1, 4))
    EpisodeStore.create(StoreConfig(path=str(tmp_path / "u"), fsync=False)).append([short, long])
    out = export_lerobot(select(tmp_path / "u"), tmp_path / "lr")
    (out / "meta" / "flywheel.json").unlink()  # as a LeRobot tool rewrites it: an outside dataset now
    with caplog.at_level("WARNING", logger="fleet.interop.lerobot"):
        imported = import_lerobot(out, ImportOptions(robot_id="r-3", robot_model="toy"))
    assert len(imported) == 1 and imported[0].num_steps == 3 and "left out 1 episode(s) of one frame" in caplog.text


def test_a_selection_is_exported_a_batch_at_a_time_and_lerobot_rolls_its_data_files(store, tmp_path, monkeypatch):
    """An export held the whole selection in memory (a fleet's store does not fit): now each format reads one batch of
    about ``batch_bytes`` at a time, and LeRobot's frames go into data files of about ``data_file_mb``, as LeRobot lays
    out a large dataset (data/chunk-C/file-F.parquet, each episode's row naming its file)."""
    import minari
    import pyarrow.parquet as pq

    from fleet.interop.common import select
    from fleet.interop.lerobot import export_lerobot, import_lerobot
    from fleet.interop.mcap_io import export_mcap, import_mcap
    from fleet.interop.minari_export import export_minari

    def one_at_a_time():
        selection = select(store["path"], robot_model="toy")
        selection.batch_bytes = 1  # every episode is its own batch
        read, sizes = selection.snapshot.read_episodes, []
        selection.snapshot.read_episodes = lambda infos, **kw: sizes.append(len(infos)) or read(infos, **kw)
        return selection, sizes

    selection, sizes = one_at_a_time()
    root = export_lerobot(selection, tmp_path / "lr", data_file_mb=1e-6)  # a file per episode
    assert sizes == [1, 1, 1]
    info = json.loads((root / "meta/info.json").read_text())
    episodes = pq.read_table(root / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert [(e["data/chunk_index"], e["data/file_index"]) for e in episodes] == [(0, 0), (0, 1), (0, 2)]
    files = [pq.read_table(root / info["data_path"].format(chunk_index=0, file_index=k)) for k in range(3)]
    assert [f.num_rows for f in files] == [5, 7, 3] and info["total_frames"] == 15
    assert_same(import_lerobot(root), store["toy"])
    stats = json.loads((root / "meta/stats.json").read_text())
    state = np.concatenate([np.stack(f["observation.state"].to_numpy(zero_copy_only=False)) for f in files]).astype(np.float64)
    np.testing.assert_allclose(stats["observation.state"]["mean"], state.mean(0), rtol=1e-9)  # merged episode by episode: exact
    np.testing.assert_allclose(stats["observation.state"]["std"], state.std(0), rtol=1e-9)
    assert stats["observation.state"]["min"] == state.min(0).tolist() and stats["observation.state"]["count"] == [15]
    assert all(np.min(state, 0)[d] <= stats["observation.state"]["q50"][d] <= np.max(state, 0)[d] for d in range(3))

    selection, sizes = one_at_a_time()
    path = export_mcap(selection, tmp_path / "mcap")
    got = {ep.episode_id: ep for ep in import_mcap(path)}
    assert sizes == [1, 1, 1] and len(got) == 3
    assert_same([got[ep.episode_id] for ep in store["toy"]], store["toy"])

    selection, sizes = one_at_a_time()
    export_minari(selection, tmp_path / "mi")
    assert sizes == [1, 1, 1]
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "mi"))
    dataset = minari.load_dataset("flywheel-toy-v0")
    assert dataset.total_episodes == 3 and [m["flywheel_metadata"] for m in dataset.storage.get_episode_metadata(range(3))] == [e.metadata for e in store["toy"]]
    assert [ep.observations.tolist() for ep in dataset.iterate_episodes()] == [e.observation.tolist() for e in store["toy"]]


def test_a_minari_export_measures_its_size_once_not_after_every_episode(tmp_path, monkeypatch):
    """Minari's arrow writer globbed and stat'ed every file written so far after each episode it appended (its
    dataset_size), so an export of N episodes took time quadratic in N (2,000 one-step episodes: 439 s). Now the export
    scans its folder once, at the end, and writes the metadata Minari's per-episode sizing would have written."""
    import minari
    from minari.dataset.minari_storage import MinariStorage

    from fleet.interop import minari_export
    from fleet.interop.common import select

    r = np.random.default_rng(0)
    episodes = [
        Episode.create(**make_episode_arrays(num_steps=n, seed=n), robot_id="arm-0", robot_model="toy", source="real", extras={"qpos": r.standard_normal((n + 1, 64))})
        for n in (300, 1, 2, 400)
    ]  # fmt: skip
    EpisodeStore.create(StoreConfig(path=str(tmp_path / "s"), fsync=False)).append(episodes)
    scans, size = [], MinariStorage.get_size
    monkeypatch.setattr(MinariStorage, "get_size", lambda self: scans.append(self.data_path) or size(self))

    def export(out, per_episode_size=False):
        if per_episode_size:  # Minari's own sizing after each episode: the reference
            monkeypatch.setattr(minari_export._SizeAtEnd, "get_size", lambda self: self.measured_size())
        selection = select(tmp_path / "s")
        selection.batch_bytes = 1  # a batch per episode: Minari appends them one after another
        scans.clear()
        data = minari_export.export_minari(selection, out)
        return minari.MinariDataset(str(data)), len(scans)

    dataset, n_scans = export(tmp_path / "mi")
    reference, reference_scans = export(tmp_path / "ref", per_episode_size=True)
    assert n_scans == 1 and reference_scans > len(episodes)  # 4 appends + 4 metadata updates before, each a scan
    meta, want = dataset.storage.metadata, reference.storage.metadata
    assert (meta["total_episodes"], meta["total_steps"]) == (want["total_episodes"], want["total_steps"]) == (4, 703)
    assert meta["dataset_size"] == want["dataset_size"] > 0.1  # MB, rounded to 0.1 as Minari does
    assert list(dataset.storage.get_episode_metadata(range(4))) == list(reference.storage.get_episode_metadata(range(4)))
    for got, ep in zip(dataset.iterate_episodes(), episodes):
        assert np.array_equal(got.observations, ep.observation) and np.array_equal(got.infos["qpos"], ep.extras["qpos"])
