"""Simulation floor: robots (MJCF + tasks), physical variation, scenarios, batched MuJoCo
stepping, gymnasium envs and the schema-v1 Episode record. Imports nothing above it.

Lazy (PEP 562): ``import sim.episode`` loads numpy and the standard library only, so a robot's
agent reads and writes episodes without MuJoCo; the names below load their module on first use.
The modules a robot applies a release with (``sim.sensors``, ``sim.sensor_filter``,
``sim.body_context``, ``sim.policy_fn``) import numpy only too: the light robot package ships them
(robot/pyproject.toml).
"""

from sim.lazy import lazy_getattr

_EXPORTS = {
    "Episode": "sim.episode",
    "EpisodeValidationError": "sim.episode",
    "DomainRandomization": "sim.scenario",
    "ScenarioSpec": "sim.scenario",
    "VariationProfile": "sim.variation",
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["DomainRandomization", "Episode", "EpisodeValidationError", "ScenarioSpec", "VariationProfile"]
