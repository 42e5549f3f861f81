"""What makes an acknowledged or spooled byte survive a power cut, checked at the system calls: each file written
whole under a temporary name, fsynced, renamed, and its folder fsynced; the store's filesystem synced once per
commit. Removing any of these once passed every test (a power cut is the only thing that shows it)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import sim.durable as durable
from fleet.agent import Spool
from fleet.agent.uploader import Uploader
from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays


def make(seed: int) -> Episode:
    return Episode.create(**make_episode_arrays(num_steps=20, seed=seed), robot_id="r0", robot_model="toy", source="real")


def traced(monkeypatch) -> list[tuple]:
    """Every fsync (of the path the descriptor names) and rename, in order."""
    calls, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(durable.os, "fsync", lambda fd: (calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd))[1])
    monkeypatch.setattr(durable.os, "replace", lambda a, b: (calls.append(("replace", str(a), str(b))), replace(a, b))[1])
    return calls


def test_a_durable_write_syncs_its_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    calls = traced(monkeypatch)
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    entry = spool.put(make(0).to_bytes(), make(0).episode_id)
    partial = str(entry.path) + ".partial"
    assert calls == [("fsync", partial), ("replace", partial, str(entry.path)), ("fsync", str(tmp_path / "spool"))]


def test_a_spool_write_that_fails_leaves_no_episode_to_upload(tmp_path, monkeypatch):
    """Written straight to its final name, a put cut short left a truncated episode in the queue."""

    def failing(fd):
        raise OSError(errno.EIO, "I/O error")

    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    monkeypatch.setattr(durable.os, "fsync", failing)
    with pytest.raises(OSError, match="I/O error"):
        spool.put(make(1).to_bytes(), make(1).episode_id)
    monkeypatch.undo()
    assert not list((tmp_path / "spool").glob("*.safetensors*"))  # neither the episode nor its part
    assert Spool(tmp_path / "spool", max_bytes=1 << 20).depth == 0


@pytest.mark.parametrize("fsync", [True, False])
def test_the_store_syncs_its_filesystem_once_per_commit_when_asked(tmp_path, monkeypatch, fsync):
    import fleet.store.backend as backend

    synced: list[Path] = []
    monkeypatch.setattr(backend, "sync_filesystem", lambda path: synced.append(Path(path)))
    store = EpisodeStore.create(StoreConfig(path=str(tmp_path / "store"), fsync=fsync))
    synced.clear()
    store.append([make(2), make(3)])
    store.append([make(4)])
    assert len(synced) == (2 if fsync else 0)


def test_a_robots_retries_back_off_exponentially_to_the_cap(tmp_path):
    """A backoff that never grew had a whole fleet retry a recovering server every half second."""
    uploader = Uploader(Spool(tmp_path / "spool", max_bytes=1 << 20), "http://127.0.0.1:9", "t", backoff_initial_s=0.5, backoff_max_s=30.0, seed=0)
    waits = []
    for failures in (1, 3, 6, 20):
        uploader._failures = failures
        waits.append(uploader.backoff_s())
    assert 0.25 <= waits[0] <= 0.5 and 1.0 <= waits[1] <= 2.0 and 8.0 <= waits[2] <= 16.0  # initial * 2^(n-1), jittered by U[0.5, 1]
    assert 15.0 <= waits[3] <= 30.0  # capped
