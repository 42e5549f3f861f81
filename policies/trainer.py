"""One training loop with the algorithm injected (SAC, PPO: :class:`policies.transition.Algorithm`).

The trainer owns what every algorithm shares: collection on the batched MuJoCo stepper,
the schedule (update when the algorithm is ready, checkpoint every N updates, evaluate every
M updates), logging, and resume. The algorithm owns its networks, data store and update.

Resume is bit-identical on CPU with the same seed and thread count: a checkpoint holds the
algorithm's tensors (weights, optimiser moments, normaliser, replay, RNG state), the
stepper's mid-episode state and the loop's counters (:mod:`policies.checkpoint`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from policies.checkpoint import load_checkpoint, save_checkpoint
from policies.networks import PolicySpec
from policies.parallel import LocalComm
from policies.settings import checkpoint_settings_differ, settings_json
from policies.stepper_state import FreeRunning, capture, restore
from policies.transition import Algorithm, VectorStep
from sim.batched import BatchedStepper
from sim.config_rules import AT_LEAST_1, COUNT, check_fields
from sim.episode import Episode
from sim.robots import get_task
from sim.sensor_filter import seen_body
from sim.variation import CONTEXT_DIM, VariationProfile
from worldmodel.device import AUTO, check_device_name, resolve_device

LogFn = Callable[[dict[str, float], int], None]
ALGORITHMS = ("ppo", "sac", "mbpo")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    robot: str = "pendulum"
    algorithm: str = "ppo"  # "ppo", "sac" or "mbpo"
    num_worlds: int = 16  # worlds of the batched stepper (per learner rank)
    total_env_steps: int = 100_000  # over all ranks
    seed: int = 0
    nthread: int | None = 1  # physics threads of the stepper
    torch_threads: int = 1  # torch intra-op threads (small MLPs: 1 is fastest)
    checkpoint_every: int = 0  # updates between checkpoints (0: only when train() returns)
    log_every: int = 1  # updates between log calls
    eval_every: int = 0  # updates between evaluations (0: never)
    eval_episodes: int = 4  # per evaluation profile
    # with eval_every: keep the best-evaluated policy of this train() call as ``Trainer.best_policy``
    # (the worst profile's return first, then the mean); the learner itself goes on from its latest state
    keep_best: bool = False
    # with keep_best: end train() once the kept policy scored the task's maximum return on every profile
    # (``Task.max_step_reward`` x the episode's steps, where the task has one): no later policy can replace it
    stop_at_max_return: bool = False
    # learner device: "auto" (cuda when torch sees one, else cpu), "cpu", "cuda", "cuda:1"; make_algorithm resolves
    # it. Bit-identical resume is promised on CPU, hence this default; the apps' configs (conf/policy/*.yaml) say auto
    device: str = "cpu"

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        check_device_name(self.device)  # whether it is present is asked where it is resolved: here, or a Ray cluster
        check_fields(
            self, num_worlds=AT_LEAST_1, total_env_steps=AT_LEAST_1, torch_threads=AT_LEAST_1, log_every=COUNT, eval_episodes=AT_LEAST_1,
            checkpoint_every=COUNT, eval_every=COUNT,
        )  # fmt: skip
        if self.keep_best and not self.eval_every:
            raise ValueError("keep_best picks among evaluations: set eval_every > 0 too")
        if self.stop_at_max_return and not self.keep_best:
            raise ValueError("stop_at_max_return stops once the kept policy cannot be beaten: set keep_best (and eval_every) too")


@dataclasses.dataclass
class TrainResult:
    env_steps: int  # over all ranks
    updates: int
    wall_s: float
    metrics: dict[str, float]  # the last logged metrics
    curve: list[tuple[int, float]]  # (env_steps, mean return of episodes finished since the previous update)
    checkpoint: Path | None


def make_spec(robot: str, algo_config) -> PolicySpec:
    """The policy spec of ``robot`` with the network settings of an algorithm config."""
    task = get_task(robot)
    context_dim = CONTEXT_DIM if getattr(algo_config, "body_context", False) else 0
    return PolicySpec(task.obs_dim, task.act_dim, algo_config.hidden_sizes, algo_config.activation, algo_config.normalize_obs, context_dim=context_dim)


def algo_config_class(algorithm: str) -> type:
    """The config class of ``TrainerConfig.algorithm``'s learner."""
    from policies.mbpo import MBPOConfig
    from policies.ppo import PPOConfig
    from policies.sac import SACConfig

    return {"ppo": PPOConfig, "sac": SACConfig, "mbpo": MBPOConfig}[algorithm]


def make_algorithm(
    config: TrainerConfig,
    algo_config,
    *,
    comm: LocalComm | None = None,
    offline: Mapping[str, Sequence[Episode]] | None = None,
    device: str | torch.device | None = None,
    context_of: Callable[[Episode], np.ndarray | None] | None = None,
) -> Algorithm:
    """Build the algorithm ``config.algorithm`` for ``config.robot`` (``offline``: SAC replay sources,
    ``context_of(episode)``: their bodies' features for a body-conditioned policy; ``device``
    overrides ``config.device``, which is resolved here: ``"auto"`` is cuda when torch sees one)."""
    device = resolve_device(config.device) if device is None else torch.device(device)
    from policies.mbpo import MBPO
    from policies.ppo import PPO
    from policies.sac import SAC

    spec = make_spec(config.robot, algo_config)
    kind = algo_config_class(config.algorithm)
    if not isinstance(algo_config, kind):
        raise TypeError(f"algorithm {config.algorithm!r} needs a {kind.__name__}, got {type(algo_config).__name__}")
    if offline and config.algorithm != "sac":
        why = {"ppo": "PPO is on-policy", "mbpo": "the model-based learner takes recorded episodes through MBPO.add_offline"}[config.algorithm]
        raise ValueError(f"{why}: it cannot use offline replay sources (use SAC)")
    if config.algorithm == "ppo":
        if spec.context_dim:
            raise ValueError("PPO has no body-conditioned policy: use SAC or the model-based learner (body_context)")
        return PPO(spec, algo_config, num_worlds=config.num_worlds, seed=config.seed, comm=comm, device=device)
    if config.algorithm == "mbpo":
        return MBPO(spec, model_beside_learner(algo_config, device), seed=config.seed, robot_model=config.robot, comm=comm, device=device)
    return SAC(spec, algo_config, seed=config.seed, offline=offline, robot_model=config.robot, comm=comm, device=device, context_of=context_of)


def model_beside_learner(algo_config, device: torch.device):
    """The model-based learner's config with its world model on the learner's ``device`` where its
    ``model_train.device`` is ``"auto"`` (the default): policy and model share one device."""
    if algo_config.model_train.device != AUTO:
        return algo_config
    return dataclasses.replace(algo_config, model_train=dataclasses.replace(algo_config.model_train, device=str(device)))


def rank_share(total_env_steps: int, world_size: int) -> int:
    """The env steps one of ``world_size`` ranks collects: its share of the budget, rounded up."""
    return -(-total_env_steps // world_size)


def steps_trained(config: TrainerConfig, world_size: int) -> int:
    """The env steps a run of ``config`` on ``world_size`` ranks ends at: each rank steps all its worlds at once until
    it has its share, so a budget that is no multiple of them is passed by under one step (202 on 4 worlds: 204)."""
    return world_size * -(-rank_share(config.total_env_steps, world_size) // config.num_worlds) * config.num_worlds


def first_update(config: TrainerConfig, algo_config, observed: int = 0, prefix: str = "") -> tuple[int, str]:
    """(env steps one rank collects before the learner's first update, the settings that say so, by key): PPO's first
    rollout; SAC's (and the model-based learner's) ``learning_starts``, less the ``observed`` steps of a learner carried
    over, then the steps that owe one gradient step at ``utd_ratio``. ``prefix``: where the keys live (``policy.``).
    The model-based learner's first update also waits for its first model fit, at the same ``learning_starts``, which
    ``MBPOConfig`` refuses below ``policies.mbpo.MIN_LEARNING_STARTS`` (the fit needs that many to split): so the two agree."""
    if config.algorithm == "ppo":
        return algo_config.n_steps * config.num_worlds, f"one rollout: {prefix}algorithm.n_steps={algo_config.n_steps} x {prefix}trainer.num_worlds={config.num_worlds}"
    sac, key = (algo_config.sac, f"{prefix}algorithm.sac.") if config.algorithm == "mbpo" else (algo_config, f"{prefix}algorithm.")
    owing = math.ceil(1.0 / sac.utd_ratio - 1e-9)  # env steps past learning_starts that owe one gradient step
    seen = f", {observed} already seen" if observed else ""
    return max(0, sac.learning_starts - observed) + owing, f"{key}learning_starts={sac.learning_starts}{seen}, then {owing} at {key}utd_ratio={sac.utd_ratio:g}"


def check_budget(config: TrainerConfig, algo_config, world_size: int = 1, observed: int = 0, prefix: str = "") -> None:
    """ValueError unless a run of ``config`` reaches the learner's first update: a budget short of it once trained nothing
    and said nothing, and flywheel-train exported, evaluated and logged the initial network as the trained policy."""
    need, why = first_update(config, algo_config, observed, prefix)
    if steps_trained(config, world_size) // world_size < need:
        least = world_size * -(-need // config.num_worlds) * config.num_worlds
        per_rank = f" per rank ({world_size} ranks)" if world_size > 1 else ""
        raise ValueError(
            f"{prefix}trainer.total_env_steps={config.total_env_steps} ends before the learner's first update, which needs {need} env steps"
            f"{per_rank} ({why}): set {prefix}trainer.total_env_steps to {least} or more, or lower those settings"
        )


class Trainer:
    """Collect on the batched stepper, update the injected algorithm, log, checkpoint, evaluate.

    ``profiles``: the variation profiles the training worlds cycle through (the fleet's robots);
    ``log(metrics, env_steps)`` receives namespaced metrics (docs/policies.md lists them);
    ``checkpoint_dir``: where checkpoints go (:meth:`resume` continues from one there);
    ``checkpointer(trainer, metrics)``: replaces :meth:`save` every ``checkpoint_every``
    updates (Ray Train reports checkpoints this way); ``algo_config`` is recorded in checkpoints;
    ``sensor_filters`` ({profile: SensorFilter}): bodies whose robot filters its sensor on board,
    in the training and the evaluation worlds; a conditioned policy is told they are clean
    (:func:`sim.sensor_filter.seen_body`); ``carried_on``: the learner goes on in a later Trainer (the
    flywheel's next iteration), so this call may end in its warm-up: the caller checks the whole run's
    budget (fleet.pipeline.loop.check_run_budget), this one does not refuse a budget short of the first update.
    """

    def __init__(
        self,
        config: TrainerConfig,
        algorithm: Algorithm,
        *,
        profiles: Sequence[VariationProfile] | None = None,
        eval_profiles: Sequence[VariationProfile] | None = None,
        log: LogFn | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        comm: LocalComm | None = None,
        algo_config=None,
        checkpointer: Callable[[Trainer, dict[str, float]], None] | None = None,
        sensor_filters=None,
        carried_on: bool = False,
    ):
        self.config, self.algo, self.log = config, algorithm, log
        self.sensor_filters = sensor_filters
        self.algo_config = algo_config if algo_config is not None else getattr(algorithm, "config", None)  # recorded in checkpoints: resume compares it
        self.checkpointer = checkpointer
        self.comm = comm or LocalComm()
        if not carried_on and isinstance(self.algo_config, algo_config_class(config.algorithm)):  # before anything is built: a budget that trains nothing
            check_budget(config, self.algo_config, self.comm.world_size, observed=getattr(algorithm, "env_steps", 0))
        torch.set_num_threads(config.torch_threads)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        profiles = list(profiles or [VariationProfile()])
        n = config.num_worlds
        self.eval_profiles = list(eval_profiles or profiles)
        self.stepper = BatchedStepper(config.robot, n, nthread=config.nthread, record=False, sensor_filters=sensor_filters)
        world_seed = config.seed * 1_000_003 + self.comm.rank
        world_profiles = [profiles[w % len(profiles)] for w in range(n)]
        self.source = FreeRunning(config.robot, world_seed, world_profiles)
        if hasattr(algorithm, "set_world_profiles"):  # a learner that reads each world's body (MBPO's model, a conditioned policy)
            algorithm.set_world_profiles([seen_body(p, sensor_filters) for p in world_profiles])
        self.obs = self.source.start(self.stepper)
        self.local_target = rank_share(config.total_env_steps, self.comm.world_size)  # env steps on this rank
        self.env_steps = 0  # on this rank
        self.updates = 0
        self.ep_return = np.zeros(n)
        self.ep_length = np.zeros(n, np.int64)
        self._finished: list[tuple[float, int]] = []  # (return, length) since the previous log
        self._curve_mark = 0  # _finished[: mark] is already in the curve
        self.curve: list[tuple[int, float]] = []
        self.last_metrics: dict[str, float] = {}
        self.best_policy, self.best_score = None, None  # keep_best: a copy of the best-evaluated policy, its score
        task = get_task(config.robot)
        self.max_return = None if task.max_step_reward is None else task.max_step_reward * task.max_steps  # of an evaluation episode

    # -- the loop --------------------------------------------------------------------------
    def train(self, max_updates: int | None = None) -> TrainResult:
        """Run until ``total_env_steps`` (or ``max_updates`` more updates, to stop early: a "crash")."""
        start, stop_at = time.perf_counter(), None if max_updates is None else self.updates + max_updates
        steps_at_log, t_log = self.env_steps, start
        while self.env_steps < self.local_target and (stop_at is None or self.updates < stop_at) and not self.unbeatable:
            self._collect_step()
            if not self.algo.ready():
                continue
            metrics = self.algo.update()
            self.updates += 1
            self._track(metrics)
            cfg = self.config
            if cfg.log_every and self.updates % cfg.log_every == 0:
                now = time.perf_counter()
                metrics["train/env_steps_per_s"] = (self.env_steps - steps_at_log) * self.comm.world_size / max(now - t_log, 1e-9)
                steps_at_log, t_log = self.env_steps, now
                self._log(metrics)
            elif not cfg.log_every:
                self._finished, self._curve_mark = [], 0
            if cfg.eval_every and self.updates % cfg.eval_every == 0:
                self._log(self._evaluate_and_keep())
            if cfg.checkpoint_every and self.updates % cfg.checkpoint_every == 0:
                if self.checkpointer is not None:
                    self.checkpointer(self, metrics)
                else:
                    self.save()
        if self.config.keep_best and self.env_steps >= self.local_target:  # the final policy competes too
            self._log(self._evaluate_and_keep())
        path = self.save() if self.checkpoint_dir is not None else None
        return TrainResult(self.env_steps * self.comm.world_size, self.updates, time.perf_counter() - start, self.last_metrics, self.curve, path)

    def _collect_step(self) -> None:
        obs = self.obs
        action = np.asarray(self.algo.explore(obs), np.float32)
        next_obs, reward, terminated, truncated, info = self.stepper.step(action)
        done = terminated | truncated
        final = np.where(done[:, None], info["final_observation"], next_obs) if done.any() else next_obs
        self.algo.observe(VectorStep(obs, action, reward, next_obs, final, terminated, truncated))
        self.ep_return += reward
        self.ep_length += 1
        for w in np.flatnonzero(done):
            self._finished.append((float(self.ep_return[w]), int(self.ep_length[w])))
            self.ep_return[w], self.ep_length[w] = 0.0, 0
        self.obs = next_obs
        self.env_steps += len(reward)

    def _track(self, metrics: dict[str, float]) -> None:
        """Add loop metrics: episodes finished since the previous log (the curve: since the previous update)."""
        global_steps = self.env_steps * self.comm.world_size
        metrics["train/env_steps"] = float(global_steps)
        metrics["train/updates"] = float(self.updates)
        new = self._finished[self._curve_mark :]
        if new:
            self.curve.append((global_steps, float(np.mean([r for r, _ in new]))))
            self._curve_mark = len(self._finished)
        if self._finished:
            metrics["train/episode_return"] = float(np.mean([r for r, _ in self._finished]))
            metrics["train/episode_length"] = float(np.mean([n for _, n in self._finished]))
            metrics["train/episodes"] = float(len(self._finished))
        self.last_metrics = metrics

    def _log(self, metrics: dict[str, float]) -> None:
        if "train/episodes" in metrics:
            self._finished, self._curve_mark = [], 0
        if self.log is not None and self.comm.rank == 0:
            self.log(metrics, self.env_steps * self.comm.world_size)

    def evaluate(self) -> dict[str, float]:
        """Evaluate the current policy on ``eval_profiles`` (fixed seeds); returns ``eval/...`` metrics."""
        from policies.evaluate import evaluate

        result = evaluate(self.algo.policy, self.config.robot, self.eval_profiles, self.config.eval_episodes, seed=self.config.seed, sensor_filters=self.sensor_filters)
        return result.metrics()

    @property
    def unbeatable(self) -> bool:
        """``stop_at_max_return``: whether the kept policy reached the task's maximum return on every profile."""
        return bool(self.config.stop_at_max_return and self.max_return is not None and self.best_score is not None and self.best_score[0] >= self.max_return)

    def _evaluate_and_keep(self) -> dict[str, float]:
        metrics = self.evaluate()
        if self.config.keep_best:
            score = (metrics["eval/min_profile_return"], metrics["eval/mean_return"])
            if self.best_score is None or score > self.best_score:
                self.best_score, self.best_policy = score, copy.deepcopy(self.algo.policy)
            metrics["eval/best_min_profile_return"] = self.best_score[0]
        return metrics

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, algo_meta = self.algo.state()
        stepper_tensors, stepper_meta = capture(self.stepper, self.source)
        tensors.update(stepper_tensors)
        tensors["trainer.ep_return"] = torch.from_numpy(self.ep_return.copy())
        tensors["trainer.ep_length"] = torch.from_numpy(self.ep_length.copy())
        meta = {
            "algorithm": self.algo.name,
            "trainer_config": settings_json(self.config),
            "algo_config": settings_json(self.algo_config),
            "policy_spec": dataclasses.asdict(self.algo.policy.spec),
            "env_steps": self.env_steps,
            "updates": self.updates,
            "world_size": self.comm.world_size,
            "rank": self.comm.rank,
            "finished": self._finished,
            "curve_mark": self._curve_mark,
            "curve": self.curve,
            "algo": algo_meta,
            "stepper": stepper_meta,
        }
        return tensors, meta

    def save(self, directory: str | os.PathLike | None = None) -> Path:
        """Write a checkpoint (default: ``checkpoint_dir``, per rank ``rank<r>`` when distributed)."""
        directory = Path(directory) if directory is not None else self.checkpoint_dir
        if directory is None:
            raise ValueError("no checkpoint directory: pass checkpoint_dir to the Trainer or a directory to save()")
        if self.comm.world_size > 1:
            directory = directory / f"rank{self.comm.rank}"
        tensors, meta = self.state()
        return save_checkpoint(directory, tensors, meta)

    def resume(self, directory: str | os.PathLike | None = None) -> None:
        """Continue from a checkpoint written by :meth:`save` with the same config."""
        directory = Path(directory) if directory is not None else self.checkpoint_dir
        if directory is None:
            raise ValueError("no checkpoint directory to resume from")
        if self.comm.world_size > 1:
            directory = directory / f"rank{self.comm.rank}"
        tensors, meta = load_checkpoint(directory)
        differ = checkpoint_settings_differ(self.config, self.algo_config, meta)
        if meta["algorithm"] != self.algo.name or meta["world_size"] != self.comm.world_size:
            differ += ["algorithm/world size"]
        if differ:
            raise ValueError(f"checkpoint in {directory} is from another run: differs in {', '.join(differ)}; resume with its config")
        self.algo.load_state(tensors, meta["algo"])
        restore(self.stepper, self.source, tensors, meta["stepper"])
        self.obs = self.stepper.obs.copy()
        self.ep_return = tensors["trainer.ep_return"].numpy().copy()
        self.ep_length = tensors["trainer.ep_length"].numpy().copy()
        self.env_steps, self.updates = int(meta["env_steps"]), int(meta["updates"])
        self._finished = [tuple(x) for x in meta["finished"]]
        self._curve_mark = int(meta["curve_mark"])
        self.curve = [tuple(x) for x in meta["curve"]]

    def close(self) -> None:
        self.stepper.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
