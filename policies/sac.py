"""Soft actor-critic (off-policy) from a replay mixing real, sim and world-model episodes.

The algorithm side of :class:`policies.trainer.Trainer`: the trainer steps the batched
stepper and hands each vector step to :meth:`SAC.observe`; SAC stores it in its
:class:`~policies.replay.MixedReplay` and, once ``learning_starts`` env steps are in, owes
``utd_ratio`` gradient steps per env step, paid when the trainer calls :meth:`SAC.update`.

All randomness (exploration noise, replay indices, reparameterisation noise) comes from one
``torch.Generator`` whose state is checkpointed, so a resumed run is bit-identical on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from policies.checkpoint import load_module_state, load_optimizer_state, module_state, optimizer_state
from worldmodel.device import fast_bfloat16
from worldmodel.flat_params import flatten_parameters, merge_optimizer_state
from policies.networks import Policy, PolicySpec, SquashedGaussianActor, TwinQ, check_network, gaussian_log_prob_from_noise, seeded_init, tanh_log_det
from policies.parallel import LocalComm
from policies.replay import MixedReplay
from policies.transition import VectorStep, world_rows
from sim.config_rules import AT_LEAST_1, COUNT, NON_NEGATIVE, POSITIVE, RATE, UNIT, check_fields
from sim.episode import Episode
from sim.variation import contexts


@dataclasses.dataclass(frozen=True)
class SACConfig:
    hidden_sizes: tuple[int, ...] = (256, 256)
    activation: str = "relu"
    normalize_obs: bool = False
    gamma: float = 0.99
    tau: float = 0.005  # target network Polyak rate
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    init_alpha: float = 1.0
    autotune_alpha: bool = True
    target_entropy: float | None = None  # None: -act_dim
    batch_size: int = 256
    utd_ratio: float = 1.0  # gradient steps per env step (SB3's default: 1)
    learning_starts: int = 1000  # env steps of uniform random actions before learning
    buffer_size: int = 1_000_000  # capacity for online transitions
    replay_ratios: Mapping[str, float] = dataclasses.field(default_factory=lambda: {"online": 1.0})
    online_source: str = "online"  # the replay source the trainer's own transitions go to
    # std of Gaussian noise on the raw observations the actor reads in updates (the critic reads them
    # clean): a policy that holds up under sensor noise of this size, judged on the state it acts in
    actor_obs_noise: float = 0.0
    # the policy (and critic) also read each transition's body features (sim.variation.VariationProfile.context
    # of its world, episode or scenario): one policy for many bodies, told apart (policies.networks.PolicySpec)
    body_context: bool = False
    # the dtype of the hidden layers' matmuls in gradient steps: "bfloat16" is mixed precision (torch.autocast;
    # weights, output layers, losses and Adam stay float32), twice the matmul rate on CPUs with AVX512-BF16
    # or AMX; "auto" takes it where that pays (matmul_dtype). Acting and the exported policy are float32 either way
    precision: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        object.__setattr__(self, "replay_ratios", {str(k): float(v) for k, v in dict(self.replay_ratios).items()})
        check_fields(
            self, tau=RATE, gamma=UNIT, utd_ratio=POSITIVE, batch_size=AT_LEAST_1, actor_obs_noise=NON_NEGATIVE, actor_lr=POSITIVE,
            critic_lr=POSITIVE, alpha_lr=POSITIVE, init_alpha=POSITIVE, learning_starts=COUNT, buffer_size=AT_LEAST_1,
        )  # fmt: skip
        if any(not (math.isfinite(r) and r >= 0) for r in self.replay_ratios.values()) or not sum(self.replay_ratios.values()) > 0:
            raise ValueError(f"SACConfig: replay_ratios={dict(self.replay_ratios)} (must be finite shares >= 0, not all 0)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"SAC precision {self.precision!r} is not one of {list(PRECISIONS)}")
        check_network(self.activation, self.hidden_sizes)
        if self.buffer_size < self.batch_size:
            raise ValueError(f"SAC buffer_size={self.buffer_size} holds fewer transitions than one batch (batch_size={self.batch_size})")


PRECISIONS = ("auto", "float32", "bfloat16")
AUTO_BFLOAT16_WIDTH = 256  # "auto" takes bfloat16 from this hidden width: the casts cost more than they save below it


def matmul_dtype(precision: str, device: torch.device, hidden_sizes: Sequence[int]) -> torch.dtype | None:
    """The autocast dtype of SACConfig.precision on ``device`` (None: float32, no autocast). "auto" is bfloat16
    where it pays: a device with fast bfloat16 matmuls and hidden layers of AUTO_BFLOAT16_WIDTH or more (one
    core with AVX512-BF16, gradient steps/s bfloat16 vs float32: 2x256 1.3x, 2x128 1.05x, 2x64 0.75x)."""
    if precision == "auto":
        wide = max(hidden_sizes, default=0) >= AUTO_BFLOAT16_WIDTH
        return torch.bfloat16 if wide and fast_bfloat16(device) else None
    return torch.bfloat16 if precision == "bfloat16" else None


class _SampleActor(nn.Module):
    """What DDP wraps for the actor loss: (obs_n (B, D), noise (B, A)) -> action (B, A), log pi (B,)."""

    def __init__(self, actor: SquashedGaussianActor):
        super().__init__()
        self.actor = actor

    def forward(self, obs_n: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.actor(obs_n)
        u = mean + log_std.exp() * noise
        return torch.tanh(u), gaussian_log_prob_from_noise(noise, log_std) - tanh_log_det(u)


class SAC:
    """SAC with twin Q critics, target critics and an auto-tuned temperature."""

    name = "sac"

    def __init__(
        self,
        spec: PolicySpec,
        config: SACConfig = SACConfig(),
        *,
        seed: int = 0,
        offline: Mapping[str, Sequence[Episode]] | None = None,
        robot_model: str | None = None,
        comm: LocalComm | None = None,
        device: str | torch.device = "cpu",
        generated: Mapping[str, int] | None = None,
        context_of: Callable[[Episode], np.ndarray | None] | None = None,
    ):
        """``offline``: replay source -> episodes; ``generated``: replay source -> capacity of the
        sources a model-based learner fills while training (:meth:`MixedReplay.add`); ``context_of``:
        an offline episode's body features, for a conditioned policy (``spec.context_dim``)."""
        self.config, self.spec, self.comm = config, spec, comm or LocalComm()
        self.device = torch.device(device)
        with seeded_init(seed):  # same initial weights on every rank, device and thread count
            self.policy = Policy(spec, state_dependent_std=True).to(self.device)
            self.critic = TwinQ(spec.input_dim, spec.act_dim, spec.hidden_sizes, spec.activation).to(self.device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # actor and critic weights each in one buffer (worldmodel/flat_params.py), the target critic's in
        # a third: the optimiser step and the Polyak update are a few kernel calls, not one per tensor
        self._flat = [flatten_parameters(self.policy.actor.parameters()), flatten_parameters(self.critic.parameters())]
        self._polyak = ([flatten_parameters(self.critic_target.parameters(), grad=False)], [self._flat[1]])
        self.log_alpha = nn.Parameter(torch.tensor(math.log(config.init_alpha), device=self.device))
        self.target_entropy = -float(spec.act_dim) if config.target_entropy is None else float(config.target_entropy)
        self.comm.broadcast_(self.policy)
        self.comm.broadcast_(self.critic)
        self.comm.broadcast_(self.critic_target)
        self.actor_train = self.comm.wrap(_SampleActor(self.policy.actor))
        self.critic_train = self.comm.wrap(self.critic)
        # one fused Adam over actor, critic and temperature (a parameter group each): one step per update
        groups = [(self._flat[0], config.actor_lr), (self._flat[1], config.critic_lr), (self.log_alpha, config.alpha_lr)]
        self.opt = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in groups], fused=True)
        self.replay = MixedReplay(
            config.replay_ratios,
            spec.input_dim,
            spec.act_dim,
            online_source=config.online_source,
            online_capacity=config.buffer_size,
            offline=offline,
            robot_model=robot_model,
            generated=generated,
            context_dim=spec.context_dim,
            context_of=context_of,
        )
        self.world_context = np.zeros((0, spec.context_dim), np.float32)  # set_world_profiles
        # one CPU stream per rank for every random draw (noise is drawn on CPU, then moved)
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + self.comm.rank)
        self.env_steps = 0  # this rank's env steps seen by observe()
        self.grad_debt = 0.0  # gradient steps owed (utd_ratio per env step after learning_starts)
        self.gradient_steps = 0
        self._matmul_dtype = matmul_dtype(config.precision, self.device, config.hidden_sizes)

    # -- acting ----------------------------------------------------------------------------
    def set_world_profiles(self, profiles) -> None:
        """The variation profile of each world the trainer steps: a conditioned policy reads their
        features next to each world's observation (unset: the nominal body)."""
        if self.spec.context_dim:
            self.world_context = contexts(profiles)

    def inputs(self, obs: np.ndarray) -> np.ndarray:
        """What the networks read for the worlds' obs (N, D): obs, then each world's body features."""
        if not self.spec.context_dim:
            return obs
        context = self.world_context
        if not len(context):  # no profiles given: the nominal body
            context = np.zeros((len(obs), self.spec.context_dim), np.float32)
        elif len(context) != len(obs):
            raise ValueError(f"{len(obs)} worlds' observations but {len(context)} world profiles (set_world_profiles)")
        return np.concatenate([obs, context], axis=1, dtype=np.float32)

    def explore(self, obs: np.ndarray) -> np.ndarray:
        """Collection actions (N, A) for the worlds' obs (N, D): uniform before ``learning_starts``, then pi's samples."""
        obs = self.inputs(world_rows(obs, self.spec.obs_dim))
        n = obs.shape[0]
        if self.env_steps < self.config.learning_starts:
            return (torch.rand((n, self.spec.act_dim), generator=self.gen) * 2 - 1).numpy()
        with torch.no_grad():
            obs_n = self.policy.normalizer(torch.from_numpy(obs).to(self.device))
            mean, log_std = self.policy.actor(obs_n)
            u = mean + log_std.exp() * self._randn(mean.shape)
            return torch.tanh(u).cpu().numpy()

    def _randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen).to(self.device, non_blocking=True)

    def observe(self, step: VectorStep) -> None:
        """Store one vector step of the worlds (its bootstrap observation is ``step.final_obs``)."""
        step.check_widths(self.spec.obs_dim, self.spec.act_dim)
        obs = self.inputs(step.obs)
        self.replay.add_online(obs, step.action, step.reward, self.inputs(step.final_obs), step.terminated, step.truncated)
        self.policy.normalizer.update(torch.from_numpy(obs).to(self.device), reduce=self.comm.sum)
        n = len(step.reward)
        before = self.env_steps
        self.env_steps += n
        learning = max(0, self.env_steps - max(before, self.config.learning_starts))
        self.grad_debt += learning * self.config.utd_ratio

    def ready(self) -> bool:
        return self.grad_debt >= 1.0 and self.replay.can_sample()

    # -- learning --------------------------------------------------------------------------
    def update(self) -> dict[str, float]:
        """Pay the owed gradient steps; returns their mean metrics (``train/...``)."""
        steps = int(self.grad_debt)
        self.grad_debt -= steps
        totals: dict[str, torch.Tensor] = {}
        for _ in range(steps):
            for k, v in self._gradient_step().items():
                totals[k] = totals.get(k, 0.0) + v
        self.gradient_steps += steps
        out = {k: float(v) / steps for k, v in totals.items()}
        out["train/gradient_steps"] = float(self.gradient_steps)
        return out

    def _gradient_step(self) -> dict[str, torch.Tensor]:
        """One SAC step, fused: the critic, actor and temperature losses come from the same batch and
        the same (pre-step) critic, one backward pass and one Adam step update all three (as the
        original SAC computes its losses together); the actor's Q passes gradients to the action only."""
        cfg = self.config
        b = self.replay.sample(cfg.batch_size, self.gen).to(self.device)
        norm = self.policy.normalizer
        obs_n, next_n = norm(b.obs), norm(b.next_obs)
        actor_obs_n, actor_next_n = obs_n, next_n  # what the actor reads: the sensor, noisy if configured
        if cfg.actor_obs_noise:  # on the sensor's columns, not on the body context
            sensor = self._randn((2, b.obs.shape[0], self.spec.obs_dim)) * cfg.actor_obs_noise
            if self.spec.context_dim:
                sensor = torch.nn.functional.pad(sensor, (0, self.spec.context_dim))
            actor_obs_n, actor_next_n = norm(b.obs + sensor[0]), norm(b.next_obs + sensor[1])
        alpha = self.log_alpha.detach().exp()
        noise = self._randn((2, obs_n.shape[0], self.spec.act_dim))
        with torch.autocast(self.device.type, self._matmul_dtype, enabled=self._matmul_dtype is not None):  # SACConfig.precision
            with torch.no_grad():
                mean, log_std = self.policy.actor(actor_next_n)
                u = mean + log_std.exp() * noise[0]
                next_logp = gaussian_log_prob_from_noise(noise[0], log_std) - tanh_log_det(u)
                q_next = self.critic_target(next_n, torch.tanh(u)).min(0).values - alpha * next_logp
                target = b.reward + cfg.gamma * (1.0 - b.terminated) * q_next  # bootstraps through truncation
            q = self.critic_train(obs_n, b.action)
            critic_loss = 0.5 * (q - target).square().mean(1).sum()
            action, logp = self.actor_train(actor_obs_n, noise[1])
            q_pi = self.critic(obs_n, action, frozen=True).min(0).values  # no critic weight gradients from the actor loss
            actor_loss = (alpha * logp - q_pi).mean()
        for flat in self._flat:
            flat.grad.zero_()  # in place: the weights' gradients are views of it
        (critic_loss + actor_loss).backward()
        if cfg.autotune_alpha:
            # loss -log_alpha * (mean log pi + target entropy); its gradient, without an autograd pass
            self.log_alpha.grad = -(logp.detach().mean() + self.target_entropy).reshape(())
            self.comm.average_grads([self.log_alpha])
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(*self._polyak, cfg.tau)
        return {
            "train/critic_loss": critic_loss.detach(), "train/actor_loss": actor_loss.detach(), "train/alpha": alpha,
            "train/entropy": -logp.detach().mean(), "train/q": q.detach().mean(),
        }  # fmt: skip

    # -- checkpointing ---------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {
            **module_state(self.policy, "policy"),
            **module_state(self.critic, "critic"),
            **module_state(self.critic_target, "critic_target"),
            "log_alpha": self.log_alpha.detach().clone(),
            "sac.generator": self.gen.get_state(),
            **self.replay.state_tensors(),
        }
        meta = {"env_steps": self.env_steps, "grad_debt": self.grad_debt, "gradient_steps": self.gradient_steps, "replay_digests": self.replay.digests}
        t, meta["opt"] = optimizer_state(self.opt, "opt")
        tensors.update(t)
        return tensors, meta

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        self._load_learner(tensors, meta)
        self.replay.load_state_tensors(tensors, meta["replay_digests"])
        self.grad_debt = float(meta["grad_debt"])

    def continue_from(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        """Carry a previous learner (a :meth:`state`) over to new offline data: networks, optimisers,
        temperature, RNG, counters and the online and generated replay; the offline sources stay as
        this learner was built with (e.g. a newer fleet snapshot). No second warm-up: its env steps
        already passed ``learning_starts``."""
        self._load_learner(tensors, meta)
        for name in (self.replay.online_source, *self.replay.generated):
            if f"replay.{name}.cursor" in tensors:
                self.replay.sources[name].load_state_tensors(tensors, f"replay.{name}")
        self.grad_debt = 0.0

    def _load_learner(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        load_module_state(self.policy, tensors, "policy")
        load_module_state(self.critic, tensors, "critic")
        load_module_state(self.critic_target, tensors, "critic_target")
        with torch.no_grad():
            self.log_alpha.copy_(tensors["log_alpha"])
        self.gen.set_state(tensors["sac.generator"].clone())
        load_optimizer_state(self.opt, *merge_optimizer_state(tensors, meta["opt"], "opt"), "opt")
        self.env_steps, self.gradient_steps = int(meta["env_steps"]), int(meta["gradient_steps"])
