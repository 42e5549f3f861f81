"""``flywheel-robot``: a (simulated) robot's agent as a Hydra app (config: fleet/conf/robot.yaml).

    FLYWHEEL_ROBOT_TOKEN=... flywheel-robot robot.robot_id=ant-07 episodes=20 fleet.agent.server_url=http://127.0.0.1:8700

Episodes go to ``fleet.agent.server_url`` with the robot's token; policies come from ``policy.server_url`` (null: the
same server), which gets the token only where it is that server (a static registry never does: docs/security.md).
"""

from __future__ import annotations

import json
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

import fleet.conf.schema_fleet  # noqa: F401  (registers the config's schema)
from fleet.agent.agent import run_sim_robot
from fleet.apps.config_path import CONF_DIR
from fleet.agent.config import check_server_url
from fleet.apps.errors import accept_start, discard_log_folder_if_refused, one_line_errors, stop_on_signals
from fleet.conf.schema_tools import check, instantiated
from sim.robots import get_task
from sim.robots.registry import use_robot_modules


@hydra.main(config_path=CONF_DIR, config_name="robot", version_base="1.3")
def main(cfg: DictConfig) -> None:
    discard_log_folder_if_refused()  # a start refused below leaves no empty runs/fleet/logs/robot/<id>/<time>/ behind
    check(cfg, "flywheel-robot")
    if cfg.episodes < 0:
        raise SystemExit(f"flywheel-robot: episodes must be >= 0 (0: until Ctrl-C), got {cfg.episodes}")
    if cfg.policy.min_healthy_steps < 0:
        raise SystemExit(f"flywheel-robot: policy.min_healthy_steps must be >= 0 (0: no first-episode health check), got {cfg.policy.min_healthy_steps}")
    for key in ("drain_timeout_s", "policy.poll_interval_s"):
        if not OmegaConf.select(cfg, key) >= 0:
            raise SystemExit(f"flywheel-robot: {key} must be >= 0 seconds, got {OmegaConf.select(cfg, key)}")
    stop_on_signals()  # Ctrl-C or a service manager's SIGTERM ends episodes=0 cleanly
    with one_line_errors("flywheel-robot", (OSError, ValueError)):  # the robot, its token, its folders, the trusted root
        use_robot_modules(cfg.robot_modules)
        robot_cfg, agent_cfg = instantiated(cfg.robot, "robot"), instantiated(cfg.fleet.agent, "fleet.agent")
        get_task(robot_cfg.model)
        token = agent_cfg.load_token()
        policy = None
        if cfg.policy.root:
            from fleet.registry.pull import signed_policy_source
            from fleet.registry.trust import adopt_shared_state

            policy_url = cfg.policy.server_url or agent_cfg.server_url
            check_server_url(policy_url, "policy.server_url", "the policy registry")
            adopt_shared_state(cfg.policy.state_dir, robot_cfg.robot_id)  # a robot upgraded from a build of one shared folder keeps its floor
            policy = signed_policy_source(
                cfg.policy.root, policy_url, token, robot_cfg.robot_id, robot_cfg.model, cfg.policy.state_dir, cfg.policy.poll_interval_s, cfg.policy.min_free_bytes,
                fleet_url=agent_cfg.server_url,  # the token goes to the registry only where it is the fleet server
                min_healthy_steps=cfg.policy.min_healthy_steps,  # a new release's first episode is its health check (docs/security.md)
            ).start()  # polls on its own thread: an episode never waits for the registry
        accept_start()
        try:
            status = run_sim_robot(robot_cfg, agent_cfg, episodes=cfg.episodes, drain_timeout_s=cfg.drain_timeout_s, policy=policy)
        finally:
            if policy is not None:
                policy.close()
    print(json.dumps(status), flush=True)
    if status["interrupted"]:
        print(f"flywheel-robot: interrupted after {status['episodes']} episode(s); {status['queue_depth']} not uploaded yet stay spooled for the next start", file=sys.stderr)
        raise SystemExit(130)
    if not status["drained"]:  # spooled for the next start, but this run did not deliver them: say why, exit non-zero
        raise SystemExit(
            f"flywheel-robot: {status['queue_depth']} episode(s) not uploaded within drain_timeout_s={cfg.drain_timeout_s:g} s; they stay in "
            f"{agent_cfg.spool_dir} for the next start. Last error: {status['last_error']}"
        )


if __name__ == "__main__":
    main()
