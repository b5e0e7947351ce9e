"""The reference model's work, Ray-free: the frozen SFT policy's logprobs for the KL penalty."""

from __future__ import annotations

import torch

from rlhf_ray.models.forward import response_logprobs
from rlhf_ray.models.loading import FrozenModelSettings, device_of, load_frozen_causal_lm
from rlhf_ray.ppo.messages import ReferenceLogprobs, RolloutBatch


class ReferenceCore:
    """The frozen SFT policy: logprobs of the sampled responses, for the KL penalty."""

    def __init__(self, settings: FrozenModelSettings, temperature: float) -> None:
        # In train mode, as the learner's policy (every dropout is off): kernels may differ by
        # mode (bitsandbytes 4-bit on CPU repacks its weights for eval), and the KL at step 1
        # must be that of the same computation, 0
        self.model = load_frozen_causal_lm(settings).train()
        self.temperature = temperature

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> ReferenceLogprobs:
        """-> the batch's (B, R) float32 reference logprobs at the sampling temperature, 0 on
        padding."""
        device = device_of(self.model)
        logprobs = response_logprobs(
            self.model,
            batch.query.to(device),
            batch.query_mask.to(device),
            batch.response.to(device),
            batch.response_mask.to(device),
            self.temperature,
        )
        return ReferenceLogprobs(batch.key, (logprobs.cpu() * batch.response_mask).float())
