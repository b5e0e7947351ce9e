"""The reward scorer's work, Ray-free: the trained reward model scoring rollouts."""

from __future__ import annotations

import torch

from rlhf_ray.models.forward import prompt_response, sequence_scores
from rlhf_ray.models.loading import FrozenModelSettings, device_of, load_frozen_scalar_model
from rlhf_ray.ppo.messages import RolloutBatch


class RewardScorer:
    """The trained reward model, reading its score at the last real token of prompt+response."""

    def __init__(self, settings: FrozenModelSettings) -> None:
        self.model = load_frozen_scalar_model(settings)

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> torch.Tensor:
        """-> (B,) float32 reward-model scores."""
        device = device_of(self.model)
        ids, mask = prompt_response(
            batch.query, batch.query_mask, batch.response, batch.response_mask
        )
        return sequence_scores(self.model, ids.to(device), mask.to(device)).cpu()
