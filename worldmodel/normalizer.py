"""Per-feature standardisation whose statistics travel with the model (buffers in its state dict)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SPREAD = 1e-3  # a feature whose std was below this when a model was fitted never varied in its data: the model knows nothing of it


class Normalizer(nn.Module):
    """x -> (x - mean) / std per feature; std is floored so constant features stay finite.

    Buffers: mean (dim,), std (dim,). Works on any leading shape (..., dim).
    """

    def __init__(self, dim: int, min_std: float = 1e-6):
        super().__init__()
        self.min_std = float(min_std)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, data: np.ndarray | torch.Tensor) -> Normalizer:
        """Set mean/std from ``data`` (M, dim)."""
        x = torch.as_tensor(np.asarray(data, np.float64))
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0] or x.shape[0] < 1:
            raise ValueError(f"normalizer of dim {self.mean.shape[0]} needs data (M>=1, {self.mean.shape[0]}), got {tuple(x.shape)}")
        self.mean.copy_(x.mean(0).to(self.mean))
        self.std.copy_(x.std(0, correction=0).clamp_min(self.min_std).to(self.std))
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean
