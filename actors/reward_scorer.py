"""RewardScorer: the trained reward model, scoring each rollout at its last real token."""

from __future__ import annotations

import os

import ray
import torch

from rlhf_ray.messages import RolloutBatch
from rlhf_ray.scoring import FrozenModelJob, Scorer


@ray.remote
class RewardScorer:
    def __init__(self, job: FrozenModelJob) -> None:
        self.scorer = Scorer(job)

    def ready(self) -> int:
        return os.getpid()

    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """-> (B,) float32 reward-model scores."""
        return self.scorer.score(batch)
