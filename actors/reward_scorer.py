"""RewardScorer: the trained reward model and reward functions, scoring each step's rollouts."""

from __future__ import annotations

import os

import ray

from rlhf_ray.ppo import reward_scorer
from rlhf_ray.ppo.messages import RolloutBatch, Scores


@ray.remote
class RewardScorer:
    def __init__(self, settings: reward_scorer.ScorerSettings) -> None:
        self.scorer = reward_scorer.RewardScorer(settings)

    def ready(self) -> int:
        return os.getpid()

    def score(self, *batches: RolloutBatch) -> Scores:
        """Every generator's batch of one step (refs resolved by Ray) -> scores, in order."""
        return self.scorer.score(list(batches))
