"""The local report: return per robot per iteration (PNG) and the summary table (text)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402


def write_report(history: list[dict], specs: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    iterations = [h["iteration"] for h in history]
    for robot_id in sorted(specs):
        ax.plot(iterations, [h["fleet_returns"].get(robot_id) for h in history], marker="o", label=f"{robot_id} ({specs[robot_id].condition})")
    ax.set_xticks(iterations)
    ax.set_xlabel("flywheel iteration")
    ax.set_ylabel("mean episode return (telemetry)")
    ax.set_title("Fleet return per robot: each robot's experience trains all others")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def summary_table(history: list[dict], specs: dict) -> Table:
    table = Table(title="Flywheel: mean return per robot (robots' own telemetry) per iteration")
    table.add_column("robot")
    table.add_column("condition")
    for h in history:
        table.add_column(f"it {h['iteration']}", justify="right")
    for robot_id in sorted(specs):
        table.add_row(robot_id, specs[robot_id].condition, *[f"{h['fleet_returns'].get(robot_id, float('nan')):.1f}" for h in history])
    table.add_row("policy", "", *[",".join(h["policy_versions"]) for h in history])
    table.add_row("release", "", *[h["rollout"]["stage"] + (f" v{h['rollout']['version']}" if "version" in h["rollout"] else "") for h in history])
    return table
