"""The episode store on S3-compatible object storage (``s3://bucket/prefix``), against a real S3
server on loopback (moto's standalone mode, started by the ``s3_server`` fixture): open modes,
bit-exact round trip, idempotency, and writers on separate "hosts" (no shared lock) racing to
commit: Icechunk's conditional branch update makes the loser rebase its commit onto the winner's
(each writer has its own catalog partition and streams), and redo it only when the winner stored
one of its episode ids; never loss or doubles."""

import contextlib
import dataclasses
import subprocess
import sys
import textwrap
import threading
import types
import uuid

import numpy as np
import pytest

from fleet.store import EpisodeStore, StoreConfig
from fleet.store.location import Location, StoreLocationError
from tests.test_store import REPO, episode


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
    assert [e.slot for e in snap.catalog()] == list(range(13))
    assert sum(w.commit_retries for w in writers) <= 1  # a redo only where the winner stored the shared id
    print(f"lost races rebased: {[w.commit_rebases for w in writers]}, transactions redone: {[w.commit_retries for w in writers]}")


class LosesEveryRace(EpisodeStore):
    """A writer whose every commit loses a race: just before it commits, ``rival`` (another store
    handle with its own writer id, as on another host) appends its next batch of ``rival_batches``."""

    def _commit(self, session, message, metadata):
        if self.rival_batches:
            self.rival_results.append(self.rival.append(self.rival_batches.pop(0)))
        return super()._commit(session, message, metadata)


def racing(cfg, rival_batches) -> LosesEveryRace:
    EpisodeStore.create(cfg)
    loser = LosesEveryRace.open(dataclasses.replace(cfg, writer_id="b"))
    loser.rival, loser.rival_batches, loser.rival_results = EpisodeStore.open(dataclasses.replace(cfg, writer_id="a")), list(rival_batches), []
    return loser


def test_a_commit_that_lost_a_race_is_rebased_onto_the_winner_not_redone(cfg):
    mine, theirs = [episode(i, "b") for i in range(3)], [episode(10 + i, "a") for i in range(2)]
    b = racing(cfg, [theirs])
    result = b.append(mine)
    assert result.statuses == ("created",) * 3 and b.rival_results[0].statuses == ("created",) * 2
    assert (b.commit_rebases, b.commit_retries) == (1, 0) and b.known_episodes == 5  # it read the winner's rows while rebasing
    snap = EpisodeStore.open(cfg).snapshot()
    assert snap.snapshot_id == result.snapshot_id
    assert [e.episode_id for e in snap.catalog()] == [e.episode_id for e in theirs + mine]  # commit order: the winner first
    assert [e.slot for e in snap.catalog()] == list(range(5))  # the rebased rows were renumbered after the winner's
    assert {e.stream.rsplit(".", 1)[1] for e in snap.catalog()[2:]} == {"b"} and all(snap.read_episode(e.episode_id).equals(e) for e in theirs + mine)
    commits = [h["metadata"]["writer"] for h in EpisodeStore.open(cfg).history(limit=10) if h["metadata"].get("episodes")]
    assert commits == ["b", "a"]  # one commit each: b's transaction was written once
    assert b.append([episode(5, "b")]).created == 1 and b.commit_rebases == 1  # no race, no rebase


def test_a_commit_racing_one_that_stored_its_ids_is_redone_without_them(cfg):
    """Idempotency and the 409 rule across writers: an id the winner stored meanwhile becomes a
    duplicate (same bytes) or a conflict (other bytes) of the loser's, never stored twice."""
    mine = [episode(0, "b"), episode(1, "shared"), episode(2, "shared")]
    other_bytes = episode(2, "shared", steps=9)
    other_bytes = other_bytes.__class__(**{**other_bytes.__dict__, "metadata": {**other_bytes.metadata, "episode_id": mine[2].episode_id}})
    b = racing(cfg, [[episode(10, "a"), mine[1]], [episode(11, "a"), other_bytes], [episode(12, "a")]])
    result = b.append(mine)
    assert result.statuses == ("created", "duplicate", "conflict")
    assert (b.commit_retries, b.commit_rebases) == (2, 1)  # redone twice (once per id the rival stored first), then rebased
    snap = EpisodeStore.open(cfg).snapshot()
    ids = [e.episode_id for e in snap.catalog()]
    assert ids == [episode(10, "a").episode_id, mine[1].episode_id, episode(11, "a").episode_id, mine[2].episode_id, episode(12, "a").episode_id, mine[0].episode_id]
    assert len(set(ids)) == 6 and snap.read_episode(mine[2].episode_id).equals(other_bytes)  # the winner's bytes


def test_the_server_counts_its_lost_commit_races_on_metrics(cfg):
    """A replica's group commit that lost races shows on /metrics: redone where the rival stored one of its
    ids first, rebased onto the rival's commit otherwise (flywheel_commit_races_total{outcome})."""
    import hashlib

    from fleet.server.committer import GroupCommitter
    from fleet.server.metrics import Metrics

    mine = [episode(0, "b"), episode(1, "shared")]
    store = racing(cfg, [[episode(10, "a"), mine[1]], [episode(11, "a")]])
    metrics = Metrics()
    committer = GroupCommitter(store, metrics, wait_s=0.05, max_bytes=1 << 20, max_episodes=8)
    committer.start()
    futures = [committer.submit(ep, hashlib.sha256(ep.to_bytes()).digest(), len(ep.to_bytes())) for ep in mine]
    committer.close()
    assert sorted(f.result(timeout=60) for f in futures) == ["created", "duplicate"]
    text = metrics.render(0, store.known_episodes)
    assert 'flywheel_commit_races_total{outcome="redone"} 1.0' in text and 'flywheel_commit_races_total{outcome="rebased"} 1.0' in text
    assert (store.commit_retries, store.commit_rebases) == (1, 1)


WRITER = textwrap.dedent(
    """
    import os, sys, time
    from fleet.store import EpisodeStore, StoreConfig
    from tests.test_store import episode
    store = EpisodeStore.open(StoreConfig(path=sys.argv[1], chunk_rows=32, index_rows=4))  # a generated writer id
    print("ready", flush=True)
    while not os.path.exists(sys.argv[2]):  # all writers start together
        time.sleep(0.002)
    w = int(sys.argv[3])
    statuses = []
    for k in range(6):
        statuses += store.append([episode(100 * w + k, f"w{w}"), episode(1000 + k, "shared")]).statuses
    print(statuses.count("created"), statuses.count("duplicate"), store.commit_rebases, store.commit_retries, store.writer_id)
    """
)


def test_writer_processes_on_s3_commit_at_once_and_rebase_instead_of_redoing(cfg, tmp_path):
    EpisodeStore.create(cfg)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, cfg.path, str(go), str(w)], stdout=subprocess.PIPE, text=True, cwd=REPO) for w in range(3)]
    try:
        for p in procs:  # Icechunk may log a line first (e.g. that the host has no CA certificates: moto is plain HTTP)
            assert "ready" in (line.strip() for line in iter(p.stdout.readline, ""))
        go.touch()
        outs = [p.communicate(timeout=120)[0].splitlines()[-1].split() for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.wait() == 0 for p in procs)
    created, duplicates, rebases, redos = ([int(o[i]) for o in outs] for i in range(4))
    assert sum(created) == 18 + 6 and sum(duplicates) == 2 * 6  # each shared id stored by one writer, a duplicate for the others
    assert all(r <= d for r, d in zip(redos, duplicates))  # a transaction is redone only when another writer stored one of its ids
    snap = EpisodeStore.open(cfg).snapshot()
    ids = [e.episode_id for e in snap.catalog()]
    expected = [episode(100 * w + k, f"w{w}") for w in range(3) for k in range(6)] + [episode(1000 + k, "shared") for k in range(6)]
    assert len(ids) == len(set(ids)) == len(expected) and set(ids) == {e.episode_id for e in expected}
    assert all(a.equals(b) for a, b in zip(snap.read_episodes([e.episode_id for e in expected]), expected))
    assert len({o[4] for o in outs}) == 3 and {e.stream.rsplit(".", 1)[1] for e in snap.catalog()} == {o[4] for o in outs}
    commits = [h["metadata"] for h in EpisodeStore.open(cfg).history(limit=100) if h["metadata"].get("episodes")][::-1]
    assert len(commits) == 18  # one per append: a lost race left no commit behind
    writers, at = [e.stream.rsplit(".", 1)[1] for e in snap.catalog()], 0
    for commit in commits:  # the catalog is in commit order across writers (seq)
        assert set(writers[at : at + commit["episodes"]]) == {commit["writer"]}
        at += commit["episodes"]
    assert at == 24
    print(f"3 writer processes, 18 commits: lost races rebased {rebases}, transactions redone {redos}")


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


def test_a_replica_without_a_writer_id_on_s3_says_to_give_it_one(cfg, tmp_path, caplog):
    from fleet.server import ServerConfig, serve

    tokens = tmp_path / "tokens.json"
    tokens.write_text("{}")
    for writer_id, warned in (("", True), ("replica-0", False)):
        caplog.clear()
        serve(ServerConfig(port=0, token_file=str(tokens)), dataclasses.replace(cfg, writer_id=writer_id)).stop()
        assert ("fleet.store.writer_id=replica-3" in caplog.text) == warned, caplog.text


def test_two_server_replicas_on_one_s3_store_keep_idempotency_and_the_409_rule(cfg, tmp_path):
    """Two flywheel-server replicas (each its own store handle and writer id, as on two hosts)
    behind no common lock: every robot's episode stored once, by the replica it reached, a retried
    upload a 200 duplicate on the other replica, other bytes under a stored id a 409 there too."""
    import httpx

    from fleet.server import ServerConfig, add_token, serve
    from tests.test_server import make

    tokens = tmp_path / "tokens.json"
    robot, operator = add_token(tokens, "robot", "r0"), add_token(tokens, "operator")
    replicas = [serve(ServerConfig(port=0, token_file=str(tokens), max_concurrent_uploads=16), dataclasses.replace(cfg, writer_id=f"replica-{i}")) for i in range(2)]
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
        snap = EpisodeStore.open(cfg).snapshot()
        for i, ep in enumerate(eps):
            assert snap.read_episode(ep.episode_id).equals(ep)
            assert snap.get(ep.episode_id).stream.endswith(f".replica-{i % 2}")  # in the streams of the replica that took it
    finally:
        for r in replicas:
            r.stop()


def test_a_flywheel_run_keeps_its_store_under_the_configured_s3_prefix(tmp_path):
    from fleet.pipeline.services import run_store, run_writer

    run = tmp_path / "20261126-120000"
    assert run_store(StoreConfig(path="s3://fleet/runs/"), run, "20261126-120000-1a2b3c4d").path == "s3://fleet/runs/20261126-120000-1a2b3c4d"  # by its run id
    assert run_store(StoreConfig(path="runs/fleet/store", chunk_rows=64), run, "x") == StoreConfig(path=str(run / "store"), chunk_rows=64)
    # its writers: on object storage one stable id per role (a resumed run reuses their partitions); a configured id or local disk as set
    assert run_writer(StoreConfig(path="s3://fleet/runs/x"), "ingest").writer_id == "ingest"
    assert run_writer(StoreConfig(path="s3://fleet/runs/x", writer_id="pod-7"), "ingest").writer_id == "pod-7"
    assert run_writer(StoreConfig(path=str(run / "store")), "ingest").writer_id == ""


def test_a_store_another_replica_is_creating_is_waited_for(cfg, monkeypatch):
    """Replicas started together on a new bucket: one found the repository its peer had just made, before its first
    commit, and exited with zarr's "No group found in store". An open now waits for that commit (lock_timeout_s)."""
    from fleet.store import backend, writer

    repo = backend.create_repo(Location.parse(cfg.path))  # the peer's repository, its first commit still to come
    monkeypatch.setattr(writer, "CREATING_POLL_S", 0.05)
    peer = threading.Timer(0.5, writer._initialise, (repo, cfg))
    peer.start()
    try:
        store = EpisodeStore.open_or_create(cfg)
    finally:
        peer.join()
    assert not store.created_here and store.append([episode(1)]).statuses == ("created",)
    stalled = dataclasses.replace(cfg, path=f"{cfg.path}-never", lock_timeout_s=0.3)
    backend.create_repo(Location.parse(stalled.path))  # a creator that died before its first commit
    with pytest.raises(StoreLocationError, match="its creation never finished"):
        EpisodeStore.open(stalled)


@contextlib.contextmanager
def moto_of_its_own(tmp_path, monkeypatch):
    """A moto S3 server of the test's own, the environment pointed at it; stopped as the block ends, so that what
    comes after meets object storage that no longer answers."""
    from tests.conftest import start_moto, stop_moto

    with open(tmp_path / "moto.log", "wb") as log:
        proc, url = start_moto(log)
        try:
            for key, value in {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "AWS_REGION": "us-east-1"}.items():
                monkeypatch.setenv(key, value)
            monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
            yield
        finally:
            stop_moto(proc)


def test_object_storage_that_stops_answering_after_the_open_is_one_error_saying_what_to_check(tmp_path, monkeypatch):
    """moto stopped under an open store: the next commit and read raised Icechunk's 45-line error ("error getting object
    from object store dispatch failure ... Connection refused"), which flywheel printed as a traceback with no way on.
    Now StoreUnreachableError (what the apps print in one line) naming the store, the cause and what to check; the
    server's 503 reason still the cause alone."""
    from fleet.store.backend import StoreUnreachableError, short_reason

    with moto_of_its_own(tmp_path, monkeypatch):
        store = EpisodeStore.open_or_create(StoreConfig(path="s3://fleet/gone", writer_id="w", chunk_rows=32, index_rows=4))
        assert store.append([episode(1)]).statuses == ("created",)
    said = r"the episode store at s3://fleet/gone did not answer \(.*[Cc]onnection refused.*\); check the bucket, AWS_ENDPOINT_URL"
    for access in (lambda: store.append([episode(2)]), store.snapshot):  # a commit, a read (each ~30 s of Icechunk's retries)
        with pytest.raises(StoreUnreachableError, match=said) as failed:
            access()
        assert "\n" not in str(failed.value) and "onnection refused" in short_reason(failed.value)


def test_object_storage_that_stops_answering_during_the_loops_catalog_and_episode_reads_is_one_error(tmp_path, monkeypatch):
    """A snapshot's catalog loads on first use, and its episodes are read after: both ran outside ``answering``, so an
    endpoint that died while the loop read an iteration's episodes (Services.read_data) ended in Icechunk's traceback."""
    from fleet.store.backend import StoreUnreachableError

    with moto_of_its_own(tmp_path, monkeypatch):
        cfg = StoreConfig(path="s3://fleet/gone-mid-read", writer_id="w", chunk_rows=32, index_rows=4)
        assert EpisodeStore.open_or_create(cfg).append([episode(1)]).statuses == ("created",)
        unread = EpisodeStore.open(cfg).snapshot()  # pinned while storage answers, nothing read (an open of its own: no shared cache)
        listed = EpisodeStore.open(cfg).snapshot()
        infos = listed.episodes()  # its catalog loaded, its episodes unread
    said = r"^the episode store at s3://fleet/gone-mid-read did not answer \(.*[Cc]onnection refused.*\); check the bucket, AWS_ENDPOINT_URL"
    for read in (unread.episodes, lambda: listed.read_episodes(infos)):  # the catalog, the episodes (each ~30 s of Icechunk's retries)
        with pytest.raises(StoreUnreachableError, match=said):
            read()


def test_a_moto_whose_bucket_cannot_be_made_is_stopped_not_left_running(tmp_path, monkeypatch):
    """The test fixture: create_bucket ran outside the start's clean-up, so a refused bucket left moto running."""
    import subprocess

    import boto3

    from tests.conftest import start_moto

    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    def refusing(*args, **kwargs):
        raise RuntimeError("bucket refused")

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    monkeypatch.setattr(boto3, "client", refusing)
    with open(tmp_path / "moto.log", "wb") as log, pytest.raises(RuntimeError, match="bucket refused"):
        start_moto(log)
    (proc,) = started
    try:
        assert proc.poll() is not None  # stopped before the error reached the caller
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_icechunk_error_that_is_no_storage_fault_keeps_its_type():
    """Only object storage that did not answer is translated: a local store's fault, or any other Icechunk error (a
    bug), keeps its traceback."""
    import icechunk

    from fleet.store.backend import answering

    for where, text in (("s3://fleet/x", "x invalid zarr key 'a//b'"), ("/tmp/local-store", "x error getting object from object store io error")):
        with pytest.raises(icechunk.IcechunkError), answering(Location.parse(where)):
            raise icechunk.IcechunkError(text)


def test_withdrawal_rules_racing_appends_and_each_other_on_s3_lose_nothing(cfg):
    """A rule is a commit of the root group's attribute: one that lost a race to another rule is made again on the new
    tip (both kept), and an append that lost a race to a rule is rebased (the rule stays)."""
    EpisodeStore.create(cfg)
    a = EpisodeStore.open(dataclasses.replace(cfg, writer_id="a"))
    a.append([episode(0, "r1"), episode(1, "r2")])
    loser = EpisodeStore.open(dataclasses.replace(cfg, writer_id="b"))
    rival_rule = []

    def rival_withdraws(self, session, message, metadata):  # the rival makes a rule just before this one commits
        if not rival_rule:
            rival_rule.append(a.withdraw("the rival's rule", robot_id="r2")[0])
        return EpisodeStore._commit(self, session, message, metadata)

    loser._commit = types.MethodType(rival_withdraws, loser)
    mine, _ = loser.withdraw("my rule", robot_id="r1")
    assert [r.id for r in EpisodeStore.open(cfg).withdrawals()] == [rival_rule[0].id, mine.id] and loser.commit_retries == 1
    rival_rule.clear()
    loser.append([episode(2, "r3")])  # loses to another rule: rebased onto it
    assert loser.commit_rebases == 1 and len(EpisodeStore.open(cfg).withdrawals()) == 3
    assert {e.robot_id for e in EpisodeStore.open(cfg).snapshot().episodes()} == {"r3"}
