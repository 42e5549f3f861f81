"""Episode store on disk: open modes, bit-exact round trip, idempotency, snapshots, filters,
concurrent writer processes, and the training view (flat transitions, split by episode)."""

import json
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fleet.store import EpisodeStore, StoreConfig
from sim.episode import Episode
from tests.conftest import make_episode_arrays

REPO = str(Path(__file__).resolve().parents[1])


def episode(seed: int, robot_id: str = "r0", *, steps: int = 6, obs_dim: int = 3, source: str = "sim", robot_model: str = "toy", **meta) -> Episode:
    """A small valid episode; the same arguments give the same episode (id included)."""
    arrays = make_episode_arrays(num_steps=steps, obs_dim=obs_dim, seed=seed)
    eid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{seed}/{robot_id}/{steps}/{obs_dim}/{source}/{robot_model}"))
    return Episode.create(
        **arrays, robot_id=robot_id, robot_model=robot_model, source=source, policy_version=f"p{seed % 3}", episode_id=eid, **meta
    )


@pytest.fixture
def cfg(tmp_path):
    return StoreConfig(path=str(tmp_path / "store"), chunk_rows=32, index_rows=4)


def test_explicit_open_modes(cfg):
    with pytest.raises(FileNotFoundError, match="create it"):
        EpisodeStore.open(cfg)
    store = EpisodeStore.create(cfg)
    assert store.info["store_schema_version"] == 3 and store.info["episode_schema_version"] == "1"
    with pytest.raises(FileExistsError, match="already exists"):
        EpisodeStore.create(cfg)
    assert EpisodeStore.open(cfg).info == store.info
    assert EpisodeStore.open_or_create(cfg).latest_snapshot_id() == store.latest_snapshot_id()


def test_object_storage_that_does_not_answer_says_what_to_set(monkeypatch, tmp_path):
    """No credentials (and no instance metadata): one error naming the store and the variables to set."""
    from fleet.store.backend import StoreUnreachableError

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StoreUnreachableError, match=r"episode store at s3://bucket/prefix .*set them, and AWS_ENDPOINT_URL"):
        EpisodeStore.open_or_create(StoreConfig(path="s3://bucket/prefix", writer_id="w"))


def test_each_writer_appends_to_its_own_partition_and_streams(cfg):
    with pytest.raises(ValueError, match="writer_id 'a/b'"):
        StoreConfig(path=cfg.path, writer_id="a/b")
    store = EpisodeStore.create(cfg)
    assert store.writer_id == "local"  # on local disk writers share one partition, taking turns under the lock
    other = EpisodeStore.open(StoreConfig(path=cfg.path, chunk_rows=32, index_rows=4, writer_id="gen-7"))
    other.append([episode(1)]), store.append([episode(2), episode(3)]), other.append([episode(2), episode(4)])
    snap = EpisodeStore.open(cfg).snapshot()
    assert [e.episode_id for e in snap.catalog()] == [episode(k).episode_id for k in (1, 2, 3, 4)]  # commit order across writers
    assert [e.stream.rsplit(".", 1)[1] for e in snap.catalog()] == ["gen-7", "local", "local", "gen-7"]
    assert [e.row for e in snap.catalog()] == [0, 0, 7, 32]  # each stream its own rows
    assert [h["metadata"]["writer"] for h in store.history(3)] == ["gen-7", "local", "gen-7"]


def test_unknown_store_schema_version_is_refused(cfg):
    from fleet.store import backend
    from fleet.store.layout import ROOT_ATTR

    EpisodeStore.create(cfg)
    repo = backend.open_repo(EpisodeStore.open(cfg).path)
    session = repo.writable_session("main")
    root = backend.open_root(session, mode="r+")
    root.attrs[ROOT_ATTR] = {**root.attrs[ROOT_ATTR], "store_schema_version": 99}
    session.commit("pretend a future layout")
    with pytest.raises(ValueError, match="store schema version 99"):
        EpisodeStore.open(cfg)


def test_a_damaged_newest_snapshot_is_named_at_once_never_called_an_unfinished_creation(cfg):
    """A truncated newest snapshot (a torn write, a bad sector): zarr reports it as "no group found", and open() waited
    lock_timeout_s, then said the store's creation never finished and to remove it: deleting every stored episode."""
    from fleet.store import StoreCorruptionError

    store = EpisodeStore.create(cfg)
    store.append([episode(1)]), store.append([episode(2)])
    tip = store.latest_snapshot_id()
    snapshot = Path(cfg.path) / "icechunk" / "snapshots" / tip
    snapshot.write_bytes(snapshot.read_bytes()[: snapshot.stat().st_size // 2])
    start = time.monotonic()
    with pytest.raises(StoreCorruptionError, match=rf"damaged: snapshot icechunk/snapshots/{tip} cannot be read .*restore it from a backup.*Do not delete") as raised:
        EpisodeStore.open(StoreConfig(path=cfg.path, lock_timeout_s=30))
    assert time.monotonic() - start < 10 and "never finished" not in str(raised.value)


def test_a_commit_on_a_damaged_manifest_names_it_and_commits_nothing(cfg, monkeypatch):
    """Icechunk's commit says only "failed to create manifest from chunk stream" when a manifest it builds on is short:
    the server answered every upload 503 "the episode store did not answer; retry later", for good."""
    from fleet.store import StoreCorruptionError

    import icechunk

    from fleet.store import backend

    monkeypatch.setattr(backend, "CACHE", icechunk.CachingConfig(num_chunk_refs=0))  # every manifest read from disk
    store = EpisodeStore.create(cfg)
    store.append([episode(1)]), store.append([episode(2)])
    tip = store.latest_snapshot_id()
    manifests = Path(cfg.path) / "icechunk" / "manifests"
    newest = sorted(manifests.iterdir(), key=lambda p: p.stat().st_mtime_ns)[-len(list(manifests.iterdir())) // 2 :]  # the last commit's
    fresh = EpisodeStore.open(cfg)  # another process, nothing read yet
    for manifest in newest:
        manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    for writer, where in ((store, r", so no commit can build on snapshot " + tip), (fresh, "")):  # found by the commit; by the id index
        with pytest.raises(StoreCorruptionError, match=rf"damaged: manifest icechunk/manifests/\w+ cannot be read \(incomplete frame\){where}; restore it from a backup"):
            writer.append([episode(3)])
    assert EpisodeStore.open(cfg).latest_snapshot_id() == tip  # nothing committed


def test_a_garbage_branch_ref_is_named_in_one_line(cfg):
    """Garbage in refs/branch.main/ref.json stopped flywheel-server with Icechunk's raw "cannot serialize ref json"."""
    from fleet.store import StoreCorruptionError

    EpisodeStore.create(cfg).append([episode(1)])
    (Path(cfg.path) / "icechunk" / "refs" / "branch.main" / "ref.json").write_text("{1: garbage")
    with pytest.raises(StoreCorruptionError, match=r"damaged: branch ref icechunk/refs/branch.main/ref.json cannot be read \(key must be a string"):
        EpisodeStore.open_or_create(cfg)


def test_round_trip_is_bit_exact_across_streams_and_extras(cfg):
    store = EpisodeStore.create(cfg)
    rng = np.random.default_rng(1)
    eps = [episode(i, f"r{i % 3}", steps=5 + 7 * i) for i in range(5)]
    eps.append(episode(10, "cam", obs_dim=4, hardware={"arm": "v2"}, scenario={"seed": 3}, model_version="wm-7", **{"x.note": "hi"}))
    extras = {"qpos": rng.standard_normal((12, 2)), "image.front": rng.integers(0, 255, (12, 4, 4, 3), dtype=np.uint8), "actuator_force": rng.standard_normal((11, 2))}
    eps.append(Episode.create(**make_episode_arrays(num_steps=11, seed=11), robot_id="r1", robot_model="toy", source="real", extras=extras))
    result = store.append(eps[:4])
    assert result.statuses == ("created",) * 4
    assert store.append(eps[4:]).created == 3
    snap = store.snapshot()
    assert len(snap) == 7 and len({e.stream for e in snap.catalog()}) == 3
    for ep in eps:
        back = snap.read_episode(ep.episode_id)
        assert back.equals(ep) and back.to_bytes() == ep.to_bytes()
    prov = snap.provenance(eps[5].episode_id)
    assert prov["hardware"] == {"arm": "v2"} and prov["scenario"] == {"seed": 3} and prov["model_version"] == "wm-7"
    assert prov["robot_id"] == "cam" and prov["upload_time"] > 0


def test_commits_start_on_chunk_boundaries(cfg):
    store = EpisodeStore.create(cfg)
    for k in range(3):
        store.append([episode(10 * k + j, steps=9) for j in range(2)])
    rows = sorted(e.row for e in store.snapshot().catalog())
    assert rows == [0, 10, 32, 42, 64, 74]  # each commit starts a new 32-row chunk


def test_idempotent_by_episode_id_within_a_batch_and_across_reopen(cfg):
    store = EpisodeStore.create(cfg)
    a, b = episode(1), episode(2)
    changed = Episode.create(**make_episode_arrays(seed=99), robot_id="r0", robot_model="toy", source="sim", episode_id=a.episode_id)
    assert store.append([a, b, a]).statuses == ("created", "created", "duplicate")
    assert store.append([changed, b]).statuses == ("conflict", "duplicate")
    reopened = EpisodeStore.open(cfg)  # a restarted server knows every stored id
    assert reopened.refresh_index() == 2
    assert reopened.append([a, changed]).statuses == ("duplicate", "conflict")
    snap = reopened.snapshot()
    assert len(snap) == 2 and snap.read_episode(a.episode_id).equals(a)


def test_snapshot_is_pinned(cfg):
    store = EpisodeStore.create(cfg)
    store.append([episode(i) for i in range(3)])
    pinned = store.snapshot()
    store.append([episode(i) for i in range(3, 8)])
    again = EpisodeStore.open(cfg).snapshot(pinned.snapshot_id)
    assert len(pinned) == len(again) == 3
    latest = store.snapshot()
    assert len(latest) == 8
    incremental = store.snapshot(latest.snapshot_id, base=pinned)  # reads only the slots added since
    assert incremental.catalog() == latest.catalog()
    assert [h["snapshot_id"] for h in store.history(2)][1] == pinned.snapshot_id
    earlier = store.snapshot(pinned.snapshot_id, base=latest)  # a base newer than the snapshot: its catalog stood in for this one's
    assert earlier.catalog() == EpisodeStore.open(cfg).snapshot(pinned.snapshot_id).catalog() and len(earlier) == 3


def test_filters_by_robot_source_model_and_time(cfg):
    store = EpisodeStore.create(cfg)
    store.append([episode(i, f"r{i % 2}", source="real" if i < 4 else "sim") for i in range(6)])
    cut = time.time()
    store.append([episode(10, "r2", source="worldmodel", robot_model="other")])
    snap = store.snapshot()
    assert len(snap.episodes(robot_id="r0")) == 3
    assert len(snap.episodes(robot_id=["r0", "r2"])) == 4
    assert len(snap.episodes(source="real")) == 4 and len(snap.episodes(source="worldmodel")) == 1
    assert len(snap.episodes(since=cut)) == 1 and len(snap.episodes(until=cut)) == 6
    assert [e.robot_id for e in snap.episodes(robot_model="other")] == ["r2"]


WRITER = textwrap.dedent(
    """
    import os, sys, time
    from fleet.store import EpisodeStore, StoreConfig
    from tests.test_store import episode
    cfg = StoreConfig(path=sys.argv[1], chunk_rows=32, index_rows=4)
    store = EpisodeStore.open(cfg)
    print("ready", flush=True)
    while not os.path.exists(sys.argv[1] + ".go"):  # all writers start together
        time.sleep(0.002)
    w, shared = int(sys.argv[2]), list(range(1000, 1006))
    statuses = []
    for k in range(6):
        batch = [episode(100 * w + k, f"w{w}"), episode(shared[k], "shared")]
        statuses += store.append(batch).statuses
    print(statuses.count("created"))
    """
)


def test_concurrent_writer_processes_lose_nothing_and_store_each_id_once(cfg):
    EpisodeStore.create(cfg)
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, cfg.path, str(w)], stdout=subprocess.PIPE, text=True, cwd=REPO)
        for w in range(3)
    ]
    assert [p.stdout.readline().strip() for p in procs] == ["ready"] * 3
    Path(cfg.path + ".go").touch()
    created = [int(p.communicate(timeout=120)[0].strip()) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    snap = EpisodeStore.open(cfg).snapshot()
    ids = [e.episode_id for e in snap.catalog()]
    expected = [episode(100 * w + k, f"w{w}") for w in range(3) for k in range(6)] + [episode(1000 + k, "shared") for k in range(6)]
    assert len(ids) == len(set(ids)) == len(expected) == sum(created)  # each writer's 6, plus the 6 shared ids once
    for ep, back in zip(expected, snap.read_episodes([e.episode_id for e in expected])):
        assert back.equals(ep)


def test_transitions_and_episode_split(cfg):
    from fleet.store.dataset import TransitionDataset, split_by_episode, train_val_datasets  # torch: only here

    store = EpisodeStore.create(cfg)
    eps = [episode(i, steps=4 + i) for i in range(10)]
    store.append(eps[:6])
    store.append(eps[6:])
    snap = store.snapshot()
    train, val = split_by_episode(snap.catalog(), 0.3, seed=0)
    assert train and val and not {e.episode_id for e in train} & {e.episode_id for e in val}
    assert split_by_episode(list(reversed(snap.catalog())), 0.3, seed=0)[1] == list(reversed(val))  # order-independent
    ds = TransitionDataset(snap, train)
    assert ds.snapshot_id == snap.snapshot_id and len(ds) == sum(e.num_steps for e in train)
    by_id = {e.episode_id: e for e in eps}
    for i in (0, len(ds) // 2, len(ds) - 1):
        ep = by_id[ds.episode_ids[ds.table.episode[i]]]
        t = int(ds.table.rows[i] - ds.table.rows[ds.table.episode == ds.table.episode[i]][0])
        item = ds[i]
        assert np.array_equal(item["obs"].numpy(), ep.observation[t]) and np.array_equal(item["next_obs"].numpy(), ep.observation[t + 1])
        assert np.array_equal(item["action"].numpy(), ep.action[t]) and float(item["reward"]) == float(ep.reward[t])
        assert bool(item["terminated"]) == bool(ep.terminated[t])
    batch = ds.sample(16, np.random.default_rng(0))
    assert batch["obs"].shape == (16, 3) and batch["action"].shape == (16, 2) and batch["terminated"].dtype.is_floating_point is False
    assert sum(len(b["reward"]) for b in ds.iterate(7)) == len(ds)
    tr, va = train_val_datasets(snap, 0.3, seed=0, source="sim")
    assert set(tr.episode_ids) == {e.episode_id for e in train} and set(va.episode_ids) == {e.episode_id for e in val}
    with pytest.raises(ValueError, match="no episodes matching"):
        train_val_datasets(snap, 0.3, robot_id="nobody")


def test_transitions_refuse_mixed_dimensions(cfg):
    store = EpisodeStore.create(cfg)
    store.append([episode(1), episode(2, obs_dim=5, robot_model="big")])
    with pytest.raises(ValueError, match="select episodes of one layout"):
        store.snapshot().transitions(store.snapshot().catalog())


def test_store_layout_is_self_describing(cfg):
    store = EpisodeStore.create(cfg)
    store.append([episode(1)])
    snap = store.snapshot()
    sig = snap.signature(snap.catalog()[0].stream)
    assert sig.robot_model == "toy" and sig.obs_dim == 3 and sig.act_dim == 2
    assert {a.name: a.length for a in sig.arrays}["observation"] == "T+1"
    assert json.loads(json.dumps(sig.to_dict())) == sig.to_dict()


def test_icechunk_caches_are_bounded():
    """With icechunk's default cache sizes a long-lived writer grew to 2.1 GiB over 3,200 commits
    (benchmarks/server_memory.py, docs/store.md); every cache the store opens its repository with has a bound."""
    from fleet.store import backend

    caching = backend.repo_config().caching
    bounds = [caching.num_snapshot_nodes, caching.num_chunk_refs, caching.num_transaction_changes, caching.num_bytes_attributes, caching.num_bytes_chunks]
    assert all(b is not None and 0 < b <= 64 << 20 for b in bounds), bounds
    assert caching.num_chunk_refs >= backend.MANIFEST_SPLIT_CHUNKS * 12  # a commit's manifest pieces (12 arrays) fit
