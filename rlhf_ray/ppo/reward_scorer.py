"""The reward scorer's work, Ray-free: the trained reward model and reward functions, weighted.

    total = scoring.reward_model_weight * reward model + sum_i function_weights[i] * function_i

The reward model reads its score at the last real token of prompt + response. Reward functions
(`reward_functions.py`) get a whole step's rollouts in one call, so the samples of one prompt
are scored together even when several rollout generators sampled them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.forward import prompt_response, sequence_scores
from rlhf_ray.models.loading import FrozenModelSettings, device_of, load_frozen_scalar_model
from rlhf_ray.models.sampling import decode_responses
from rlhf_ray.ppo.messages import RolloutBatch, Scores
from rlhf_ray.ppo.reward_functions import call_reward_function, import_reward_function

REWARD_MODEL = "reward_model"  # the name of the reward model's component in `Scores`


@dataclass(frozen=True)
class ScorerSettings:
    reward_model: FrozenModelSettings | None  # None when scoring.reward_model_weight is 0
    reward_model_weight: float
    functions: tuple[str, ...]  # module:function
    function_weights: tuple[float, ...]  # one per function
    tokenizer_path: str  # the SFT model's directory: decodes completions for the functions
    trust_remote_code: bool


class RewardScorer:
    def __init__(self, settings: ScorerSettings) -> None:
        self.settings = settings
        self.model = (
            load_frozen_scalar_model(settings.reward_model) if settings.reward_model else None
        )
        self.functions = [(spec, import_reward_function(spec)) for spec in settings.functions]
        self.tok = (
            load_tokenizer(settings.tokenizer_path, settings.trust_remote_code)
            if self.functions
            else None
        )

    @torch.no_grad()
    def score(self, batches: list[RolloutBatch]) -> Scores:
        """A step's rollouts (one batch per generator) -> their scores, batches concatenated."""
        components = {}
        if self.model is not None:
            components[REWARD_MODEL] = torch.cat([self._reward_model(b) for b in batches])
        if self.functions:
            prompts = [p for b in batches for p in b.prompts]
            completions = [text for b in batches for text in decode_responses(self.tok, b)]
            ids = [row[mask.bool()].tolist() for b in batches for row, mask in _rows(b)]
            for spec, function in self.functions:
                components[spec] = call_reward_function(spec, function, prompts, completions, ids)
        weights = dict(zip(self.settings.functions, self.settings.function_weights, strict=True))
        weights[REWARD_MODEL] = self.settings.reward_model_weight
        total = sum(weights[name] * values for name, values in components.items())
        return Scores(total=total.float(), components=components)

    def _reward_model(self, batch: RolloutBatch) -> torch.Tensor:
        """-> (B,) float32 reward-model scores."""
        device = device_of(self.model)
        ids, mask = prompt_response(
            batch.query, batch.query_mask, batch.response, batch.response_mask
        )
        return sequence_scores(self.model, ids.to(device), mask.to(device)).cpu().float()


def _rows(batch: RolloutBatch):
    return zip(batch.response, batch.response_mask, strict=True)
