"""What the driver sends every Ray Train worker of the SFT and reward phases (picklable).

Nothing heavy is imported here: Ray Train unpickles these in its controller too
(rlhf_ray/train/launch.py says why that matters).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.config import LoraConfig, ModelConfig, QuantizationConfig, RewardConfig, SFTConfig
from rlhf_ray.data.limits import Limits
from rlhf_ray.run.trackers import TrackingSettings

EVAL_SCORES_FILE = "eval_scores.jsonl"  # per held-out pair: score of chosen and of rejected


@dataclass(frozen=True)
class SFTWorkerSettings:
    """What an SFT worker needs; picklable, sent to every Ray Train worker."""

    base_path: str
    data_dir: Path
    out_dir: Path
    tracking: TrackingSettings  # where step metrics go
    model: ModelConfig
    quantization: QuantizationConfig
    lora: LoraConfig
    sft: SFTConfig
    limits: Limits
    worker_cpus: float
    sharding: str  # resources.train_sharding: ddp or fsdp
    seed: int


@dataclass(frozen=True)
class RewardWorkerSettings:
    sft_path: str
    data_dir: Path
    out_dir: Path
    tracking: TrackingSettings  # where step metrics go
    model: ModelConfig
    quantization: QuantizationConfig
    lora: LoraConfig
    reward: RewardConfig
    limits: Limits
    worker_cpus: float
    sharding: str  # resources.train_sharding: ddp or fsdp
    seed: int
