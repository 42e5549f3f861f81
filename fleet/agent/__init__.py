"""Robot side of the fleet: record episodes, spool them crash-safely, upload in the background.

No torch and no Ray here: this runs on the robot. Entry points:

* :class:`AgentConfig`, :class:`SimRobotConfig` - settings (Hydra ``_target_``)
* :class:`RobotAgent` - ``submit(episode)``, ``status()``, ``wait_drained()``, ``stop()``
* :class:`EpisodeRecorder` - step-by-step recording from a control loop
* :class:`Robot`, :func:`run_episode` - the robot protocol, and the loop that records one episode from it
* :class:`Spool`, :class:`Uploader` - the two halves of the agent
* :class:`PolicySource` - where the running policy comes from (the seam for issue 6)

Only :mod:`fleet.agent.config` loads eagerly; the rest loads on first use. All of it but the MuJoCo
stand-in (:mod:`fleet.agent.robot`: :class:`SimRobot`, loaded by :func:`run_sim_robot` when it runs)
imports numpy, httpx and zstandard only: the light package flywheel-robot-agent (robot/) ships it.
"""

from __future__ import annotations

from sim.lazy import lazy_getattr

from fleet.agent.config import AgentConfig, SimRobotConfig

_LAZY = {
    "RobotAgent": "fleet.agent.agent",
    "run_sim_robot": "fleet.agent.agent",
    "EpisodeRecorder": "fleet.agent.recorder",
    "Spool": "fleet.agent.spool",
    "Uploader": "fleet.agent.uploader",
    "Robot": "fleet.agent.loop",
    "run_episode": "fleet.agent.loop",
    "SimRobot": "fleet.agent.robot",
    "Policy": "fleet.agent.policy",
    "PolicySource": "fleet.agent.policy",
    "FixedPolicy": "fleet.agent.policy",
}


__getattr__ = lazy_getattr("fleet.agent", _LAZY)


__all__ = ["AgentConfig", "SimRobotConfig", *_LAZY]
