"""Saving and loading a world model without pickle: safetensors for every tensor (weights,
normaliser statistics, elites, envelope), JSON for the spec and the model version.

Layout of a saved model (a directory):
    model.safetensors   the state dict
    model.json          {"format": "flywheel-worldmodel", "format_version": 1, "spec": {...},
                         "model_version": "wm-<16 hex>", "tensors": {name: shape}, "extra": {...}}

The model version is a content hash of the spec and every tensor, so the same weights
always carry the same version and any change gives a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from worldmodel.device import resolve_device
from worldmodel.ensemble import DynamicsEnsemble, ModelSpec

FORMAT = "flywheel-worldmodel"
FORMAT_VERSION = 1
WEIGHTS_FILE, META_FILE = "model.safetensors", "model.json"


def _state(model: DynamicsEnsemble) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def model_version(model: DynamicsEnsemble) -> str:
    """``wm-`` + 16 hex digits of sha256 over the spec JSON and every tensor (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(model.spec.to_json().encode())
    for name, tensor in sorted(_state(model).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "wm-" + digest.hexdigest()[:16]


def save(model: DynamicsEnsemble, directory: str | Path, extra: dict | None = None) -> str:
    """Write ``model`` to ``directory`` (created; existing files replaced atomically). Returns its version.

    ``extra``: JSON-serialisable notes kept beside the spec (e.g. a training report).
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = _state(model)
    envelope = ("obs_low", "obs_high")  # +-inf until data widens it, by design
    broken = sorted(k for k, v in state.items() if k not in envelope and v.is_floating_point() and not bool(v.isfinite().all()))
    if broken:  # a diverged fit: a saved model of NaN loads and rolls out nothing
        raise ValueError(f"the world model holds NaN or Inf in {len(broken)} tensors ({', '.join(broken[:3])}): its training diverged (lower model_train.learning_rate); not saved")
    version = model_version(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": model.spec.to_dict(),
        "model_version": version,
        "tensors": {k: list(v.shape) for k, v in sorted(state.items())},
        "extra": extra or {},
    }
    tmp_w, tmp_m = path / (WEIGHTS_FILE + ".tmp"), path / (META_FILE + ".tmp")
    save_file(state, str(tmp_w), metadata={"format": FORMAT, "model_version": version})
    tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_w, path / WEIGHTS_FILE)
    os.replace(tmp_m, path / META_FILE)
    return version


def read_meta(directory: str | Path) -> dict:
    """The JSON side of a saved model (spec, version, extra), checked for format."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"no world model at {directory}: {META_FILE} is missing (save one with worldmodel.io.save)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}; this build reads {FORMAT_VERSION}")
    return meta


def load(directory: str | Path, device: str = "auto") -> DynamicsEnsemble:
    """Rebuild the model saved in ``directory`` on ``device``.

    Raises ValueError naming every missing, unexpected or mis-shaped tensor, and when the
    recomputed content hash differs from the saved version (a corrupted or edited file).
    """
    meta = read_meta(directory)
    spec = ModelSpec.from_dict(meta["spec"])
    model = DynamicsEnsemble(spec)
    weights_path = Path(directory) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing; the directory holds only the JSON half of a model")
    state = load_file(str(weights_path))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing tensor {k} {shape}" for k, shape in sorted(expected.items()) if k not in state]
    problems += [f"unexpected tensor {k} {tuple(v.shape)}" for k, v in sorted(state.items()) if k not in expected]
    problems += [
        f"tensor {k}: saved shape {tuple(state[k].shape)}, spec {meta['spec']} needs {shape}"
        for k, shape in sorted(expected.items())
        if k in state and tuple(state[k].shape) != shape
    ]
    if problems:
        raise ValueError(f"world model at {directory} does not match its spec: " + "; ".join(problems))
    model.load_state_dict(state)
    version = model_version(model)
    if version != meta["model_version"]:
        raise ValueError(
            f"world model at {directory}: content hash {version} differs from the saved version {meta['model_version']} "
            "(the files were changed or corrupted); re-save the model"
        )
    return model.to(resolve_device(device)).eval()
