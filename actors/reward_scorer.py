"""RewardScorer: the trained reward model, scoring each rollout at its last real token."""

from __future__ import annotations

import os

import ray
import torch

from rlhf_ray.models.loading import FrozenModelSettings
from rlhf_ray.ppo import reward_scorer
from rlhf_ray.ppo.messages import RolloutBatch


@ray.remote
class RewardScorer:
    def __init__(self, settings: FrozenModelSettings) -> None:
        self.scorer = reward_scorer.RewardScorer(settings)

    def ready(self) -> int:
        return os.getpid()

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """-> (B,) float32 reward-model scores."""
        return self.scorer.score(batch)
