"""Soak (``make soak``, not in ``make test``: ~6 minutes on 2 cores): flywheel-server in its own
process takes tens of thousands of episodes from 16 robots and reads them back, and its memory
stays flat. Real HTTP, real store (benchmarks/server_memory.py drives it)."""

import importlib.util
from pathlib import Path

import pytest

EPISODES = 25_600
BOUND_MIB = 768  # RssAnon during ingest and after read-back; measured: 354 peak, 399 after reading back (docs/benchmarks.md)


def _driver():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "server_memory.py"
    spec = importlib.util.spec_from_file_location("server_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_server_memory_stays_flat_over_tens_of_thousands_of_episodes_and_their_read_back():
    out = _driver().soak(EPISODES, read_back=2_560)
    assert len(out["acknowledged"]) == EPISODES and set(out["acknowledged"]) <= out["listed"]  # nothing acknowledged lost
    assert out["end"] <= BOUND_MIB and out["peak"] <= BOUND_MIB, out
    assert out["end"] <= 1.25 * out["halfway"], f"memory still growing: {out['halfway']:.0f} MiB halfway, {out['end']:.0f} MiB at the end"
