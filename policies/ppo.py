"""Proximal policy optimisation (on-policy) on the batched MuJoCo stepper.

The algorithm side of :class:`policies.trainer.Trainer`: every vector step goes into a
rollout of ``n_steps`` x N worlds; when it is full, :meth:`PPO.update` computes GAE
advantages and runs ``epochs`` passes of clipped-surrogate minibatch updates.

Squashed Gaussian actions: the rollout keeps the pre-tanh sample u, so the probability
ratio is exp(log N_new(u) - log N_old(u)) (the tanh Jacobian cancels). A truncated step
bootstraps: its reward gets ``gamma * V(final observation)``; a terminated one does not.
The observation statistics are frozen during a rollout and its update and folded in after,
so the stored log-probabilities and values stay consistent.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from policies.checkpoint import load_module_state, load_optimizer_state, module_state, optimizer_state
from policies.networks import MLP, Policy, PolicySpec, SquashedGaussianActor, check_network, gaussian_log_prob, orthogonal_init_, seeded_init
from policies.parallel import LocalComm
from policies.transition import VectorStep, check_world_count, world_rows
from sim.config_rules import AT_LEAST_1, NON_NEGATIVE, POSITIVE, UNIT, check_fields


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    hidden_sizes: tuple[int, ...] = (64, 64)
    activation: str = "tanh"
    normalize_obs: bool = True
    n_steps: int = 64  # vector steps per rollout (rollout size: n_steps x num_worlds)
    epochs: int = 10
    minibatch_size: int = 512
    lr: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    log_std_init: float = 0.0
    normalize_advantages: bool = True

    def __post_init__(self):
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        check_fields(
            self, n_steps=AT_LEAST_1, epochs=AT_LEAST_1, minibatch_size=AT_LEAST_1, lr=POSITIVE, gamma=UNIT, gae_lambda=UNIT,
            clip_range=POSITIVE, ent_coef=NON_NEGATIVE, vf_coef=NON_NEGATIVE, max_grad_norm=POSITIVE,
        )  # fmt: skip
        check_network(self.activation, self.hidden_sizes)


class _PPOLoss(nn.Module):
    """What DDP wraps: (obs_n (B, D), u (B, A)) -> log N(u) (B,), entropy (B,), value (B,)."""

    def __init__(self, actor: SquashedGaussianActor, value: MLP):
        super().__init__()
        self.actor, self.value = actor, value

    def forward(self, obs_n: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_std = self.actor(obs_n)
        entropy = (log_std + 0.5 * (1.0 + math.log(2 * math.pi))).sum(-1)  # of the pre-tanh Gaussian
        return gaussian_log_prob(mean, log_std, u), entropy, self.value(obs_n).squeeze(-1)


class PPO:
    """Clipped-surrogate PPO with GAE, one optimiser over actor and value networks."""

    name = "ppo"

    def __init__(
        self,
        spec: PolicySpec,
        config: PPOConfig = PPOConfig(),
        *,
        num_worlds: int,
        seed: int = 0,
        comm: LocalComm | None = None,
        device: str | torch.device = "cpu",
    ):
        self.config, self.spec, self.comm, self.num_worlds = config, spec, comm or LocalComm(), num_worlds
        self.device = dev = torch.device(device)
        with seeded_init(seed):  # same initial weights on every rank, whatever its thread count
            actor = SquashedGaussianActor(
                spec.obs_dim, spec.act_dim, spec.hidden_sizes, spec.activation, state_dependent_std=False, log_std_init=config.log_std_init
            )
            orthogonal_init_(actor.trunk)
            nn.init.orthogonal_(actor.mean.weight, 0.01)
            nn.init.zeros_(actor.mean.bias)
            self.policy = Policy(spec, actor)
            self.value = MLP(spec.obs_dim, spec.hidden_sizes, 1, spec.activation)
            orthogonal_init_(self.value, last_gain=1.0)
        self.policy.to(dev)
        self.value.to(dev)
        self.comm.broadcast_(self.policy)
        self.comm.broadcast_(self.value)
        self.loss_module = _PPOLoss(self.policy.actor, self.value)
        self.train_module = self.comm.wrap(self.loss_module)
        self.opt = torch.optim.Adam(self.loss_module.parameters(), lr=config.lr, eps=1e-5, fused=True)
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + self.comm.rank)  # CPU stream; draws are moved
        t, n, d, a = config.n_steps, num_worlds, spec.obs_dim, spec.act_dim
        self.buf = {
            "obs": torch.zeros(t, n, d, device=dev),
            "u": torch.zeros(t, n, a, device=dev),
            "logp": torch.zeros(t, n, device=dev),
            "value": torch.zeros(t, n, device=dev),
            "reward": torch.zeros(t, n, device=dev),
            "done": torch.zeros(t, n, device=dev),
        }
        self.t = 0
        self.updates = 0
        self._pending: tuple[torch.Tensor, ...] | None = None
        self._last_obs: torch.Tensor | None = None

    # -- acting ----------------------------------------------------------------------------
    def explore(self, obs: np.ndarray) -> np.ndarray:
        """Sample actions (N, A) for obs (N, D), N = ``num_worlds``; remembers u, log N(u) and V(obs) for :meth:`observe`."""
        obs_t = torch.from_numpy(world_rows(obs, self.spec.obs_dim, self.num_worlds)).to(self.device)
        with torch.no_grad():
            obs_n = self.policy.normalizer(obs_t)
            mean, log_std = self.policy.actor(obs_n)
            u = mean + log_std.exp() * torch.randn(mean.shape, generator=self.gen).to(self.device)
            logp = gaussian_log_prob(mean, log_std, u)
            value = self.value(obs_n).squeeze(-1)
        self._pending = (obs_t, u, logp, value)
        return torch.tanh(u).cpu().numpy()

    def observe(self, step: VectorStep) -> None:
        step.check_widths(self.spec.obs_dim, self.spec.act_dim)
        check_world_count("VectorStep: rows", len(step.reward), self.num_worlds)
        if self._pending is None:
            raise RuntimeError("PPO.observe() needs the explore() call that produced the step's actions")
        obs_t, u, logp, value = self._pending
        self._pending = None
        reward = torch.from_numpy(step.reward.astype(np.float32)).to(self.device)
        if step.truncated.any():  # time limit: bootstrap from the final observation
            idx = np.flatnonzero(step.truncated)
            with torch.no_grad():
                final_v = self.value(self.policy.normalizer(torch.from_numpy(step.final_obs[idx]).to(self.device))).squeeze(-1)
            reward = reward.clone()
            reward[torch.from_numpy(idx).to(self.device)] += self.config.gamma * final_v
        b, t = self.buf, self.t
        b["obs"][t], b["u"][t], b["logp"][t], b["value"][t], b["reward"][t] = obs_t, u, logp, value, reward
        b["done"][t] = torch.from_numpy((step.terminated | step.truncated).astype(np.float32)).to(self.device)
        self.t += 1
        self._last_obs = torch.from_numpy(step.next_obs).to(self.device)

    def ready(self) -> bool:
        return self.t == self.config.n_steps

    # -- learning --------------------------------------------------------------------------
    def _advantages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE over the rollout: advantages (T, N), returns (T, N)."""
        cfg, b = self.config, self.buf
        with torch.no_grad():
            last_v = self.value(self.policy.normalizer(self._last_obs)).squeeze(-1)
        adv = torch.zeros_like(b["reward"])
        running = torch.zeros(self.num_worlds, device=self.device)
        for t in reversed(range(cfg.n_steps)):
            next_v = last_v if t == cfg.n_steps - 1 else b["value"][t + 1]
            live = 1.0 - b["done"][t]
            delta = b["reward"][t] + cfg.gamma * next_v * live - b["value"][t]
            running = delta + cfg.gamma * cfg.gae_lambda * live * running
            adv[t] = running
        return adv, adv + b["value"]

    def update(self) -> dict[str, float]:
        cfg, b = self.config, self.buf
        adv, ret = self._advantages()
        flat = {
            "obs": self.policy.normalizer(b["obs"].reshape(-1, self.spec.obs_dim)),
            "u": b["u"].reshape(-1, self.spec.act_dim),
            "logp": b["logp"].reshape(-1),
            "value": b["value"].reshape(-1),
            "adv": adv.reshape(-1),
            "ret": ret.reshape(-1),
        }
        total = flat["adv"].shape[0]
        mb = min(cfg.minibatch_size, total)
        stats = dict.fromkeys(("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"), 0.0)
        count = 0
        params = list(self.loss_module.parameters())
        for _ in range(cfg.epochs):
            perm = torch.randperm(total, generator=self.gen).to(self.device)
            for start in range(0, total - mb + 1, mb):
                idx = perm[start : start + mb]
                logp, entropy, value = self.train_module(flat["obs"][idx], flat["u"][idx])
                a = flat["adv"][idx]
                if cfg.normalize_advantages:
                    a = (a - a.mean()) / (a.std() + 1e-8)
                log_ratio = logp - flat["logp"][idx]
                ratio = log_ratio.exp()
                policy_loss = -torch.min(a * ratio, a * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)).mean()
                value_loss = 0.5 * (value - flat["ret"][idx]).square().mean()
                loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy.mean()
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.opt.step()
                with torch.no_grad():  # summed on the device; read once at the end
                    stats["policy_loss"] += policy_loss.detach()
                    stats["value_loss"] += value_loss.detach()
                    stats["entropy"] += entropy.mean()
                    stats["approx_kl"] += ((ratio - 1) - log_ratio).mean()
                    stats["clip_fraction"] += ((ratio - 1).abs() > cfg.clip_range).float().mean()
                count += 1
        # fold this rollout into the observation statistics only now (see the module docstring)
        self.policy.normalizer.update(b["obs"].reshape(-1, self.spec.obs_dim), reduce=self.comm.sum)
        self.t = 0
        self.updates += 1
        var_ret = flat["ret"].var()
        explained = 1.0 - (flat["ret"] - flat["value"]).var() / var_ret if var_ret > 0 else torch.tensor(float("nan"))
        out = {f"train/{k}": float(v) / count for k, v in stats.items()}
        out["train/explained_variance"] = float(explained)
        out["train/std"] = float(self.policy.actor.log_std.detach().exp().mean())
        return out

    # -- checkpointing (between vector steps; a partly filled rollout is saved with it) -----
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {**module_state(self.policy, "policy"), **module_state(self.value, "value"), "ppo.generator": self.gen.get_state()}
        tensors.update({f"ppo.rollout.{k}": v[: self.t].clone() for k, v in self.buf.items()})
        if self._last_obs is not None:
            tensors["ppo.last_obs"] = self._last_obs.clone()
        opt_tensors, opt_meta = optimizer_state(self.opt, "opt")
        tensors.update(opt_tensors)
        return tensors, {"opt": opt_meta, "updates": self.updates, "t": self.t}

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        load_module_state(self.policy, tensors, "policy")
        load_module_state(self.value, tensors, "value")
        self.gen.set_state(tensors["ppo.generator"].clone())
        load_optimizer_state(self.opt, tensors, meta["opt"], "opt")
        self.updates, self.t = int(meta["updates"]), int(meta["t"])
        for k, v in self.buf.items():
            v[: self.t] = tensors[f"ppo.rollout.{k}"].to(self.device)
        self._last_obs = tensors["ppo.last_obs"].to(self.device) if "ppo.last_obs" in tensors else None
