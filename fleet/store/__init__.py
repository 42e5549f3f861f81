"""Episode store: Zarr v3 arrays in an Icechunk repository (layout: docs/store.md).

This package is the only code that calls zarr or icechunk. Entry points:

* :class:`StoreConfig` - where the store lives and how it writes (a Hydra ``_target_``)
* :class:`EpisodeStore` - ``create`` / ``open`` / ``open_or_create``; ``append`` commits
  episodes atomically and idempotently; ``snapshot()`` pins a read-only view
* :class:`StoreSnapshot` - catalog, filters (robot, source, time), episodes, transitions
* :class:`Withdrawal` - a rule that keeps episodes out of training (``EpisodeStore.withdraw``/``restore``)
* :mod:`fleet.store.dataset` - torch Dataset over a pinned snapshot, split by episode

Only :mod:`fleet.store.config` loads eagerly; the rest imports zarr/icechunk on first use.
"""

from __future__ import annotations

from sim.lazy import lazy_getattr

from fleet.store.config import StoreConfig

_LAZY = {
    "EpisodeStore": "fleet.store.writer",
    "AppendResult": "fleet.store.writer",
    "canonical_digest": "fleet.store.writer",
    "StoreSnapshot": "fleet.store.reader",
    "EpisodeInfo": "fleet.store.reader",
    "TransitionTable": "fleet.store.reader",
    "StoreCorruptionError": "fleet.store.reader",
    "UnknownSnapshotError": "fleet.store.backend",
    "StoreBusyError": "fleet.store.backend",
    "Withdrawal": "fleet.store.withdrawal",
}


__getattr__ = lazy_getattr("fleet.store", _LAZY)


__all__ = ["StoreConfig", *_LAZY]
