"""Older store schemas: read schema 1 (snapshots pinned before a migration), migrate 1 and 2 to 3.

Schema 2 differs from 3 in its catalog only: one flat table ``/catalog/<column>`` without ``seq``
(rows in commit order) and streams without a writer. Its snapshots are read by the reader's
schema-3 code, as a single partition (layout.partition_path(None)); :func:`migrate_catalog` moves
the table into the partition ``/catalog/migrated`` (layout.MIGRATED_WRITER) in one writable
session (the caller commits). Data chunks and streams stay as they are: their ``episode_index``
holds the rows of that partition, and no writer appends to a stream without a writer again.

Schema 1 kept each stream's catalog in padded per-stream index arrays (docs/store.md,
"Older schemas")::

    streams/<stream>/index/span      int64 (slots, 2)   [first row, T]; T == 0: unused slot
    streams/<stream>/index/key       uint8 (slots, 48)  episode UUID bytes + sha256 digest
    streams/<stream>/index/record    string (slots,)    provenance JSON
    streams/<stream>/index/metadata  string (slots,)    the metadata map as JSON

and its arrays had no dimension names. :func:`migrate` rewrites that into schema 3 inside
one writable session (the caller commits): the partition ``/catalog/migrated``,
``data/episode_index`` per stream, dimension names on every data array; the index arrays are
deleted. Data chunks are not rewritten: their padding stays zero (``episode_index`` says which
rows are data).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import numpy as np
from zarr.core.metadata.io import save_metadata

from fleet.store import backend
from fleet.store.catalog import COLUMNS, EpisodeInfo, absent, columns, record
from fleet.store.layout import (
    CATALOG,
    EPISODE_INDEX,
    MIGRATED_WRITER,
    ROOT_ATTR,
    STORE_SCHEMA_VERSION,
    STREAMS,
    StreamSignature,
    catalog_path,
    data_path,
    dimension_names,
    index_path,
    stream_path,
)


async def load_catalog(store) -> tuple[list[EpisodeInfo], dict[str, StreamSignature]]:
    """Every episode of a schema-1 snapshot (stream by stream, slot order) and the stream signatures."""
    streams = await backend.open_group(store, STREAMS, mode="r")
    names = sorted([name async for name in streams.group_keys()])

    async def one(stream: str) -> tuple[StreamSignature, list[EpisodeInfo]]:
        group = await backend.open_group(store, stream_path(stream), mode="r")
        arrays = await asyncio.gather(*(backend.open_array(store, index_path(stream, n), mode="r") for n in ("span", "key", "record")))
        spans, keys, records = await asyncio.gather(*(a.getitem(slice(0, a.shape[0])) for a in arrays))
        out = []
        for slot in np.flatnonzero(spans[:, 1] > 0):
            rec = json.loads(str(records[slot]))
            out.append(
                EpisodeInfo(
                    episode_id=str(uuid.UUID(bytes=bytes(keys[slot, :16]))),
                    stream=stream,
                    slot=int(slot),
                    row=int(spans[slot, 0]),
                    num_steps=int(spans[slot, 1]),
                    digest=bytes(keys[slot, 16:]).hex(),
                    robot_id=rec["robot_id"],
                    robot_model=rec["robot_model"],
                    source=rec["source"],
                    policy_version=rec["policy_version"],
                    model_version=rec["model_version"],
                    upload_time=rec["upload_time"],
                    start_time=rec["start_time"],
                    total_return=rec["total_return"],
                )
            )
        return StreamSignature.from_dict(group.attrs["signature"]), out

    parts = await asyncio.gather(*(one(n) for n in names))
    return [e for _, infos in parts for e in infos], {n: sig for n, (sig, _) in zip(names, parts)}


async def read_metadata(store, infos: list[EpisodeInfo], index_rows: int) -> list[dict[str, str]]:
    """Full metadata maps of schema-1 catalog entries, in order."""
    by_stream: dict[str, list[int]] = {}
    for info in infos:
        by_stream.setdefault(info.stream, []).append(info.slot)

    async def one(stream: str, slots: list[int]) -> dict[tuple[str, int], str]:
        arr = await backend.open_array(store, index_path(stream, "metadata"), mode="r")
        stop = max(slots) + 1
        block = await arr.getitem(slice(min(slots) // index_rows * index_rows, stop))
        first = min(slots) // index_rows * index_rows
        return {(stream, s): str(block[s - first]) for s in slots}

    values: dict[tuple[str, int], str] = {}
    for part in await asyncio.gather(*(one(s, slots) for s, slots in by_stream.items())):
        values.update(part)
    return [json.loads(values[(i.stream, i.slot)]) for i in infos]


async def migrate(session, info: dict, make_catalog) -> dict:
    """Turn the schema-1 store in ``session`` into schema 3 (uncommitted); returns the new root attribute.

    ``make_catalog()`` creates ``/catalog`` and the empty partition of MIGRATED_WRITER (the writer's).
    """
    store = session.store
    infos, signatures = await load_catalog(store)
    metas = await read_metadata(store, infos, info["index_rows"])
    records = [
        record(meta, digest=i.digest, stream=i.stream, row=i.row, num_steps=i.num_steps,
               total_return=i.total_return, start_time=i.start_time, upload_time=i.upload_time, seq=k)
        for k, (i, meta) in enumerate(zip(infos, metas))
    ]  # fmt: skip
    await _fill(await make_catalog(), columns(records), len(infos))
    await asyncio.gather(*(_migrate_stream(store, info, sig, [(k, i) for k, i in enumerate(infos) if i.stream == name]) for name, sig in signatures.items()))
    return await _set_version(store, info)


async def migrate_catalog(session, info: dict, make_catalog) -> dict:
    """Turn the schema-2 store in ``session`` into schema 3 (uncommitted): its flat catalog becomes
    the partition of MIGRATED_WRITER (columns it predates hold their fill value, ``seq`` the row
    number); returns the new root attribute. ``make_catalog()`` as for :func:`migrate`."""
    store = session.store
    group = await backend.open_group(store, CATALOG, mode="r")
    have = {name async for name in group.array_keys()}
    rows = (await backend.open_array(store, catalog_path("episode_id"), mode="r")).shape[0]

    async def column(name: str):
        if name not in have:
            return absent(name, 0, rows)
        return await (await backend.open_array(store, catalog_path(name), mode="r")).getitem(slice(0, rows))

    values = dict(zip(COLUMNS, await asyncio.gather(*(column(c) for c in COLUMNS))))
    await (await backend.open_group(store, mode="r+")).delitem(CATALOG)  # make_catalog makes it anew
    await _fill(await make_catalog(), values, rows)
    streams = await backend.open_group(store, STREAMS, mode="r")
    for name in sorted([n async for n in streams.group_keys()]):
        await (await backend.open_group(store, stream_path(name), mode="r+")).update_attributes({"writer": MIGRATED_WRITER})
    return await _set_version(store, info)


async def _fill(catalog: dict, values: dict, rows: int) -> None:
    """Write ``rows`` rows of ``values`` into the new, empty catalog partition ``catalog``."""
    await asyncio.gather(*(arr.resize((rows,)) for arr in catalog.values()))
    if rows:
        await asyncio.gather(*(catalog[c].setitem(slice(0, rows), values[c]) for c in catalog))


async def _set_version(store, info: dict) -> dict:
    new_info = {**info, "store_schema_version": STORE_SCHEMA_VERSION}
    await (await backend.open_group(store, mode="r+")).update_attributes({ROOT_ATTR: new_info})
    return new_info


async def _migrate_stream(store, info: dict, sig: StreamSignature, entries: list[tuple[int, EpisodeInfo]]) -> None:
    arrays = await asyncio.gather(*(backend.open_array(store, data_path(sig.name, s.name), mode="r+") for s in sig.arrays))
    for spec, arr in zip(sig.arrays, arrays):
        await save_metadata(arr.store_path, dataclasses.replace(arr.metadata, dimension_names=dimension_names(spec)))
    rows = arrays[0].shape[0]
    mask = np.full(rows, -1, np.int32)
    for k, e in entries:
        mask[e.row : e.row + e.num_steps + 1] = k
    group = await backend.open_group(store, stream_path(sig.name), mode="r+")
    await group.update_attributes({"writer": MIGRATED_WRITER})
    index = await group.create_array(
        f"data/{EPISODE_INDEX}", shape=(rows,), chunks=(info["chunk_rows"],), dtype="int32", fill_value=-1,
        compressors=backend.compressors(info["compression"]), dimension_names=("step",),
    )  # fmt: skip
    if rows:
        await index.setitem(slice(0, rows), mask)
    await group.delitem("index")
