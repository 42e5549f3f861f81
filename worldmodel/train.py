"""Training the dynamics ensemble from Episode records (real + sim), split by episode.

Loss per member (PETS): Gaussian negative log-likelihood of the normalised targets
(obs delta, reward) + binary cross-entropy of the termination logit + a small penalty on
the learned log-variance bounds. Each member draws its own random minibatches (with
replacement), so the members see different data orders and disagree where data is thin.

Early stopping: every ``eval_every`` gradient steps the held-out episodes are scored per
member; a member's best weights are kept; training stops when no member improved by more
than ``min_improvement`` (relative) for ``patience`` evaluations, or at ``max_steps``. The
``num_elites`` members with the lowest validation MSE become the elites.

Metrics logged (``log(metrics, step)``, step = gradient steps):
  worldmodel/train_loss   mean training loss over the last evaluation period
  worldmodel/val_mse      validation MSE (normalised targets) averaged over the current elites
  worldmodel/val_nll      validation Gaussian NLL per target dimension, averaged over members
  worldmodel/val_term_acc validation termination accuracy (logit > 0) averaged over members
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from sim.config_rules import AT_LEAST_1, NON_NEGATIVE, OPEN_UNIT, SEED_MAX, check_fields, integer
from sim.episode import Episode
from worldmodel.device import check_device_name, resolve_device, set_cpu_threads
from worldmodel.ensemble import DynamicsEnsemble, EnsembleConfig, ModelSpec
from worldmodel.flat_params import flatten_parameters
from worldmodel.normalizer import SPREAD
from worldmodel.transitions import Transitions, check_compatible, split_transitions

LogFn = Callable[[dict[str, float], int], None]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    max_steps: int = 20_000  # gradient steps, at most
    eval_every: int = 250  # gradient steps between validation passes
    patience: int = 5  # validation passes without improvement before stopping
    min_improvement: float = 0.01  # relative improvement of a member's val MSE that counts
    val_fraction: float = 0.15  # share of episodes held out
    max_val_transitions: int = 20_000  # validation subsample (seeded), keeps evaluation cheap
    termination_weight: float = 1.0
    logvar_bound_weight: float = 0.01
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self):
        check_fields(
            self, batch_size=AT_LEAST_1, max_steps=AT_LEAST_1, eval_every=AT_LEAST_1, patience=AT_LEAST_1, max_val_transitions=AT_LEAST_1,
            learning_rate=NON_NEGATIVE, weight_decay=NON_NEGATIVE, min_improvement=NON_NEGATIVE, val_fraction=OPEN_UNIT,
            termination_weight=NON_NEGATIVE, logvar_bound_weight=NON_NEGATIVE,
        )  # fmt: skip
        check_device_name(self.device)  # when the config is made, not at the first fit (mid-run under the model-based learner)
        object.__setattr__(self, "seed", integer("TrainConfig: seed", self.seed, minimum=0, maximum=SEED_MAX))  # a numpy integer too


@dataclasses.dataclass
class TrainReport:
    steps: int
    evaluations: int
    stopped_early: bool
    val_mse: list[float]  # per member, of the weights kept
    elites: list[int]
    train_episodes: int
    val_episodes: int
    train_transitions: int
    val_transitions: int
    seconds: float

    @property
    def elite_val_mse(self) -> float:
        return float(np.mean([self.val_mse[i] for i in self.elites]))


def _tensors(model: DynamicsEnsemble, data: Transitions, device: torch.device):
    """Normalised inputs (M, in), targets (M, out) and termination (M,) float tensors."""
    obs = torch.as_tensor(data.obs, device=device)
    act = torch.as_tensor(data.action, device=device)
    target = torch.cat([torch.as_tensor(data.next_obs - data.obs, device=device), torch.as_tensor(data.reward, device=device)[:, None]], 1)
    ctx = None if data.context is None else torch.as_tensor(data.context, device=device)
    x = model.input_norm.normalize(model.raw_inputs(obs, act, ctx))
    y = model.output_norm.normalize(target)
    return x, y, torch.as_tensor(data.terminated, device=device, dtype=torch.float32)


def _fit_statistics(model: DynamicsEnsemble, data: Transitions) -> None:
    model.input_norm.fit(data.model_inputs())
    if data.context_dim:  # context features are bounded by design: kept as they are, so a body first seen later is no outlier
        model.input_norm.mean[-data.context_dim :] = 0.0
        model.input_norm.std[-data.context_dim :] = 1.0
    model.output_norm.fit(np.concatenate([data.next_obs - data.obs, data.reward[:, None]], 1))


@torch.no_grad()
def _refit_statistics(model: DynamicsEnsemble, data: Transitions) -> None:
    """Refit a trained model's normalisers to ``data`` and rescale its first and last layers so that it predicts
    what it did along every feature its data varied in (``x_n = (x - m) / s``: the first layer's weights scale by
    s'/s and its bias takes up the shift; the mean head by s/s' with the shift in its bias; the log-variance, its
    bounds included, moves by 2 log(s/s')). A feature that never varied (std below ``SPREAD``: a zero policy's
    actions) was never learned: its weights stay as initialised, a new input. Kept as first fitted, such a
    normaliser (std 1e-6) turned every later action of +-1 into +-1e6, and the model's error into 1e4-1e6 from then on."""
    old_in = (model.input_norm.mean.clone(), model.input_norm.std.clone())
    old_out = (model.output_norm.mean.clone(), model.output_norm.std.clone())
    _fit_statistics(model, data)
    (m, s), (m2, s2) = old_in, (model.input_norm.mean, model.input_norm.std)
    learned = s > SPREAD
    first = model.hidden[0]
    # x_n = x_n' s'/s + (m' - m)/s for a learned feature; one that never varied (x = m in the earlier data) stays a new input
    # whose old value m reads 0 as before: its shift (m - m')/s' is taken out of the bias
    shift = torch.where(learned, (m2 - m) / s, -(m - m2) / s2).to(first.weight)
    first.bias += torch.einsum("i,kio->ko", shift, first.weight)[:, None, :]
    first.weight *= torch.where(learned, s2 / s, 1.0).to(first.weight)[None, :, None]
    (m, s), (m2, s2), d = old_out, (model.output_norm.mean, model.output_norm.std), model.spec.out_dim
    learned = s > SPREAD
    head = model.head  # mean_n' = (mean_n s + m - m') / s'
    scale = torch.where(learned, s / s2, 1.0).to(head.weight)
    head.weight[..., :d] *= scale
    head.bias[..., :d] = head.bias[..., :d] * scale + torch.where(learned, (m - m2) / s2, 0.0).to(head.bias)
    lift = torch.where(learned, 2.0 * torch.log(s / s2), 0.0).to(head.bias)  # logvar_n' = logvar_n + 2 log(s/s'), its soft bounds too
    head.bias[..., d : 2 * d] += lift
    model.max_logvar += lift.to(model.max_logvar)
    model.min_logvar += lift.to(model.min_logvar)


def _widen_envelope(model: DynamicsEnsemble, data: Transitions) -> None:
    both = np.concatenate([data.obs, data.next_obs])
    low, high = torch.as_tensor(both.min(0)).to(model.obs_low), torch.as_tensor(both.max(0)).to(model.obs_high)
    model.obs_low.copy_(torch.minimum(model.obs_low, low))
    model.obs_high.copy_(torch.maximum(model.obs_high, high))


def _loss(model: DynamicsEnsemble, x, y, term, cfg: TrainConfig) -> torch.Tensor:
    """x (K, B, in), y (K, B, out), term (K, B) -> scalar loss (summed over members)."""
    mean, logvar, logit = model(x)
    nll = ((mean - y) ** 2 * torch.exp(-logvar) + logvar).mean(-1).mean(-1).sum()
    bce = F.binary_cross_entropy_with_logits(logit, term, reduction="none").mean(-1).sum()
    bound = model.max_logvar.sum() - model.min_logvar.sum()
    return nll + cfg.termination_weight * bce + cfg.logvar_bound_weight * bound


@torch.no_grad()
def evaluate(model: DynamicsEnsemble, x, y, term, chunk: int = 8192) -> dict[str, torch.Tensor]:
    """Per-member validation metrics on normalised x (M, in), y (M, out), term (M,): mse, nll, term_acc, each (K,)."""
    k = model.ensemble_size
    sums = {"mse": torch.zeros(k, device=x.device), "nll": torch.zeros(k, device=x.device), "term_acc": torch.zeros(k, device=x.device)}
    for start in range(0, x.shape[0], chunk):
        xs, ys, ts = x[start : start + chunk], y[start : start + chunk], term[start : start + chunk]
        mean, logvar, logit = model(xs.unsqueeze(0).expand(k, -1, -1))
        err = (mean - ys) ** 2
        sums["mse"] += err.mean(-1).sum(-1)
        sums["nll"] += (0.5 * (err * torch.exp(-logvar) + logvar + np.log(2 * np.pi))).mean(-1).sum(-1)
        sums["term_acc"] += ((logit > 0).float() == ts).float().sum(-1)
    return {name: value / x.shape[0] for name, value in sums.items()}


def train_ensemble(
    episodes: Sequence[Episode],
    *,
    ensemble: EnsembleConfig = EnsembleConfig(),
    config: TrainConfig = TrainConfig(),
    model: DynamicsEnsemble | None = None,
    log: LogFn | None = None,
) -> tuple[DynamicsEnsemble, TrainReport]:
    """Train an ensemble on ``episodes`` (one robot model; any mix of sources), split by episode
    (a lone episode by its steps: :func:`worldmodel.transitions.split_transitions`).

    With ``model`` given, training continues from it (its normalisers refit to the new data, its first and last
    layers rescaled so that it predicts what it did: :func:`_refit_statistics`; its envelope widens to the new
    data) and ``ensemble`` is ignored.
    Returns the model (best weights per member, elites set) and a :class:`TrainReport`.
    """
    robot, _, _ = check_compatible(episodes)
    train, val, counts = split_transitions(episodes, config.val_fraction, config.seed)
    return fit_transitions(train, val, robot=robot, ensemble=ensemble, config=config, model=model, log=log, episodes=counts)


def fit_transitions(
    train: Transitions,
    val: Transitions,
    *,
    robot: str,
    ensemble: EnsembleConfig = EnsembleConfig(),
    config: TrainConfig = TrainConfig(),
    model: DynamicsEnsemble | None = None,
    log: LogFn | None = None,
    episodes: tuple[int, int] = (0, 0),
) -> tuple[DynamicsEnsemble, TrainReport]:
    """Train (or continue training ``model``) on ``train``, early-stopping and choosing elites on
    ``val`` (transitions of other episodes than ``train``'s; ``episodes``: their episode counts, for
    the report). The core of :func:`train_ensemble`, for callers that hold transitions already."""
    started = time.perf_counter()
    set_cpu_threads(config.num_threads)
    device = resolve_device(config.device)
    obs_dim, act_dim, context_dim = train.obs_dim, train.act_dim, train.context_dim
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"need training and validation transitions, got {len(train)} and {len(val)}")
    if val.context_dim != context_dim:
        raise ValueError(f"training transitions have {context_dim} context features, validation {val.context_dim}")
    if model is None:
        model = DynamicsEnsemble(ModelSpec(robot, obs_dim, act_dim, ensemble, context_dim), seed=config.seed)
        _fit_statistics(model, train)
    elif (model.spec.robot, model.spec.obs_dim, model.spec.act_dim, model.spec.context_dim) != (robot, obs_dim, act_dim, context_dim):
        raise ValueError(
            f"cannot continue training a world model of {(model.spec.robot, model.spec.obs_dim, model.spec.act_dim, model.spec.context_dim)} "
            f"on transitions of (robot, obs_dim, act_dim, context_dim)={(robot, obs_dim, act_dim, context_dim)}"
        )
    else:
        _refit_statistics(model, train)  # the new data's spread, the model's function kept
    model = model.to(device)
    _widen_envelope(model, train)
    x, y, term = _tensors(model, train, device)
    vx, vy, vterm = _val_tensors(model, val, config, device)

    k = model.ensemble_size
    gen = torch.Generator(device=device).manual_seed(config.seed)
    flat = flatten_parameters(model.parameters())  # one buffer: each AdamW step is a few kernel calls, not ten per tensor
    opt = torch.optim.AdamW([flat], lr=config.learning_rate, weight_decay=config.weight_decay)
    best = evaluate(model, vx, vy, vterm)["mse"].clone()
    best_state = _member_state(model)
    stale, steps, evaluations, stopped_early = 0, 0, 0, False
    model.train()
    while steps < config.max_steps:
        period = min(config.eval_every, config.max_steps - steps)
        running = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for _ in range(period):
            idx = torch.randint(len(x), (k, config.batch_size), generator=gen, device=device)  # (K, B): one draw per member
            loss = _loss(model, x[idx], y[idx], term[idx], config)
            flat.grad.zero_()  # in place: the weights' gradients are views of it
            loss.backward()
            opt.step()
            running += loss.detach()
        steps += period
        evaluations += 1
        metrics = evaluate(model, vx, vy, vterm)
        improved = metrics["mse"] < best * (1.0 - config.min_improvement)
        if improved.any():
            _keep_members(best_state, _member_state(model), improved)
            best = torch.where(improved, metrics["mse"], best)
            stale = 0
        else:
            stale += 1
        if log is not None:
            top = torch.argsort(metrics["mse"])[: model.spec.ensemble.num_elites]
            log(
                {
                    "worldmodel/train_loss": float(running) / period,
                    "worldmodel/val_mse": float(metrics["mse"][top].mean()),
                    "worldmodel/val_nll": float(metrics["nll"].mean()),
                    "worldmodel/val_term_acc": float(metrics["term_acc"].mean()),
                },
                steps,
            )
        if stale >= config.patience:
            stopped_early = True
            break
    _load_members(model, best_state)
    model.eval()
    final = evaluate(model, vx, vy, vterm)["mse"]
    model.elites.copy_(torch.argsort(final)[: model.spec.ensemble.num_elites].sort().values)
    report = TrainReport(
        steps=steps,
        evaluations=evaluations,
        stopped_early=stopped_early,
        val_mse=[float(v) for v in final],
        elites=[int(i) for i in model.elites],
        train_episodes=episodes[0],
        val_episodes=episodes[1],
        train_transitions=len(train),
        val_transitions=len(val),
        seconds=time.perf_counter() - started,
    )
    return model, report


def _val_tensors(model: DynamicsEnsemble, val: Transitions, config: TrainConfig, device: torch.device):
    x, y, term = _tensors(model, val, device)
    if x.shape[0] > config.max_val_transitions:
        keep = torch.as_tensor(np.random.default_rng(config.seed).choice(x.shape[0], config.max_val_transitions, replace=False), device=device)
        x, y, term = x[keep], y[keep], term[keep]
    return x, y, term


def _member_state(model: DynamicsEnsemble) -> dict[str, torch.Tensor]:
    """Copies of the per-member weights (tensors whose axis 0 is the member)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith(("hidden.", "head."))}


def _keep_members(best: dict[str, torch.Tensor], current: dict[str, torch.Tensor], members: torch.Tensor) -> None:
    for name, value in current.items():
        best[name][members] = value[members]


@torch.no_grad()
def _load_members(model: DynamicsEnsemble, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)
