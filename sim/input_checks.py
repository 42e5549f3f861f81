"""What a learner or a world model takes from its caller, checked where it enters (policies.transition.VectorStep,
worldmodel.transitions.Transitions): finite values, and actions in [-1, 1], the range every policy acts in."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def check_finite(owner: str, arrays: Mapping[str, np.ndarray], advice: str) -> None:
    """ValueError naming the first of ``arrays`` that holds NaN or Inf (a NaN stored trains every weight to NaN)."""
    for name, values in arrays.items():
        if not np.isfinite(values).all():
            raise ValueError(f"{owner}: {name} holds NaN or Inf; {advice}")


def check_unit_actions(owner: str, action: np.ndarray, advice: str) -> None:
    """ValueError unless every action is in [-1, 1] (float rounding aside)."""
    largest = float(np.abs(action).max(initial=0.0))
    if largest > 1.0 + 1e-6:
        raise ValueError(f"{owner}: actions up to {largest:.4g} in size; {advice}")
