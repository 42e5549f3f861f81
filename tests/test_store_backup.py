"""`flywheel store backup`: a copy of a store taken while it is written and maintained opens, holds what was
acknowledged, and can be maintained itself.

A backup probe: 5 of 8 `cp -a` copies of a store taken during ingest did not open ("damaged": the copied ref named a
snapshot copied before it was written), while the error messages said to restore from a backup. A second reader:
copies taken while maintenance ran passed their check but referred to history maintenance had deleted meanwhile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from fleet.store import EpisodeStore, StoreConfig
from fleet.store.cli import main as store_cli
from fleet.store import maintenance
from fleet.store.maintenance import MaintenanceBusy
from sim.episode import Episode
from tests.conftest import make_episode_arrays


def episode(k: int) -> Episode:
    return Episode.create(**make_episode_arrays(num_steps=3, seed=k), robot_id=f"r{k % 4}", robot_model="toy", source="real")


def test_a_backup_taken_during_ingest_and_maintenance_opens_holds_every_acknowledged_episode_and_maintains(tmp_path, capsys):
    from fleet.store.backup import backup

    path = str(tmp_path / "store")
    writer = EpisodeStore.open_or_create(StoreConfig(path=path, fsync=False))
    deleted = [0]
    acknowledged: list[str] = []
    stop = threading.Event()

    def ingest():  # one commit after another, as a busy server's
        k = 0
        while not stop.is_set():
            ep = episode(k)
            writer.append([ep])
            acknowledged.append(ep.episode_id)
            k += 1

    def maintain():  # a server's maintenance, back to back, expiring all history and deleting what is 0.5 s old
        while not stop.is_set():
            try:
                deleted[0] += maintenance.maintain(writer.location, 0.001, 0.5).deleted_objects
            except MaintenanceBusy:  # the backup holds it: skipped, as a server's scheduled run is
                stop.wait(0.01)

    threads = [threading.Thread(target=ingest), threading.Thread(target=maintain)]
    for t in threads:
        t.start()
    try:
        while len(acknowledged) < 5 or not deleted[0]:
            stop.wait(0.01)
        for n in range(3):
            before = list(acknowledged)
            out = backup(path, str(tmp_path / f"copy{n}"))
            copy = EpisodeStore.open(StoreConfig(path=str(tmp_path / f"copy{n}")))
            snapshot = copy.snapshot()
            held = {info.episode_id for info in snapshot.catalog()}
            assert set(before) <= held and out["snapshot_id"] == snapshot.snapshot_id and out["files"] > 0
            assert len(snapshot.read_episodes(snapshot.catalog())) == len(held)  # every chunk there, every episode checks out
            maintenance.maintain(copy.location, 0.001, 0.5)  # its whole history is there: maintaining the restored copy finds no damage
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not list(tmp_path.glob("*.partial")) and deleted[0] > 0


def test_backup_refusals_leave_nothing_behind(tmp_path, capsys):
    path = str(tmp_path / "store")
    EpisodeStore.open_or_create(StoreConfig(path=path)).append([episode(0)])
    assert store_cli(["backup", "--store", path, "--to", f"{tmp_path}/bk/"]) == 0  # a trailing slash: the folder bk
    assert (tmp_path / "bk" / "icechunk").is_dir() and not (tmp_path / "bk.partial").exists()
    capsys.readouterr()
    for to, error in (
        (tmp_path / "bk", "exists: back up into a new folder"),
        (tmp_path / "store" / "icechunk" / "chunks" / "b", "is inside the store"),
        (tmp_path / "mine", "mine.partial exists and is not a backup this command left"),
    ):
        (tmp_path / "mine.partial").mkdir(exist_ok=True)  # a user's own folder of that name: never removed
        assert store_cli(["backup", "--store", path, "--to", str(to)]) == 2
        assert error in capsys.readouterr().err
    assert (tmp_path / "mine.partial").is_dir() and not (tmp_path / "store" / "icechunk" / "chunks" / "b.partial").exists()
    assert store_cli(["backup", "--store", str(tmp_path / "none"), "--to", str(tmp_path / "x")]) == 2
    assert "no flywheel episode store at" in capsys.readouterr().err


def test_two_backups_to_one_folder_at_once_one_takes_it_the_other_is_refused_and_a_killed_ones_leftovers_go(tmp_path, capsys, monkeypatch):
    """A concurrency probe: two backups to one --to at once (a cron job and an operator) removed each other's
    <to>.partial (taken for a killed run's leftovers, since a running one bears the same mark): in 15 of 20 tries both
    failed, with raw OS errors or "the episode store at <to>.partial is damaged ... restore it from a backup"."""
    from fleet.store import backup as backup_module

    path, to = str(tmp_path / "store"), str(tmp_path / "bk")
    EpisodeStore.open_or_create(StoreConfig(path=path)).append([episode(0), episode(1)])
    check, copied, go_on, result = backup_module._check, threading.Event(), threading.Event(), {}

    def held_check(partial, store):  # the first run, its copy taken, pauses before checking and renaming it
        copied.set()
        go_on.wait(60)
        return check(partial, store)

    monkeypatch.setattr(backup_module, "_check", held_check)
    first = threading.Thread(target=lambda: result.update(backup_module.backup(path, to)))
    first.start()
    try:
        assert copied.wait(60)
        monkeypatch.setattr(backup_module, "_check", check)
        assert store_cli(["backup", "--store", path, "--to", to]) == 2  # refused at once: it neither waits nor touches the copy
        assert capsys.readouterr().err.strip() == f"flywheel store backup: error: another backup to {to} is running (pid {os.getpid()}): wait for it, or choose another --to"
        assert (tmp_path / "bk.partial" / backup_module.PARTIAL_MARK).is_file()
    finally:
        go_on.set()
        first.join()
    snapshot = EpisodeStore.open(StoreConfig(path=to)).snapshot()
    assert result["snapshot_id"] == snapshot.snapshot_id and len(snapshot.read_episodes(snapshot.catalog())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bk", "store"]  # no .partial, no lock's file
    assert store_cli(["backup", "--store", path, "--to", to]) == 2 and "bk exists: back up into a new folder" in capsys.readouterr().err

    # a backup killed (SIGKILL) after its copy: its lock goes with it, and the next run removes its .partial
    killed = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom fleet.store import backup as b\n"
        "def hang(partial, store): print('copied', flush=True); time.sleep(600)\n"
        f"b._check = hang\nb.backup({path!r}, {str(tmp_path / 'later')!r})"
    )], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert killed.stdout.readline().strip() == "copied"
        assert store_cli(["backup", "--store", path, "--to", str(tmp_path / "later")]) == 2
        assert f"(pid {killed.pid})" in capsys.readouterr().err
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert (tmp_path / "later.partial" / backup_module.PARTIAL_MARK).is_file()
    assert store_cli(["backup", "--store", path, "--to", str(tmp_path / "later")]) == 0
    snapshot = EpisodeStore.open(StoreConfig(path=str(tmp_path / "later"))).snapshot()
    assert len(snapshot.read_episodes(snapshot.catalog())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bk", "later", "store"]


def test_a_store_on_object_storage_is_backed_up_with_the_bucket_tools(s3_server, tmp_path):
    from fleet.store.backup import backup

    url = f"s3://fleet/tests/{uuid.uuid4().hex}"
    EpisodeStore.open_or_create(StoreConfig(path=url)).append([episode(0)])
    with pytest.raises(ValueError, match="object storage: back it up with the bucket's own tools"):
        backup(url, str(tmp_path / "copy"))
    assert not (tmp_path / "copy").exists()
