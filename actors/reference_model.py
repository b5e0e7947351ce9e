"""ReferenceModel: the frozen SFT policy, giving logprobs for the KL penalty."""

from __future__ import annotations

import os

import ray
import torch

from rlhf_ray.messages import RolloutBatch
from rlhf_ray.scoring import FrozenModelJob, Reference


@ray.remote
class ReferenceModel:
    def __init__(self, job: FrozenModelJob, temperature: float) -> None:
        self.reference = Reference(job, temperature)

    def ready(self) -> int:
        return os.getpid()

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """-> (B, R) float32 reference logprobs, 0 on padding."""
        return self.reference.logprobs(batch)
