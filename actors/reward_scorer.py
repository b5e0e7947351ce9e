"""RewardScorer: the trained reward model and reward functions, scoring each step's rollouts."""

from __future__ import annotations

import os

import ray

from rlhf_ray.ppo.messages import ReferenceLogprobs, RolloutBatch, Scores
from rlhf_ray.ppo.settings import ScorerSettings
from rlhf_ray.run.busy import BusyClock
from rlhf_ray.run.console import quiet_libraries


@ray.remote
class RewardScorer:
    def __init__(self, settings: ScorerSettings) -> None:
        quiet_libraries()  # before any library loads a model
        from rlhf_ray.ppo.reward_scorer import ScorerCore  # in the role's process only

        self.scorer = ScorerCore(settings)
        self.busy = BusyClock()

    def ready(self) -> int:
        return os.getpid()

    def score(self, *batches: RolloutBatch) -> Scores:
        """Every generator's batch of one step (refs resolved by Ray) -> scores, in order."""
        with self.busy.working():
            return self.scorer.score(list(batches))

    def evaluate(self, batch: RolloutBatch, reference: ReferenceLogprobs) -> dict[str, float]:
        """Held-out responses sampled during PPO, and their reference logprobs -> judge name ->
        mean score, and their mean KL to the reference ("kl")."""
        with self.busy.working():
            return self.scorer.evaluate(batch, reference)

    def busy_seconds(self) -> float:
        return self.busy.seconds
