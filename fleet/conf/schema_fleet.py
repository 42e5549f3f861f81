"""Schemas of `flywheel-server` and `flywheel-robot` (server.yaml, robot.yaml) and of the ``fleet``
group, registered in Hydra's ConfigStore on import. Robot-side: no torch, no Ray (MuJoCo: the simulated robot's)."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from hydra.core.config_store import ConfigStore

from fleet.agent.config import AgentConfig, SimRobotConfig
from fleet.conf.schema_tools import extend, fields_schema, target_schema
from fleet.registry.trust import MIN_HEALTHY_STEPS
from fleet.server.config import ServerConfig
from fleet.store.config import StoreConfig
from sim.variation import VariationProfile

StoreSchema, ServerSchema, AgentSchema = target_schema(StoreConfig), target_schema(ServerConfig), target_schema(AgentConfig)
# robot.profile is typed (VariationProfile's fields): robot.profile.payload_mass=0.5 needs no "+", a wrong type is refused by name
ProfileSchema = fields_schema(VariationProfile, "ProfileSchema")
SimRobotSchema = extend(target_schema(SimRobotConfig, convert="all"), "SimRobotAppSchema", profile=(ProfileSchema, ProfileSchema))


@dataclasses.dataclass
class RegistrySchema:
    """``fleet.registry``: what `flywheel-server` passes to ``fleet.registry.store.open_registry``."""

    dir: str = "runs/fleet/registry"
    online_key: str = "runs/fleet/keys/online.pem"
    release_key: Optional[str] = None  # where the root names a release key for targets: only a server holding it releases
    root_keys: Optional[List[str]] = None
    root_threshold: int = 2
    expiry_s: Dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FleetSchema:
    store: StoreSchema = dataclasses.field(default_factory=StoreSchema)
    server: ServerSchema = dataclasses.field(default_factory=ServerSchema)
    agent: AgentSchema = dataclasses.field(default_factory=AgentSchema)
    registry: RegistrySchema = dataclasses.field(default_factory=RegistrySchema)


@dataclasses.dataclass
class ServerAppSchema:
    """server.yaml: the ingestion + policy service."""

    fleet: FleetSchema = dataclasses.field(default_factory=FleetSchema)


@dataclasses.dataclass
class RobotPolicySchema:
    """robot.yaml ``policy``: what `flywheel-robot` passes to ``fleet.registry.pull.signed_policy_source``."""

    root: Optional[str] = None
    server_url: Optional[str] = None  # the registry's URL (a static host, bucket or CDN); None: fleet.agent.server_url
    state_dir: str = "runs/fleet/robot-policy/${robot.robot_id}"
    poll_interval_s: float = 10.0
    min_free_bytes: int = 64 << 20
    min_healthy_steps: int = MIN_HEALTHY_STEPS  # the default lives there (robot.yaml leaves it to this schema): one value for every robot


@dataclasses.dataclass
class RobotAppSchema:
    """robot.yaml: a (simulated) robot's agent."""

    fleet: FleetSchema = dataclasses.field(default_factory=FleetSchema)
    robot_modules: List[str] = dataclasses.field(default_factory=list)
    robot: SimRobotSchema = dataclasses.field(default_factory=SimRobotSchema)
    episodes: int = 10
    drain_timeout_s: float = 60.0
    policy: RobotPolicySchema = dataclasses.field(default_factory=RobotPolicySchema)


ConfigStore.instance().store(name="base_server", node=ServerAppSchema)
ConfigStore.instance().store(name="base_robot", node=RobotAppSchema)
