"""Range rules for the learners' and the world model's config dataclasses, checked where a config is made:
each refusal names its field and what it must be (a negative learning rate trains backwards, silently)."""

from __future__ import annotations

import math
import numbers

POSITIVE = (lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
COUNT = (lambda v: v >= 0, ">= 0")
UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
OPEN_UNIT = (lambda v: 0 < v < 1, "in (0, 1)")
RATE = (lambda v: 0 < v <= 1, "in (0, 1]")


def check_fields(config, **rules: tuple) -> None:
    """ValueError naming every field of ``config`` outside its rule (``name=(test, what it must be)``); None passes."""
    bad = [
        f"{name}={getattr(config, name)!r} (must be {text})"
        for name, (ok, text) in rules.items()
        if getattr(config, name) is not None and not ok(getattr(config, name))
    ]
    if bad:
        raise ValueError(f"{type(config).__name__}: {', '.join(bad)}")


def integer(name: str, value, minimum: int, maximum: int | None = None) -> int:
    """``value`` as a Python int (a numpy integer too: ``for seed in np.arange(3)``), or a ValueError naming ``name``
    (its owner first, ``"scenario: seed"``): a bool, a text, a number with a fraction (``seed=1.5``), or one outside
    [minimum, maximum] is refused."""
    whole = isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer())
    if isinstance(value, bool) or not whole or value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}")
    return int(value)


SEED_MAX = 2**63 - 1  # the largest seed torch's generators take
