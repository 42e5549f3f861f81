"""Parameters in one contiguous buffer, so an optimiser step is one kernel call, not one per tensor.

A small SAC step at batch 256 is dominated by per-tensor overhead: Adam visits every weight and
bias of the actor and both critics. :func:`flatten_parameters` moves a list of parameters into one
buffer (their ``.data`` and ``.grad`` become views of it) and returns a parameter over the whole
buffer; an optimiser built on that parameter updates every weight at once, element for element
the same arithmetic. Autograd accumulates each weight's gradient into its view in place, so the
buffer's gradient is always the weights' gradients; clear it with ``flat.grad.zero_()`` (never
``set_to_none``, which would cut the views loose).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

_ALIGN = 16  # elements: 64 bytes of float32


def flatten_parameters(params: Iterable[nn.Parameter], *, grad: bool = True) -> nn.Parameter:
    """Move ``params`` (same dtype and device) into one buffer; returns the parameter over it.

    Values are kept. ``grad``: the gradients become views of one zeroed buffer too (``flat.grad``);
    without it (a target network) the returned parameter does not require grad."""
    params = list(params)
    if not params:
        raise ValueError("flatten_parameters needs at least one parameter")
    # each weight starts on a 64-byte boundary (BLAS kernels are slower on unaligned matrices); the
    # padding between them has zero gradient and stays zero
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + _padded(p.numel()))
    with torch.no_grad():
        flat = nn.Parameter(params[0].new_zeros(offsets[-1]), requires_grad=grad)
        for p, start in zip(params, offsets):
            flat.data[start : start + p.numel()] = p.detach().reshape(-1)
    if grad:
        flat.grad = torch.zeros_like(flat)
    for p, start in zip(params, offsets):
        p.data = flat.data[start : start + p.numel()].view_as(p)
        if grad:
            p.grad = flat.grad[start : start + p.numel()].view_as(p)
    return flat


def _padded(numel: int) -> int:
    return -(-numel // _ALIGN) * _ALIGN


def merge_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: Mapping, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state saved over separate parameters (``policies.checkpoint.optimizer_state``),
    merged to one parameter per group, as an optimiser over flattened groups keeps it: each
    per-element moment is concatenated in parameter order, laid out as :func:`flatten_parameters`
    lays out the weights; per-parameter scalars (Adam's ``step``)
    are the same for every parameter of a group and are kept once. A state already merged is
    returned as it is."""
    groups = meta["param_groups"]
    if all(len(g["params"]) == 1 for g in groups):
        return dict(tensors), dict(meta)
    head = f"{prefix}.state."
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(head):
            pid, key = name[len(head) :].split(".", 1)
            per_param.setdefault(int(pid), {})[key] = value
    out = {k: v for k, v in tensors.items() if not k.startswith(head)}
    scalars: dict[str, object] = {}
    new_groups = []
    for gi, group in enumerate(groups):
        pids = list(group["params"])
        states = [per_param.get(pid, {}) for pid in pids]
        if all(states):  # a group never stepped has no state
            for key in states[0]:
                values = [s[key] for s in states]
                out[f"{head}{gi}.{key}"] = values[0] if values[0].dim() == 0 else torch.cat([_flat_padded(v) for v in values])
            for key, value in meta["scalars"].items():
                pid, name = key.split(".", 1)
                if int(pid) == pids[0]:
                    scalars[f"{gi}.{name}"] = value
        new_groups.append({**group, "params": [gi]})
    return out, {**meta, "param_groups": new_groups, "scalars": scalars}


def _flat_padded(value: torch.Tensor) -> torch.Tensor:
    flat = value.reshape(-1)
    return torch.cat([flat, flat.new_zeros(_padded(flat.numel()) - flat.numel())])
