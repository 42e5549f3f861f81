"""A store written in schema 2 (one flat catalog, streams without a writer) is migrated to schema 3
when opened, once; snapshots pinned before the migration still read, and writers append beside
the migrated rows in their own partition and streams."""

from pathlib import Path

import numpy as np
import pytest
import zarr

from fleet.store import EpisodeStore, StoreConfig, backend
from fleet.store.catalog import ADDED_COLUMNS, COLUMNS, columns, fill_value, record_of, zarr_dtype
from fleet.store.layout import StreamSignature, dimension_names, episode_index_rows, padded, padding_value, stack_rows
from fleet.store.writer import canonical_digest
from tests.test_store import episode
from tests.test_store_tools import hand_written_store


@pytest.fixture
def cfg(tmp_path):
    return StoreConfig(path=str(tmp_path / "store"), chunk_rows=32, index_rows=4, fsync=False)


def write_schema_2_store(cfg: StoreConfig, episodes, drop=()) -> str:
    """A store as schema 2 wrote it (the flat /catalog/<column>, no seq; a stream named without a
    writer), by hand, in one commit; ``drop``: catalog columns it predates. Returns the snapshot id."""
    sess, root, sig, stream = hand_written_store(cfg, 2, episodes)
    rows = padded(sum(e.num_steps + 1 for e in episodes), cfg.chunk_rows)
    for spec in sig.arrays:
        block = stack_rows(episodes, spec, rows, padding_value(spec.dtype))
        stream.create_array(f"data/{spec.name}", data=block, chunks=(cfg.chunk_rows, *spec.tail), dimension_names=dimension_names(spec))
    index = episode_index_rows(episodes, list(range(len(episodes))), rows)
    stream.create_array("data/episode_index", data=index, chunks=(cfg.chunk_rows,), dimension_names=("step",))
    starts = np.cumsum([0] + [e.num_steps + 1 for e in episodes])
    values = columns([record_of(e, canonical_digest(e), 1.0 + k, sig.name, int(starts[k])) for k, e in enumerate(episodes)])
    catalog = root.create_group("catalog", attributes={"columns": [c for c in COLUMNS if c != "seq" and c not in drop]})
    for column in catalog.attrs["columns"]:
        arr = catalog.create_array(column, shape=(len(episodes),), chunks=(cfg.index_rows,), dtype=zarr_dtype(column), fill_value=fill_value(column), dimension_names=("episode",))
        arr[:] = values[column]
    return sess.commit("a schema-2 store")


@pytest.mark.parametrize("drop", [(), ADDED_COLUMNS], ids=["schema-2", "schema-2-before-the-1.1-columns"])
def test_schema_2_store_is_migrated_on_open_and_old_snapshots_still_read(cfg, drop):
    old = [episode(i, steps=4 + i, hardware={"v": i}) for i in range(3)]
    pinned_id = write_schema_2_store(cfg, old, drop)
    store = EpisodeStore.open(cfg)  # migrates in one commit
    assert store.info["store_schema_version"] == 3 and store.history(1)[0]["message"] == "migrate store schema 2 -> 3"
    assert EpisodeStore.open(cfg).latest_snapshot_id() == store.latest_snapshot_id()  # migrated once
    pinned = store.snapshot(pinned_id)  # pinned before the migration: the flat catalog
    assert [e.episode_id for e in pinned.catalog()] == [e.episode_id for e in old]
    assert all(pinned.read_episode(e.episode_id).to_bytes() == e.to_bytes() for e in old)
    new = episode(50, steps=7)
    assert store.append([new, old[1]]).statuses == ("created", "duplicate")  # the id index survived the migration
    snap = store.snapshot()
    assert [e.episode_id for e in snap.catalog()] == [e.episode_id for e in old + [new]] and [e.slot for e in snap.catalog()] == [0, 1, 2, 3]
    assert all(snap.read_episode(e.episode_id).equals(e) for e in old + [new])
    assert snap.get(old[0].episode_id).stream == StreamSignature.of(old[0]).name  # the data did not move
    assert snap.get(new.episode_id).stream == f"{StreamSignature.of(new).name}.local"
    assert store.snapshot(snap.snapshot_id, base=pinned).catalog() == snap.catalog()  # a base of another schema is not reused
    root = zarr.open_group(backend.open_repo(Path(cfg.path)).readonly_session(branch="main").store, mode="r", zarr_format=3, use_consolidated=False)
    assert sorted(root["catalog"].group_keys()) == ["local", "migrated"] and not list(root["catalog"].array_keys())
    assert list(root["catalog/migrated/seq"][:]) == [0, 1, 2] and list(root["catalog/local/seq"][:]) == [3]
    assert root[f"streams/{StreamSignature.of(old[0]).name}"].attrs["writer"] == "migrated"


def test_a_backup_of_a_schema_2_store_copies_it_as_it_is(cfg, tmp_path):
    """`flywheel store backup` opened the store as the other store commands do, and that open migrated a schema-2 store:
    the backup wrote to the store it only reads. Store and copy now stay schema 2 (the copy migrates when opened)."""
    from fleet.store.backend import open_repo
    from fleet.store.cli import main as store_cli
    from fleet.store.layout import BRANCH

    write_schema_2_store(cfg, [episode(i, steps=4) for i in range(2)])
    tip = open_repo(cfg.path).lookup_branch(BRANCH)
    assert store_cli(["backup", "--store", cfg.path, "--to", str(tmp_path / "copy")]) == 0
    assert open_repo(cfg.path).lookup_branch(BRANCH) == tip == open_repo(str(tmp_path / "copy")).lookup_branch(BRANCH)  # no commit
