"""Settings: one frozen, validated dataclass per concern (`sections`, with the PPO phase's in
`ppo`, the roles' resources in `resources` and the rollout engine's in `rollout`), loaded from a
YAML preset plus command-line overrides (`loading`)."""

from rlhf_ray.config.rollout import RolloutConfig
from rlhf_ray.config.sections import (
    DTYPES,
    EMBEDDED_MODEL,
    PHASES,
    Config,
    DataConfig,
    EvalConfig,
    LoraConfig,
    ModelConfig,
    PPOConfig,
    QuantizationConfig,
    ResourcesConfig,
    RewardConfig,
    RunConfig,
    ScoringConfig,
    SFTConfig,
)

__all__ = [
    "DTYPES",
    "EMBEDDED_MODEL",
    "PHASES",
    "Config",
    "DataConfig",
    "EvalConfig",
    "LoraConfig",
    "ModelConfig",
    "PPOConfig",
    "QuantizationConfig",
    "ResourcesConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "ScoringConfig",
    "SFTConfig",
]
