"""Replay for off-policy learning: named transition sources mixed in fixed ratios.

Sources are lists of :class:`sim.episode.Episode` (e.g. ``real`` from a pinned fleet store
snapshot, ``sim`` from MuJoCo scenarios, ``worldmodel`` from model rollouts) plus the online
data the trainer collects from the batched stepper, which goes into the source named
``online_source``. Each sampled batch takes ``round(ratio * batch_size)`` transitions from
each source (largest-remainder rounding, so the counts always sum to the batch size): with
``{"real": 0.5, "sim": 0.3, "worldmodel": 0.2}`` that is MBPO's "real ratio".

``terminated`` and ``truncated`` are stored apart: a TD target bootstraps through a
truncation (time limit) and not through a termination; ``next_obs`` of an episode's last
step is the episode's final observation.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from sim.episode import Episode

FIELDS = ("obs", "action", "reward", "next_obs", "terminated", "truncated")


@dataclasses.dataclass
class Batch:
    """A sampled batch: obs (B, D), action (B, A), reward (B,), next_obs (B, D), terminated (B,) and
    truncated (B,) as float32 0/1."""

    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self
        return Batch(**{f: getattr(self, f).to(device, non_blocking=True) for f in FIELDS})


class TransitionBuffer:
    """A ring buffer of transitions (numpy, preallocated): once full, the oldest are overwritten."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity, self.obs_dim, self.act_dim = capacity, obs_dim, act_dim
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, act_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.terminated = np.zeros(capacity, np.float32)
        self.truncated = np.zeros(capacity, np.float32)
        self.size = 0
        self.pos = 0

    def add(self, obs, action, reward, next_obs, terminated, truncated) -> None:
        """Append B transitions: obs (B, D), action (B, A), reward (B,), next_obs (B, D), terminated/truncated (B,)."""
        b = len(reward)
        if b > self.capacity:  # only the newest `capacity` survive anyway
            obs, action, reward, next_obs, terminated, truncated = (
                x[-self.capacity :] for x in (obs, action, reward, next_obs, terminated, truncated)
            )
            b = self.capacity
        idx = (self.pos + np.arange(b)) % self.capacity
        self.obs[idx], self.action[idx], self.reward[idx] = obs, action, reward
        self.next_obs[idx], self.terminated[idx], self.truncated[idx] = next_obs, terminated, truncated
        self.pos = int((self.pos + b) % self.capacity)
        self.size = int(min(self.size + b, self.capacity))

    def add_episode(self, ep: Episode, context: np.ndarray | None = None) -> None:
        """``ep``'s transitions; ``context`` (C,): its body's features, appended to every observation
        (a body-conditioned policy's replay)."""
        obs = ep.observation
        if context is not None and len(context):
            obs = np.concatenate([obs, np.broadcast_to(np.asarray(context, np.float32), (len(obs), len(context)))], axis=1)
        self.add(obs[:-1], ep.action, ep.reward, obs[1:], ep.terminated, ep.truncated)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {f: getattr(self, f)[idx] for f in FIELDS}

    # -- checkpointing -------------------------------------------------------------------
    def state_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.{f}": torch.from_numpy(np.ascontiguousarray(getattr(self, f)[: self.size])) for f in FIELDS}
        out[f"{prefix}.cursor"] = torch.tensor([self.size, self.pos], dtype=torch.int64)
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
        size, pos = (int(x) for x in tensors[f"{prefix}.cursor"])
        if size > self.capacity:
            raise ValueError(f"checkpointed replay '{prefix}' holds {size} transitions, more than this capacity {self.capacity}")
        for f in FIELDS:
            getattr(self, f)[:size] = tensors[f"{prefix}.{f}"].numpy()
        self.size, self.pos = size, pos


def episodes_digest(episodes: Sequence[Episode]) -> str:
    """A short fingerprint of an episode list (ids and lengths), to check a resume sees the same data."""
    h = hashlib.sha256()
    for ep in episodes:
        h.update(f"{ep.episode_id}:{ep.num_steps};".encode())
    return h.hexdigest()[:16]


def split_counts(ratios: Mapping[str, float], batch_size: int) -> dict[str, int]:
    """Per-source sample counts summing to ``batch_size`` (largest remainder, ties by name)."""
    total = sum(ratios.values())
    exact = {k: batch_size * v / total for k, v in ratios.items()}
    counts = {k: int(np.floor(x)) for k, x in exact.items()}
    left = batch_size - sum(counts.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), k))[:left]:
        counts[k] += 1
    return counts


class MixedReplay:
    """Named :class:`TransitionBuffer` sources sampled in fixed ratios.

    ``ratios``: source name -> weight (> 0; normalised). ``offline``: source name -> episodes.
    ``online_source``: the source the trainer's own transitions go to (it gets
    ``online_capacity`` extra room) and must have a ratio. ``generated``: source name ->
    capacity of sources the learner fills itself while training (world-model rollouts, via
    :meth:`add`). Every source with a ratio needs data: an offline list, being the online
    source, or being generated.
    """

    def __init__(
        self,
        ratios: Mapping[str, float],
        obs_dim: int,
        act_dim: int,
        *,
        online_source: str = "online",
        online_capacity: int = 1_000_000,
        offline: Mapping[str, Sequence[Episode]] | None = None,
        robot_model: str | None = None,
        generated: Mapping[str, int] | None = None,
        context_dim: int = 0,
        context_of: Callable[[Episode], np.ndarray | None] | None = None,
    ):
        """``obs_dim``: what is stored per observation, the last ``context_dim`` of them the body
        features of a conditioned policy; ``context_of(episode)`` gives an offline episode's (None or
        no ``context_of``: the nominal body, all zeros)."""
        offline, generated = dict(offline or {}), dict(generated or {})
        if not ratios or any(v <= 0 or not np.isfinite(v) for v in ratios.values()):
            raise ValueError(f"replay ratios must be a non-empty map of positive weights, got {dict(ratios)}")
        unused = (set(offline) | set(generated)) - set(ratios)
        if unused:
            raise ValueError(f"episodes given for sources {sorted(unused)} that have no ratio in {dict(ratios)}; add a ratio or drop them")
        if online_source not in ratios:
            raise ValueError(
                f"online_source {online_source!r} has no ratio in {dict(ratios)}: the collected transitions would be dropped; "
                "give it a ratio or name one of the sources"
            )
        for name in ratios:
            if name != online_source and not offline.get(name) and name not in generated:
                raise ValueError(
                    f"replay source {name!r} has ratio {ratios[name]} but no episodes: pass offline={{{name!r}: [...]}}, "
                    f"make it the online source, or drop its ratio"
                )
        self.ratios = {k: float(v) for k, v in sorted(ratios.items())}
        self.online_source = online_source
        self.generated = tuple(sorted(generated))
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.digests = {name: episodes_digest(eps) for name, eps in sorted(offline.items())}
        self.sources: dict[str, TransitionBuffer] = {}
        for name in self.ratios:
            episodes = offline.get(name, [])
            _check_episodes(name, episodes, obs_dim - context_dim, act_dim, robot_model)
            capacity = sum(ep.num_steps for ep in episodes) + (online_capacity if name == self.online_source else 0) + generated.get(name, 0)
            buf = TransitionBuffer(capacity, obs_dim, act_dim)
            for ep in episodes:
                context = context_of(ep) if context_dim and context_of is not None else None
                buf.add_episode(ep, np.zeros(context_dim, np.float32) if context_dim and context is None else context)
            self.sources[name] = buf

    def add_online(self, obs, action, reward, next_obs, terminated, truncated) -> None:
        """Transitions the trainer collected (batch layout as :meth:`TransitionBuffer.add`)."""
        self.sources[self.online_source].add(obs, action, reward, next_obs, terminated, truncated)

    def add(self, source: str, obs, action, reward, next_obs, terminated, truncated) -> None:
        """Transitions of a generated source (batch layout as :meth:`TransitionBuffer.add`)."""
        if source not in self.generated:
            raise KeyError(f"{source!r} is not a generated replay source (generated: {list(self.generated)})")
        self.sources[source].add(obs, action, reward, next_obs, terminated, truncated)

    def sizes(self) -> dict[str, int]:
        return {k: b.size for k, b in self.sources.items()}

    def can_sample(self) -> bool:
        return all(b.size > 0 for b in self.sources.values())

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` transitions, split across sources by ratio (indices drawn from ``generator``)."""
        parts = []
        for name, count in split_counts(self.ratios, batch_size).items():
            if count == 0:
                continue
            buf = self.sources[name]
            if buf.size == 0:
                raise RuntimeError(f"replay source {name!r} is empty; collect online steps before sampling (learning_starts)")
            idx = torch.randint(buf.size, (count,), generator=generator).numpy()
            parts.append(buf.take(idx))
        cat = {f: np.concatenate([p[f] for p in parts]) if len(parts) > 1 else parts[0][f] for f in FIELDS}
        return Batch(**{f: torch.from_numpy(v) for f, v in cat.items()})

    # -- checkpointing: the online and generated sources' contents; offline sources by digest --
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in (self.online_source, *self.generated):
            out.update(self.sources[name].state_tensors(f"replay.{name}"))
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], digests: Mapping[str, str]) -> None:
        if dict(digests) != self.digests:
            raise ValueError(
                f"the checkpoint was trained on offline episodes {dict(digests)} (digests) but this run got {self.digests}: "
                "resume with the same data snapshot"
            )
        for name in (self.online_source, *self.generated):
            self.sources[name].load_state_tensors(tensors, f"replay.{name}")


def _check_episodes(name: str, episodes: Sequence[Episode], obs_dim: int, act_dim: int, robot_model: str | None) -> None:
    for ep in episodes:
        if ep.observation.shape[1] != obs_dim or ep.action.shape[1] != act_dim:
            raise ValueError(
                f"source {name!r}: episode {ep.episode_id} has obs_dim {ep.observation.shape[1]}, act_dim {ep.action.shape[1]}; "
                f"this policy needs {obs_dim}, {act_dim}"
            )
        if robot_model is not None and ep.metadata.get("robot_model") != robot_model:
            raise ValueError(f"source {name!r}: episode {ep.episode_id} is from robot model {ep.metadata.get('robot_model')!r}, not {robot_model!r}")
