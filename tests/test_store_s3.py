"""The episode store on S3-compatible object storage (``s3://bucket/prefix``), against a real S3
server on loopback (moto's standalone mode, started by the ``s3_server`` fixture): open modes,
bit-exact round trip, idempotency, and writers on separate "hosts" (no shared lock) racing to
commit, which Icechunk's conditional branch update turns into retries, never into loss or doubles."""

import threading
import uuid

import numpy as np
import pytest

from fleet.store import EpisodeStore, StoreConfig
from fleet.store.backend import Location, StoreLocationError
from tests.test_store import episode


@pytest.fixture
def cfg(s3_server):
    return StoreConfig(path=f"s3://fleet/tests/{uuid.uuid4().hex}", chunk_rows=32, index_rows=4)


def test_open_modes_and_a_bit_exact_round_trip(cfg):
    with pytest.raises(FileNotFoundError, match="create it"):
        EpisodeStore.open(cfg)
    store = EpisodeStore.create(cfg)
    assert store.path is None and str(store.location) == cfg.path
    with pytest.raises(FileExistsError, match="already exists"):
        EpisodeStore.create(cfg)
    eps = [episode(s, robot_id=f"r{s % 2}") for s in range(5)]
    assert store.append(eps).statuses == ("created",) * 5
    again = EpisodeStore.open_or_create(cfg)  # another process, as a second server would
    snap = again.snapshot()
    assert {e.episode_id for e in snap.catalog()} == {e.episode_id for e in eps}
    for ep in eps:
        assert snap.read_episode(ep.episode_id).equals(ep)
    assert [e.episode_id for e in snap.episodes(robot_id="r1")] == [eps[1].episode_id, eps[3].episode_id]
    changed = episode(0, robot_id="r0", steps=7)
    changed = changed.__class__(**{**changed.__dict__, "metadata": {**changed.metadata, "episode_id": eps[0].episode_id}})
    assert again.append([eps[0], changed, episode(9)]).statuses == ("duplicate", "conflict", "created")


def test_writers_on_two_hosts_race_and_nothing_is_lost_or_doubled(cfg):
    EpisodeStore.create(cfg)
    writers = [EpisodeStore.open(cfg) for _ in range(2)]  # separate instances: no lock in common
    batches = [[episode(100 * w + i, robot_id=f"w{w}") for i in range(6)] for w in range(2)]
    shared = episode(999, robot_id="both")  # both writers try to store it
    results, barrier = {}, threading.Barrier(2)

    def write(w):
        barrier.wait()
        results[w] = [writers[w].append([ep, shared] if i == 0 else [ep]) for i, ep in enumerate(batches[w])]

    threads = [threading.Thread(target=write, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [s for w in range(2) for r in results[w] for s in r.statuses]
    assert statuses.count("created") == 13 and statuses.count("duplicate") == 1 and "conflict" not in statuses
    snap = EpisodeStore.open(cfg).snapshot()
    ids = [e.episode_id for e in snap.catalog()]
    assert len(ids) == len(set(ids)) == 13
    for ep in [*batches[0], *batches[1], shared]:
        assert snap.read_episode(ep.episode_id).equals(ep)
    commits = [h for h in EpisodeStore.open(cfg).history(limit=100) if h["metadata"].get("episodes")]
    assert len(commits) == 12  # one per append that stored something; a lost race left no commit behind
    print(f"commits redone after losing a race: {[w.commit_retries for w in writers]}")


def test_transitions_of_an_s3_store_train_like_a_local_one(cfg, tmp_path):
    eps = [episode(s, steps=9) for s in range(4)]
    local = EpisodeStore.create(StoreConfig(path=str(tmp_path / "store"), chunk_rows=32, index_rows=4))
    remote = EpisodeStore.create(cfg)
    local.append(eps), remote.append(eps)
    a, b = (snap.transitions(snap.catalog()) for snap in (local.snapshot(), remote.snapshot()))
    for name in ("observation", "action", "reward", "terminated", "truncated"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_a_bad_location_says_what_to_use():
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        StoreConfig(path="gs://fleet/store")
    with pytest.raises(StoreLocationError, match="names no bucket"):
        Location.parse("s3:///prefix")
    assert Location.parse("s3://fleet/a/b/") == Location(bucket="fleet", prefix="a/b")


def test_two_server_replicas_on_one_s3_store_keep_idempotency_and_the_409_rule(cfg, tmp_path):
    """Two flywheel-server replicas (each its own store handle, as on two hosts) behind no common
    lock: every robot's episode stored once whichever replica it reached, a retried upload a 200
    duplicate on the other replica, other bytes under a stored id a 409 there too."""
    import httpx

    from fleet.server import ServerConfig, add_token, serve
    from tests.test_server import make

    tokens = tmp_path / "tokens.json"
    robot, operator = add_token(tokens, "robot", "r0"), add_token(tokens, "operator")
    replicas = [serve(ServerConfig(port=0, token_file=str(tokens), max_concurrent_uploads=16), cfg) for _ in range(2)]
    try:
        eps = [make(seed=s, steps=20) for s in range(12)]
        codes, barrier = {}, threading.Barrier(len(eps))

        def upload(i):
            with httpx.Client(base_url=replicas[i % 2].url, timeout=60, headers={"Authorization": f"Bearer {robot}"}) as c:
                barrier.wait()
                codes[i] = c.post("/v1/episodes", content=eps[i].to_bytes()).status_code

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(eps))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes.values()) == [201] * len(eps)
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {robot}"}) as c:
            for i, ep in enumerate(eps[:4]):  # the robot retries on the other replica
                again = c.post(f"{replicas[(i + 1) % 2].url}/v1/episodes", content=ep.to_bytes())
                assert again.status_code == 200 and again.json()["status"] == "duplicate"
            other = make(seed=77, steps=20, episode_id=eps[0].episode_id)
            assert c.post(f"{replicas[1].url}/v1/episodes", content=other.to_bytes()).status_code == 409
        with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {operator}"}) as c:
            listed = [c.get(f"{r.url}/v1/episodes", params={"limit": 1000}).json() for r in replicas]
        assert listed[0]["total"] == listed[1]["total"] == len(eps)
        for ep in eps:
            assert EpisodeStore.open(cfg).snapshot().read_episode(ep.episode_id).equals(ep)
    finally:
        for r in replicas:
            r.stop()


def test_a_flywheel_run_keeps_its_store_under_the_configured_s3_prefix(tmp_path):
    from fleet.pipeline.services import run_store

    run = tmp_path / "20261126-120000"
    assert run_store(StoreConfig(path="s3://fleet/runs/"), run).path == "s3://fleet/runs/20261126-120000"  # a resumed run finds it again
    assert run_store(StoreConfig(path="runs/fleet/store", chunk_rows=64), run) == StoreConfig(path=str(run / "store"), chunk_rows=64)
