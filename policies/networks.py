"""Networks: MLP trunks, the squashed Gaussian actor, critics, and the exportable Policy.

Shapes: B is the batch, D = obs_dim, A = act_dim; a body-conditioned policy (``context_dim`` C > 0,
:class:`PolicySpec`) reads D + C inputs: the observation, then the robot's calibrated body features
(:meth:`sim.variation.VariationProfile.context`), as in Rapid Motor Adaptation. Actions live in [-1, 1] (the sim floor's
normalised actuator range): the actor samples u ~ N(mean, std) and acts a = tanh(u).

Only :class:`Policy` (normaliser + actor trunk + mean head) is exported; its deterministic
action ``tanh(mean(normalise(obs)))`` is what :mod:`policies.runtime` recomputes in numpy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from policies.normalizer import ObsNormalizer

ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu}  # policies.runtime mirrors this table


def check_network(activation: str, hidden_sizes) -> None:
    """A ValueError naming the field unless ``activation`` is known and ``hidden_sizes`` are positive: checked where a
    learner's config is made, not when its first network is built (in the loop: after an iteration's data and models)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
    if not hidden_sizes or any(int(h) < 1 for h in hidden_sizes):
        raise ValueError(f"hidden_sizes {list(hidden_sizes)} must be one or more layer widths >= 1")


LOG_2PI = math.log(2 * math.pi)


def float32_head(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Where a mixed-precision gradient step (``torch.autocast``) runs the hidden layers in bfloat16, the
    output layers run in float32 under this context: Q-values, action means and log-stds keep their full
    precision (they cost one thin matmul each). A no-op outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What an exported policy is: enough to rebuild it and to check a robot can run it."""

    obs_dim: int
    act_dim: int
    hidden_sizes: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    normalize_obs: bool = True
    obs_clip: float = 10.0
    obs_eps: float = 1e-8
    # > 0: the policy also reads its robot's body features (sim.variation.CONTEXT_FIELDS) after the
    # observation; the robot gets them, calibrated and signed, with each release (docs/policies.md)
    context_dim: int = 0

    @property
    def input_dim(self) -> int:
        """What the networks read: the observation, then the body context."""
        return self.obs_dim + self.context_dim

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.obs_dim < 1 or self.act_dim < 1 or self.context_dim < 0 or not all(h > 0 for h in self.hidden_sizes):
            raise ValueError(f"policy spec needs positive sizes, got obs_dim={self.obs_dim}, act_dim={self.act_dim}, hidden={self.hidden_sizes}")


class MLP(nn.Module):
    """Linear layers ``layers.0 .. layers.K`` with ``activation`` between them (none after the last).

    in (B, in_dim) -> out (B, out_dim); ``out_dim=None`` ends with the last hidden layer (activated).
    """

    def __init__(self, in_dim: int, hidden_sizes: tuple[int, ...], out_dim: int | None, activation: str):
        super().__init__()
        sizes = [in_dim, *hidden_sizes] + ([out_dim] if out_dim is not None else [])
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = ACTIVATIONS[activation]
        self.activate_last = out_dim is None
        self.out_dim = sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last or self.activate_last:
                x = self.act(x)
        return x


class SquashedGaussianActor(nn.Module):
    """pi(a|s): u ~ N(mean(s), std), a = tanh(u).

    ``state_dependent_std=True`` (SAC): a head predicts log_std, clamped to ``log_std_bounds``.
    ``False`` (PPO): one learned log_std per action dimension.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: tuple[int, ...],
        activation: str,
        *,
        state_dependent_std: bool,
        log_std_init: float = 0.0,
        log_std_bounds: tuple[float, float] = (-20.0, 2.0),
    ):
        super().__init__()
        self.trunk = MLP(obs_dim, hidden_sizes, None, activation)
        self.mean = nn.Linear(self.trunk.out_dim, act_dim)
        self.state_dependent_std = state_dependent_std
        self.log_std_bounds = log_std_bounds
        if state_dependent_std:
            self.log_std_head = nn.Linear(self.trunk.out_dim, act_dim)
        else:
            self.log_std = nn.Parameter(torch.full((act_dim,), float(log_std_init)))

    def forward(self, obs_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs_n (B, D) normalised -> mean (B, A), log_std (B, A) of the pre-tanh Gaussian."""
        h = self.trunk(obs_n)
        with float32_head(h):
            h = h.float()
            mean = self.mean(h)
            if self.state_dependent_std:
                log_std = self.log_std_head(h).clamp(*self.log_std_bounds)
            else:
                log_std = self.log_std.expand_as(mean)
        return mean, log_std

    def deterministic(self, obs_n: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, A) = tanh(mean): the action a robot runs."""
        return torch.tanh(self.mean(self.trunk(obs_n)))

    def sample(self, obs_n: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample: (action (B, A) in (-1, 1), log pi(action) (B,) with the tanh correction)."""
        mean, log_std = self(obs_n)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)  # a CPU generator: the same draws on any device
        u = mean + log_std.exp() * noise
        logp = gaussian_log_prob_from_noise(noise, log_std) - tanh_log_det(u)
        return torch.tanh(u), logp


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """log N(u; mean, exp(log_std)) summed over the last axis: (B, A) -> (B,)."""
    z = (u - mean) * torch.exp(-log_std)
    return gaussian_log_prob_from_noise(z, log_std)


def gaussian_log_prob_from_noise(z: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return (-0.5 * z * z - log_std - 0.5 * LOG_2PI).sum(-1)


def tanh_log_det(u: torch.Tensor) -> torch.Tensor:
    """sum log(1 - tanh(u)^2), computed stably: (B, A) -> (B,)."""
    return (2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))).sum(-1)


class TwinQ(nn.Module):
    """An ensemble of ``n`` Q-networks evaluated as one batched matmul per layer.

    Parameters ``weight_i`` (n, in, out), ``bias_i`` (n, 1, out). (obs_n (B, D), act (B, A)) -> q (n, B).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden_sizes: tuple[int, ...], activation: str, n: int = 2):
        super().__init__()
        sizes = [obs_dim + act_dim, *hidden_sizes, 1]
        self.n, self.act = n, ACTIVATIONS[activation]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(a)  # nn.Linear's default initialisation
            self.weights.append(nn.Parameter(torch.empty(n, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, b).uniform_(-bound, bound)))

    def forward(self, obs_n: torch.Tensor, act: torch.Tensor, *, frozen: bool = False) -> torch.Tensor:
        """``frozen=True``: gradients flow to the inputs only, not to this network's parameters."""
        x = torch.cat([obs_n, act], -1).unsqueeze(0).expand(self.n, -1, -1)
        layers = [(w.detach(), b.detach()) if frozen else (w, b) for w, b in zip(self.weights, self.biases)]
        for w, b in layers[:-1]:
            # bmm, then the bias added (in the matmul's dtype, bfloat16 under autocast): a CPU baddbmm
            # first copies the broadcast bias into its output, slowly
            x = torch.bmm(x, w)
            x = self.act(x + b.to(x.dtype))
        w, b = layers[-1]
        with float32_head(x):
            # (n, B, H) . (n, 1, H) -> (n, B): a product and a sum, where a (H, 1) matmul and its gradients
            # would be matrix-vector calls an order of magnitude slower on a CPU
            return (x.float() * w.mT).sum(-1) + b.squeeze(-1)


class Policy(nn.Module):
    """The exportable policy: raw obs (B, D) (+ body context (B, C) after it, when
    ``context_dim`` > 0) -> deterministic action (B, A) in [-1, 1].

    Holds the normaliser (statistics travel with it; the context columns pass through it
    unchanged) and the actor. A torch ``nn.Module``, so ``sim.batched.BatchedStepper.simulate(scenarios,
    policy)`` runs it directly (and hands a conditioned one each world's context).
    """

    def __init__(self, spec: PolicySpec, actor: SquashedGaussianActor | None = None, *, state_dependent_std: bool = True):
        super().__init__()
        self.spec = spec
        self.context_dim = spec.context_dim  # read by sim.policy_fn: the stepper appends each world's context
        self.normalizer = ObsNormalizer(spec.input_dim, enabled=spec.normalize_obs, clip=spec.obs_clip, eps=spec.obs_eps, fixed_tail=spec.context_dim)
        self.actor = actor or SquashedGaussianActor(
            spec.input_dim, spec.act_dim, spec.hidden_sizes, spec.activation, state_dependent_std=state_dependent_std
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.actor.deterministic(self.normalizer(obs))

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a robot needs, by their exported names (see :mod:`policies.runtime`)."""
        out = {
            "normalizer.mean": self.normalizer.mean.to(torch.float32),
            "normalizer.var": self.normalizer.var.to(torch.float32),
        }
        for i, layer in enumerate(self.actor.trunk.layers):
            out[f"trunk.{i}.weight"], out[f"trunk.{i}.bias"] = layer.weight, layer.bias
        out["mean.weight"], out["mean.bias"] = self.actor.mean.weight, self.actor.mean.bias
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}

    def load_export_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`export_tensors` (the log-std head, not exported, is left as is)."""
        with torch.no_grad():
            self.normalizer.mean.copy_(tensors["normalizer.mean"].to(torch.float64))
            self.normalizer.var.copy_(tensors["normalizer.var"].to(torch.float64))
            self.normalizer._refresh()
            for i, layer in enumerate(self.actor.trunk.layers):
                layer.weight.copy_(tensors[f"trunk.{i}.weight"])
                layer.bias.copy_(tensors[f"trunk.{i}.bias"])
            self.actor.mean.weight.copy_(tensors["mean.weight"])
            self.actor.mean.bias.copy_(tensors["mean.bias"])


@contextlib.contextmanager
def seeded_init(seed: int):
    """Build networks inside: torch's global RNG seeded with ``seed`` and one intra-op thread, both restored after, so
    a seed gives the same initial weights on every rank, device and machine. Orthogonal init is a QR decomposition,
    which LAPACK splits by thread count: a 64x64 PPO net once differed between 1 and 2 threads, and so did every run
    from it (the trainer's ``torch_threads`` is applied after the learner is built)."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def orthogonal_init_(module: nn.Module, gain: float = math.sqrt(2), last_gain: float | None = None) -> None:
    """Orthogonal weights, zero biases for every nn.Linear in ``module`` (the last one gets ``last_gain``)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    for i, layer in enumerate(linears):
        g = last_gain if (last_gain is not None and i == len(linears) - 1) else gain
        nn.init.orthogonal_(layer.weight, g)
        nn.init.zeros_(layer.bias)
