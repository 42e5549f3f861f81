"""The episode store read by generic tools: xarray (named dimensions), the catalog table
(pandas, the writers' partitions in seq order), a plain zarr reader (padding masked), pinned
snapshots, and a schema-1 store."""

import hashlib
import json
import uuid

import icechunk
import numpy as np
import pytest
import zarr

from fleet.store import EpisodeStore, StoreConfig
from fleet.store.writer import canonical_digest
from tests.test_store import episode

xr = pytest.importorskip("xarray")


@pytest.fixture
def cfg(tmp_path):
    return StoreConfig(path=str(tmp_path / "store"), chunk_rows=32, index_rows=4, fsync=False)


def session(cfg: StoreConfig, snapshot_id: str | None = None) -> icechunk.Session:
    """A read-only Icechunk session, opened the way any Icechunk user would."""
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(f"{cfg.path}/icechunk"))
    return repo.readonly_session(snapshot_id=snapshot_id) if snapshot_id else repo.readonly_session(branch="main")


def open_xr(sess: icechunk.Session, group: str):
    return xr.open_zarr(sess.store, group=group, consolidated=False, zarr_format=3, chunks=None)


def catalog_table(sess: icechunk.Session):
    """The catalog as docs/store.md reads it with generic tools: every writer's partition, in seq order."""
    import pandas as pd

    writers = zarr.open_group(sess.store, path="catalog", mode="r", zarr_format=3, use_consolidated=False).group_keys()
    return pd.concat([open_xr(sess, f"catalog/{w}").to_dataframe() for w in writers]).sort_values("seq", ignore_index=True)


def two_commits(cfg: StoreConfig):
    store = EpisodeStore.create(cfg)
    first = [episode(i, f"r{i % 2}", steps=5 + 3 * i) for i in range(3)]
    second = [episode(10, "cam", obs_dim=4, robot_model="big", hardware={"arm": "v2"}, **{"x.note": "hi"}), episode(11, "r0", steps=40)]
    snap1 = store.append(first).snapshot_id
    snap2 = store.append(second).snapshot_id
    return store, first, second, snap1, snap2


def test_xarray_opens_every_stream_with_named_dimensions(cfg):
    store, first, second, _, _ = two_commits(cfg)
    sess = session(cfg)
    catalog = catalog_table(sess)
    by_id = {e.episode_id: e for e in first + second}
    for stream in set(catalog["stream"].values):
        ds = open_xr(sess, f"streams/{stream}/data")
        assert ds["observation"].dims == ("step", "obs_dim") and ds["action"].dims == ("step", "act_dim")
        assert ds["reward"].dims == ds["terminated"].dims == ds["episode_index"].dims == ("step",)
        for k in np.flatnonzero(catalog["stream"].values == stream):
            ep = by_id[str(catalog["episode_id"].values[k])]
            row, t = int(catalog["row"].values[k]), int(catalog["num_steps"].values[k])
            rows = ds.isel(step=slice(row, row + t + 1))
            assert np.array_equal(rows["observation"].values, ep.observation)
            assert np.array_equal(rows["action"].values[:t], ep.action) and np.isnan(rows["action"].values[t]).all()
            assert np.array_equal(rows["terminated"].values[:t], ep.terminated)
            assert (rows["episode_index"].values == k).all()
    big = open_xr(sess, f"streams/{store.snapshot().get(second[0].episode_id).stream}/data")
    assert big.sizes["obs_dim"] == 4


def test_catalog_rows_equal_the_episodes_of_each_pinned_snapshot(cfg):
    store, first, second, snap1, snap2 = two_commits(cfg)
    for snap_id, eps in ((snap1, first), (snap2, first + second)):
        table = catalog_table(session(cfg, snap_id))
        assert list(table["episode_id"]) == [e.episode_id for e in eps]  # commit order, nothing else
        assert list(table["seq"]) == list(range(len(eps)))
        assert list(table["num_steps"]) == [e.num_steps for e in eps]
        assert np.allclose(table["total_return"], [e.total_return for e in eps])
        assert list(table["start_time"]) == [float(e.timestamp[0]) for e in eps]
        assert list(table["robot_id"]) == [e.robot_id for e in eps] and list(table["source"]) == [e.source for e in eps]
        assert list(table["digest"]) == [canonical_digest(e).hex() for e in eps]
        assert [e.episode_id for e in store.snapshot(snap_id).catalog()] == list(table["episode_id"])
    cam = table.set_index("episode_id").loc[second[0].episode_id]
    assert cam["robot_model"] == "big" and json.loads(cam["hardware"]) == {"arm": "v2"}  # one level of JSON, no more
    assert json.loads(cam["other_metadata"]) == {"x.note": "hi"} and cam["scenario"] == ""


def test_plain_zarr_reader_sees_padding_as_masked_or_nan(cfg):
    store, first, second, _, _ = two_commits(cfg)
    root = zarr.open_group(session(cfg).store, mode="r", zarr_format=3, use_consolidated=False)
    for name, group in root["streams"].groups():
        data = group["data"]
        index = data["episode_index"][:]
        padding = index < 0
        assert padding.any()  # commits start on chunk boundaries, so there is padding to mask
        for array_name, arr in data.arrays():
            assert arr.metadata.dimension_names[0] == "step"
            if arr.dtype.kind == "f":
                assert np.isnan(arr[:][padding]).all() and not np.isnan(arr[:][~padding][: -1]).all()
    rows = sum(int((g["data"]["episode_index"][:] >= 0).sum()) for _, g in root["streams"].groups())
    assert rows == sum(e.num_steps + 1 for e in first + second)  # every data row belongs to exactly one episode


def hand_written_store(cfg: StoreConfig, schema_version: int, episodes):
    """An empty store of an older schema written by hand, as that schema's writer left it, and the
    stream of ``episodes[0]``: (the writable session, the root group, the stream's signature, its group)."""
    from pathlib import Path

    from fleet.store import backend
    from fleet.store.layout import StreamSignature

    sess = backend.create_repo(Path(cfg.path)).writable_session("main")
    root = zarr.open_group(sess.store, mode="w", zarr_format=3)
    root.attrs["flywheel_store"] = {"format": "flywheel-episode-store", "store_schema_version": schema_version, "episode_schema_version": "1",
                                    "chunk_rows": cfg.chunk_rows, "index_rows": cfg.index_rows, "compression": cfg.compression}  # fmt: skip
    sig = StreamSignature.of(episodes[0])
    return sess, root, sig, root.create_group(f"streams/{sig.name}", attributes={"signature": sig.to_dict()})


def write_schema_1_store(cfg: StoreConfig, episodes) -> str:
    """A store as schema 1 wrote it (per-stream padded index/ arrays, no catalog), by hand."""
    from fleet.store.layout import stack_rows

    sess, _, sig, group = hand_written_store(cfg, 1, episodes)
    rows, slots = cfg.chunk_rows, cfg.index_rows
    for spec in sig.arrays:
        group.create_array(f"data/{spec.name}", data=stack_rows(episodes, spec, rows, 0), chunks=(rows, *spec.tail))
    span, key = np.zeros((slots, 2), np.int64), np.zeros((slots, 48), np.uint8)
    record, meta = np.full(slots, "", dtype=object), np.full(slots, "", dtype=object)
    row = 0
    for k, ep in enumerate(episodes):
        span[k] = (row, ep.num_steps)
        key[k] = np.frombuffer(uuid.UUID(ep.episode_id).bytes + canonical_digest(ep), np.uint8)
        m = ep.metadata
        record[k] = json.dumps({"robot_id": m["robot_id"], "robot_model": m["robot_model"], "source": m["source"], "policy_version": m["policy_version"],
                                "model_version": m.get("model_version"), "scenario_sha256": None, "upload_time": 1.0,
                                "start_time": float(ep.timestamp[0]), "num_steps": ep.num_steps, "total_return": ep.total_return})  # fmt: skip
        meta[k] = json.dumps(m, sort_keys=True)
        row += ep.num_steps + 1
    for name, block in (("span", span), ("key", key), ("record", record), ("metadata", meta)):
        group.create_array(f"index/{name}", shape=block.shape, chunks=block.shape, dtype=str if block.dtype == object else block.dtype, fill_value="" if block.dtype == object else 0)
        group[f"index/{name}"][:] = block
    return sess.commit("a schema-1 store")


def test_schema_1_store_is_migrated_on_open_and_old_snapshots_still_read(cfg):
    old = [episode(i, steps=4 + i, hardware={"v": i}) for i in range(3)]
    old_snapshot = write_schema_1_store(cfg, old)
    store = EpisodeStore.open(cfg)  # migrates in one commit
    assert store.info["store_schema_version"] == 3 and store.history(1)[0]["message"] == "migrate store schema 1 -> 3"
    assert EpisodeStore.open(cfg).latest_snapshot_id() == store.latest_snapshot_id()  # migrated once
    pinned = store.snapshot(old_snapshot)  # pinned before the migration: read through the schema-1 reader
    assert [pinned.read_episode(e.episode_id).to_bytes() for e in old] == [e.to_bytes() for e in old]
    new = episode(50, steps=7)
    assert store.append([new, old[0]]).statuses == ("created", "duplicate")  # the id index survived the migration
    snap = store.snapshot()
    assert [e.episode_id for e in snap.catalog()] == [e.episode_id for e in old + [new]]
    assert all(snap.read_episode(e.episode_id).equals(e) for e in old + [new])
    table = catalog_table(session(cfg))
    assert list(table["num_steps"]) == [e.num_steps for e in old + [new]]
    assert [snap.get(e.episode_id).stream.endswith(".local") for e in old + [new]] == [False] * 3 + [True]  # new rows: the writer's own stream
    data = open_xr(session(cfg), f"streams/{snap.catalog()[0].stream}/data")
    assert data["observation"].dims == ("step", "obs_dim")
    assert list(np.unique(data["episode_index"].values)) == [-1, 0, 1, 2]  # rows of the partition "migrated"
    migrated = open_xr(session(cfg), "catalog/migrated").to_dataframe()
    assert list(migrated["episode_id"]) == [e.episode_id for e in old] and list(migrated["seq"]) == [0, 1, 2]


def test_catalog_rebuilds_metadata_exactly():
    from fleet.store.catalog import COLUMNS, EpisodeInfo, metadata_of, record_of

    ep = episode(3, model_version="", scenario={"seed": 1}, **{"x.a": "1", "x.b": "{}"})
    rec = record_of(ep, hashlib.sha256(b"x").digest(), 2.0, "toy-abc", 0)
    assert set(rec) == set(COLUMNS)
    info = EpisodeInfo(rec["episode_id"], "toy-abc", 0, 0, ep.num_steps, rec["digest"], ep.robot_id, "toy", ep.source, ep.metadata["policy_version"],
                       rec["model_version"] or None, 2.0, rec["start_time"], rec["total_return"])  # fmt: skip
    assert metadata_of(info, rec, "1") == ep.metadata
