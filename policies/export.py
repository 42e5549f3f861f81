"""Export a trained policy for robots: safetensors weights (+ normalisation) and a JSON manifest.

The manifest is a plain JSON dict written with sorted keys (:func:`policies.runtime.manifest_bytes`),
so its bytes are stable and the fleet can sign them. It records the architecture, the
observation/action spec, the training data snapshot and the evaluation results; the
weights file is named and hashed (sha256) in it. :mod:`policies.runtime` (numpy only)
loads and verifies the pair.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save as save_safetensors_bytes
from safetensors.torch import load as load_torch_safetensors

from policies.checkpoint import env_steps_of, load_checkpoint
from policies.networks import Policy, PolicySpec
from sim.variation import CONTEXT_FIELDS
from policies.runtime import ARCHITECTURE, CONTEXT_ENCODING, FORMAT, FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE, load_policy, manifest_bytes, parse_manifest


def build_manifest(
    policy: Policy,
    weights: bytes,
    *,
    robot_model: str,
    policy_version: str,
    algorithm: str,
    data_snapshot: str | None = None,
    env_steps: int | None = None,
    seed: int | None = None,
    training_config: Mapping | None = None,
    evaluation: Mapping | None = None,
) -> dict:
    spec = policy.spec
    observation = {"dim": spec.obs_dim, "normalization": {"enabled": spec.normalize_obs, "clip": spec.obs_clip, "eps": spec.obs_eps}}
    if spec.context_dim:  # a body-conditioned policy: what the robot appends to each observation
        observation["context"] = {"dim": spec.context_dim, "fields": list(CONTEXT_FIELDS[: spec.context_dim]), "encoding": CONTEXT_ENCODING}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "policy_version": policy_version,
        "robot_model": robot_model,
        "architecture": {"type": ARCHITECTURE, "hidden_sizes": list(spec.hidden_sizes), "activation": spec.activation, "output": "tanh"},
        "observation": observation,
        "action": {"dim": spec.act_dim, "low": -1.0, "high": 1.0},
        "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights), "dtype": "float32"},
        "training": {
            "algorithm": algorithm,
            "data_snapshot": data_snapshot,
            "env_steps": env_steps,
            "seed": seed,
            "config": dict(training_config) if training_config is not None else None,
        },
        "evaluation": dict(evaluation) if evaluation is not None else None,
    }
    return parse_manifest(manifest_bytes(manifest))  # round-trip: JSON-able and within spec


def export_policy(
    policy: Policy,
    directory: str | os.PathLike,
    *,
    robot_model: str,
    policy_version: str,
    algorithm: str,
    data_snapshot: str | None = None,
    env_steps: int | None = None,
    seed: int | None = None,
    training_config: Mapping | None = None,
    evaluation=None,
) -> dict:
    """Write ``directory/weights.safetensors`` and ``directory/manifest.json``; returns the manifest.

    ``data_snapshot``: the pinned store snapshot id the training data came from;
    ``evaluation``: an :class:`policies.evaluate.EvaluationResult` or a JSON-able dict.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.numpy() for k, v in policy.export_tensors().items()}
    bad = [k for k, v in tensors.items() if not np.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to export a policy with NaN/Inf in {bad}")
    weights = save_safetensors_bytes(tensors)
    if evaluation is not None and hasattr(evaluation, "to_dict"):
        evaluation = evaluation.to_dict()
    manifest = build_manifest(
        policy,
        weights,
        robot_model=robot_model,
        policy_version=policy_version,
        algorithm=algorithm,
        data_snapshot=data_snapshot,
        env_steps=env_steps,
        seed=seed,
        training_config=training_config,
        evaluation=evaluation,
    )
    (directory / WEIGHTS_FILE).write_bytes(weights)
    (directory / MANIFEST_FILE).write_bytes(manifest_bytes(manifest))
    return manifest


def build_policy(spec: Mapping, state: Mapping[str, torch.Tensor], *, state_dependent_std: bool) -> Policy:
    """A torch :class:`Policy` of ``spec`` (a :class:`PolicySpec` as a dict) holding the state dict ``state``."""
    policy = Policy(PolicySpec(**spec), state_dependent_std=state_dependent_std)
    policy.load_state_dict(state)
    return policy.eval()


def policy_from_checkpoint(directory: str | os.PathLike) -> tuple[Policy, dict]:
    """The torch :class:`Policy` saved in a training checkpoint (:mod:`policies.checkpoint`), and its meta."""
    tensors, meta = load_checkpoint(directory)
    head = "policy."
    sd = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
    state_dependent_std = any(k.startswith("actor.log_std_head.") for k in sd)  # SAC's actor, also the model-based learner's
    return build_policy(meta["policy_spec"], sd, state_dependent_std=state_dependent_std), meta


def export_checkpoint(checkpoint: str | os.PathLike, directory: str | os.PathLike, **kwargs) -> dict:
    """Export the policy of a training checkpoint (kwargs as :func:`export_policy`; algorithm, steps,
    seed and config default to the checkpoint's)."""
    policy, meta = policy_from_checkpoint(checkpoint)
    kwargs.setdefault("algorithm", meta["algorithm"])
    kwargs.setdefault("env_steps", env_steps_of(meta))
    kwargs.setdefault("seed", meta["trainer_config"]["seed"])
    kwargs.setdefault("training_config", {"trainer": meta["trainer_config"], "algorithm": meta["algo_config"]})
    kwargs.setdefault("robot_model", meta["trainer_config"]["robot"])
    return export_policy(policy, directory, **kwargs)


def torch_policy_from_export(directory: str | os.PathLike) -> Policy:
    """Rebuild the torch policy of an export (for re-evaluation on the learner side)."""
    manifest = parse_manifest((Path(directory) / MANIFEST_FILE).read_bytes())
    runtime = load_policy(directory, robot_model=manifest["robot_model"], obs_dim=manifest["observation"]["dim"], act_dim=manifest["action"]["dim"])
    arch, norm = manifest["architecture"], manifest["observation"]["normalization"]
    spec = PolicySpec(
        runtime.obs_dim, runtime.act_dim, tuple(arch["hidden_sizes"]), arch["activation"], norm["enabled"], norm["clip"], norm["eps"], runtime.context_dim
    )
    policy = Policy(spec)
    weights = (Path(directory) / manifest["weights"]["file"]).read_bytes()
    policy.load_export_tensors(dict(load_torch_safetensors(weights)))
    return policy.eval()

