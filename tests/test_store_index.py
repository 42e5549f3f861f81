"""The writer's episode-id index (fleet/store/index.py): a dict's answers in a fraction of its memory.

Every server replica holds the index of the whole store for idempotency, so its bytes per id are a
fleet's memory bill: a dict of str to bytes took ~190 (the server's memory grew ~270 B an episode)."""

from __future__ import annotations

import random
import uuid

import numpy as np
import pytest

from fleet.store import StoreConfig
from fleet.store.index import IdDigests
from fleet.store.writer import EpisodeStore
from sim.episode import Episode
from tests.conftest import make_episode_arrays


def _uuid(rnd: random.Random) -> str:
    raw = bytearray(rnd.randbytes(16))
    if rnd.random() < 0.3:  # trailing NUL bytes: numpy's bytes items drop them
        k = rnd.randint(1, 3)
        raw[-k:] = bytes(k)
    return str(uuid.UUID(bytes=bytes(raw)))


def _other(rnd: random.Random) -> str:
    """Ids a store written before ids were checked may hold, one of them a canonical id's other spelling."""
    u = _uuid(rnd)
    return rnd.choice([u.upper(), "{" + u + "}", u.replace("-", ""), u + " ", "é" + u[1:], u[:35], u + "0", u.replace("-", " ", 1), "x" * 36, "", u + "\0", u + "\0x"])


def _digest(rnd: random.Random) -> bytes:
    raw = bytearray(rnd.randbytes(32))
    if rnd.random() < 0.3:
        raw[-3:] = bytes(3)
    return bytes(raw)


@pytest.mark.parametrize("merge_at", [1, 7, 1 << 15])
def test_the_id_index_answers_as_a_dict_does(monkeypatch, merge_at):
    """Random commits (a few pairs) and catalog loads (many, as hex text) against a dict: get, get with a default, in,
    len; ids seen before, new ids, other spellings of stored ids, and ids of an old store that are not canonical."""
    monkeypatch.setattr(IdDigests, "MERGE_AT", merge_at)
    monkeypatch.setattr(IdDigests, "FANOUT", 2)  # several levels at these sizes
    rnd = random.Random(merge_at)
    index, want, seen = IdDigests(), {}, []

    def some_id() -> str:
        return rnd.choice(seen) if seen and rnd.random() < 0.2 else _other(rnd) if rnd.random() < 0.1 else _uuid(rnd)

    for _ in range(60):
        pairs = [(some_id(), _digest(rnd)) for _ in range(rnd.randint(0, 20 if rnd.random() < 0.5 else 300))]
        seen += [eid for eid, _ in pairs]
        if len(pairs) <= 20:
            index.update(pairs)
        else:
            ids, as_zarr = [eid for eid, _ in pairs], rnd.random() < 0.5  # zarr returns StringDType arrays
            if rnd.random() < 0.2:  # a block of an old store: no canonical id in it
                ids = [eid.upper() for eid in ids]
                pairs = list(zip(ids, [d for _, d in pairs]))
            kind = np.dtypes.StringDType() if as_zarr else object
            index.load(np.array(ids, dtype=kind), np.array([d.hex() for _, d in pairs], dtype=kind))
        want.update(pairs)
        assert len(index) == len(want)
        for eid in seen[-400:] + [_uuid(rnd) for _ in range(20)] + [eid.upper() for eid in seen[-20:]]:
            assert index.get(eid) == want.get(eid) and index.get(eid, b"-") == want.get(eid, b"-") and (eid in index) == (eid in want)


def test_the_id_index_keeps_an_id_in_about_48_bytes():
    index = IdDigests()
    rnd = random.Random(0)
    n = 100_000
    ids = [str(uuid.UUID(bytes=rnd.randbytes(16))) for _ in range(n)]
    index.load(ids, [rnd.randbytes(32).hex() for _ in range(n)])
    index.update((str(uuid.UUID(bytes=rnd.randbytes(16))), rnd.randbytes(32)) for _ in range(100))
    assert len(index) == n + 100 and index.nbytes == 48 * n  # the 100 newest wait in a dict for MERGE_AT more
    assert index.get(ids[12_345]) is not None and index.get(str(uuid.UUID(bytes=rnd.randbytes(16)))) is None


def make_episode(seed: int, episode_id: str | None = None) -> Episode:
    return Episode.create(**make_episode_arrays(num_steps=3, seed=seed), robot_id="r", robot_model="toy", source="real", episode_id=episode_id)


def test_a_reopened_store_knows_its_episodes_from_the_catalog(tmp_path):
    """The index a server builds at start (refresh_index reads every partition's id and digest columns) answers for
    every stored episode: duplicate for the same bytes, conflict for others under its id."""
    cfg = StoreConfig(path=str(tmp_path / "s"))
    first = EpisodeStore.open_or_create(cfg)
    episodes = [make_episode(k) for k in range(40)]
    for k in range(0, 40, 8):
        first.append(episodes[k : k + 8])
    reopened = EpisodeStore.open(cfg)
    assert reopened.refresh_index() == 40 == reopened.known_episodes
    result = reopened.append([episodes[3], make_episode(99, episodes[5].episode_id), make_episode(7)])
    assert result.statuses == ("duplicate", "conflict", "created") and reopened.known_episodes == 41
