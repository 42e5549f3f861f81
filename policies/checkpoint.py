"""Training checkpoints: one safetensors file of every tensor plus one JSON file, nothing pickled.

Layout of a checkpoint directory::

    state.safetensors   weights, optimiser moments, normaliser, replay, stepper state,
                        RNG states (uint8 tensors)
    state.json          {"format", "format_version", "tensors_sha256", ...counters and config}

Both files are written to temporary names and renamed, so a crash mid-write leaves the
previous checkpoint intact. Ray Train checkpoints are directories too: the distributed
learner writes this layout into them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from sim.durable import write_durably

FORMAT = "flywheel-policy-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted or from another format/run."""


def env_steps_of(meta: Mapping) -> int:
    """The env steps a trainer's checkpoint (its ``meta``) holds, of every rank: each rank records its own, so
    ``env_steps x world_size`` (a checkpoint of a build without ``world_size`` is one rank's)."""
    return int(meta.get("env_steps", 0)) * int(meta.get("world_size", 1))


def save_checkpoint(directory: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> Path:
    """Write ``tensors`` and JSON-able ``meta`` into ``directory`` (created); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    blob = save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "tensors_sha256": hashlib.sha256(blob).hexdigest(), **meta}
    write_durably(directory / TENSORS_FILE, blob)
    write_durably(directory / META_FILE, json.dumps(header, indent=1, sort_keys=True).encode())
    return directory


def discard_checkpoint(directory: str | os.PathLike) -> None:
    """Remove the checkpoint in ``directory`` (its two files, or a distributed one's ``rank<N>/`` folders); anything
    else there (a policy export beside it) stays."""
    directory = Path(directory)
    for name in (TENSORS_FILE, META_FILE):
        (directory / name).unlink(missing_ok=True)
    for rank in directory.glob("rank[0-9]*"):
        if rank.is_dir():
            shutil.rmtree(rank)


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint directory; raises :class:`CheckpointError` saying what is wrong.

    A distributed checkpoint (``rank0/``, ``rank1/``, ... as Ray Train stores it) reads rank 0's.
    """
    directory = Path(directory)
    if not (directory / META_FILE).exists() and (directory / "rank0" / META_FILE).is_file():
        directory = directory / "rank0"
    paths = [directory / TENSORS_FILE, directory / META_FILE]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(f"{directory} is not a policy checkpoint: missing {missing}")
    try:
        meta = json.loads(paths[1].read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{paths[1]} is not valid JSON ({exc}); the checkpoint is corrupted") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}: format {meta.get('format')!r} v{meta.get('format_version')!r}, this build reads {FORMAT!r} v{FORMAT_VERSION}"
        )
    blob = paths[0].read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise CheckpointError(f"{paths[0]} does not match the sha256 in {META_FILE}: the checkpoint is corrupted or mixed; restore the folder from a backup, or train anew in a new folder")
    return dict(load_safetensors_bytes(blob)), meta



# -- helpers to turn training state into (tensors, JSON) -------------------------------------
def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser's state_dict split into tensors (``prefix.state.<param>.<key>``) and JSON groups."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], meta: Mapping, prefix: str) -> None:
    state: dict[int, dict] = {}
    head = f"{prefix}.state."
    for name, value in tensors.items():
        if name.startswith(head):
            pid, key = name[len(head) :].split(".", 1)
            state.setdefault(int(pid), {})[key] = value.clone()
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def module_state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module_state(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    head = f"{prefix}."
    sd = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{prefix}' does not fit this network: missing {missing}, unexpected {unexpected}")


def generator_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


def numpy_rng_state(rng: np.random.Generator) -> dict:
    """A numpy Generator's state as JSON (PCG64 integers are exact in JSON)."""
    return rng.bit_generator.state


def set_numpy_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state
