"""Batched synthetic rollouts: many start states at once, policy in the loop, cut where the
ensemble stops agreeing.

Each step, for every live rollout: the policy picks an action from the current observation;
every member predicts the next observation; the disagreement is the standard deviation
across members of their mean prediction of the (normalised) observation change, RMS over
observation dimensions; a random elite member is sampled for the transition. A rollout is
cut, before the untrusted transition is recorded, when the disagreement passes the
threshold, when a prediction is not finite, or when the next observation leaves the
envelope (the training range widened by ``envelope_margin`` times its width on each side; a
dimension that never varied is given a small width first: ``DynamicsEnsemble.envelope``).
So no NaN or Inf ever leaves a rollout, and every recorded step had disagreement <= threshold.

Everything stays on the model's device (GPU when there is one) until the finished batch is
copied out once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from sim.episode import Episode
from sim.policy_fn import context_dim_of
from sim.config_rules import SEED_MAX, integer
from worldmodel.ensemble import DynamicsEnsemble, as_float32, disagreement
from worldmodel.io import model_version
from worldmodel.transitions import check_compatible

CUT_REASONS = ("horizon", "terminated", "disagreement", "envelope")
_EPISODE_NAMESPACE = uuid.UUID("0f6c2f0a-8f55-4f7e-9d7b-5a9e1c3b2d41")
Policy = nn.Module | Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    horizon: int = 10  # H control steps at most
    disagreement_threshold: float = 0.5  # normalised units (see the module docstring)
    disagreement_members: str = "all"  # "all" members, or only the "elites" (cheaper: E/K of the compute)
    envelope_margin: float = 0.5
    sample: bool = True  # sample the elite's Gaussian (False: its mean)
    chunk_size: int = 65_536  # start states per batched pass (bounds memory; the picks are drawn chunk by chunk, so a seed's rollouts depend on it too)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "seed", integer("rollout: seed", self.seed, minimum=0, maximum=SEED_MAX))  # a numpy integer too
        if self.horizon < 1 or self.chunk_size < 1:
            raise ValueError(f"rollout: horizon and chunk_size must be >= 1, got {self.horizon}, {self.chunk_size}")
        if self.disagreement_members not in ("all", "elites"):
            raise ValueError(f"rollout: disagreement_members must be 'all' or 'elites', got {self.disagreement_members!r}")
        if not self.disagreement_threshold > 0 or self.envelope_margin < 0:
            raise ValueError("rollout: disagreement_threshold must be > 0 and envelope_margin >= 0")


@dataclasses.dataclass
class RolloutBatch:
    """N rollouts of up to H steps (numpy, rows past ``length`` are zero).

    observation (N, H+1, obs_dim) f32, action (N, H, act_dim) f32, reward (N, H) f32,
    disagreement (N, H) f32 of every attempted step (NaN where not attempted, inf where a
    prediction was not finite), length (N,) int64 recorded steps, terminated (N,) bool
    (ended by a predicted termination), cut (N,) int8 index into CUT_REASONS.
    """

    observation: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    disagreement: np.ndarray
    length: np.ndarray
    terminated: np.ndarray
    cut: np.ndarray

    @property
    def num_transitions(self) -> int:
        return int(self.length.sum())


def _policy_on_device(policy: Policy, device: torch.device, act_dim: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(policy, nn.Module):
        param = next(policy.parameters(), None)
        pdev = param.device if param is not None else device

        def run(obs: torch.Tensor) -> torch.Tensor:  # a copy: a policy that edits its input in place leaves the rollout as it was
            action = policy(obs.to(pdev, copy=True))
            if not isinstance(action, torch.Tensor):
                raise TypeError(f"a torch policy must return a tensor of actions (N, act_dim), got {type(action).__name__}")
            return action.to(device, torch.float32)

    elif callable(policy):

        def run(obs: torch.Tensor) -> torch.Tensor:  # a copy, as above (one, from a GPU too)
            action = policy(obs.to("cpu", copy=True).numpy())
            try:
                return as_float32(action, device)
            except (TypeError, ValueError, RuntimeError):  # None, text, ragged lists: torch's words named no policy
                raise ValueError(f"policy must return actions (N, {act_dim}) as an array, got {type(action).__name__}") from None

    else:
        raise TypeError(f"policy must be a torch module or a numpy callable, got {type(policy).__name__}")

    def checked(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the action clamped to [-1, 1], whether every action was finite: a 0-d tensor, read once the step's one wait
        on the device is over, so reading it waits for nothing)."""
        action = run(obs)
        if action.shape != (obs.shape[0], act_dim):
            raise ValueError(f"policy returned actions of shape {tuple(action.shape)}, expected {(obs.shape[0], act_dim)}")
        return action.clamp(-1.0, 1.0), torch.isfinite(action).all()

    return checked


@torch.no_grad()
def model_rollout(
    model: DynamicsEnsemble,
    start_obs: np.ndarray | torch.Tensor,
    policy: Policy,
    config: RolloutConfig = RolloutConfig(),
    context: np.ndarray | torch.Tensor | None = None,
    policy_context: np.ndarray | None = None,
) -> RolloutBatch:
    """Roll ``policy`` out in the model from every row of ``start_obs`` (N, obs_dim); see the module
    docstring. A context-conditioned model takes ``context`` (N, context_dim): rollout i stays in the body
    of row i. A body-conditioned policy (``sim.policy_fn.context_dim_of``) reads row i's
    ``policy_context`` (N, its context_dim) after the observation; any other sees only the observation."""
    if model.max_logvar.dtype != torch.float32:
        raise ValueError(f"world-model rollouts run in float32, and this model's parameters are {model.max_logvar.dtype}: call model.float() first")
    if config.disagreement_members == "elites" and len(model.elites) < 2:
        raise ValueError(f"disagreement over the elites needs 2 or more, and this model has {len(model.elites)}: use disagreement_members='all'")
    start = _finite_rows(start_obs, "start_obs", model.spec.obs_dim, None, model.device)
    if context is not None and not model.spec.context_dim:
        raise ValueError("this world model is unconditioned: pass no context")
    ctx = None if context is None else _finite_rows(context, "context", model.spec.context_dim, len(start), model.device)
    act = _policy_on_device(policy, model.device, model.spec.act_dim)
    if context_dim_of(policy):
        if policy_context is None:
            raise ValueError(f"a body-conditioned policy needs policy_context of shape {(len(start), context_dim_of(policy))}")
        act = _with_rows_context(act, _finite_rows(policy_context, "policy_context", context_dim_of(policy), len(start), model.device))
    elif policy_context is not None:
        raise ValueError("policy_context is for a body-conditioned policy (sim.policy_fn.context_dim_of), and this one is not: pass none")
    else:
        act = _ignore_rows(act)
    gen = torch.Generator(device=model.device).manual_seed(config.seed)
    # which member predicts each step is drawn on the CPU, so that a seed picks the same members on any device
    # (on the CPU one generator draws both, as it always has; the sampled noise stays the device's own draw)
    picks = gen if model.device.type == "cpu" else torch.Generator().manual_seed(config.seed)
    n, h = len(start), config.horizon
    out = RolloutBatch(  # filled chunk by chunk: each chunk's outputs are copied once, straight into their rows
        observation=np.empty((n, h + 1, model.spec.obs_dim), np.float32),
        action=np.empty((n, h, model.spec.act_dim), np.float32),
        reward=np.empty((n, h), np.float32),
        disagreement=np.empty((n, h), np.float32),
        length=np.empty(n, np.int64),
        terminated=np.empty(n, bool),
        cut=np.empty(n, np.int8),
    )
    was_training = model.training
    model.eval()
    try:
        for i in range(0, n, config.chunk_size):
            rows = slice(i, i + config.chunk_size)
            part = _rollout_chunk(model, start[rows], None if ctx is None else ctx[rows], functools.partial(_offset_rows, act, i), config, gen, picks)
            for name, tensor in part.items():
                torch.from_numpy(getattr(out, name)[rows]).copy_(tensor)
    finally:
        model.train(was_training)
    return out


def _finite_rows(x, name: str, dim: int, rows: int | None, device: torch.device) -> torch.Tensor:
    """``x`` as a float32 tensor (rows, dim) on ``device``, or a ValueError naming it: another shape, NaN or Inf."""
    out = as_float32(x, device)
    if out.ndim != 2 or out.shape[1] != dim or (rows is not None and out.shape[0] != rows):
        raise ValueError(f"{name} must be ({'N' if rows is None else rows}, {dim}), got {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return out


def _to(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``; to a GPU through pinned memory, so the copy does not wait for the device."""
    return x if device.type == "cpu" else x.pin_memory().to(device, non_blocking=True)


def _offset_rows(act, offset: int, obs: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return act(obs, rows + offset)  # a chunk's rows are rows of the whole batch from ``offset`` on


def _with_rows_context(act, context: torch.Tensor):
    """``act`` of (obs of the live rows, their indices): the rows' body features appended."""
    return lambda obs, rows: act(torch.cat([obs, context[rows]], dim=1))


def _ignore_rows(act):
    return lambda obs, rows: act(obs)


def _members(model: DynamicsEnsemble, which: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(members evaluated (None: all), positions of the elites among them (E,))."""
    if which == "elites":
        return model.elites, torch.arange(len(model.elites), device=model.device)
    return None, model.elites


def _rollout_chunk(
    model: DynamicsEnsemble, start: torch.Tensor, context: torch.Tensor | None, act, config: RolloutConfig, gen: torch.Generator, picks: torch.Generator
) -> dict[str, torch.Tensor]:
    """One chunk's outputs, named as :class:`RolloutBatch`'s fields, on the model's device."""
    dev, n, h = model.device, start.shape[0], config.horizon
    o_dim, a_dim = model.spec.obs_dim, model.spec.act_dim
    members, elite_pos = _members(model, config.disagreement_members)
    low, high = model.envelope(config.envelope_margin)
    obs_out = torch.zeros(n, h + 1, o_dim, device=dev)
    act_out = torch.zeros(n, h, a_dim, device=dev)
    rew_out = torch.zeros(n, h, device=dev)
    dis_out = torch.full((n, h), float("nan"), device=dev)
    length = torch.zeros(n, dtype=torch.int64, device=dev)
    terminated = torch.zeros(n, dtype=torch.bool, device=dev)
    cut = torch.zeros(n, dtype=torch.int8, device=dev)  # "horizon" unless set otherwise
    obs_out[:, 0] = start
    live, cur = torch.arange(n, device=dev), start
    reasons = {name: torch.tensor(CUT_REASONS.index(name), dtype=torch.int8, device=dev) for name in CUT_REASONS}
    for t in range(h):
        if len(live) == 0:
            break
        a, finite_action = act(cur, live)
        x = model.input_norm.normalize(model.raw_inputs(cur, a, None if context is None else context[live]))
        mean, raw_logvar, logit = model.forward_members(x, members)
        dis = disagreement(mean[..., :o_dim])
        pick = elite_pos[_to(torch.randint(len(elite_pos), (len(live),), generator=picks), dev)]
        rows = torch.arange(len(live), device=dev)
        y = mean[pick, rows]
        if config.sample:
            std = torch.exp(0.5 * model.bound_logvar(raw_logvar[pick, rows]))
            y = y + std * torch.randn(y.shape, generator=gen, device=dev)
        raw = model.output_norm.denormalize(y)
        nxt, rew = cur + raw[:, :o_dim], raw[:, o_dim]
        finite = torch.isfinite(nxt).all(-1) & torch.isfinite(rew)
        agree = dis <= config.disagreement_threshold
        inside = finite & ((nxt >= low) & (nxt <= high)).all(-1)
        ok = agree & inside
        ends = ok & (logit[pick, rows] > 0)
        # every write below is by index, never by a boolean mask, so the step runs without waiting on the device
        # until the one count of the rollouts that go on (a live row's outputs at t + 1 are zero until written)
        dis_out[live, t] = dis
        cut[live] = torch.where(~agree, reasons["disagreement"], torch.where(~inside, reasons["envelope"], torch.where(ends, reasons["terminated"], cut[live])))
        obs_out[live, t + 1] = torch.where(ok[:, None], nxt, 0.0)
        act_out[live, t] = torch.where(ok[:, None], a, 0.0)
        rew_out[live, t] = torch.where(ok, rew, 0.0)
        length[live] += ok
        terminated[live] = ends
        go_on = (ok & ~ends).nonzero().squeeze(1)
        if not finite_action:
            raise ValueError("policy returned NaN or Inf actions")
        live, cur = live[go_on], nxt[go_on]
    return {
        "observation": obs_out,
        "action": act_out,
        "reward": rew_out,
        "disagreement": dis_out,
        "length": length,
        "terminated": terminated,
        "cut": cut,
    }


# -- branching from real episodes -----------------------------------------------------------
def sample_starts(episodes: Sequence[Episode], count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` (episode index, step) pairs drawn uniformly over all recorded steps t < T (seeded, with replacement)."""
    sizes = np.array([ep.num_steps for ep in episodes])
    if len(sizes) == 0 or count < 1:
        raise ValueError(f"need at least one episode and count >= 1 (got {len(sizes)} episodes, count {count})")
    flat = np.random.default_rng(seed).integers(0, sizes.sum(), count)
    bounds = np.cumsum(sizes)
    idx = np.searchsorted(bounds, flat, side="right")
    step = flat - np.concatenate([[0], bounds[:-1]])[idx]
    return [(int(i), int(t)) for i, t in zip(idx, step)]


def branch_rollouts(
    model: DynamicsEnsemble,
    episodes: Sequence[Episode],
    policy: Policy,
    num_rollouts: int,
    config: RolloutConfig = RolloutConfig(),
    *,
    policy_version: str = "none",
    context_of: Callable[[Episode], np.ndarray | None] | None = None,
) -> list[Episode]:
    """World-model episodes branched from recorded states of ``episodes`` (real fleet states).

    Each output Episode has source="worldmodel", ``model_version``, the source episode's robot
    id and model, timestamps continuing the source's clock (start + k * dt), terminated at a
    predicted termination, truncated at a cut (horizon, disagreement, envelope), and a
    ``scenario`` JSON naming where it branched from (plus the physics state and profile of
    the source where known, so :mod:`worldmodel.physics_check` can replay it in MuJoCo).
    Rollouts cut before their first step yield no episode. A body-conditioned model rolls out, and a
    body-conditioned policy acts, in the body each rollout branched from: the features ``context_of(episode)``
    (None or no ``context_of``: the nominal body). An episode's id follows from where it branched, the
    model, ``policy_version`` and what it holds: a rerun of the same rollout gives the same ids (a store takes
    it once), another policy's or configuration's rollout from the same start gives other ids. "The same" is bit for
    bit: a rerun on another machine or thread count whose floats round otherwise gives other ids (world-model
    episodes are provenance; the loop trains on real and simulated ones).
    """
    robot = check_compatible(episodes)[0]
    if robot != model.spec.robot:
        raise ValueError(f"episodes are of robot model {robot!r}, the world model of {model.spec.robot!r}")
    starts = sample_starts(episodes, num_rollouts, config.seed)
    start_obs = np.stack([episodes[i].observation[t] for i, t in starts])

    def rows_context(dim: int) -> np.ndarray | None:  # each start's body features (the nominal body's are zeros)
        if not dim:
            return None
        per_episode = [np.zeros(dim, np.float32) if context_of is None or (c := context_of(ep)) is None else np.asarray(c, np.float32) for ep in episodes]
        return np.stack([per_episode[i] for i, _ in starts])

    # a body-conditioned model rolls each start out in the body it branched from, as a body-conditioned policy acts in it
    batch = model_rollout(model, start_obs, policy, config, rows_context(model.spec.context_dim), rows_context(context_dim_of(policy)))
    version = model_version(model)
    out = []
    for r, (i, t) in enumerate(starts):
        length = int(batch.length[r])
        if length == 0:
            continue
        src = episodes[i]
        scenario = _branch_scenario(src, t, r, batch, config, version)
        out.append(_episode(batch, r, length, src, t, scenario, version, policy_version))
    return out


def _branch_scenario(src: Episode, t: int, r: int, batch: RolloutBatch, config: RolloutConfig, version: str) -> dict:
    scenario = {
        "kind": "worldmodel_branch",
        "robot": src.metadata["robot_model"],
        "source_episode_id": src.episode_id,
        "source_step": t,
        "rollout_index": r,
        "horizon": config.horizon,
        "disagreement_threshold": config.disagreement_threshold,
        "seed": config.seed,
        "cut": CUT_REASONS[int(batch.cut[r])],
        "model_version": version,
    }
    source_spec = src.json_metadata("scenario")
    if "profile" in source_spec:
        scenario["profile"] = source_spec["profile"]
    if "qpos" in src.extras and "qvel" in src.extras:
        scenario["init_qpos"] = [float(v) for v in src.extras["qpos"][t]]
        scenario["init_qvel"] = [float(v) for v in src.extras["qvel"][t]]
    return scenario


def _episode(batch: RolloutBatch, r: int, length: int, src: Episode, t: int, scenario: dict, version: str, policy_version: str) -> Episode:
    dt = float(np.median(np.diff(src.timestamp)))
    terminated = np.zeros(length, bool)
    truncated = np.zeros(length, bool)
    (terminated if batch.terminated[r] else truncated)[-1] = True
    scenario_json = json.dumps(scenario, sort_keys=True)
    identity = hashlib.sha256(f"{scenario_json}|{policy_version}".encode())
    for part in (batch.observation[r, : length + 1], batch.action[r, :length], batch.reward[r, :length]):  # what it holds: two
        identity.update(np.ascontiguousarray(part).tobytes())  # policies (or configs) from one start are two episodes
    return Episode.create(
        observation=batch.observation[r, : length + 1],
        action=batch.action[r, :length],
        reward=batch.reward[r, :length],
        terminated=terminated,
        truncated=truncated,
        timestamp=src.timestamp[t] + dt * np.arange(length + 1),
        robot_id=src.robot_id,
        robot_model=src.metadata["robot_model"],
        source="worldmodel",
        policy_version=policy_version,
        episode_id=str(uuid.uuid5(_EPISODE_NAMESPACE, identity.hexdigest())),
        scenario=scenario_json,
        model_version=version,
    )
