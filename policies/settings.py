"""What a resumed run's settings are compared with: config dataclasses as the JSON a checkpoint or a run folder
records, and the keys in which two such records differ.

One comparison for every resume: ``Trainer.resume`` (a checkpoint's trainer and learner configs), flywheel-train's
check before it starts (the same, with a message that names the Hydra keys) and the flywheel loop's run folder
(``fleet.run_folders``: the whole run's settings tree)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

# settings of how a learner computes, not of what it learns (SACConfig.precision): a run resumes under another
# value, and under a build that added the key (its record lacks it)
ARITHMETIC = ("precision",)
# TrainerConfig keys a resumed run may change: its budget, logging, evaluation and device
RESUMABLE_CHANGES = ("total_env_steps", "checkpoint_every", "log_every", "eval_every", "eval_episodes", "keep_best", "stop_at_max_return", "device")


def settings_json(config) -> dict | None:
    """A config dataclass as the JSON a checkpoint records (``trainer_config``, ``algo_config``)."""
    if config is None:
        return None
    return json.loads(json.dumps(dataclasses.asdict(config)))


def flat_keys(tree: Mapping, prefix: str = "") -> dict:
    """A settings tree as flat ``a.b.c`` keys (an empty mapping is a value)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            out |= flat_keys(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_differ(now: Mapping, then: Mapping, keep: tuple[str, ...] = ()) -> list[str]:
    """The flat keys whose values differ between two settings trees, but ``ARITHMETIC`` ones and those in ``keep``
    (flat keys a resumed run may change)."""
    now, then = flat_keys(now), flat_keys(then)
    return [
        k for k in sorted(set(now) | set(then))
        if now.get(k) != then.get(k) and k not in keep and k.rsplit(".", 1)[-1] not in ARITHMETIC
    ]  # fmt: skip


def checkpoint_settings_differ(trainer_config, algo_config, meta: Mapping) -> list[str]:
    """Where a checkpoint (its ``meta``) was written under other settings than ``trainer_config`` and ``algo_config``
    (``trainer.KEY`` / ``algorithm.KEY``): its networks, replay and optimiser belong to those. The learner's config
    is compared where both are known (a checkpoint of a Trainer given no ``algo_config`` holds none)."""
    differ = [f"trainer.{k}" for k in settings_differ(settings_json(trainer_config), meta["trainer_config"], RESUMABLE_CHANGES)]
    then = meta.get("algo_config")
    if algo_config is not None and then is not None:
        differ += [f"algorithm.{k}" for k in settings_differ(settings_json(algo_config), then)]
    return differ
