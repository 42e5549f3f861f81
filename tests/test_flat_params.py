"""Flattened parameters (policies/flat_params.py): same values, same gradients, same Adam steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from policies.checkpoint import load_optimizer_state, optimizer_state
from worldmodel.flat_params import flatten_parameters, merge_optimizer_state


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))


def _loss(net: nn.Module, seed: int) -> torch.Tensor:
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(seed))
    return net(x).square().mean()


def test_weights_become_views_and_gradients_land_in_the_buffer():
    net, reference = _net(), _net()
    flat = flatten_parameters(net.parameters())
    for p, q in zip(net.parameters(), reference.parameters()):
        assert torch.equal(p, q) and p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
        assert p.data_ptr() % 64 == 0  # each weight aligned for BLAS
    for seed in (1, 2):  # a second backward after zeroing sees only its own gradients
        flat.grad.zero_()
        reference.zero_grad()
        _loss(net, seed).backward()
        _loss(reference, seed).backward()
        for p, q in zip(net.parameters(), reference.parameters()):
            assert p.grad.data_ptr() == p.data_ptr() - flat.data_ptr() + flat.grad.data_ptr()  # a view of the buffer's gradient
            assert torch.allclose(p.grad, q.grad)
        assert float(flat.grad.abs().sum()) == pytest.approx(sum(float(q.grad.abs().sum()) for q in reference.parameters()), rel=1e-5)  # nothing else


def test_adam_over_the_buffer_steps_like_adam_over_the_weights_and_old_states_merge():
    net, reference = _net(), _net()
    flat = flatten_parameters(net.parameters())
    opt = torch.optim.Adam([flat], lr=1e-2)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for seed in range(3):
        flat.grad.zero_()
        ref_opt.zero_grad()
        _loss(net, seed).backward()
        _loss(reference, seed).backward()
        opt.step()
        ref_opt.step()
    for p, q in zip(net.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-7)
    # a checkpoint written by the per-weight optimiser loads into the flat one and continues alike
    tensors, meta = optimizer_state(ref_opt, "opt")
    resumed_net = copy.deepcopy(reference)
    resumed_flat = flatten_parameters(resumed_net.parameters())
    resumed = torch.optim.Adam([resumed_flat], lr=1e-2)
    load_optimizer_state(resumed, *merge_optimizer_state(tensors, meta, "opt"), "opt")
    assert torch.allclose(resumed.state[resumed_flat]["exp_avg_sq"], opt.state[flat]["exp_avg_sq"], atol=1e-9)
    for o, f, n in ((opt, flat, net), (resumed, resumed_flat, resumed_net)):
        f.grad.zero_()
        _loss(n, 7).backward()
        o.step()
    assert torch.allclose(resumed_flat, flat, atol=1e-7)
    # a state already merged passes through unchanged
    merged_tensors, merged_meta = optimizer_state(opt, "opt")
    assert merge_optimizer_state(merged_tensors, merged_meta, "opt") == (merged_tensors, merged_meta)
