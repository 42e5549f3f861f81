"""The local report: return per robot per iteration (PNG) and the summary table (text)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from rich.table import Table  # noqa: E402

from fleet.pipeline.simfleet import robot_order  # noqa: E402


def write_report(history: list[dict], specs: dict, path: Path) -> Path:
    """Left: return per robot per iteration; right: the same returns against the real steps each robot has used.
    ``history``: the iterations' records, then the closing round's (no ``rollout``: nothing was trained after it)."""
    fig, (ax, ax_steps) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    iterations = [h["iteration"] for h in history]
    for robot_id in robot_order(specs):
        returns = [h["fleet_returns"].get(robot_id) for h in history]
        label = f"{robot_id} ({specs[robot_id].condition})"
        ax.plot(iterations, returns, marker="o", label=label)
        ax_steps.plot([h.get("real_steps", {}).get(robot_id) for h in history], returns, marker="o", label=label)
    ax.set_xticks(iterations, [_label(h) for h in history])
    ax.set_xlabel("flywheel iteration")
    ax.set_ylabel("mean episode return (telemetry)")
    ax.set_title("Fleet return per robot")
    ax_steps.set_xlabel("real robot steps used (cumulative)")
    ax_steps.set_title("Return vs real steps")
    for a in (ax, ax_steps):
        a.grid(alpha=0.3)
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
        table.add_column(_label(h), justify="right")
    for robot_id in robot_order(specs):
        table.add_row(robot_id, specs[robot_id].condition, *[f"{h['fleet_returns'][robot_id]:.1f}" if robot_id in h["fleet_returns"] else "-" for h in history])  # "-": not in the fleet yet
    table.add_row("real steps", "", *[str(sum(h.get("real_steps", {}).values())) for h in history])
    table.add_row("policy", "", *[",".join(h["policy_versions"]) for h in history])
    table.add_row("release", "", *[_release(h.get("rollout")) for h in history])
    return table


def _label(record: dict) -> str:
    return f"it {record['iteration']}" if "rollout" in record else "final"


def _release(rollout: dict | None) -> str:
    if rollout is None:
        return "-"
    return rollout["stage"] + (f" v{rollout['version']}" if "version" in rollout else "")
