"""Data-parallel plumbing the algorithms call, with one in-process implementation and one for
``torch.distributed`` (the process group is set up by the caller, e.g. Ray Train's TorchTrainer).

Algorithms never branch on "am I distributed": they wrap their trained modules with
:meth:`wrap` (DistributedDataParallel when distributed), sum statistics with :meth:`sum`,
and average the few gradients DDP does not own (SAC's temperature) with :meth:`average_grads`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LocalComm:
    """One process: every operation is the identity."""

    rank = 0
    world_size = 1

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def average_grads(self, params: Iterable[nn.Parameter]) -> None:
        return None

    def broadcast_(self, module: nn.Module) -> None:
        return None


class TorchDistComm(LocalComm):
    """``torch.distributed`` (gloo on CPU, nccl on GPU); the default process group must exist."""

    def __init__(self):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed has no process group: run under Ray Train's TorchTrainer "
                "(policies.distributed.fit) or call torch.distributed.init_process_group first"
            )
        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def wrap(self, module: nn.Module) -> nn.Module:
        """DistributedDataParallel: gradients are all-reduced (averaged) during backward."""
        device = next(module.parameters()).device
        if device.type == "cuda":
            return nn.parallel.DistributedDataParallel(module, device_ids=[device.index])
        return nn.parallel.DistributedDataParallel(module)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        self._dist.all_reduce(out, op=self._dist.ReduceOp.SUM)
        return out

    def average_grads(self, params: Iterable[nn.Parameter]) -> None:
        for p in params:
            if p.grad is not None:
                self._dist.all_reduce(p.grad, op=self._dist.ReduceOp.SUM)
                p.grad /= self.world_size

    def broadcast_(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                self._dist.broadcast(t.data, src=0)
