"""Observation normalisation whose statistics travel with the policy.

The running mean and variance are module buffers, so they are part of the policy's
``state_dict``: checkpoints, exports and the numpy runtime all carry them. The runtime
computes exactly ``clip((obs - mean) / sqrt(var + eps), -clip, clip)`` (see
:mod:`policies.runtime`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# sums of (count, sum x, sum x^2) across data-parallel ranks; identity in one process
MomentReduce = Callable[[torch.Tensor], torch.Tensor]


class ObsNormalizer(nn.Module):
    """Running mean/variance of observations (Chan et al. parallel update, float64 accumulators).

    Buffers: ``mean`` (obs_dim,) f64, ``var`` (obs_dim,) f64, ``count`` () f64.
    ``enabled=False`` makes it the identity (the buffers stay mean 0, var 1), so every policy
    has the same exported layout. The last ``fixed_tail`` columns (a conditioned policy's body
    context, already bounded) keep mean 0, var 1: a feature every training body shares would
    otherwise get a zero variance and blow a new robot's value up to the clip.
    """

    def __init__(self, obs_dim: int, *, enabled: bool = True, clip: float = 10.0, eps: float = 1e-8, fixed_tail: int = 0):
        super().__init__()
        if not 0 <= fixed_tail <= obs_dim:
            raise ValueError(f"fixed_tail must be in [0, {obs_dim}], got {fixed_tail}")
        self.obs_dim, self.enabled, self.clip, self.eps = obs_dim, enabled, float(clip), float(eps)
        self.tracked = obs_dim - fixed_tail  # columns with running statistics
        self.register_buffer("mean", torch.zeros(obs_dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(obs_dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self._refresh()

    def _refresh(self) -> None:
        # float32 copies used on the hot path (recomputed only when the statistics change)
        self._mean32 = self.mean.to(torch.float32)
        self._inv_std32 = torch.rsqrt(self.var.to(torch.float32) + self.eps)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    @torch.no_grad()
    def update(self, obs: torch.Tensor, reduce: MomentReduce | None = None) -> None:
        """Fold a batch ``obs`` (B, obs_dim) into the statistics; ``reduce`` sums moments across ranks."""
        if not self.enabled:
            return
        x = obs.detach().to(torch.float64).reshape(-1, self.obs_dim)[:, : self.tracked]
        moments = torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device), x.sum(0), (x * x).sum(0)])
        if reduce is not None:
            moments = reduce(moments)
        n = moments[0]
        if n <= 0:
            return
        d = self.tracked
        batch_mean = moments[1 : 1 + d] / n
        batch_var = (moments[1 + d :] / n - batch_mean**2).clamp_min(0.0)
        total = self.count + n
        mean, var = self.mean[:d], self.var[:d]
        delta = batch_mean - mean
        mean += delta * n / total
        var.copy_((var * self.count + batch_var * n + delta**2 * self.count * n / total) / total)
        self.count.copy_(total)
        self._refresh()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """(B, obs_dim) raw -> (B, obs_dim) normalised float32 (unchanged when disabled)."""
        if not self.enabled:
            return obs
        return ((obs - self._mean32) * self._inv_std32).clamp(-self.clip, self.clip)

    def _apply(self, fn, recurse=True):  # .to(device) also moves the float32 copies
        out = super()._apply(fn, recurse)
        self._refresh()
        return out
