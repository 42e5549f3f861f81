"""A long-running store stays bounded: maintenance expires old history and deletes what nothing reaches, pinned
snapshots stay readable, a server runs it on a schedule beside its uploads, and `flywheel store` runs it from the
shell. A soak (7 robots, 27 minutes, one small episode per commit) grew a store to 1.1 GB and 280,000 files for 7,600
episodes of 1.7 KB, every commit's replaced manifests kept for ever."""

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.interop.common import InteropError
from fleet.server import ServerConfig, add_token, serve
from fleet.store import EpisodeStore, StoreConfig
from fleet.store.cli import main as store_cli
from fleet.store.location import Location
from fleet.store.maintenance import SpentPinName, maintain
from tests.test_store import episode


def disk_use(path: Path) -> tuple[int, int]:
    files = [Path(folder) / name for folder, _, names in os.walk(path) for name in names]
    return len(files), sum(f.stat().st_size for f in files)


def test_maintenance_reclaims_replaced_history_and_keeps_the_tip_and_pinned_snapshots_whole(tmp_path):
    cfg = StoreConfig(path=str(tmp_path / "store"), chunk_rows=32, index_rows=4, fsync=False)
    store = EpisodeStore.create(cfg)
    episodes = [episode(i, f"r{i % 3}") for i in range(60)]
    for ep in episodes[:30]:
        store.append([ep])  # one episode a commit, as robots that upload at their own pace are committed
    pinned = store.latest_snapshot_id()
    store.pin(pinned, "release-1")
    store.pin(pinned, "release-1")  # again: nothing to do (a redone iteration pins its start again)
    with pytest.raises(ValueError, match="already holds snapshot"):
        store.pin(store.history(2)[1]["snapshot_id"], "release-1")  # the name pins another snapshot already
    unpinned = store.latest_snapshot_id()
    for ep in episodes[30:]:
        store.append([ep])
    before = disk_use(tmp_path / "store")

    report = maintain(Location.of(cfg.path), keep_history_s=1e-3, gc_grace_s=0.0)  # everything but the tip's and the pin's
    after = disk_use(tmp_path / "store")
    assert report.expired_snapshots >= 59 and report.deleted_objects > 0 and report.deleted_bytes > 0
    assert after[0] < before[0] / 4 and after[1] < before[1] / 4, (before, after)

    reopened = EpisodeStore.open(cfg)
    tip = reopened.snapshot()
    assert [e.episode_id for e in tip.read_episodes(tip.catalog())] == [e.episode_id for e in episodes]  # digests checked on read
    old = reopened.snapshot(pinned)
    assert [e.episode_id for e in old.read_episodes(old.catalog())] == [e.episode_id for e in episodes[:30]]
    assert reopened.pins() == {"release-1": pinned}
    assert unpinned not in [h["snapshot_id"] for h in reopened.history(100)]
    assert reopened.append([episode(99)]).created == 1  # writers go on
    assert len(reopened.snapshot().catalog()) == 61


def test_pin_names_and_the_settings_that_would_delete_a_commit_in_flight_are_refused(tmp_path):
    store = EpisodeStore.create(StoreConfig(path=str(tmp_path / "store"), fsync=False))
    store.append([episode(1)])
    with pytest.raises(ValueError, match="pin name 'a b'"):
        store.pin(store.latest_snapshot_id(), "a b")
    with pytest.raises(ValueError, match="cannot pin snapshot NOSUCH"):
        store.pin("NOSUCH", "x")
    with pytest.raises(ValueError, match=r"gc_grace_s \(30.0\) must be more than lock_timeout_s \(60.0\)"):
        StoreConfig(path=str(tmp_path / "store"), gc_grace_s=30.0)
    for bad in ({"keep_history_s": 0.0}, {"keep_history_s": float("inf")}, {"gc_grace_s": 1e11}):
        with pytest.raises(ValueError, match="must be > 0 and at most 315360000 s"):
            StoreConfig(path=str(tmp_path / "store"), **bad)


def test_flywheel_store_maintains_pins_and_lists_from_the_shell(tmp_path, capsys):
    path = str(tmp_path / "store")
    store = EpisodeStore.create(StoreConfig(path=path, fsync=False))
    for i in range(3):
        store.append([episode(i)])
    tip = store.latest_snapshot_id()
    assert store_cli(["pin", "--store", path, "--snapshot", tip, "--name", "export-1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"command": "pin", "store": path, "name": "export-1", "snapshot_id": tip}
    assert store_cli(["maintain", "--store", path, "--keep-history-s", "0.001"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["command"] == "maintain" and done["expired_snapshots"] >= 3 and done["deleted_bytes"] == 0  # all younger than the grace
    assert store_cli(["pins", "--store", path]) == 0
    assert json.loads(capsys.readouterr().out)["pins"] == {"export-1": tip}
    assert store_cli(["maintain", "--store", str(tmp_path / "nowhere")]) == 2
    said = capsys.readouterr().err  # a run folder, or a typo: where a store is, not how to create one
    assert "flywheel store maintain: error: no flywheel episode store at" in said and "<run_dir>/store" in said and "EpisodeStore.create" not in said
    assert store_cli(["maintain", "--store", path, "--gc-grace-s", "5"]) == 2
    assert "must be more than lock_timeout_s" in capsys.readouterr().err


def test_flywheel_store_as_a_process_prints_its_line_and_its_exit_status(tmp_path):
    """The console command ends its process without the interpreter's teardown (fleet.json_command.exit_process: a
    native thread of the store aborted ~5 % of runs there, exit 134, on a loaded machine): its line and status still come
    out whole through a pipe."""
    import subprocess
    import sys

    path = str(tmp_path / "store")
    store = EpisodeStore.create(StoreConfig(path=path, fsync=False))
    store.append([episode(1)])
    store.pin(store.latest_snapshot_id(), "kept")
    flywheel = str(Path(sys.executable).parent / "flywheel")
    listed = subprocess.run([flywheel, "store", "pins", "--store", path], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and json.loads(listed.stdout) == {"command": "pins", "store": path, "pins": {"kept": store.latest_snapshot_id()}}
    refused = subprocess.run([flywheel, "store", "pins", "--store", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("flywheel store pins: error: no flywheel episode store at"), refused.stderr


def test_the_server_maintains_its_store_on_a_schedule_beside_uploads_and_counts_it(tmp_path):
    tokens = tmp_path / "tokens.json"
    tok, op = add_token(tokens, "robot", "r0"), add_token(tokens, "operator")
    store_cfg = StoreConfig(path=str(tmp_path / "store"), chunk_rows=32, index_rows=4, fsync=False, lock_timeout_s=0.5, keep_history_s=0.2, gc_grace_s=0.6)
    handle = serve(ServerConfig(port=0, token_file=str(tokens), maintenance_every_s=0.25), store_cfg)
    sent, errors = [], []
    try:
        with httpx.Client(base_url=handle.url, timeout=30, headers={"Authorization": f"Bearer {tok}"}) as client:

            def upload() -> None:  # one at a time, so each is its own commit, while maintenance runs beside
                for i in range(40):
                    ep = episode(i, "r0")
                    got = client.post("/v1/episodes", content=ep.to_bytes())
                    (sent if got.status_code == 201 else errors).append(ep.episode_id if got.status_code == 201 else got.text)
                    time.sleep(0.02)

            uploader = threading.Thread(target=upload)
            uploader.start()
            uploader.join()
            time.sleep(1.5)  # runs after the last commit, past the grace
            metrics = {
                (s.name, s.labels.get("outcome")): s.value
                for f in text_string_to_metric_families(httpx.get(f"{handle.url}/metrics", headers={"Authorization": f"Bearer {op}"}).text)
                for s in f.samples
            }
            assert not errors and len(sent) == 40
            assert metrics[("flywheel_store_maintenance_runs_total", "ok")] >= 2
            assert metrics.get(("flywheel_store_maintenance_runs_total", "failed"), 0) == 0
            assert metrics[("flywheel_store_maintenance_deleted_bytes_total", None)] > 0
            for eid in sent:  # every acknowledged episode reads back whole from the server
                got = httpx.get(f"{handle.url}/v1/episodes/{eid}", headers={"Authorization": f"Bearer {op}"})
                assert got.status_code == 200, got.text
    finally:
        handle.stop()
    snap = EpisodeStore.open(store_cfg).snapshot()
    assert sorted(e.episode_id for e in snap.read_episodes(snap.catalog())) == sorted(sent)
    assert len(EpisodeStore.open(store_cfg).history(100)) < 10  # the history was expired as it went


def test_maintenance_on_object_storage_keeps_pins_and_the_tip(s3_server):
    """The same on an S3-compatible bucket (moto on loopback): Icechunk lists and deletes the objects there."""
    import uuid

    cfg = StoreConfig(path=f"s3://fleet/maintained-{uuid.uuid4().hex}", chunk_rows=32, index_rows=4)
    store = EpisodeStore.create(cfg)
    episodes = [episode(i) for i in range(12)]
    for ep in episodes[:6]:
        store.append([ep])
    pinned = store.latest_snapshot_id()
    store.pin(pinned, "kept")
    for ep in episodes[6:]:
        store.append([ep])
    report = maintain(Location.of(cfg.path), keep_history_s=1e-3, gc_grace_s=0.0)
    assert report.expired_snapshots >= 11 and report.deleted_objects > 0
    reopened = EpisodeStore.open(cfg)
    tip, old = reopened.snapshot(), reopened.snapshot(pinned)
    assert len(tip.read_episodes(tip.catalog())) == 12 and len(old.read_episodes(old.catalog())) == 6
    assert reopened.pins() == {"kept": pinned}


def test_a_snapshot_no_longer_in_the_store_is_unknown_not_damage(tmp_path, capsys):
    """A mistyped id, or one maintenance expired, was reported as "the store is damaged: restore it from a backup": an
    operator who did would lose every episode stored since the backup."""
    from fleet.interop.cli import main as interop_main
    from fleet.store import UnknownSnapshotError

    cfg = StoreConfig(path=str(tmp_path / "store"), fsync=False)
    store = EpisodeStore.create(cfg)
    store.append([episode(1)])
    old = store.latest_snapshot_id()
    store.append([episode(2)])
    for missing in ("AAAAAAAAAAAAAAAAAAAA", "not-an-id"):
        with pytest.raises(UnknownSnapshotError, match="is not in the episode store .* Pin a snapshot you will read later"):
            store.snapshot(missing)
    maintain(Location.of(cfg.path), keep_history_s=1e-3, gc_grace_s=0.0)
    with pytest.raises(UnknownSnapshotError, match=f"snapshot '{old}' is not in the episode store"):
        EpisodeStore.open(cfg).snapshot(old)
    assert interop_main(["export", "--format", "mcap", "--store", cfg.path, "--snapshot", old, "--out", str(tmp_path / "out")]) == 2
    said = capsys.readouterr().err
    assert "is not in the episode store" in said and "damaged" not in said
    assert "Pin a snapshot you will read later" in said  # whole (it was cut at 200 characters, mid-word, before the advice)


def test_a_snapshot_stays_for_keep_history_after_it_stopped_being_the_newest(tmp_path):
    """Expiry went by when a snapshot was written: a quiet store's tip, written long ago, went at the first maintenance
    after the next commit, under a reader that had just pinned its view to it."""
    import time

    cfg = StoreConfig(path=str(tmp_path / "store"), fsync=False)
    store = EpisodeStore.create(cfg)
    store.append([episode(1)])
    quiet = store.latest_snapshot_id()
    time.sleep(0.6)  # the tip for a while
    store.append([episode(2)])
    maintain(Location.of(cfg.path), keep_history_s=0.4, gc_grace_s=0.0)  # written 0.6 s ago, the newest until a moment ago: kept
    assert len(store.snapshot(quiet).catalog()) == 1
    time.sleep(0.6)
    maintain(Location.of(cfg.path), keep_history_s=0.4, gc_grace_s=0.0)  # superseded 0.6 s ago: expired
    with pytest.raises(ValueError, match="is not in the episode store"):
        EpisodeStore.open(cfg).snapshot(quiet)


def test_a_commit_whose_chunks_are_older_than_half_the_grace_writes_them_again(tmp_path, monkeypatch):
    """gc_grace_s > lock_timeout_s did not protect a commit that was slow between writing its chunks and committing:
    maintenance could delete them and the episode was acknowledged over chunks that were gone."""
    import asyncio

    from fleet.store import writer

    cfg = StoreConfig(path=str(tmp_path / "store"), fsync=False, lock_timeout_s=5.0, gc_grace_s=6.0)
    store = EpisodeStore.create(cfg)
    original, slow = writer.EpisodeStore._write, [True]

    async def write_then_stall(self, *args):
        written = await original(self, *args)
        if slow.pop() if slow else False:
            await asyncio.sleep(3.2)  # past gc_grace_s / 2 before the commit
        return written

    monkeypatch.setattr(writer.EpisodeStore, "_write", write_then_stall)
    assert store.append([episode(1)]).statuses == ("created",)
    assert store.commit_retries == 1  # written again once, then committed
    snap = EpisodeStore.open(cfg).snapshot()
    assert [e.episode_id for e in snap.read_episodes(snap.catalog())] == [episode(1).episode_id]


def test_unpin_lets_maintenance_expire_and_a_name_is_not_reused(tmp_path, capsys):
    path = str(tmp_path / "store")
    store = EpisodeStore.create(StoreConfig(path=path, fsync=False))
    store.append([episode(1)])
    first = store.latest_snapshot_id()
    store.pin(first, "keep")
    store.append([episode(2)])
    assert store_cli(["unpin", "--store", path, "--name", "keep"]) == 0
    assert json.loads(capsys.readouterr().out) == {"command": "unpin", "store": path, "name": "keep"}
    assert store.pins() == {}
    assert store_cli(["unpin", "--store", path, "--name", "keep"]) == 2 and "no pin 'keep'" in capsys.readouterr().err
    maintain(Location.of(path), keep_history_s=1e-3, gc_grace_s=0.0)
    with pytest.raises(ValueError, match="is not in the episode store"):
        store.snapshot(first)
    store.append([episode(3)])
    with pytest.raises(SpentPinName, match="pin name 'keep' was unpinned before, and a name pins once .*: pin under another name"):
        store.pin(store.latest_snapshot_id(), "keep")  # Icechunk's own words were "tag already exists, tags are immutable"
    assert store_cli(["pin", "--store", path, "--snapshot", store.latest_snapshot_id(), "--name", "keep"]) == 2
    assert "pin under another name" in capsys.readouterr().err


def test_a_run_whose_pins_an_operator_unpinned_resumes_and_lets_them_go(tmp_path):
    """An operator tidying pins unpinned a stopped run's start.<id>: every resume failed with Icechunk's "tag already
    exists, tags are immutable" (the redo pins its start again under the same name), until iteration.json was edited."""
    from fleet.pipeline.services import Services

    store = EpisodeStore.create(StoreConfig(path=str(tmp_path / "store"), fsync=False))
    store.append([episode(1)])
    services = Services.of_store(store)  # what the loop stands on, its store alone (no Ray, no server)
    start = services.pinned_tip()
    store.unpin(f"start.{start}")  # the operator
    services.pin_start(start)  # the resumed run's redo
    services.pin_start(start)  # and another
    store.pin(start, f"start.{start}.audit")  # the operator's own
    assert store.pins() == {f"start.{start}.2": start, f"start.{start}.audit": start}
    services.release_start(start)  # the next iteration began
    assert store.pins() == {f"start.{start}.audit": start}


def test_a_pin_that_fails_for_another_reason_says_that_reason(tmp_path):
    """Any refused tag (a full disk, a read-only mount, a 5xx) read as "unpinned before", and the loop then tried 99
    more names before saying "set a new run_dir". A full disk cannot be made here: Icechunk's error is stood in for."""
    import icechunk

    from fleet.store.maintenance import pin

    store = EpisodeStore.create(StoreConfig(path=str(tmp_path / "store"), fsync=False))
    store.append([episode(1)])

    class FullDisk:  # the store's own repository, but for the tag it cannot write
        def __getattr__(self, name):
            return getattr(store._repo, name)

        def create_tag(self, tag, snapshot_id):
            raise icechunk.IcechunkError("error writing object: No space left on device (os error 28)")

    with pytest.raises(ValueError, match="No space left on device") as refused:
        pin(FullDisk(), Location.of(str(tmp_path / "store")), store.latest_snapshot_id(), "fresh")
    assert not isinstance(refused.value, SpentPinName)


def test_one_maintenance_run_at_a_time_on_a_local_store(tmp_path, capsys):
    """Two replicas on one host overlapped: each deleted what the other had, and Icechunk logged an ERROR line for
    every file already gone (~15,000 a minute). The second run is skipped now, and counted so."""
    import fcntl

    from fleet.server.maintainer import Maintainer
    from fleet.server.metrics import Metrics
    from fleet.store.layout import MAINTENANCE_LOCK_FILE
    from fleet.store.maintenance import MaintenanceBusy

    path = str(tmp_path / "store")
    store = EpisodeStore.create(StoreConfig(path=path, fsync=False))
    store.append([episode(1)])
    with open(tmp_path / "store" / MAINTENANCE_LOCK_FILE, "w") as other:  # another process's run in progress
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(MaintenanceBusy, match=r"another process is maintaining \(or backing up\) the store at .*; this run is skipped"):
            store.maintain()
        assert store_cli(["maintain", "--store", path]) == 0
        assert "another process is maintaining" in json.loads(capsys.readouterr().out)["skipped"]
        metrics = Metrics()
        Maintainer(store, metrics, 900.0).run_once()
        assert metrics.maintenance_runs.labels("skipped")._value.get() == 1 and metrics.maintenance_runs.labels("failed")._value.get() == 0
    assert store.maintain().expired_snapshots >= 0  # the other run ended: this one runs


def test_an_export_pins_its_snapshot_while_it_reads_so_maintenance_midway_takes_nothing(tmp_path, capsys, monkeypatch):
    """An export read a snapshot unpinned: one that ran past keep_history_s on a busy store (maintenance every 15 min)
    had its chunks deleted midway. Here maintenance with no history kept runs after the export chose its snapshot and
    before it reads a single episode: the export is whole, and its pin is gone after."""
    from fleet.interop import cli as interop_cli
    from fleet.interop import mcap_io
    from fleet.interop.common import select

    cfg = StoreConfig(path=str(tmp_path / "store"), fsync=False)
    store = EpisodeStore.create(cfg)
    store.append([episode(1), episode(2)])
    old = store.latest_snapshot_id()
    store.append([episode(3)])  # a newer snapshot: ``old`` is history now
    export_mcap = mcap_io.export_mcap

    def maintained_first(selection, out):
        assert list(store.pins()) == [pin := next(iter(store.pins()))] and pin.startswith("export.")  # held while it reads
        assert store.pins()[pin] == old
        maintain(Location.of(cfg.path), keep_history_s=1e-3, gc_grace_s=0.0)
        return export_mcap(selection, out)

    monkeypatch.setattr(mcap_io, "export_mcap", maintained_first)
    assert interop_cli.main(["export", "--format", "mcap", "--store", cfg.path, "--snapshot", old, "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["episodes"] == 2 and store.pins() == {}  # whole, and let go
    maintain(Location.of(cfg.path), keep_history_s=1e-3, gc_grace_s=0.0)
    with pytest.raises(InteropError, match="is not in the episode store"):  # unpinned, the same maintenance takes it
        select(cfg.path, old)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_an_export_stopped_by_sigterm_or_ctrl_c_lets_its_pin_go_and_leaves_no_partial_folder(tmp_path, capsys, monkeypatch, signame):
    import signal

    from fleet.interop import cli as interop_cli
    from fleet.interop.common import Selection

    sig = getattr(signal, signame)
    cfg = StoreConfig(path=str(tmp_path / "store"), fsync=False)
    store = EpisodeStore.create(cfg)
    store.append([episode(1)])
    batches, seen = Selection.batches, []

    def stopped_midway(selection):
        seen.append((len(store.pins()), [p.name for p in out.iterdir()]))  # pinned, its partial folder made
        assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler, None)  # or the kill below would end pytest
        os.kill(os.getpid(), sig)  # as a supervisor stops it, or Ctrl-C; the handler unwinds at the next line
        yield from batches(selection)

    before = signal.getsignal(sig)
    monkeypatch.setattr(Selection, "batches", stopped_midway)
    out = tmp_path / "exports" / "out"
    assert interop_cli.main(["export", "--format", "mcap", "--store", cfg.path, "--out", str(out)]) == 128 + sig
    assert f"stopped by {signame} (an export is published whole or not at all" in capsys.readouterr().err
    assert seen[0][0] == 1 and len(seen[0][1]) == 1 and seen[0][1][0].startswith(".episodes.mcap.partial-")
    assert store.pins() == {} and list(out.iterdir()) == []  # no pin, no partial folder, nothing published
    assert signal.getsignal(sig) is before  # the process's own handler back


@pytest.mark.parametrize("during", ["pin", "unpin"])
def test_a_sigterm_while_the_export_pin_is_written_or_deleted_leaves_no_pin(tmp_path, capsys, monkeypatch, during):
    """Python runs a signal's handler when the native call returns: one that came as Icechunk wrote the pin's tag was
    raised before the export's finally block was in place, and the pin stayed (while the message said it was let go).
    Now it waits for the write: the export unwinds and lets the pin go. One that comes as the pin is deleted, after the
    export has ended, is dropped: the export's result stands."""
    import signal

    from fleet.interop import cli as interop_cli
    from fleet.store import maintenance

    cfg = StoreConfig(path=str(tmp_path / "store"), fsync=False)
    store = EpisodeStore.create(cfg)
    store.append([episode(1)])
    real = getattr(maintenance, during)

    def then_sigterm(*args):
        real(*args)
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(maintenance, during, then_sigterm)
    code = interop_cli.main(["export", "--format", "mcap", "--store", cfg.path, "--out", str(tmp_path / "out")])
    said = capsys.readouterr()
    assert store.pins() == {}
    if during == "pin":
        assert code == 128 + signal.SIGTERM and "stopped by SIGTERM" in said.err and not (tmp_path / "out" / "episodes.mcap").exists()
    else:
        assert code == 0 and json.loads(said.out)["episodes"] == 1  # finished and published before the signal came


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/setpriv").exists(), reason="needs root and setpriv to read a store it cannot write")
def test_an_export_of_a_store_it_may_read_but_not_write_goes_on_unpinned_with_a_note(tmp_path):
    """A store owned by the server's user, read by an operator who may not write it: the pin is refused (Icechunk's own
    error on a local store, which went up as a traceback), and the export goes on unpinned, as it did before pins."""
    import shutil
    import subprocess
    import sys

    path = tmp_path / "store"
    store = EpisodeStore.create(StoreConfig(path=str(path), fsync=False))
    store.append([episode(1), episode(2)])
    for folder, dirs, files in os.walk(path):
        for name in [folder, *(os.path.join(folder, f) for f in dirs + files)]:
            os.chown(name, 65534, 65534)  # another user's store; readable by all, as Icechunk writes it
    out = tmp_path / "out"
    as_reader = ["/usr/bin/setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--inh-caps=-all", "--"]
    flywheel = str(Path(sys.executable).parent / "flywheel")
    done = subprocess.run([*as_reader, flywheel, "export", "--format", "mcap", "--store", str(path), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["episodes"] == 2 and (out / "episodes.mcap").is_file()
    assert "could not pin snapshot" in done.stderr and "exporting it unpinned" in done.stderr and "Traceback" not in done.stderr
    assert store.pins() == {}
    shutil.rmtree(path, ignore_errors=True)


def test_an_export_from_object_storage_pins_there_and_lets_go(s3_server, tmp_path, capsys, monkeypatch):
    """The export's pin on an S3-compatible bucket (moto on loopback): maintenance midway takes nothing, the pin goes."""
    import uuid

    from fleet.interop import cli as interop_cli
    from fleet.interop import mcap_io

    cfg = StoreConfig(path=f"s3://fleet/exported-{uuid.uuid4().hex}", chunk_rows=32, index_rows=4)
    store = EpisodeStore.create(cfg)
    store.append([episode(1), episode(2)])
    old = store.latest_snapshot_id()
    store.append([episode(3)])
    export_mcap = mcap_io.export_mcap

    def maintained_first(selection, out):
        assert list(store.pins().values()) == [old]
        maintain(Location.of(cfg.path), keep_history_s=1e-3, gc_grace_s=0.0)
        return export_mcap(selection, out)

    monkeypatch.setattr(mcap_io, "export_mcap", maintained_first)
    assert interop_cli.main(["export", "--format", "mcap", "--store", cfg.path, "--snapshot", old, "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["episodes"] == 2 and store.pins() == {}


def test_a_snapshot_maintenance_expires_while_it_is_read_is_unknown_not_damage(tmp_path):
    """A reader of an unpinned snapshot that outlasted keep_history_s was told "the store's files are damaged; restore
    the store from backup": an operator who did would lose every episode stored since. Read through its own handle (as
    another process: the writer's handle had the manifests cached)."""
    from fleet.store import UnknownSnapshotError

    cfg = StoreConfig(path=str(tmp_path / "store"), fsync=False)
    store = EpisodeStore.create(cfg)
    for k in range(3):
        store.append([episode(100 * k + i) for i in range(8)])
    reading = EpisodeStore.open(cfg).snapshot()
    catalog = reading.catalog()
    for k in range(3):
        store.append([episode(5000 + 100 * k + i) for i in range(8)])
    maintain(Location.of(cfg.path), keep_history_s=1e-3, gc_grace_s=0.0)
    with pytest.raises(UnknownSnapshotError, match="was expired by maintenance while it was being read .* pin a snapshot you read for longer"):
        reading.read_episodes(catalog)


def test_a_replaced_snapshot_whose_files_are_lost_is_damage_not_an_expiry(tmp_path):
    """The other side of the check above: no maintenance ran, the snapshot was only replaced (still in the branch's
    history), and its files are gone (a lost disk block, a partial restore): that is damage, restore from backup."""
    from fleet.store import StoreCorruptionError

    cfg = StoreConfig(path=str(tmp_path / "store"), fsync=False)
    store = EpisodeStore.create(cfg)
    store.append([episode(i) for i in range(4)])
    reading = EpisodeStore.open(cfg).snapshot()
    catalog = reading.catalog()
    store.append([episode(100 + i) for i in range(4)])
    files = tmp_path / "store" / "icechunk"
    (files / "snapshots" / reading.snapshot_id).unlink()
    for manifest in (files / "manifests").iterdir():
        manifest.unlink()
    with pytest.raises(StoreCorruptionError, match="damaged"):
        reading.read_episodes(catalog)


def test_an_unpinned_export_whose_snapshot_expires_midway_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    """A store that refused the export's pin (read-only files), and an export that outlasted keep_history_s: it ended in
    9,841 lines of tracebacks and "restore the store from backup". Now exit 2 and one line that says what happened."""
    from fleet.interop import cli as interop_cli
    from fleet.interop import mcap_io

    cfg = StoreConfig(path=str(tmp_path / "store"), fsync=False)
    store = EpisodeStore.create(cfg)
    for k in range(3):
        store.append([episode(100 * k + i) for i in range(8)])
    export_mcap = mcap_io.export_mcap

    def refused(self, snapshot_id, name):
        raise ValueError("this user may not write the store")

    def outlasted(selection, out):
        for k in range(3):
            store.append([episode(5000 + 100 * k + i) for i in range(8)])
        maintain(Location.of(cfg.path), keep_history_s=1e-3, gc_grace_s=0.0)
        return export_mcap(selection, out)

    monkeypatch.setattr(EpisodeStore, "pin", refused)
    monkeypatch.setattr(mcap_io, "export_mcap", outlasted)
    assert interop_cli.main(["export", "--format", "mcap", "--store", cfg.path, "--out", str(tmp_path / "out")]) == 2
    said = capsys.readouterr().err
    assert "could not pin snapshot" in said and "flywheel store pin --store" in said
    assert "was expired by maintenance while it was being read" in said and "damaged" not in said and "Traceback" not in said
    assert said.count("\n") == 2  # the note and the error, nothing else


def test_an_export_whose_pin_an_operator_let_go_midway_says_nothing_of_it(tmp_path, capsys, monkeypatch):
    from fleet.interop import cli as interop_cli
    from fleet.interop import mcap_io

    cfg = StoreConfig(path=str(tmp_path / "store"), fsync=False)
    store = EpisodeStore.create(cfg)
    store.append([episode(1)])
    export_mcap = mcap_io.export_mcap

    def unpinned_meanwhile(selection, out):
        store.unpin(next(iter(store.pins())))
        return export_mcap(selection, out)

    monkeypatch.setattr(mcap_io, "export_mcap", unpinned_meanwhile)
    assert interop_cli.main(["export", "--format", "mcap", "--store", cfg.path, "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err == "" and store.pins() == {}  # it said "the pin stays; unpin it", and unpin then failed
