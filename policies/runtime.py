"""On-robot policy runtime: numpy only (no torch, no Ray). Load, verify, act.

An exported policy is two files (written by :mod:`policies.export`)::

    manifest.json        plain JSON, keys sorted (the fleet signs these bytes)
    weights.safetensors  float32 tensors: normalizer.mean/var (D + C,), trunk.<i>.weight/bias, mean.weight/bias

A body-conditioned policy (``observation.context`` in the manifest: C features named in
``fields``, encoded as ``sim.variation.VariationProfile.context``) reads the D observation values
and then its robot's C body features; the robot gets its features with the release
(``body_contexts``, docs/protocol.md) and :func:`sim.policy_fn.with_context` binds them.

:func:`load_policy` refuses anything that does not match what the robot expects (robot
model, observation and action sizes), whose weights do not hash to the manifest's sha256,
or whose tensors do not have the shapes the architecture implies; each refusal is a
:class:`PolicyLoadError` saying what is wrong. The action is deterministic:
``tanh(mean(normalise(obs)))``, clipped normalisation ``clip((obs - mean) / sqrt(var + eps), -c, c)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _load_safetensors

FORMAT = "flywheel-policy"
FORMAT_VERSION = 1
ARCHITECTURE = "mlp_squashed_gaussian"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
ACTIVATIONS = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0, out=x)}  # mirrors policies.networks
MAX_MANIFEST_BYTES = 1 << 20
CONTEXT_ENCODING = "variation_profile_tanh_v1"  # sim.variation.VariationProfile.context


class PolicyLoadError(ValueError):
    """An exported policy this robot must not run, and why."""


class PolicyWeightsError(PolicyLoadError):
    """The weights file is what the robot refuses (not the manifest): another file than the manifest names, not
    safetensors, or tensors of the wrong names, dtypes, shapes or values."""


def manifest_bytes(manifest: dict) -> bytes:
    """The canonical bytes of a manifest (sorted keys, compact, UTF-8): what is written and signed."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def context_dim(manifest: dict) -> int:
    """How many body features the policy reads after the observation (0: not conditioned)."""
    return int(manifest["observation"].get("context", {}).get("dim", 0))


def input_dim(manifest: dict) -> int:
    return manifest["observation"]["dim"] + context_dim(manifest)


def expected_tensor_shapes(manifest: dict) -> dict[str, list[int]]:
    """Tensor name -> shape implied by the manifest's architecture and specs."""
    arch, d, a = manifest["architecture"], input_dim(manifest), manifest["action"]["dim"]
    sizes = [d, *arch["hidden_sizes"]]
    shapes = {"normalizer.mean": [d], "normalizer.var": [d]}
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"trunk.{i}.weight"], shapes[f"trunk.{i}.bias"] = [n_out, n_in], [n_out]
    shapes["mean.weight"], shapes["mean.bias"] = [a, sizes[-1]], [a]
    return shapes


class RuntimePolicy:
    """A verified policy: :meth:`act` maps obs (obs_dim,) or (N, obs_dim) to actions in [-1, 1]; a
    conditioned one (``context_dim`` > 0) reads obs_dim + context_dim values, the body features last."""

    def __init__(self, manifest: dict, tensors: dict[str, np.ndarray]):
        self.manifest = manifest
        self.obs_dim, self.act_dim = manifest["observation"]["dim"], manifest["action"]["dim"]
        self.context_dim = context_dim(manifest)
        self.input_dim = self.obs_dim + self.context_dim
        norm = manifest["observation"]["normalization"]
        self._normalize = bool(norm["enabled"])
        self._clip = np.float32(norm["clip"])
        self._mean = tensors["normalizer.mean"]
        self._inv_std = (1.0 / np.sqrt(tensors["normalizer.var"] + np.float32(norm["eps"]))).astype(np.float32)
        self._act = ACTIVATIONS[manifest["architecture"]["activation"]]
        n_hidden = len(manifest["architecture"]["hidden_sizes"])
        # transposed once, so a step is x @ W^T without a copy
        self._layers = [(np.ascontiguousarray(tensors[f"trunk.{i}.weight"].T), tensors[f"trunk.{i}.bias"]) for i in range(n_hidden)]
        self._head = (np.ascontiguousarray(tensors["mean.weight"].T), tensors["mean.bias"])

    @property
    def version(self) -> str:
        return self.manifest["policy_version"]

    def act(self, obs: np.ndarray) -> np.ndarray:
        """obs (input_dim,) or (N, input_dim) -> action (act_dim,) or (N, act_dim), float32, deterministic."""
        x = np.asarray(obs, dtype=np.float32)
        if x.shape[-1] != self.input_dim or x.ndim not in (1, 2):
            what = "observation" if not self.context_dim else f"observation + body context ({self.obs_dim} + {self.context_dim})"
            raise ValueError(f"{what} must have shape ({self.input_dim},) or (N, {self.input_dim}), got {x.shape}")
        if self._normalize:
            x = np.clip((x - self._mean) * self._inv_std, -self._clip, self._clip)
        for w, b in self._layers:
            x = self._act(x @ w + b)
        w, b = self._head
        return np.tanh(x @ w + b)

    __call__ = act


def load_policy(
    directory: str | os.PathLike,
    *,
    robot_model: str,
    obs_dim: int,
    act_dim: int,
) -> RuntimePolicy:
    """Load and verify ``directory/manifest.json`` + its weights file for a robot of ``robot_model``
    with observations of ``obs_dim`` and actions of ``act_dim``."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise PolicyLoadError(f"{manifest_path} not found: export the policy with policies.export.export_policy")
    raw = manifest_path.read_bytes()
    manifest = parse_manifest(raw)
    weights_path = directory / manifest["weights"]["file"]
    if not weights_path.is_file():
        raise PolicyLoadError(f"weights file {weights_path} named by the manifest is missing")
    return load_policy_bytes(manifest, weights_path.read_bytes(), robot_model=robot_model, obs_dim=obs_dim, act_dim=act_dim)


def parse_manifest(raw: bytes | str | dict) -> dict:
    """Parse and structurally check a manifest (bytes, text or dict)."""
    if isinstance(raw, dict):
        manifest = raw
    else:
        if len(raw) > MAX_MANIFEST_BYTES:
            raise PolicyLoadError(f"manifest is {len(raw)} bytes, more than the {MAX_MANIFEST_BYTES}-byte limit")
        try:
            manifest = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PolicyLoadError(f"manifest is not valid JSON ({exc.__class__.__name__}: {exc}); re-download or re-export it") from None
    if not isinstance(manifest, dict):
        raise PolicyLoadError("manifest must be a JSON object")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise PolicyLoadError(
            f"manifest format {manifest.get('format')!r} v{manifest.get('format_version')!r}; this runtime reads {FORMAT!r} v{FORMAT_VERSION}"
        )
    try:
        arch, obs, act, weights = manifest["architecture"], manifest["observation"], manifest["action"], manifest["weights"]
        checks = [
            arch["type"] == ARCHITECTURE,
            arch["activation"] in ACTIVATIONS,
            isinstance(arch["hidden_sizes"], list) and all(isinstance(h, int) and h > 0 for h in arch["hidden_sizes"]),
            isinstance(obs["dim"], int) and obs["dim"] > 0,
            isinstance(act["dim"], int) and act["dim"] > 0,
            isinstance(obs["normalization"]["enabled"], bool),
            float(obs["normalization"]["clip"]) > 0 and float(obs["normalization"]["eps"]) >= 0,
            isinstance(weights["file"], str) and "/" not in weights["file"] and "\\" not in weights["file"] and weights["file"] not in ("", ".", ".."),
            isinstance(weights["sha256"], str) and len(weights["sha256"]) == 64,
            isinstance(manifest["robot_model"], str) and isinstance(manifest["policy_version"], str),
            _context_ok(obs.get("context")),
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise PolicyLoadError(f"manifest is missing or mistypes a required field ({exc.__class__.__name__}: {exc})") from None
    if not all(checks):
        names = ["architecture.type", "architecture.activation", "architecture.hidden_sizes", "observation.dim", "action.dim",
                 "observation.normalization.enabled", "observation.normalization.clip/eps", "weights.file", "weights.sha256",
                 "robot_model/policy_version", "observation.context"]  # fmt: skip
        bad = [n for n, ok in zip(names, checks) if not ok]
        raise PolicyLoadError(f"manifest fields out of spec: {bad}")
    return manifest


def _context_ok(context) -> bool:
    """An absent context, or {"dim": C > 0, "fields": C names, "encoding": the one this runtime knows}."""
    if context is None:
        return True
    return (
        isinstance(context, dict) and isinstance(context.get("dim"), int) and not isinstance(context["dim"], bool) and context["dim"] > 0
        and isinstance(context.get("fields"), list) and len(context["fields"]) == context["dim"] and all(isinstance(f, str) for f in context["fields"])
        and context.get("encoding") == CONTEXT_ENCODING
    )  # fmt: skip


def load_policy_bytes(manifest: bytes | str | dict, weights: bytes, *, robot_model: str, obs_dim: int, act_dim: int) -> RuntimePolicy:
    """As :func:`load_policy`, from bytes (e.g. downloaded from the fleet server)."""
    manifest = parse_manifest(manifest)
    if manifest["robot_model"] != robot_model:
        raise PolicyLoadError(f"policy {manifest['policy_version']!r} is for robot model {manifest['robot_model']!r}, this robot is {robot_model!r}")
    if manifest["observation"]["dim"] != obs_dim:
        raise PolicyLoadError(f"policy expects observations of {manifest['observation']['dim']} values, this robot produces {obs_dim}")
    if manifest["action"]["dim"] != act_dim:
        raise PolicyLoadError(f"policy outputs {manifest['action']['dim']} actions, this robot has {act_dim} actuators")
    digest = hashlib.sha256(weights).hexdigest()
    if digest != manifest["weights"]["sha256"]:
        raise PolicyWeightsError(
            f"weights sha256 {digest[:16]}... does not match the manifest's {manifest['weights']['sha256'][:16]}... "
            f"({len(weights)} bytes): the file is truncated, corrupted or from another export; re-download it"
        )
    try:
        tensors = _load_safetensors(bytes(weights))
    except (SafetensorError, KeyError, ValueError, TypeError, OverflowError) as exc:  # KeyError: a dtype numpy lacks (BF16, F8_*)
        raise PolicyWeightsError(f"weights are not a readable safetensors file of numpy dtypes ({exc.__class__.__name__}: {exc}); export float32 weights") from None
    expected = expected_tensor_shapes(manifest)
    if set(tensors) != set(expected):
        raise PolicyWeightsError(f"weights hold tensors {sorted(tensors)}, the architecture needs {sorted(expected)}")
    for name, shape in expected.items():
        t = tensors[name]
        if list(t.shape) != shape or t.dtype != np.float32:
            raise PolicyWeightsError(f"tensor {name!r} is {t.dtype}{list(t.shape)}, the manifest's architecture needs float32{shape}")
        if not np.isfinite(t).all():
            raise PolicyWeightsError(f"tensor {name!r} contains NaN or Inf")
    if (tensors["normalizer.var"] < 0).any():
        raise PolicyWeightsError("normalizer.var has negative entries")
    return RuntimePolicy(manifest, tensors)
