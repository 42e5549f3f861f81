"""Body contexts in a release: each robot's calibrated body features, for a body-conditioned policy.

A policy conditioned on the body (``policies.networks.PolicySpec.context_dim``) reads, after the
observation, the features :meth:`sim.variation.VariationProfile.context` of the body it drives:
one policy for the whole fleet that still acts as each body needs (the weak motor pushes harder,
the heavy payload earlier), as in Rapid Motor Adaptation. A robot does not know its own body;
calibration estimates it from the robot's telemetry (``sim/calibration.py``), and the registry
delivers the estimate, signed, with the policy (``body_contexts`` in the release manifest,
docs/protocol.md). The robot binds it once (:func:`sim.policy_fn.with_context`); a robot the
release does not list (not calibrated yet) runs as the nominal body (all features 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: a robot imports this module without MuJoCo (sim.variation)
    from sim.variation import VariationProfile


class BodyContextError(ValueError):
    pass


def context_vectors(profiles: Mapping[str, VariationProfile]) -> dict[str, list[float]]:
    """The manifest's ``body_contexts``: robot id -> its calibrated profile's features."""
    return {r: [float(x) for x in p.context()] for r, p in sorted(profiles.items())}


def parse_context(value, dim: int) -> np.ndarray:
    """``value`` (a manifest's ``body_contexts[robot_id]``) as a (dim,) float32 array; raises
    :class:`BodyContextError` unless it is ``dim`` finite numbers in [-1, 1] (the features' range)."""
    if not isinstance(value, list) or len(value) != dim or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise BodyContextError(f"body context must be a list of {dim} numbers (the policy's context features)")
    context = np.asarray(value, np.float64)
    if not np.isfinite(context).all() or np.abs(context).max(initial=0.0) > 1.0:
        raise BodyContextError("body context entries must be finite and within [-1, 1]")
    return context.astype(np.float32)


def _contexts_object(body_contexts) -> dict:
    if not isinstance(body_contexts, dict):
        raise BodyContextError("body_contexts must be an object {robot_id: [one value per context feature]}")
    return body_contexts


def parse_contexts(body_contexts, dim: int) -> dict[str, np.ndarray]:
    """Every entry of a manifest's ``body_contexts``, parsed (what a publisher must send); an
    unconditioned policy (``dim`` 0) takes none."""
    entries = _contexts_object(body_contexts)
    if entries and not dim:
        raise BodyContextError("body_contexts given for a policy that reads no body context (its manifest has no observation.context)")
    return {robot_id: parse_context(entry, dim) for robot_id, entry in entries.items()}


def robot_context(body_contexts, robot_id: str, dim: int) -> np.ndarray:
    """This robot's features from a manifest's ``body_contexts`` (parsed); the nominal body's (zeros)
    when it has none; :class:`BodyContextError` when the field or the entry is malformed."""
    entry = _contexts_object(body_contexts).get(robot_id)
    return np.zeros(dim, np.float32) if entry is None else parse_context(entry, dim)
