"""The benchmarks run on a robot of the user's own (one of ``robot_modules``), measuring what applies to it."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from tests.tiny_robots import registered  # noqa: E402


def test_sim_throughput_measures_a_plugin_robot_with_the_gymnasium_column_null(monkeypatch, capsys):
    """Its default run (every registered robot) once ended in a KeyError at gym.make for the first plugin robot."""
    import sim_throughput

    monkeypatch.setattr(sim_throughput, "rss_per_1000_worlds", lambda robot, record: 1.0)  # a fresh process each: not what is tested
    monkeypatch.setattr(sys, "argv", ["sim_throughput.py", "--robots", "tiny_tilt", "pendulum", "--worlds", "2", "--steps", "2"])
    monkeypatch.setattr(sim_throughput, "gymnasium_single", lambda robot, steps, real=sim_throughput.gymnasium_single: real(robot, 20))
    with registered():
        sim_throughput.main()
    lines = {row["metric"]: row for row in map(json.loads, capsys.readouterr().out.splitlines())}
    assert lines["sim/tiny_tilt/batched_mlp_steps_per_s"]["value"] > 0  # measured
    assert lines["sim/tiny_tilt/gymnasium_single_steps_per_s"]["value"] is None  # not measured: gymnasium has no such env
    tiny, pendulum = lines["sim/tiny_tilt/batched_vs_gymnasium"], lines["sim/pendulum/batched_vs_gymnasium"]
    assert tiny["value"] > 0 and tiny["baseline"] is None and tiny["ratio"] is None  # ours measured, gymnasium's not: no ratio
    assert lines["sim/pendulum/gymnasium_single_steps_per_s"]["value"] > 0  # a built-in robot's still is
    assert pendulum["unit"] == "physics steps/s" and abs(pendulum["ratio"] - pendulum["value"] / pendulum["baseline"]) < 0.0051  # value / baseline, both rates
