"""`flywheel store backup`: a copy of a store taken while it is written opens and holds what was acknowledged.

A backup probe: 5 of 8 `cp -a` copies of a store taken during ingest did not open ("damaged": the copied ref named a
snapshot copied before it was written), while the error messages said to restore from a backup."""

from __future__ import annotations

import threading
import uuid

import pytest

from fleet.store import EpisodeStore, StoreConfig
from fleet.store.cli import main as store_cli
from sim.episode import Episode
from tests.conftest import make_episode_arrays


def episode(k: int) -> Episode:
    return Episode.create(**make_episode_arrays(num_steps=3, seed=k), robot_id=f"r{k % 4}", robot_model="toy", source="real")


def test_a_backup_taken_during_ingest_opens_and_holds_every_episode_acknowledged_before_it(tmp_path, capsys):
    from fleet.store.backup import backup

    path = str(tmp_path / "store")
    writer = EpisodeStore.open_or_create(StoreConfig(path=path, fsync=False))
    acknowledged: list[str] = []
    stop = threading.Event()

    def ingest():  # one commit after another, as a busy server's
        k = 0
        while not stop.is_set():
            ep = episode(k)
            writer.append([ep])
            acknowledged.append(ep.episode_id)
            k += 1

    thread = threading.Thread(target=ingest)
    thread.start()
    try:
        while len(acknowledged) < 5:
            stop.wait(0.01)
        for n in range(3):
            before = list(acknowledged)
            out = backup(path, str(tmp_path / f"copy{n}"))
            copy = EpisodeStore.open(StoreConfig(path=str(tmp_path / f"copy{n}"))).snapshot()
            held = {info.episode_id for info in copy.catalog()}
            assert set(before) <= held and out["episodes"] == len(held) and out["snapshot_id"] == copy.snapshot_id
            assert len(copy.read_episodes(copy.catalog())) == len(held)  # every chunk there, every episode checks out
    finally:
        stop.set()
        thread.join()
    assert not list(tmp_path.glob("*.partial")) and writer.pins() == {}  # the pin let go, nothing half-taken left
    assert EpisodeStore.open(StoreConfig(path=str(tmp_path / "copy0"))).pins() == {}
    assert store_cli(["backup", "--store", path, "--to", str(tmp_path / "copy0")]) == 2  # never written over
    assert "exists: back up into a new folder" in capsys.readouterr().err
    assert store_cli(["backup", "--store", str(tmp_path / "none"), "--to", str(tmp_path / "x")]) == 2
    assert "no flywheel episode store at" in capsys.readouterr().err


def test_a_store_on_object_storage_is_backed_up_with_the_bucket_tools(s3_server, tmp_path):
    from fleet.store.backup import backup

    url = f"s3://fleet/tests/{uuid.uuid4().hex}"
    EpisodeStore.open_or_create(StoreConfig(path=url)).append([episode(0)])
    with pytest.raises(ValueError, match="object storage: back it up with the bucket's own tools"):
        backup(url, str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()
