"""Simulation floor: robots (MJCF + tasks), physical variation, scenarios, batched MuJoCo
stepping, gymnasium envs and the schema-v1 Episode record. Imports nothing above it."""

from sim.episode import Episode, EpisodeValidationError
from sim.scenario import DomainRandomization, ScenarioSpec
from sim.variation import VariationProfile

__all__ = ["DomainRandomization", "Episode", "EpisodeValidationError", "ScenarioSpec", "VariationProfile"]
