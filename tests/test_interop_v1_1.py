"""Schema 1.1 through interop: LeRobot fps/names/task out and in, MCAP bit-exact with a camera on
its own clock, Minari keeping the 1.1 metadata (and leaving that camera out)."""

import json
import uuid

import numpy as np
import pytest

from fleet.interop.common import ImportOptions, InteropError, select
from fleet.interop.lerobot import export_lerobot, import_lerobot
from fleet.interop.mcap_io import export_mcap, import_mcap
from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays

NAMES = {"observation": ["shoulder", "elbow", "wrist"], "action": ["shoulder_cmd", "elbow_cmd"]}


def arm(seed: int, camera: bool) -> Episode:
    """20 Hz control declared as 21 Hz (within the 10 % tolerance, so fps shows it is read, not inferred)."""
    arrays = make_episode_arrays(num_steps=6, seed=seed)
    extras = {}
    if camera:
        extras = {"image.wrist": np.full((3, 2, 2, 3), seed, np.uint8), "image.wrist.timestamp": np.array([0.0, 0.1, 0.2])}
    cameras = {"wrist": {"codec": "raw-rgb8", "width": 2, "height": 2, "rate_hz": 10}} if camera else None
    meta = {"names": NAMES, "control_rate_hz": "21", "task": "stack the blocks", **({"cameras": cameras} if cameras else {})}
    eid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"interop11/{seed}/{camera}"))
    return Episode.create(**arrays, robot_id="arm-1", robot_model="so100", source="real", episode_id=eid, extras=extras, **meta)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("interop11")
    out = {}
    for kind, camera in (("plain", False), ("camera", True)):
        eps = [arm(0, camera), arm(1, camera)]
        EpisodeStore.create(StoreConfig(path=str(root / kind), chunk_rows=32, index_rows=4, fsync=False)).append(eps)
        out[kind] = (select(root / kind), eps)
    return out


def test_lerobot_exports_declared_fps_names_and_task_and_imports_them_back(stores, tmp_path):
    selection, eps = stores["plain"]
    root = export_lerobot(selection, tmp_path / "lr")
    info = json.loads((root / "meta/info.json").read_text())
    assert info["fps"] == 21  # the declared control_rate_hz, not the inferred 20
    assert info["features"]["observation.state"]["names"] == NAMES["observation"]
    assert info["features"]["action"]["names"] == NAMES["action"]
    import pandas as pd

    assert list(pd.read_parquet(root / "meta/tasks.parquet").index) == ["stack the blocks"]
    back = import_lerobot(root)
    assert all(b.equals(e) for b, e in zip(back, eps))  # flywheel export: bit-exact, 1.1 metadata included

    (root / "meta/flywheel.json").unlink()  # now a foreign LeRobot dataset
    foreign = import_lerobot(root, ImportOptions(robot_id="so100-9"))[0]
    assert foreign.metadata["schema_version"] == "1.1" and foreign.metadata["task"] == "stack the blocks"
    assert foreign.metadata["control_rate_hz"] == "21" and foreign.json_metadata("names") == NAMES


def test_lerobot_leaves_out_cameras_and_their_metadata(stores, tmp_path):
    selection, eps = stores["camera"]
    back = import_lerobot(export_lerobot(selection, tmp_path / "lr"))[0]
    assert "image.wrist" not in back.extras and "cameras" not in back.metadata
    assert back.metadata["names"] == eps[0].metadata["names"]


def test_mcap_round_trips_a_camera_on_its_own_clock_bit_exact(stores, tmp_path):
    from mcap.reader import make_reader

    selection, eps = stores["camera"]
    path = export_mcap(selection, tmp_path / "m")
    with open(path, "rb") as f:
        rows = [json.loads(m.data) for _, c, m in make_reader(f).iter_messages() if c.topic == "/flywheel/image/wrist"]
    assert [r["timestamp"] for r in rows if r["episode_id"] == eps[0].episode_id] == [0.0, 0.1, 0.2]  # the camera's frame times, not the control steps
    back = import_mcap(path)
    assert all(b.equals(e) and b.to_bytes() == e.to_bytes() for b, e in zip(back, eps))


def test_minari_keeps_1_1_metadata_and_leaves_out_the_own_clock_camera(stores, tmp_path):
    from fleet.interop.minari_export import export_minari
    import minari

    selection, eps = stores["camera"]
    data = minari.MinariDataset(export_minari(selection, tmp_path / "mn"))
    episode = next(data.iterate_episodes())
    assert "image.wrist" not in episode.infos and np.array_equal(episode.observations, eps[0].observation)
    meta = data.storage.get_episode_metadata([0])
    meta = next(iter(meta))["flywheel_metadata"]
    assert meta["task"] == "stack the blocks" and meta["control_rate_hz"] == "21"


def test_lerobot_export_is_what_lerobot_reads_and_never_reuses_an_id_for_other_content(stores, tmp_path):
    """A 1-wide feature was a list column LeRobot could not cast to the scalar its shape [1] means; an episode that lost
    its camera kept its id, so importing it beside the original was a 409; robots of other rates got one wrong fps."""
    import pyarrow.parquet as pq

    selection, eps = stores["camera"]
    back = import_lerobot(export_lerobot(selection, tmp_path / "lr"))
    assert [b.episode_id for b in back] != [e.episode_id for e in eps]  # other content: other ids, stable ones
    assert [b.metadata["x.flywheel.derived_from"] for b in back] == [e.episode_id for e in eps]
    assert [b.episode_id for b in import_lerobot(tmp_path / "lr")] == [b.episode_id for b in back]
    one = Episode.create(**make_episode_arrays(num_steps=5, obs_dim=1, act_dim=1, seed=3), robot_id="slide-1", robot_model="slide", source="real")
    root = tmp_path / "one"
    EpisodeStore.create(StoreConfig(path=str(root / "store"), fsync=False)).append([one])
    out = export_lerobot(select(root / "store"), root / "lr")
    table = pq.read_table(out / "data/chunk-000/file-000.parquet")
    assert str(table.schema.field("action").type) == "float" and json.loads((out / "meta/info.json").read_text())["features"]["action"]["shape"] == [1]
    assert import_lerobot(out)[0].equals(one)  # and it still comes back whole
    slow = Episode.create(**{**make_episode_arrays(num_steps=5, seed=4), "timestamp": np.arange(6) * 0.1}, robot_id="arm-9", robot_model="so100", source="real")
    EpisodeStore.create(StoreConfig(path=str(root / "mixed"), fsync=False)).append([one, slow, *stores["plain"][1]])
    with pytest.raises(InteropError, match="one integer frame rate"):
        export_lerobot(select(root / "mixed", robot_model="so100"), root / "lr2")
    odd = Episode.create(**{**make_episode_arrays(num_steps=5, seed=5), "timestamp": np.arange(6) / 3.5}, robot_id="arm-8", robot_model="slow", source="real")
    EpisodeStore.create(StoreConfig(path=str(root / "odd"), fsync=False)).append([odd])
    with pytest.raises(InteropError, match="3.5 Hz.*no LeRobot fps fits"):  # one robot: "export each rate apart" would not help
        export_lerobot(select(root / "odd"), root / "lr3")
