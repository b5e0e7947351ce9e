"""ReferenceModel: the frozen SFT policy, giving logprobs for the KL penalty."""

from __future__ import annotations

import os

import ray

from rlhf_ray.models.loading import FrozenModelSettings
from rlhf_ray.ppo.messages import ReferenceLogprobs, RolloutBatch
from rlhf_ray.run.busy import BusyClock
from rlhf_ray.run.console import quiet_libraries


@ray.remote
class ReferenceModel:
    def __init__(self, settings: FrozenModelSettings, temperature: float) -> None:
        quiet_libraries()  # before any library loads a model
        from rlhf_ray.ppo.reference_model import ReferenceCore  # in the role's process only

        self.reference = ReferenceCore(settings, temperature)
        self.busy = BusyClock()

    def ready(self) -> int:
        return os.getpid()

    def busy_seconds(self) -> float:
        return self.busy.seconds

    def logprobs(self, batch: RolloutBatch) -> ReferenceLogprobs:
        """-> the batch's (B, R) float32 reference logprobs, 0 on padding."""
        with self.busy.working():
            return self.reference.logprobs(batch)
