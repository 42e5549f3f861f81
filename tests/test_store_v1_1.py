"""Schema 1.1 episodes through the server into the store and back, bit-exact; the catalog's 1.1
columns; cameras on their own frame axis; stores written before the 1.1 columns still read and grow."""

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from fleet.server import ServerConfig, add_token, serve
from fleet.store import EpisodeStore, StoreConfig, backend
from fleet.store.catalog import ADDED_COLUMNS
from sim.episode import Episode, encode_safetensors
from tests.conftest import make_episode_arrays
from tests.test_episode_v1_1 import NAMES, camera, make_v1_1

OPTS = dict(consolidated=False, zarr_format=3, chunks=None)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("server11")
    tokens = root / "tokens.json"
    tok = {"robot": add_token(tokens, "robot", "robot-1"), "operator": add_token(tokens, "operator")}
    store_cfg = StoreConfig(path=str(root / "store"), chunk_rows=64, index_rows=8, fsync=False)
    handle = serve(ServerConfig(port=0, token_file=str(tokens)), store_cfg)
    with httpx.Client(base_url=handle.url, timeout=30) as client:
        yield client, tok, store_cfg
    handle.stop()


def post(fleet, body: bytes) -> httpx.Response:
    client, tok, _ = fleet
    return client.post("/v1/episodes", content=body, headers={"Authorization": f"Bearer {tok['robot']}"})


def test_1_1_and_1_records_go_wire_server_store_and_back_bit_exact(fleet):
    client, tok, store_cfg = fleet
    slow = make_v1_1()  # 10 Hz wrist camera (3 frames) beside 20 Hz control (5 steps)
    fast = make_v1_1(extras=camera(frames=16, rate_hz=60.0), cameras={"wrist": {"codec": "raw-rgb8", "width": 6, "height": 4}}, control_rate_hz="20.0")
    plain = Episode.create(**make_episode_arrays(seed=3), robot_id="robot-1", robot_model="arm", source="real")
    for ep in (slow, fast, plain):
        answer = post(fleet, ep.to_bytes())
        assert answer.status_code == 201, answer.text
        assert post(fleet, ep.to_bytes()).json()["status"] == "duplicate"
        got = client.get(f"/v1/episodes/{ep.episode_id}", headers={"Authorization": f"Bearer {tok['operator']}"})
        assert got.content == ep.to_bytes()
    snap = EpisodeStore.open(store_cfg).snapshot()
    for ep in (slow, fast, plain):
        assert snap.read_episode(ep.episode_id).equals(ep)
    info = snap.get(slow.episode_id)
    assert (info.schema_version, info.task, info.control_rate_hz) == ("1.1", "pick up the red cube ✓", 20.0)
    assert info.frames[0][0] == "image.wrist" and info.frames[0][2] == 3
    assert snap.get(plain.episode_id).schema_version == "1" and snap.get(plain.episode_id).task is None
    both = snap.read_episodes([slow.episode_id, fast.episode_id, plain.episode_id])
    assert [e.extras.get("image.wrist", np.zeros(0)).shape[0] for e in both] == [3, 16, 0]


@pytest.mark.parametrize(
    "meta, code, field",
    [
        ({"names": json.dumps({"observation": ["a"]})}, "bad_metadata", "names.observation"),
        ({"control_rate_hz": "200"}, "bad_metadata", "control_rate_hz"),
        ({"task": "\x07"}, "bad_metadata", "task"),
        ({"cameras": json.dumps({"wrist": {"codec": "av1", "width": 6, "height": 4}})}, "bad_metadata", "cameras.wrist"),
        ({"schema_version": "2"}, "unknown_schema_version", "schema_version"),
        ({"schema_version": "1"}, "unknown_metadata", "cameras"),
    ],
)
def test_bad_1_1_uploads_are_refused_with_4xx_naming_the_field(fleet, meta, code, field):
    ep = make_v1_1()
    answer = post(fleet, encode_safetensors(ep.arrays(), {**ep.metadata, **meta}))
    assert answer.status_code == 422 and answer.json()["error"] == code and answer.json()["field"] == field, answer.text


def test_camera_clock_errors_map_to_their_codes(fleet):
    ep = make_v1_1(cameras=None)
    late = encode_safetensors({**ep.arrays(), "image.wrist.timestamp": np.array([0.0, 0.1, 9.0])}, ep.metadata)
    assert post(fleet, late).json() == {"error": "bad_camera_timestamp", "field": "image.wrist.timestamp", "reason": post(fleet, late).json()["reason"]}
    orphan = encode_safetensors({**ep.arrays(), "image.back.timestamp": np.array([0.0])}, ep.metadata)
    assert post(fleet, orphan).json()["error"] == "missing_array"


def test_catalog_columns_and_camera_frame_axis_read_with_xarray(tmp_path):
    import icechunk
    import xarray as xr

    store = EpisodeStore.create(StoreConfig(path=str(tmp_path / "s"), chunk_rows=16, index_rows=4, fsync=False))
    eps = [make_v1_1(), make_v1_1(extras=camera(frames=2, rate_hz=10.0))]
    store.append(eps)
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(tmp_path / "s" / "icechunk")))
    session = repo.readonly_session(branch="main")
    catalog = xr.open_zarr(session.store, group="catalog/local", **OPTS).to_dataframe()  # the one writer's partition
    assert list(catalog.task) == ["pick up the red cube ✓"] * 2 and list(catalog.control_rate_hz) == [20.0, 20.0]
    assert json.loads(catalog.names.iloc[0]) == NAMES
    data = xr.open_zarr(session.store, group=f"streams/{catalog.stream.iloc[0]}/data", **OPTS)
    assert data["image.wrist"].dims == ("image.wrist_frame", "image.wrist_height", "image.wrist_width", "image.wrist_channel")
    stamps = data["image.wrist.timestamp"].values
    assert data["image.wrist.timestamp"].dims == ("image.wrist_frame",) and np.isfinite(stamps).sum() == 5  # NaN = padding
    frames = [json.loads(f) for f in catalog.frames]
    assert frames == [{"image.wrist": [0, 3]}, {"image.wrist": [3, 2]}]


def test_a_store_written_before_the_1_1_columns_reads_and_grows_without_a_rewrite(tmp_path):
    cfg = StoreConfig(path=str(tmp_path / "old"), chunk_rows=16, index_rows=4, fsync=False)
    store = EpisodeStore.create(cfg)
    old = Episode.create(**make_episode_arrays(seed=5), robot_id="r", robot_model="arm", source="sim", **{"x.note": "v1"})
    store.append([old])
    repo = backend.open_repo(Path(cfg.path))
    session = repo.writable_session("main")

    async def drop_columns():  # what a store written by the build before schema 1.1 holds
        group = await backend.open_group(session.store, "catalog/local", mode="r+")
        for column in ADDED_COLUMNS:
            await group.delitem(column)

    backend.run(drop_columns())
    before = session.commit("as written before schema 1.1")
    reopened = EpisodeStore.open(cfg)
    assert reopened.snapshot().read_episode(old.episode_id).equals(old)
    new = make_v1_1()
    assert reopened.append([new]).statuses == ("created",)
    snap = EpisodeStore.open(cfg).snapshot()
    assert snap.read_episode(old.episode_id).equals(old) and snap.read_episode(new.episode_id).equals(new)
    assert snap.get(old.episode_id).schema_version == "" and snap.get(old.episode_id).control_rate_hz is None
    assert reopened.snapshot(before).read_episode(old.episode_id).equals(old)  # pinned before the columns existed
    assert EpisodeStore.open(cfg).history(1)[0]["message"] == "append episodes"  # no migration commit
