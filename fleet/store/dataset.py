"""Training data from a pinned store snapshot: episode-level train/val split, torch Dataset.

The only fleet.store module that imports torch. The split is by episode, never by step:
an episode's every transition lands on the same side. It is decided by a hash of
(seed, episode_id), so an episode stays on its side as the store grows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fleet.store.reader import EpisodeInfo, StoreSnapshot, TransitionTable


def split_by_episode(infos: Sequence[EpisodeInfo], val_fraction: float, seed: int = 0) -> tuple[list[EpisodeInfo], list[EpisodeInfo]]:
    """(train, val) episode lists; an episode is in val when hash(seed, episode_id) < val_fraction."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for info in infos:
        h = int.from_bytes(hashlib.sha256(f"{seed}/{info.episode_id}".encode()).digest()[:8], "little") / 2**64
        (val if h < val_fraction else train).append(info)
    return train, val


class TransitionDataset(torch.utils.data.Dataset):
    """Flat transitions of some episodes of one pinned snapshot, held in memory.

    Item i: dict of obs (obs_dim,), action (act_dim,), next_obs (obs_dim,) float32,
    reward () float32, terminated () bool, truncated () bool.
    ``snapshot_id`` and ``episode_ids`` say exactly which data this is (log them with a run).
    """

    def __init__(self, snapshot: StoreSnapshot, infos: Sequence[EpisodeInfo]):
        self.table: TransitionTable = snapshot.transitions(infos)
        self.snapshot_id = snapshot.snapshot_id
        self.episode_ids = list(self.table.episode_ids)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.asarray(v)) for k, v in self.table.gather(np.asarray(i)).items()}

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Transitions ``idx`` (B,) stacked: obs/next_obs (B, obs_dim), action (B, act_dim), reward/terminated/truncated (B,)."""
        return {k: torch.from_numpy(v) for k, v in self.table.gather(np.asarray(idx, np.int64)).items()}

    def sample(self, batch_size: int, generator: np.random.Generator) -> dict[str, torch.Tensor]:
        """A uniform random batch of transitions (see :meth:`batch` for shapes)."""
        return self.batch(generator.integers(0, len(self), size=batch_size))

    def iterate(self, batch_size: int, *, shuffle: bool = True, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch in batches (the last may be smaller)."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        for start in range(0, len(order), batch_size):
            yield self.batch(order[start : start + batch_size])


def train_val_datasets(
    snapshot: StoreSnapshot, val_fraction: float = 0.1, seed: int = 0, **filters
) -> tuple[TransitionDataset, TransitionDataset | None]:
    """Train and val datasets of one snapshot, split by episode; ``filters`` go to :meth:`StoreSnapshot.episodes`.

    val is None when no episode falls into it (few episodes or val_fraction 0).
    """
    infos = snapshot.episodes(**filters)
    if not infos:
        raise ValueError(f"snapshot {snapshot.snapshot_id} has no episodes matching {filters}")
    train, val = split_by_episode(infos, val_fraction, seed)
    if not train:
        raise ValueError(f"all {len(infos)} episodes fell into val (val_fraction={val_fraction}); lower it or add data")
    return TransitionDataset(snapshot, train), (TransitionDataset(snapshot, val) if val else None)
