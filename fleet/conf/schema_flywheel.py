"""Schema of `flywheel` (flywheel.yaml), of `flywheel-train` (train.yaml) and of their groups, registered in Hydra's ConfigStore on import.

Each node's fields come from the dataclass or function that reads it (``LoopSettings``, ``gate``,
``TrainerConfig``, ``CalibrationConfig``, ...), so a knob is declared once, in the code."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from fleet.conf.schema_fleet import FleetSchema
from fleet.conf.schema_tools import extend, fields_schema, signature_schema, target_schema
from fleet.pipeline.gate import gate
from fleet.pipeline.loop import LoopSettings
from fleet.tracking import Tracker
from fleet.train_job import TrainJob
from policies.mbpo import MBPOConfig
from policies.ppo import PPOConfig
from policies.sac import SACConfig
from policies.trainer import TrainerConfig
from sim.calibration import CalibrationConfig
from sim.scenario import DomainRandomization
from worldmodel.ensemble import EnsembleConfig
from worldmodel.proposals import ProposalConfig
from worldmodel.rollout import RolloutConfig
from worldmodel.train import TrainConfig

GateSchema = signature_schema(gate, "GateSchema")  # loop.gate: gate(**loop.gate)
LoopSchema = extend(fields_schema(LoopSettings, "LoopFields", exclude=("seed", "gate")), "LoopSchema", gate=(GateSchema, GateSchema))  # seed: top level
WandbSchema = signature_schema(Tracker, "WandbSchema", only=("mode", "project", "entity"))
TrainerSchema = target_schema(TrainerConfig)
CalibrationSchema, RandomizationSchema = target_schema(CalibrationConfig), target_schema(DomainRandomization, convert="all")
ProposalSchema = extend(target_schema(ProposalConfig), "ProposalSchema", randomization=(RandomizationSchema, RandomizationSchema))
EnsembleSchema, TrainSchema, RolloutSchema = target_schema(EnsembleConfig), target_schema(TrainConfig), target_schema(RolloutConfig)


@dataclasses.dataclass
class RayTrainingSchema:
    """``ray.training``: where the world model and the learner train (fleet.pipeline.training.TrainingPlacement)."""

    placement: str = "driver"  # driver (this process) or cluster (a Ray task each)
    num_cpus: Optional[float] = None  # null: policy.trainer.torch_threads / worldmodel.train.num_threads
    num_gpus: float = 0.0
    resources: Dict[str, float] = dataclasses.field(default_factory=dict)  # custom Ray resources the node must have


@dataclasses.dataclass
class RaySchema:
    """``ray``: how ``fleet.pipeline.ray_start`` starts or joins Ray (``start_ray``) and how often robot actors
    are restarted and Ray tasks retried (``max_retries``)."""

    address: Optional[str] = None  # null: start a local Ray; "auto" or "host:port" of a head: join one
    node_ip_address: Optional[str] = "127.0.0.1"  # what this process's Ray binds and advertises; null: Ray picks
    auth: str = "token"  # RAY_AUTH_MODE: token or disabled (ray_start.use_token_auth)
    auth_token_file: Optional[str] = None  # RAY_AUTH_TOKEN_PATH; null: RAY_AUTH_TOKEN, else ~/.ray/auth_token
    max_retries: int = 3  # robot actor restarts, Ray task retries, after a process or node dies (-1: no limit)
    num_cpus: Optional[int] = None
    object_store_memory: Optional[int] = None
    include_dashboard: bool = False
    training: RayTrainingSchema = dataclasses.field(default_factory=RayTrainingSchema)


@dataclasses.dataclass
class FanoutSchema:
    chunk_size: int = 64  # scenarios per job: fleet.pipeline.steps.generate_scenarios(chunk_size=...)


@dataclasses.dataclass
class ScenariosSchema:
    calibration: CalibrationSchema = dataclasses.field(default_factory=CalibrationSchema)
    proposals: ProposalSchema = dataclasses.field(default_factory=ProposalSchema)
    fanout: FanoutSchema = dataclasses.field(default_factory=FanoutSchema)


@dataclasses.dataclass
class WorldModelSchema:
    ensemble: EnsembleSchema = dataclasses.field(default_factory=EnsembleSchema)
    train: TrainSchema = dataclasses.field(default_factory=TrainSchema)
    rollout: RolloutSchema = dataclasses.field(default_factory=RolloutSchema)


@dataclasses.dataclass
class PolicySchema:
    """``policy``: the learner. ``algorithm`` is typed per option (base_sac_policy, base_mbpo_policy, base_ppo_policy)."""

    trainer: TrainerSchema = dataclasses.field(default_factory=TrainerSchema)
    algorithm: Any = None


@dataclasses.dataclass
class AppSchema:
    """What both training apps read: `flywheel` and `flywheel-train`."""

    robot_modules: List[str] = dataclasses.field(default_factory=list)
    run_dir: Optional[str] = "${hydra:runtime.output_dir}"  # Optional: --cfg job --resolve prints it as None (no output dir)
    policy: PolicySchema = dataclasses.field(default_factory=PolicySchema)
    ray: RaySchema = dataclasses.field(default_factory=RaySchema)
    wandb: WandbSchema = dataclasses.field(default_factory=WandbSchema)


@dataclasses.dataclass
class FlywheelSchema(AppSchema):
    """flywheel.yaml: the whole loop."""

    seed: int = 0
    loop: LoopSchema = dataclasses.field(default_factory=LoopSchema)
    worldmodel: WorldModelSchema = dataclasses.field(default_factory=WorldModelSchema)
    scenarios: ScenariosSchema = dataclasses.field(default_factory=ScenariosSchema)
    fleet: FleetSchema = dataclasses.field(default_factory=FleetSchema)


TrainJobSchema = fields_schema(TrainJob, "TrainJobSchema")


@dataclasses.dataclass
class TrainAppSchema(AppSchema):
    """train.yaml: `flywheel-train`, one policy on its own."""

    train: TrainJobSchema = dataclasses.field(default_factory=TrainJobSchema)


store = ConfigStore.instance().store
store(name="base_flywheel", node=FlywheelSchema)
store(name="base_train", node=TrainAppSchema)
for name, algo in (("base_sac", SACConfig), ("base_mbpo", MBPOConfig), ("base_ppo", PPOConfig)):  # the policy options' schemas, outside the group
    store(name=f"{name}_policy", node=extend(PolicySchema, f"Policy{algo.__name__}Schema", algorithm=(target_schema(algo), target_schema(algo))))
