"""`flywheel`: the Hydra app of the flywheel loop.

Until the loop lands (issue 6) it runs the simulation floor's batched rollout survey: every
configured robot, N worlds, a seeded random policy, and prints what was actually done.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from fleet.apps.config_path import CONF_DIR
from sim.survey import survey


@hydra.main(config_path=CONF_DIR, config_name="flywheel", version_base="1.3")
def main(cfg: DictConfig) -> None:
    console = Console()
    console.print("[bold]flywheel[/bold]: the fleet loop is not built yet; running the batched rollout survey of every robot")
    rows = survey(cfg.sim.robots, cfg.sim.num_worlds, cfg.sim.survey_steps, seed=cfg.seed, nthread=cfg.sim.nthread)
    table = Table(title=f"batched MuJoCo rollout: {cfg.sim.num_worlds} worlds x {cfg.sim.survey_steps} control steps, random policy")
    for column in ("robot", "transitions", "physics steps/s", "episodes finished", "terminated", "mean return", "diverged"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["robot"], str(r["transitions"]), f"{r['physics_steps_per_s']:,.0f}", str(r["episodes_finished"]),
            str(r["terminated"]), f"{r['mean_return']:.2f}", str(r["diverged"]),
        )
    console.print(table)


if __name__ == "__main__":
    main()
