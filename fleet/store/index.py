"""A writer's episode-id index: the id and digest of every committed episode, read incrementally
from every writer's catalog partition (docs/store.md, "Commit protocol").

The index is current at one snapshot (:attr:`IdIndex.snapshot_id`); :meth:`IdIndex.refresh`
brings it to a later one by reading only the rows each partition gained since. The number of
catalog rows at that snapshot (:attr:`IdIndex.total`) is where a commit based on it numbers its
rows (the catalog's ``seq``).

Every server replica holds the index of the whole store for idempotency, so its size per id is a
fleet's memory bill: :class:`IdDigests` keeps an id in 48 bytes (a dict of str to bytes: ~190).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import numpy as np

from fleet.store import backend
from fleet.store.layout import STORE_SCHEMA_VERSION, catalog_path

REFRESH_BLOCK_ROWS = 1 << 16  # catalog rows an index refresh decodes at once
_HEX_VALUE = np.full(256, 16, np.uint8)  # ASCII byte -> its value as a lowercase hex digit, 16 for any other byte
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_DASHES = [8, 13, 18, 23]  # where a canonical UUID text has its hyphens
_UUID_DIGITS = [i for i in range(36) if i not in _DASHES]


def _hex_bytes(text: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, width) ASCII bytes of lowercase hex digits -> (n, width // 2) uint8 and a (n,) bool: every byte a digit."""
    digit = _HEX_VALUE[text]
    return (digit[:, 0::2] << 4) | digit[:, 1::2], (digit < 16).all(axis=1)


def _ascii(texts, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``texts`` as (n, width) bytes, NUL-padded, and a (n,) bool: the text is ``width`` ASCII characters long (numpy's
    bytes drop trailing NULs and cut longer texts: the lengths are the texts' own)."""
    length = np.fromiter(map(len, texts), np.int64, count=len(texts))
    try:
        raw = np.asarray(texts, dtype=f"S{width}")
    except UnicodeEncodeError:  # non-ASCII: in no form this index keeps
        ascii_ = np.fromiter((t.isascii() for t in texts), bool, count=len(texts))
        raw, length = np.asarray([t if a else "" for t, a in zip(texts, ascii_)], dtype=f"S{width}"), np.where(ascii_, length, -1)
    return raw.reshape(-1).view(np.uint8).reshape(len(raw), width), length == width


def _uuid_keys(ids) -> tuple[np.ndarray, np.ndarray]:
    """Episode ids -> their UUIDs' 16 bytes (n, 16) and a (n,) bool: the text is the canonical form (lowercase 8-4-4-4-12),
    so the 16 bytes give it back exactly."""
    raw, whole = _ascii(ids, 36)
    keys, digits = _hex_bytes(raw[:, _UUID_DIGITS], 32)
    return keys, whole & digits & (raw[:, _DASHES] == ord("-")).all(axis=1)


def _uuid_key(episode_id: str) -> bytes | None:
    """One id's UUID bytes where it is in the canonical form, else None."""
    if len(episode_id) != 36 or any(episode_id[i] != "-" for i in _DASHES):
        return None
    digits = episode_id.replace("-", "")
    try:
        key = bytes.fromhex(digits)
    except ValueError:
        return None
    return key if len(key) == 16 and key.hex() == digits else None  # fromhex takes upper case and spaces; the form does not


class IdDigests:
    """episode_id -> the sha256 digest (32 bytes) of its episode: a mapping's ``get``, ``in`` and ``len``.

    Canonical UUID ids (every id a store has taken since ids were checked) are kept as their 16
    bytes beside the digest in sorted runs, 48 bytes an id: the newest in a dict until
    :attr:`MERGE_AT` of them go into the smallest run, and a run that outgrows its level (MERGE_AT
    x FANOUT, x FANOUT again for the next) into the next one, so an id is copied about FANOUT / 2
    times a level (~18 times in all at a million ids), not once per flush of the whole index (a
    log-structured merge; a lookup searches each run). Any other id (a store written before ids
    were checked) is kept in a dict as it is.
    """

    MERGE_AT = 1 << 12
    FANOUT = 16

    def __init__(self):
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (keys S16 sorted, digests (n, 32) uint8), smallest level first
        self._newest: dict[bytes, bytes] = {}  # UUID bytes -> digest, in no run yet
        self._other: dict[str, bytes] = {}  # ids not in the canonical form

    def __len__(self) -> int:
        return sum(len(keys) for keys, _ in self._runs) + len(self._newest) + len(self._other)

    @property
    def nbytes(self) -> int:
        """Bytes of the runs' arrays (the dicts not counted: at most MERGE_AT ids, and the ids of an old store)."""
        return sum(keys.nbytes + digests.nbytes for keys, digests in self._runs)

    def __contains__(self, episode_id: str) -> bool:
        return self.get(episode_id) is not None

    def get(self, episode_id: str, default: bytes | None = None) -> bytes | None:
        key = _uuid_key(episode_id)
        if key is None:
            return self._other.get(episode_id, default)
        found = self._newest.get(key)
        if found is not None:
            return found
        for keys, digests in self._runs:
            i = _find(keys, key)
            if i is not None:
                return digests[i].tobytes()
        return default

    def update(self, pairs: Iterable[tuple[str, bytes]]) -> None:
        """Add (episode_id, digest) pairs, as ``dict.update`` does (a few: a commit's)."""
        for episode_id, digest in pairs:
            key = _uuid_key(episode_id)
            if key is None:
                self._other[episode_id] = bytes(digest)
            elif not self._replaced(key, digest):
                self._newest[key] = bytes(digest)
        if len(self._newest) >= self.MERGE_AT:
            self._flush()

    def load(self, episode_ids, hex_digests) -> None:
        """Add many ids with their digests as hex text (catalog columns), vectorised."""
        if not len(episode_ids):
            return
        keys, canonical = _uuid_keys(episode_ids)
        text, whole = _ascii(hex_digests, 64)
        digests, valid = _hex_bytes(text, 64)
        fast = canonical & valid & whole
        if not fast.all():  # ids of an old store, or a digest text this code did not write: row by row, in order
            self.update((str(i), bytes.fromhex(str(d))) for i, d in zip(episode_ids, hex_digests))
            return
        self._flush()
        keys = keys.reshape(-1).view("S16")
        order = np.argsort(keys, kind="stable")
        keys, digests = keys[order], digests[order]
        last = np.append(keys[1:] != keys[:-1], True)  # of equal keys the last given, as dict.update keeps
        keys, digests = keys[last], digests[last]
        new = np.ones(len(keys), bool)
        for run_keys, run_digests in self._runs:  # ids a run holds already: replaced where they are
            at = np.minimum(np.searchsorted(run_keys, keys), max(len(run_keys) - 1, 0))
            present = (run_keys[at] == keys) if len(run_keys) else np.zeros(len(keys), bool)
            run_digests[at[present]] = digests[present]
            new &= ~present
        self._add_run(keys[new], digests[new])

    def _replaced(self, key: bytes, digest: bytes) -> bool:
        """Put ``digest`` for ``key`` where a run holds it; False when none does."""
        for keys, digests in self._runs:
            i = _find(keys, key)
            if i is not None:
                digests[i] = np.frombuffer(digest, np.uint8)
                return True
        return False

    def _flush(self) -> None:
        if self._newest:
            keys = np.frombuffer(b"".join(self._newest), "S16")
            digests = np.frombuffer(b"".join(self._newest.values()), np.uint8).reshape(-1, 32)
            self._newest = {}
            order = np.argsort(keys)
            self._add_run(keys[order], digests[order])

    def _add_run(self, keys: np.ndarray, digests: np.ndarray) -> None:
        """Merge sorted ``keys`` (S16, in no run) and their digests into the smallest run, and every run past its level's
        size into the next."""
        level = 0
        while len(keys):
            if level == len(self._runs):
                self._runs.append((np.empty(0, "S16"), np.empty((0, 32), np.uint8)))
            run_keys, run_digests = self._runs[level]
            if len(run_keys) < len(keys):
                run_keys, run_digests, keys, digests = keys, digests, run_keys, run_digests
            at = np.searchsorted(run_keys, keys)
            merged = (np.insert(run_keys, at, keys), np.insert(run_digests, at, digests, axis=0))
            if level + 1 < 8 and len(merged[0]) > self.MERGE_AT * self.FANOUT ** (level + 1):
                self._runs[level] = (np.empty(0, "S16"), np.empty((0, 32), np.uint8))
                keys, digests = merged  # on to the next level
                level += 1
            else:
                self._runs[level] = merged
                return


def _find(keys: np.ndarray, key: bytes) -> int | None:
    """The row of ``key`` in the sorted ``keys``, or None."""
    i = int(np.searchsorted(keys, np.frombuffer(key, "S16"))[0])
    return i if i < len(keys) and keys[i : i + 1].tobytes() == key else None  # bytes: an item drops trailing NULs


class IdIndex:
    def __init__(self):
        self.digests = IdDigests()  # episode_id -> sha256 of its canonical bytes
        self.rows: dict[str, int] = {}  # writer -> rows of its partition read into ``digests``
        self.snapshot_id: str | None = None  # the snapshot the index is current at

    @property
    def total(self) -> int:
        """Catalog rows (all partitions) at :attr:`snapshot_id`."""
        return sum(self.rows.values())

    async def refresh(self, store, snapshot_id: str) -> None:
        """Read the rows committed since :attr:`snapshot_id` from ``store``, a view of the
        committed snapshot ``snapshot_id`` (a schema-3 one) with no uncommitted rows in it."""
        writers = await backend.catalog_partitions(store, STORE_SCHEMA_VERSION)
        for writer in writers:  # in blocks: a server starting on millions of episodes decodes a block's text at a time
            ids, digests = await asyncio.gather(*(backend.open_array(store, catalog_path(c, writer), mode="r") for c in ("episode_id", "digest")))
            stop = ids.shape[0]
            for start in range(self.rows.get(writer, 0), stop, REFRESH_BLOCK_ROWS):
                rows = slice(start, min(start + REFRESH_BLOCK_ROWS, stop))
                self.digests.load(*await asyncio.gather(ids.getitem(rows), digests.getitem(rows)))
            self.rows[writer] = stop
        self.snapshot_id = snapshot_id

    def committed(self, writer: str, pairs: list[tuple[str, bytes]], rows: int, snapshot_id: str) -> None:
        """Record ``writer``'s own commit ``snapshot_id``, made on top of :attr:`snapshot_id`, which
        stored ``pairs`` (episode id, digest) and left its partition ``rows`` long."""
        self.digests.update(pairs)
        self.rows[writer] = rows
        self.snapshot_id = snapshot_id
