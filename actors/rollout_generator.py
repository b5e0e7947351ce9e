"""RolloutGenerator: samples responses with a copy of the policy. N replicas, scaled freely."""

from __future__ import annotations

import os

import ray

from rlhf_ray.messages import RolloutBatch, Weights
from rlhf_ray.rollout import PolicyJob, RolloutWorker


@ray.remote
class RolloutGenerator:
    def __init__(self, job: PolicyJob, rank: int, learner, timeout_s: float) -> None:
        self.worker = RolloutWorker(job, rank)
        # Fresh start or restart after a crash: take the learner's current weights, so a
        # restarted generator never samples from a stale policy.
        self.worker.load_weights(ray.get(learner.weights.remote(), timeout=timeout_s))

    def ready(self) -> int:
        return os.getpid()

    def generate(self, prompts: list[str]) -> RolloutBatch:
        return self.worker.generate(prompts)

    def load_weights(self, weights: Weights) -> int:
        self.worker.load_weights(weights)
        return weights.version
