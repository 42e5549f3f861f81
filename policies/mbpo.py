"""Model-based policy optimisation: SAC trained mostly on short world-model rollouts of the
current policy, branched from real states (MBPO, Janner et al. 2019), with a measured horizon.

On top of :class:`policies.sac.SAC` the learner owns:

* the real transitions in arrival order, each with its episode id (:class:`RealLog`), so the
  world model's validation split is by episode and open-loop errors follow real episodes;
* a :class:`worldmodel.ensemble.DynamicsEnsemble`, first fitted after ``sac.learning_starts``
  real steps, then retrained every ``model_train_every`` real steps, continuing from its weights;
* the ``model`` replay source, refilled every ``rollout_every`` real steps with rollouts of the
  *current* stochastic policy from ``rollouts_per_step * rollout_every`` real start states; it
  keeps the newest ``model_retain`` refills.

The rollout horizon H is measured, not a constant: after every retraining the elites' mean
model predicts held-out real episodes open loop from their recorded actions, and H is the
largest k <= ``max_horizon`` whose median normalised k-step error stays <= ``horizon_tolerance``
(:func:`worldmodel.evaluate.trusted_horizon`); each rollout is still cut per step where the
members disagree or a prediction leaves the training envelope (:mod:`worldmodel.rollout`).

SAC then takes ``sac.utd_ratio`` gradient steps per real step on batches of ``real_ratio`` real
and ``1 - real_ratio`` model transitions. Metrics: ``train/...`` (SAC) plus ``model/val_mse``,
``model/horizon``, ``model/k_step_error``, ``model/rollout_transitions``, ``model/refill_transitions`` (the environment steps
are the log's own axis). Refills that add nothing (every rollout cut at once) leave SAC waiting: a few in a row warn.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from policies.networks import Policy, PolicySpec
from policies.parallel import LocalComm
from policies.sac import SAC, SACConfig
from policies.transition import VectorStep
from sim.variation import CONTEXT_DIM, VariationProfile, contexts
from worldmodel.ensemble import DynamicsEnsemble, EnsembleConfig, ModelSpec
from worldmodel.evaluate import ensemble_step_fn, open_loop_errors, trusted_horizon
from worldmodel.device import resolve_device
from worldmodel.rollout import CUT_REASONS, RolloutConfig, model_rollout
from worldmodel.train import TrainConfig, fit_transitions
from worldmodel.transitions import Transitions

REAL, MODEL = "real", "model"
# The world model's first fit, at sac.learning_starts real steps, has too few for a split by episode blocks: it holds out the
# newest FIRST_FIT_HOLDOUT of them. MIN_LEARNING_STARTS leaves 8 transitions to fit (and the normalisers' spread) and 2 to
# validate on; 1 left none to fit (a crash at the first step), 2 left one, whose zero spread gave a val_mse of 6e9.
FIRST_FIT_HOLDOUT = 0.2
MIN_LEARNING_STARTS = 10
EMPTY_REFILLS_WARN = 3  # refills in a row that added nothing before the learner warns: SAC waits for model data until one does
_FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "episode", "step", "offline", "context")


@dataclasses.dataclass(frozen=True)
class MBPOConfig:
    sac: SACConfig = SACConfig(hidden_sizes=(128, 128), utd_ratio=10.0, learning_starts=150, init_alpha=0.1, precision="float32")
    ensemble: EnsembleConfig = EnsembleConfig(ensemble_size=5, num_elites=3, hidden_size=128, num_hidden_layers=3)
    model_train: TrainConfig = TrainConfig(max_steps=3000, eval_every=100, patience=5, num_threads=None)  # device auto: the learner's (make_algorithm)
    retrain_steps: int = 600  # gradient steps of each later retraining (continues from the weights)
    model_train_every: int = 250  # real steps between retrainings
    rollout_every: int = 50  # real steps between rollout refills
    rollouts_per_step: int = 40  # start states per real step of a refill
    model_retain: int = 20  # refills kept in the model replay
    real_ratio: float = 0.1  # share of real transitions in each SAC batch
    max_horizon: int = 15
    horizon_tolerance: float = 0.25  # median normalised open-loop error a trusted step may have
    disagreement_threshold: float = 1.0
    val_fraction: float = 0.2  # share of real data held out from model training (in blocks of val_block steps)
    val_block: int = 100  # steps of one episode held out or trained on together (the horizon is measured inside them)
    # the world model also reads each transition's body (its world's profile, a robot's calibrated
    # profile: sim.variation.VariationProfile.context), so pooled bodies do not blur into one
    condition_on_profile: bool = True

    def __post_init__(self):
        for name in ("sac", "ensemble", "model_train"):  # Hydra may hand in plain mappings
            value, kind = getattr(self, name), {"sac": SACConfig, "ensemble": EnsembleConfig, "model_train": TrainConfig}[name]
            if isinstance(value, Mapping):
                object.__setattr__(self, name, kind(**value))
        if self.sac.learning_starts < MIN_LEARNING_STARTS:
            raise ValueError(
                f"mbpo: sac.learning_starts={self.sac.learning_starts} is too short a warm-up: the world model is first fitted on that many real steps, "
                f"{FIRST_FIT_HOLDOUT:.0%} of them held out to validate on, and needs {MIN_LEARNING_STARTS} or more to fit on at least 8 "
                f"(fewer crashed at the first step or fitted nonsense): set sac.learning_starts to {MIN_LEARNING_STARTS} or more (the default is 150)"
            )
        if not 0 < self.real_ratio < 1:
            raise ValueError(f"mbpo: real_ratio must be in (0, 1), got {self.real_ratio}")
        for name in ("retrain_steps", "model_train_every", "rollout_every", "rollouts_per_step", "model_retain", "max_horizon", "val_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"mbpo: {name} must be >= 1, got {getattr(self, name)}")
        if self.val_block < self.max_horizon:
            raise ValueError(f"mbpo: val_block ({self.val_block}) must be >= max_horizon ({self.max_horizon}): the horizon is measured inside held-out blocks")
        if self.sac.body_context and not self.condition_on_profile:
            raise ValueError("mbpo: a body-conditioned policy (sac.body_context) needs condition_on_profile: its rollouts keep each start's body")
        if not 0 < self.val_fraction < 1 or not self.horizon_tolerance > 0:
            raise ValueError("mbpo: val_fraction must be in (0, 1) and horizon_tolerance > 0")

    # the policy spec reads the network settings from here (policies.trainer.make_spec)
    hidden_sizes = property(lambda self: self.sac.hidden_sizes)
    body_context = property(lambda self: self.sac.body_context)
    activation = property(lambda self: self.sac.activation)
    normalize_obs = property(lambda self: self.sac.normalize_obs)

    @property
    def model_capacity(self) -> int:
        return self.rollouts_per_step * self.rollout_every * self.max_horizon * self.model_retain


class RealLog:
    """Real transitions in arrival order with (episode id, step in episode) and the context features
    of the body they came from (``context_dim`` 0: none); growable numpy arrays.

    Rows come from the learner's own steps (:meth:`add`) or from recorded episodes handed in
    (:meth:`add_episode`, flagged ``offline``: the fleet's telemetry, scenario episodes)."""

    def __init__(self, obs_dim: int, act_dim: int, context_dim: int = 0):
        self.size = 0
        self.obs_dim, self.act_dim, self.context_dim = obs_dim, act_dim, context_dim
        self.arrays = self._alloc(1024)
        self.next_episode = 0
        self.world_episode = np.zeros(0, np.int64)  # per world: its current episode id
        self.world_step = np.zeros(0, np.int64)

    def _alloc(self, n: int) -> dict[str, np.ndarray]:
        d, a = self.obs_dim, self.act_dim
        shapes = {"obs": (n, d), "action": (n, a), "reward": (n,), "next_obs": (n, d), "terminated": (n,), "episode": (n,), "step": (n,), "offline": (n,),
                  "context": (n, self.context_dim)}  # fmt: skip
        types = {"terminated": bool, "episode": np.int64, "step": np.int64, "offline": bool}
        return {k: np.zeros(shapes[k], types.get(k, np.float32)) for k in _FIELDS}

    def _append(self, rows: dict[str, np.ndarray]) -> None:
        n = len(rows["reward"])
        if self.size + n > len(self.arrays["obs"]):
            grown = self._alloc(2 * (self.size + n))
            for k, v in self.arrays.items():
                grown[k][: self.size] = v[: self.size]
            self.arrays = grown
        for k, v in rows.items():
            self.arrays[k][self.size : self.size + n] = v
        self.size += n

    def add(self, step: VectorStep, context: np.ndarray | None = None) -> None:
        """The learner's own step of N worlds; ``context`` (N, context_dim) their bodies' features."""
        n = len(step.reward)
        if len(self.world_episode) != n:  # first step: one episode per world
            self.world_episode = self.next_episode + np.arange(n, dtype=np.int64)
            self.world_step = np.zeros(n, np.int64)
            self.next_episode += n
        self._append(
            {"obs": step.obs, "action": step.action, "reward": step.reward, "next_obs": step.final_obs, "terminated": step.terminated,
             "episode": self.world_episode, "step": self.world_step, "offline": np.zeros(n, bool), "context": self._context(context, n)}
        )  # fmt: skip
        done = step.terminated | step.truncated
        self.world_step += 1
        self.world_step[done] = 0
        self.world_episode[done] = self.next_episode + np.arange(int(done.sum()))
        self.next_episode += int(done.sum())

    def add_episode(self, observation: np.ndarray, action: np.ndarray, reward: np.ndarray, terminated: np.ndarray, context: np.ndarray | None = None) -> None:
        """A recorded episode (observation (T+1, D), action (T, A), reward (T,), terminated (T,); its
        body's context (context_dim,)), flagged offline."""
        t = len(reward)
        self._append(
            {"obs": observation[:-1], "action": np.clip(action, -1.0, 1.0), "reward": reward, "next_obs": observation[1:], "terminated": terminated,
             "episode": np.full(t, self.next_episode), "step": np.arange(t), "offline": np.ones(t, bool),
             "context": self._context(None if context is None else np.broadcast_to(context, (t, self.context_dim)), t)}
        )  # fmt: skip
        self.next_episode += 1

    def _context(self, context: np.ndarray | None, n: int) -> np.ndarray:
        if context is None:  # the nominal body
            return np.zeros((n, self.context_dim), np.float32)
        if context.shape != (n, self.context_dim):
            raise ValueError(f"context must be ({n}, {self.context_dim}), got {context.shape}")
        return context

    def drop_offline(self) -> None:
        """Forget the handed-in episodes (a newer snapshot replaces them); the learner's own steps stay."""
        keep = ~self.arrays["offline"][: self.size]
        for k, v in self.arrays.items():
            v[: int(keep.sum())] = v[: self.size][keep]
        self.size = int(keep.sum())

    def view(self, mask: np.ndarray | None = None) -> Transitions:
        a = {k: v[: self.size] for k, v in self.arrays.items() if k != "offline" and (k != "context" or self.context_dim)}
        whole = Transitions.unchecked(**a)  # rows checked as they came in (VectorStep; episodes, actions clipped as applied)
        return whole if mask is None else whole.rows(mask)

    def is_val(self, val_fraction: float, block: int) -> np.ndarray:
        """(size,) bool: the transition is held out. The unit held out is a block of ``block``
        consecutive steps of one episode (a fixed hash of (episode, step // block)), not a whole
        episode: a robot whose episodes run 1,000 steps has ``val_fraction`` of every episode held out, so the
        held-out data follows the policy as it changes, instead of one early episode standing for all."""
        n = self.size
        key = self.arrays["episode"][:n].astype(np.uint64) * np.uint64(1_000_003) + (self.arrays["step"][:n] // block).astype(np.uint64)
        return ((key * np.uint64(2654435761)) % np.uint64(1000)) < np.uint64(int(val_fraction * 1000))

    def segments(self, mask: np.ndarray, horizon: int, max_starts: int, rng: np.random.Generator):
        """Recorded segments of up to ``horizon`` steps within ``mask``'s transitions, from starts among them:
        obs (S, H+1, D), action (S, H, A), valid (S, H), context (S, context_dim) of their bodies (or None)."""
        t = self.view()
        rows = np.flatnonzero(mask)
        if len(rows) > max_starts:
            rows = np.sort(rng.choice(rows, max_starts, replace=False))
        # the transitions of one episode are not contiguous when several worlds interleave:
        # order by (episode, step), then step k of a segment is k rows further
        order = np.lexsort((t.step, t.episode))
        where = np.empty_like(order)
        where[order] = np.arange(len(order))
        pos = where[rows][:, None] + np.arange(horizon)[None]
        idx = order[np.minimum(pos, len(order) - 1)]
        valid = (t.episode[idx] == t.episode[rows][:, None]) & (t.step[idx] == t.step[rows][:, None] + np.arange(horizon)) & (pos < len(order))
        valid &= mask[idx]  # a segment ends where its episode leaves ``mask`` (held-out segments stay unseen)
        valid = np.logical_and.accumulate(valid, axis=1)
        obs = np.concatenate([t.obs[rows][:, None], t.next_obs[idx]], axis=1)
        return obs, t.action[idx], valid, self.contexts(rows)

    def contexts(self, rows: np.ndarray) -> np.ndarray | None:
        """(len(rows), context_dim) body features of those rows; None for a log without contexts."""
        return self.arrays["context"][: self.size][rows] if self.context_dim else None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"real.{k}": torch.from_numpy(np.ascontiguousarray(v[: self.size])) for k, v in self.arrays.items()}
        out["real.world_episode"] = torch.from_numpy(self.world_episode.copy())
        out["real.world_step"] = torch.from_numpy(self.world_step.copy())
        out["real.next_episode"] = torch.tensor([self.next_episode], dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        size = int(tensors["real.obs"].shape[0])
        self.arrays = self._alloc(max(1024, size))
        for k in _FIELDS:
            if f"real.{k}" in tensors or k != "context":  # a learner saved before contexts: nominal bodies
                self.arrays[k][:size] = tensors[f"real.{k}"].numpy()
        self.size = size
        self.world_episode = tensors["real.world_episode"].numpy().copy()
        self.world_step = tensors["real.world_step"].numpy().copy()
        self.next_episode = int(tensors["real.next_episode"][0])


class _Explorer(nn.Module):
    """The current stochastic policy as a module: raw obs (B, D) (+ body context) -> a ~ pi(.|obs) (B, A)."""

    def __init__(self, policy: Policy, generator: torch.Generator):
        super().__init__()
        self.policy, self.generator = policy, generator
        self.context_dim = policy.context_dim

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.policy.actor.sample(self.policy.normalizer(obs), self.generator)[0]


class MBPO:
    """SAC on real + world-model data, the model retrained as real data arrives (see the module docstring)."""

    name = "mbpo"

    def __init__(
        self,
        spec: PolicySpec,
        config: MBPOConfig = MBPOConfig(),
        *,
        seed: int = 0,
        robot_model: str,
        comm: LocalComm | None = None,
        device: str | torch.device = "cpu",
    ):
        self.config, self.spec, self.robot_model, self.seed = config, spec, robot_model, seed
        sac_cfg = dataclasses.replace(config.sac, replay_ratios={REAL: config.real_ratio, MODEL: 1.0 - config.real_ratio}, online_source=REAL)
        self.sac = SAC(spec, sac_cfg, seed=seed, robot_model=robot_model, comm=comm, device=device, generated={MODEL: config.model_capacity})
        self.policy = self.sac.policy
        self.real = RealLog(spec.obs_dim, spec.act_dim, CONTEXT_DIM if config.condition_on_profile else 0)
        self.world_context: np.ndarray | None = None  # (worlds, context_dim): set_world_profiles
        self.model: DynamicsEnsemble | None = None
        self.horizon = 1
        self.k_step_error = np.full(config.max_horizon, np.nan)
        self.model_val_mse = float("nan")
        self.retrains = 0
        self.refills = 0
        self.refill_transitions = 0  # added by the last refill
        self.empty_refills = 0  # refills in a row that added nothing
        self.last_train_step = 0  # real steps at the last retraining
        self.last_refill_step = 0
        self.gen = torch.Generator().manual_seed(seed * 7_919 + 17)  # rollout action noise and elite picks

    # -- acting and data ------------------------------------------------------------------------
    @property
    def env_steps(self) -> int:
        return self.sac.env_steps

    def explore(self, obs: np.ndarray) -> np.ndarray:
        return self.sac.explore(obs)

    def set_world_profiles(self, profiles) -> None:
        """The variation profile of each world the learner steps (``policies.trainer.Trainer`` calls
        this): a conditioned world model reads each world's context. Unset: nominal bodies."""
        if self.real.context_dim:
            self.world_context = contexts(profiles)
        self.sac.set_world_profiles(profiles)

    def observe(self, step: VectorStep) -> None:
        self.sac.observe(step)
        self.real.add(step, self.world_context)  # None (nominal) unless set_world_profiles gave one
        cfg, steps = self.config, self.sac.env_steps
        if steps < cfg.sac.learning_starts:
            return
        if self.model is None or steps - self.last_train_step >= cfg.model_train_every:  # also right after continue_from
            self._train_model()
        if self.refills == 0 or steps - self.last_refill_step >= cfg.rollout_every:
            self._refill()

    def add_offline(self, episodes, profile_of: Callable[[object], VariationProfile | None] | None = None) -> None:
        """Recorded episodes (``sim.episode.Episode``: the fleet's telemetry, scenario episodes) the
        world model learns from and rollouts branch from, besides the learner's own steps.
        ``profile_of(episode)``: the body it was recorded on (a robot's calibrated profile, a
        scenario's profile) for a conditioned model; None (or no ``profile_of``): nominal."""
        for ep in episodes:
            if ep.observation.shape[1] != self.spec.obs_dim or ep.action.shape[1] != self.spec.act_dim:
                raise ValueError(f"episode {ep.episode_id} has obs/act dims {ep.observation.shape[1]}/{ep.action.shape[1]}, this learner {self.spec.obs_dim}/{self.spec.act_dim}")
            profile = profile_of(ep) if profile_of is not None and self.real.context_dim else None
            self.real.add_episode(ep.observation, ep.action, ep.reward, ep.terminated, None if profile is None else profile.context())

    def ready(self) -> bool:
        return self.model is not None and self.sac.ready()

    def update(self) -> dict[str, float]:
        out = self.sac.update()
        out.update(self.model_metrics())
        return out

    def model_metrics(self) -> dict[str, float]:
        return {
            "model/val_mse": self.model_val_mse,
            "model/horizon": float(self.horizon),
            "model/k_step_error": float(self.k_step_error[self.horizon - 1]),
            "model/rollout_transitions": float(self.sac.replay.sources[MODEL].size),
            "model/refill_transitions": float(self.refill_transitions),
            "model/retrains": float(self.retrains),
        }

    # -- the model ------------------------------------------------------------------------------
    def _train_model(self) -> None:
        cfg = self.config
        val = self.real.is_val(cfg.val_fraction, cfg.val_block)
        if val.all() or not val.any():  # too little data yet for a block split: hold out the newest FIRST_FIT_HOLDOUT
            val = np.arange(self.real.size) >= int((1 - FIRST_FIT_HOLDOUT) * self.real.size)
        train_cfg = cfg.model_train if self.model is None else dataclasses.replace(cfg.model_train, max_steps=cfg.retrain_steps)
        train_cfg = dataclasses.replace(train_cfg, seed=cfg.model_train.seed + self.retrains)
        self.model, report = fit_transitions(
            self.real.view(~val), self.real.view(val), robot=self.robot_model, ensemble=cfg.ensemble, config=train_cfg, model=self.model
        )
        self.model_val_mse = report.elite_val_mse
        self._measure_horizon(val)
        self.retrains += 1
        self.last_train_step = self.sac.env_steps

    def _measure_horizon(self, val: np.ndarray) -> None:
        cfg = self.config
        rng = np.random.default_rng(self.seed + self.retrains)
        obs, action, valid, context = self.real.segments(val, cfg.max_horizon, 1000, rng)
        scale = np.maximum(self.real.view().obs.std(0), 1e-6)
        self.k_step_error = open_loop_errors(ensemble_step_fn(self.model, context), obs, action, valid, scale)
        self.horizon = trusted_horizon(self.k_step_error, cfg.horizon_tolerance, cfg.max_horizon)

    def _refill(self) -> None:
        """Roll the current policy out in the model from real start states into the ``model`` source."""
        cfg = self.config
        count = cfg.rollouts_per_step * cfg.rollout_every
        starts = torch.randint(self.real.size, (count,), generator=self.gen).numpy()
        rollout_cfg = RolloutConfig(
            horizon=self.horizon, disagreement_threshold=cfg.disagreement_threshold, seed=int(torch.randint(2**31 - 1, (1,), generator=self.gen))
        )
        context = self.real.contexts(starts)
        policy_context = context if self.spec.context_dim else None
        batch = model_rollout(self.model, self.real.view().obs[starts], _Explorer(self.policy, self.gen), rollout_cfg, context, policy_context)
        t = np.arange(self.horizon)[None]
        keep = t < batch.length[:, None]  # (N, H)
        last = t == (batch.length[:, None] - 1)
        terminated = last & batch.terminated[:, None]
        obs, nxt = batch.observation[:, :-1], batch.observation[:, 1:]
        if policy_context is not None:  # the policy's replay holds each transition's body next to it
            body = np.broadcast_to(policy_context[:, None], (*obs.shape[:2], policy_context.shape[1]))
            obs, nxt = np.concatenate([obs, body], axis=2), np.concatenate([nxt, body], axis=2)
        obs, nxt = obs[keep], nxt[keep]
        self.sac.replay.add(MODEL, obs, batch.action[keep], batch.reward[keep], nxt, terminated[keep], np.zeros(int(keep.sum()), bool))
        self.refills += 1
        self.last_refill_step = self.sac.env_steps
        self._note_refill(batch.num_transitions, batch.cut)

    def _note_refill(self, added: int, cut: np.ndarray) -> None:
        """Count refills that added nothing, and warn at ``EMPTY_REFILLS_WARN`` in a row: SAC needs model data to start,
        and a model that trusts none of its predictions once let a whole run end with no update and no word."""
        self.refill_transitions = added
        self.empty_refills = 0 if added else self.empty_refills + 1
        if self.empty_refills == EMPTY_REFILLS_WARN:
            reasons = ", ".join(f"{name} {int(n)}" for name, n in zip(CUT_REASONS, np.bincount(cut, minlength=len(CUT_REASONS))))
            warnings.warn(
                f"mbpo: the last {self.empty_refills} rollout refills added no model transitions (every rollout was cut before "
                f"its first step; the last refill's cuts: {reasons}), so SAC makes no update until one does; "
                f"{self.retrains} model fits so far, model/val_mse {self.model_val_mse:.3g}",
                RuntimeWarning,
                stacklevel=2,
            )

    # -- checkpointing --------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = self.sac.state()
        tensors.update(self.real.state_tensors())
        tensors["mbpo.generator"] = self.gen.get_state()
        tensors["mbpo.k_step_error"] = torch.from_numpy(self.k_step_error.copy())
        if self.model is not None:
            tensors.update({f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()})
        meta = {
            "sac": meta,
            "model_spec": None if self.model is None else self.model.spec.to_dict(),
            "horizon": self.horizon,
            "model_val_mse": self.model_val_mse,
            "retrains": self.retrains,
            "refills": self.refills,
            "last_train_step": self.last_train_step,
            "last_refill_step": self.last_refill_step,
        }
        return tensors, meta

    def continue_from(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        """Carry a previous learner (a :meth:`state`) on, with newer offline episodes: everything but
        the episodes it was handed (:meth:`add_offline` the new ones after this)."""
        self.sac.continue_from(tensors, meta["sac"])
        self._load_model_side(tensors, meta)
        self.real.drop_offline()
        self.real.world_episode = np.zeros(0, np.int64)  # the new stepper starts new episodes
        # refit the model on the new data and roll out from its states at the first step
        self.last_train_step = self.sac.env_steps - self.config.model_train_every
        self.last_refill_step = self.sac.env_steps - self.config.rollout_every

    def load_state(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        self.sac.load_state(tensors, meta["sac"])
        self._load_model_side(tensors, meta)

    def _load_model_side(self, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
        self.real.load_state_tensors(tensors)
        self.gen.set_state(tensors["mbpo.generator"].clone())
        self.k_step_error = tensors["mbpo.k_step_error"].numpy().copy()
        self.model = None
        if meta["model_spec"] is not None:
            self.model = DynamicsEnsemble(ModelSpec.from_dict(meta["model_spec"]))
            self.model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
            self.model.to(resolve_device(self.config.model_train.device)).eval()  # beside the learner, as fitting puts it
        self.horizon, self.model_val_mse = int(meta["horizon"]), float(meta["model_val_mse"])
        self.retrains, self.refills = int(meta["retrains"]), int(meta["refills"])
        self.last_train_step, self.last_refill_step = int(meta["last_train_step"]), int(meta["last_refill_step"])


def default_config(robot: str, *, total_env_steps: int, seed: int = 0):
    """(TrainerConfig, MBPOConfig) as ``conf/policy/mbpo.yaml`` sets them: one world (a robot)."""
    from policies.trainer import TrainerConfig

    trainer = TrainerConfig(robot=robot, algorithm="mbpo", num_worlds=1, total_env_steps=total_env_steps, seed=seed, log_every=0)
    return trainer, MBPOConfig()
