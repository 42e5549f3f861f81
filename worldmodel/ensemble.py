"""The probabilistic dynamics ensemble (PETS / MBPO class), vectorised over its K members.

Each member is a Gaussian MLP: from (obs, action) it predicts a mean and a log-variance of
(obs_{t+1} - obs_t, reward_t), plus a termination logit. All K members run as one batched
matmul per layer (weights (K, in, out)), never a Python loop over members.

Units: inputs and targets are standardised by two :class:`Normalizer` s fitted on the
training transitions; ``forward`` works in those normalised units, ``predict`` takes raw
observations and actions and returns raw units.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from worldmodel.normalizer import SPREAD, Normalizer

ACTIVATIONS = {"silu": F.silu, "relu": F.relu, "tanh": torch.tanh, "elu": F.elu}
_INPLACE = {"silu": lambda h: F.silu(h, inplace=True), "relu": torch.relu_, "tanh": torch.tanh_, "elu": lambda h: F.elu(h, inplace=True)}


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    """Hyper-parameters of the ensemble (the data-dependent dims live in :class:`ModelSpec`)."""

    ensemble_size: int = 5  # K members
    num_elites: int = 3  # members used for sampling, chosen on held-out episodes
    hidden_size: int = 128  # (MBPO uses 7/5 members of 4x200; this size is what 2 CPU cores train in a minute)
    num_hidden_layers: int = 3
    activation: str = "silu"
    init_max_logvar: float = 0.5  # soft bounds on the predicted log-variance (learned, PETS)
    init_min_logvar: float = -10.0

    def __post_init__(self):
        if self.ensemble_size < 1 or not 1 <= self.num_elites <= self.ensemble_size:
            raise ValueError(
                f"ensemble: need ensemble_size >= 1 and 1 <= num_elites <= ensemble_size, got {self.ensemble_size}, {self.num_elites}"
            )
        if self.hidden_size < 1 or self.num_hidden_layers < 1:
            raise ValueError(f"ensemble: hidden_size and num_hidden_layers must be >= 1, got {self.hidden_size}, {self.num_hidden_layers}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ensemble: activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if not self.init_min_logvar < self.init_max_logvar:
            raise ValueError("ensemble: init_min_logvar must be below init_max_logvar")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild an (untrained) ensemble: the robot, its dims, the config."""

    robot: str
    obs_dim: int
    act_dim: int
    ensemble: EnsembleConfig = EnsembleConfig()
    # features of the body each transition came from (sim.variation.VariationProfile.context), an
    # input besides obs and action, so one model can tell a fleet's bodies apart; 0: unconditioned
    context_dim: int = 0

    @property
    def in_dim(self) -> int:
        return self.obs_dim + self.act_dim + self.context_dim

    @property
    def out_dim(self) -> int:
        """Gaussian outputs: obs delta (obs_dim) and reward (1)."""
        return self.obs_dim + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"model spec: unknown fields {sorted(unknown)}")
        data["ensemble"] = EnsembleConfig(**data.get("ensemble", {}))
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class EnsembleLinear(nn.Module):
    """K independent linear layers as one batched matmul: (K, B, in) -> (K, B, out)."""

    def __init__(self, k: int, d_in: int, d_out: int, generator: torch.Generator | None = None):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(k, d_in, d_out).uniform_(-bound, bound, generator=generator))
        self.bias = nn.Parameter(torch.empty(k, 1, d_out).uniform_(-bound, bound, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


@dataclasses.dataclass
class Prediction:
    """Per-member predictions in raw units for a batch of B (obs, action) pairs.

    delta_mean, delta_std: (K, B, obs_dim); reward_mean, reward_std: (K, B);
    term_logit: (K, B); norm_delta_mean: (K, B, obs_dim) the delta mean in normalised units
    (what the disagreement is measured on).
    """

    delta_mean: torch.Tensor
    delta_std: torch.Tensor
    reward_mean: torch.Tensor
    reward_std: torch.Tensor
    term_logit: torch.Tensor
    norm_delta_mean: torch.Tensor


def as_float32(x, device: torch.device) -> torch.Tensor:
    """``x`` (a tensor, a numpy array, a list) as a float32 tensor on ``device``. A numpy view with negative strides
    (``a[::-1]``), which torch cannot take, is copied first."""
    if isinstance(x, np.ndarray) and any(stride < 0 for stride in x.strides):
        x = np.ascontiguousarray(x)
    return torch.as_tensor(x, dtype=torch.float32, device=device)


def disagreement(norm_delta_mean: torch.Tensor) -> torch.Tensor:
    """(M, B, obs_dim) members' mean obs change (normalised) -> (B,) std across members, RMS over dims.

    Non-finite values give +inf (never NaN), so a threshold test treats them as untrusted.
    """
    if norm_delta_mean.shape[0] < 2:  # one member: nothing to disagree with, but a non-finite prediction is still untrusted
        finite = torch.isfinite(norm_delta_mean[0]).all(-1)
        return torch.where(finite, 0.0, float("inf")).to(norm_delta_mean.dtype)
    # the variance across members written out: torch's std over a short leading dim is 30-90x slower on a CPU
    # (18 ms against 0.45 ms for 5 members x 5,000 rows x 17 dims), and this runs at every rollout step
    centred = norm_delta_mean - norm_delta_mean.mean(0)
    dis = centred.square().mean(0).mean(-1).sqrt()
    return torch.where(torch.isfinite(dis), dis, torch.full_like(dis, float("inf")))


class DynamicsEnsemble(nn.Module):
    """K Gaussian MLPs over (obs, action) -> (obs delta, reward) + termination logit.

    Buffers besides the weights: the input/output normalisers, ``elites`` (num_elites,) the
    member indices used for sampling, and ``obs_low``/``obs_high`` (obs_dim,) the range of
    observations seen in training (the rollout envelope: :meth:`envelope`).
    """

    def __init__(self, spec: ModelSpec, seed: int = 0):
        super().__init__()
        self.spec = spec
        cfg = spec.ensemble
        gen = torch.Generator().manual_seed(seed)
        k, h = cfg.ensemble_size, cfg.hidden_size
        dims = [spec.in_dim] + [h] * cfg.num_hidden_layers
        self.hidden = nn.ModuleList(EnsembleLinear(k, a, b, gen) for a, b in zip(dims[:-1], dims[1:]))
        self.head = EnsembleLinear(k, h, 2 * spec.out_dim + 1, gen)
        self.act = ACTIVATIONS[cfg.activation]
        self._act_inplace = _INPLACE[cfg.activation]
        self.max_logvar = nn.Parameter(torch.full((spec.out_dim,), cfg.init_max_logvar))
        self.min_logvar = nn.Parameter(torch.full((spec.out_dim,), cfg.init_min_logvar))
        self.input_norm = Normalizer(spec.in_dim)
        self.output_norm = Normalizer(spec.out_dim)
        self.register_buffer("elites", torch.arange(cfg.num_elites, dtype=torch.int64))
        # empty until training data widens it: an untrained model trusts no prediction
        self.register_buffer("obs_low", torch.full((spec.obs_dim,), math.inf))
        self.register_buffer("obs_high", torch.full((spec.obs_dim,), -math.inf))

    def envelope(self, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) (obs_dim,) the observations a rollout may reach: the training range widened by ``margin`` x its
        width on each side. A range narrower than ``SPREAD`` x (1 + |value|) (a dimension that never varied in the
        data: a planar arm's fingertip z, a touch sensor that never fired) is widened to that about its middle first:
        with no width, the model's 1e-9 predicted change of such a dimension left it and cut every rollout at step 0.
        An untrained model's range stays empty."""
        low, high = self.obs_low, self.obs_high
        floor = SPREAD * (1.0 + torch.maximum(low.abs(), high.abs()))
        narrow = (high >= low) & (high - low < floor)
        middle = 0.5 * (low + high)
        low, high = torch.where(narrow, middle - 0.5 * floor, low), torch.where(narrow, middle + 0.5 * floor, high)
        width = high - low
        return low - margin * width, high + margin * width

    @property
    def ensemble_size(self) -> int:
        return self.spec.ensemble.ensemble_size

    @property
    def device(self) -> torch.device:
        return self.max_logvar.device

    def forward(self, x_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_norm (K, B, in_dim) normalised -> mean (K, B, out_dim), logvar (K, B, out_dim), term_logit (K, B)."""
        h = x_norm
        for layer in self.hidden:
            h = self.act(layer(h))
        mean, raw_logvar, term_logit = self._split(self.head(h))
        return mean, self.bound_logvar(raw_logvar), term_logit

    @torch.no_grad()
    def forward_members(self, x_norm: torch.Tensor, members: torch.Tensor | None = None):
        """Inference for a subset of members (all when None): x_norm (B, in_dim) normalised ->
        mean (M, B, out_dim), raw_logvar (M, B, out_dim) (pass it through :meth:`bound_logvar`), term_logit (M, B).

        Activations run in place and the log-variance is left unbounded, so a caller that needs
        it for only some rows pays for only those.
        """
        layers = [*self.hidden, self.head]
        weights = [(m.weight, m.bias) if members is None else (m.weight[members], m.bias[members]) for m in layers]
        h = x_norm.unsqueeze(0).expand(weights[0][0].shape[0], -1, -1)
        for w, b in weights[:-1]:
            h = self._act_inplace(torch.baddbmm(b, h, w))
        return self._split(torch.baddbmm(weights[-1][1], h, weights[-1][0]))

    def _split(self, out: torch.Tensor):
        d = self.spec.out_dim
        return out[..., :d], out[..., d : 2 * d], out[..., 2 * d]

    def bound_logvar(self, raw_logvar: torch.Tensor) -> torch.Tensor:
        """Soft-clamp into [min_logvar, max_logvar] (PETS), any leading shape (..., out_dim)."""
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw_logvar)
        return self.min_logvar + F.softplus(logvar - self.min_logvar)

    def raw_inputs(self, obs: torch.Tensor, action: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """obs (B, obs_dim), action (B, act_dim), context (B, context_dim) of a conditioned model -> (B, in_dim)."""
        if (context is None) != (self.spec.context_dim == 0):
            raise ValueError(
                f"this world model takes a context of {self.spec.context_dim} features per row; "
                + ("pass context=" if context is None else "it is unconditioned: pass no context")
            )
        return torch.cat([obs, action] if context is None else [obs, action, context.to(obs)], dim=-1)

    def inputs(self, obs: torch.Tensor, action: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """obs (B, obs_dim), action (B, act_dim)[, context] -> normalised inputs (K, B, in_dim) (a broadcast view)."""
        x = self.input_norm.normalize(self.raw_inputs(obs, action, context))
        return x.unsqueeze(0).expand(self.ensemble_size, -1, -1)

    def rows(self, obs, action, context=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """obs (B, obs_dim), action (B, act_dim)[, context (B, context_dim)] (tensors or numpy arrays) as float32 tensors
        on the model's device; a ValueError naming the one of another shape (numpy once gave a TypeError, a wrong
        width a size mismatch inside the normaliser)."""
        out = [None if x is None else as_float32(x, self.device) for x in (obs, action, context)]
        batch = out[0].shape[0] if out[0].ndim == 2 else -1
        for name, x, dim in zip(("obs", "action", "context"), out, (self.spec.obs_dim, self.spec.act_dim, self.spec.context_dim)):
            if x is not None and dim and tuple(x.shape) != (batch, dim):  # a context for an unconditioned model: raw_inputs says so
                rows = "" if name == "obs" else f", B = {batch} as obs has"
                raise ValueError(f"{name} must be (B, {dim}){rows}, got {tuple(x.shape)}")
        return out[0], out[1], out[2]

    def predict(self, obs: torch.Tensor, action: torch.Tensor, context: torch.Tensor | None = None) -> Prediction:
        """Every member's prediction for obs (B, obs_dim), action (B, act_dim)[, context (B, context_dim)] (tensors or
        numpy arrays: :meth:`rows`), in raw units."""
        mean, logvar, term_logit = self(self.inputs(*self.rows(obs, action, context)))
        std_norm = torch.exp(0.5 * logvar)
        raw_mean = self.output_norm.denormalize(mean)
        raw_std = std_norm * self.output_norm.std
        o = self.spec.obs_dim
        return Prediction(
            delta_mean=raw_mean[..., :o],
            delta_std=raw_std[..., :o],
            reward_mean=raw_mean[..., o],
            reward_std=raw_std[..., o],
            term_logit=term_logit,
            norm_delta_mean=mean[..., :o],
        )

    @torch.no_grad()
    def disagreement(self, obs: torch.Tensor, action: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) disagreement of all members at obs (B, obs_dim), action (B, act_dim); see :func:`disagreement`."""
        return disagreement(self.predict(obs, action, context).norm_delta_mean)

    @torch.no_grad()
    def mean_step(self, obs: torch.Tensor, action: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Deterministic step: the elites' average mean. Returns next_obs (B, obs_dim), reward (B,) (tensors, for numpy in too)."""
        obs, action, context = self.rows(obs, action, context)
        pred = self.predict(obs, action, context)
        elites = self.elites
        return obs + pred.delta_mean[elites].mean(0), pred.reward_mean[elites].mean(0)
