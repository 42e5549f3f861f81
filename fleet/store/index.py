"""A writer's episode-id index: the id and digest of every committed episode, read incrementally
from every writer's catalog partition (docs/store.md, "Commit protocol").

The index is current at one snapshot (:attr:`IdIndex.snapshot_id`); :meth:`IdIndex.refresh`
brings it to a later one by reading only the rows each partition gained since. The number of
catalog rows at that snapshot (:attr:`IdIndex.total`) is where a commit based on it numbers its
rows (the catalog's ``seq``).
"""

from __future__ import annotations

import asyncio

from fleet.store import backend
from fleet.store.layout import STORE_SCHEMA_VERSION, catalog_path


class IdIndex:
    def __init__(self):
        self.digests: dict[str, bytes] = {}  # episode_id -> sha256 of its canonical bytes
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
        parts = await asyncio.gather(*(self._new_rows(store, w) for w in writers))
        for writer, stop, pairs in parts:
            self.digests.update(pairs)
            self.rows[writer] = stop
        self.snapshot_id = snapshot_id

    async def _new_rows(self, store, writer: str) -> tuple[str, int, list[tuple[str, bytes]]]:
        ids, digests = await asyncio.gather(*(backend.open_array(store, catalog_path(c, writer), mode="r") for c in ("episode_id", "digest")))
        start, stop = self.rows.get(writer, 0), ids.shape[0]
        if stop <= start:
            return writer, stop, []
        id_values, digest_values = await asyncio.gather(ids.getitem(slice(start, stop)), digests.getitem(slice(start, stop)))
        return writer, stop, [(str(i), bytes.fromhex(str(d))) for i, d in zip(id_values, digest_values)]

    def committed(self, writer: str, pairs: list[tuple[str, bytes]], rows: int, snapshot_id: str) -> None:
        """Record ``writer``'s own commit ``snapshot_id``, made on top of :attr:`snapshot_id`, which
        stored ``pairs`` (episode id, digest) and left its partition ``rows`` long."""
        self.digests.update(pairs)
        self.rows[writer] = rows
        self.snapshot_id = snapshot_id
