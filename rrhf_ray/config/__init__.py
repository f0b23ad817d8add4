"""The run configuration: one pydantic model per component, composed into `RunConfig`.

A config comes from a YAML file plus `dotted.key=value` overrides from the command line.
Every model forbids unknown keys, so a typo is an error that names the key and the file
instead of a setting silently ignored. Cross-field checks live in validators, once.

- `rrhf_ray.config.base`: the sections' base class and `ConfigError`;
- `rrhf_ray.config.training`: the trainers' settings (`FitConfig`, `TrainConfig`, the losses);
- `rrhf_ray.config.run`: every other section, `RunConfig`, and the paths made absolute;
- `rrhf_ray.config.loading`: YAML + overrides → a validated `RunConfig`.

Every public name is importable from `rrhf_ray.config`. These modules import nothing of the
project but each other: every other module depends on them, never the reverse.
"""

from rrhf_ray.config.base import ConfigError, Section
from rrhf_ray.config.loading import (
    apply_overrides,
    build,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
)
from rrhf_ray.config.run import (
    BUILTIN_PREFIX,
    DEFAULT_STOP,
    DataConfig,
    EvalConfig,
    MLflowTrackingConfig,
    ModelConfig,
    OnlineConfig,
    OutputConfig,
    PairStageConfig,
    RayConfig,
    RewardConfig,
    RewardModelStageConfig,
    RunConfig,
    SamplingConfig,
    SFTStageConfig,
    TensorBoardTrackingConfig,
    TrackingConfig,
    WandbTrackingConfig,
    absolute_path,
    with_absolute_paths,
)
from rrhf_ray.config.training import (
    LOSS_CONFIGS,
    DPOLoss,
    FitConfig,
    LoraConfig,
    LossConfig,
    PROLoss,
    RAFTLoss,
    RRHFLoss,
    SimPOLoss,
    SLiCLoss,
    TrainConfig,
)

__all__ = [
    "BUILTIN_PREFIX", "DEFAULT_STOP", "LOSS_CONFIGS", "ConfigError", "DPOLoss", "DataConfig",
    "EvalConfig", "FitConfig", "LoraConfig", "LossConfig", "MLflowTrackingConfig", "ModelConfig",
    "OnlineConfig",
    "OutputConfig", "PROLoss", "PairStageConfig", "RAFTLoss", "RRHFLoss", "RayConfig", "RewardConfig",
    "RewardModelStageConfig", "RunConfig", "SFTStageConfig", "SLiCLoss", "SamplingConfig", "Section",
    "SimPOLoss", "TensorBoardTrackingConfig", "TrackingConfig", "TrainConfig", "WandbTrackingConfig",
    "absolute_path", "apply_overrides", "build", "dump_config", "load_config", "parse_override",
    "read_yaml", "with_absolute_paths",
]
