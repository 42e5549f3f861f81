"""Group commit "rejoin" (fleet/server/committer.py): an upload queued while a commit ran waits (up to
commit_rejoin_ms) for the robots of that commit that came straight back last time, so robots uploading back
to back do not split into two cohorts that take turns; a lone robot, and a robot that pauses between
uploads, are never waited for.

A real store on disk; its commits are recorded (which robots each one held), and commit i runs only once
``gates[i]`` is set, so that uploads queue while it runs, as they do behind a busy commit thread.
Behaviour only: which uploads share a commit, never how fast. A wait that must not happen is a 60 s
rejoin, far beyond the 30 s the tests wait for an acknowledgement.
"""

import hashlib
import threading

import pytest

from fleet.server.committer import GroupCommitter
from fleet.server.metrics import Metrics
from fleet.store import EpisodeStore, StoreConfig
from tests.test_store import episode

ACK_S = 30.0


class GatedStore(EpisodeStore):
    """A real store that records the robot_ids of each commit; commit i sets ``entered[i]``, then waits
    for ``gates[i]``."""

    def append(self, episodes, **kwargs):
        i = self.started
        self.started += 1
        self.entered[i].set()
        assert self.gates[i].wait(ACK_S)
        self.commits.append(sorted(e.robot_id for e in episodes))
        return super().append(episodes, **kwargs)


@pytest.fixture
def store(tmp_path):
    store = GatedStore.create(StoreConfig(path=str(tmp_path / "store"), chunk_rows=32, index_rows=4))
    store.started, store.commits = 0, []
    store.entered, store.gates = [threading.Event() for _ in range(8)], [threading.Event() for _ in range(8)]
    return store


def committer(store, rejoin_s: float) -> GroupCommitter:
    return GroupCommitter(store, Metrics(), wait_s=0.0, rejoin_s=rejoin_s, max_bytes=1 << 30, max_episodes=256)


def upload(c: GroupCommitter, robots: list[str], seed: int):
    futures = []
    for k, robot in enumerate(robots):
        ep = episode(seed + k, robot)
        data = ep.to_bytes()
        futures.append(c.submit(ep, hashlib.sha256(data).digest(), len(data)))
    return futures


def open_gates(store, first: int) -> None:
    for gate in store.gates[first:]:
        gate.set()


def acknowledged(futures) -> bool:
    return all(f.result(ACK_S) == "created" for f in futures)


@pytest.mark.parametrize("rejoin_s, fourth", [(0.0, ["b0", "b1"]), (60.0, ["a0", "a1", "b0", "b1"])])
def test_robots_that_come_straight_back_rejoin_the_next_commit(store, rejoin_s, fourth):
    """Cohorts a and b take turns: each uploads again as soon as it is acknowledged, while the other's
    commit runs. Once both are known to come straight back, b's upload (queued during a's commit) waits for
    a's robots, and the cohorts merge; without rejoin they keep taking turns."""
    a, b = ["a0", "a1"], ["b0", "b1"]
    c = committer(store, rejoin_s)
    first = upload(c, a, 0)  # queued before the thread starts: commit 0
    c.start()
    try:
        assert store.entered[0].wait(ACK_S)
        queued_b = upload(c, b, 10)  # queued during commit 0
        store.gates[0].set()
        assert acknowledged(first) and store.entered[1].wait(ACK_S)  # commit 1: b (a is not known quick yet)
        again_a = upload(c, a, 20)  # a comes straight back, during commit 1
        store.gates[1].set()
        assert acknowledged(queued_b) and store.entered[2].wait(ACK_S)  # commit 2: a (b not known quick yet)
        again_b = upload(c, b, 30)  # b comes straight back, during commit 2
        store.gates[2].set()
        assert acknowledged(again_a)  # commit 3 starts with b's upload: it may wait for a's robots
        store.gates[3].set()
        last_a = upload(c, a, 40)
        open_gates(store, 4)
        assert acknowledged(again_b + last_a)
    finally:
        c.close()
    assert store.commits[:4] == [a, b, a, fourth]


def test_a_lone_robot_never_waits_for_company(store):
    """A lone robot's upload is committed at once (a 60 s rejoin would exceed the 30 s allowed for each
    acknowledgement): it comes after its own acknowledgement; and one queued behind its own running
    commit has nobody else of that commit to wait for."""
    c = committer(store, rejoin_s=60.0)
    open_gates(store, 0)  # commits 0-2 run at once; commit 3 is held below
    store.gates[3].clear()
    c.start()
    try:
        for seed in range(3):
            assert acknowledged(upload(c, ["solo"], seed))
        running = upload(c, ["solo"], 3)  # commit 3 is held; the next upload queues behind it
        assert store.entered[3].wait(ACK_S)
        queued = upload(c, ["solo"], 4)
        open_gates(store, 3)
        assert acknowledged(running + queued)
    finally:
        c.close()
    assert store.commits == [["solo"]] * 5


def test_a_robot_that_stops_is_waited_for_at_most_rejoin_once(store):
    """x and y came straight back once; then y stops. x's next upload, queued during x and y's commit,
    waits for y up to commit_rejoin only, then commits alone."""
    c = committer(store, rejoin_s=0.3)
    both = upload(c, ["x", "y"], 0)  # commit 0
    c.start()
    try:
        assert store.entered[0].wait(ACK_S)
        z = upload(c, ["z"], 10)  # queued during commit 0: commit 1
        store.gates[0].set()
        assert acknowledged(both) and store.entered[1].wait(ACK_S)
        again = upload(c, ["x", "y"], 20)  # x and y come straight back, during commit 1: commit 2
        store.gates[1].set()
        assert acknowledged(z) and store.entered[2].wait(ACK_S)
        x = upload(c, ["x"], 30)  # queued during commit 2; y does not upload again
        open_gates(store, 2)
        assert acknowledged(again + x)
    finally:
        c.close()
    assert store.commits == [["x", "y"], ["z"], ["x", "y"], ["x"]]


def test_a_robot_that_pauses_between_uploads_is_not_waited_for(store):
    """A robot whose upload came later than commit_rejoin after its acknowledgement is not quick: an upload
    queued during its next commit does not wait for it (with a 60 s wait it would miss the 30 s allowed)."""
    c = committer(store, rejoin_s=0.05)
    both = upload(c, ["x", "y"], 0)  # commit 0
    c.start()
    try:
        assert store.entered[0].wait(ACK_S)
        store.gates[0].set()
        assert acknowledged(both)
        threading.Event().wait(0.2)  # both pause longer than the 50 ms rejoin before uploading again
        z = upload(c, ["z"], 10)  # commit 1, held while x and y upload again
        assert store.entered[1].wait(ACK_S)
        again = upload(c, ["x", "y"], 20)  # commit 2
        c.rejoin_s = 60.0  # from here a wait for them would outlast the acknowledgement timeout
        store.gates[1].set()
        assert acknowledged(z) and store.entered[2].wait(ACK_S)
        x = upload(c, ["x"], 30)  # queued during commit 2: must not wait for y
        open_gates(store, 2)
        assert acknowledged(again + x)
    finally:
        c.close()
    assert store.commits == [["x", "y"], ["z"], ["x", "y"], ["x"]]


@pytest.mark.parametrize("field", ["commit_wait_ms", "commit_rejoin_ms"])
def test_a_negative_wait_is_refused_saying_what_is_allowed(field, tmp_path):
    from fleet.server import ServerConfig

    with pytest.raises(ValueError, match="commit_wait_ms and commit_rejoin_ms must be >= 0"):
        ServerConfig(token_file=str(tmp_path / "tokens.json"), **{field: -1.0})
