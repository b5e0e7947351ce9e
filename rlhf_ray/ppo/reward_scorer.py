"""The reward scorer's work, Ray-free: the trained reward model and reward functions, weighted.

    total = scoring.reward_model_weight * reward model + sum_i function_weights[i] * function_i

The reward model reads its score at the last real token of prompt + response. Reward functions
(`reward_functions.py`) get a whole step's rollouts in one call, so the samples of one prompt
are scored together even when several rollout generators sampled them. With synthetic prompts
the gold judge watches too, at weight 0: its score is logged (rewards/gold_judge), so the
reward model's score and the true one can be set side by side as KL grows (the
over-optimisation picture of Gao et al. 2022), and never trained on.
"""

from __future__ import annotations

import torch

from rlhf_ray.data.chat import assistant_message, is_conversational, prompt_text
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.errors import RoleFailed
from rlhf_ray.models.forward import prompt_response, sequence_scores
from rlhf_ray.models.loading import device_of, load_frozen_scalar_model
from rlhf_ray.models.sampling import decode_responses
from rlhf_ray.ppo.messages import ReferenceLogprobs, RolloutBatch, Scores
from rlhf_ray.ppo.reward_functions import call_reward_function, import_reward_function
from rlhf_ray.ppo.settings import ScorerSettings
from rlhf_ray.world.gold_judge import GoldJudge, gold_reward

REWARD_MODEL = "reward_model"  # the name of the reward model's component in `Scores`
GOLD_JUDGE = "gold_judge"  # the watching gold judge's component (weight 0)


class ScorerCore:
    def __init__(self, settings: ScorerSettings) -> None:
        self.settings = settings
        self.model = (
            load_frozen_scalar_model(settings.reward_model) if settings.reward_model else None
        )
        self.functions = [(spec, import_reward_function(spec)) for spec in settings.functions]
        self.judge = GoldJudge()
        self.tok = (
            load_tokenizer(settings.tokenizer_path, settings.trust_remote_code)
            if self.functions or settings.watch_gold
            else None
        )

    @torch.no_grad()
    def score(self, batches: list[RolloutBatch]) -> Scores:
        """A step's rollouts (one batch per generator) -> their scores, batches concatenated."""
        components = {}
        if self.model is not None:
            components[REWARD_MODEL] = torch.cat([self._reward_model(b) for b in batches])
        if self.tok is not None:
            prompts = [p for b in batches for p in b.prompts]
            texts = [text for b in batches for text in decode_responses(self.tok, b)]
            # As TRL gives them: a conversation's completion is an assistant message list.
            completions = [
                assistant_message(t) if is_conversational(p) else t
                for p, t in zip(prompts, texts, strict=True)
            ]
            ids = [row[mask.bool()].tolist() for b in batches for row, mask in _rows(b)]
            for spec, function in self.functions:
                components[spec] = call_reward_function(spec, function, prompts, completions, ids)
            if self.settings.watch_gold and all(self.judge.knows(prompt_text(p)) for p in prompts):
                components[GOLD_JUDGE] = torch.tensor(gold_reward(prompts, completions))
        weights = dict(zip(self.settings.functions, self.settings.function_weights, strict=True))
        weights[REWARD_MODEL] = self.settings.reward_model_weight
        total = sum(weights.get(name, 0.0) * values for name, values in components.items())
        return Scores(total.float(), components, [b.key for b in batches])

    @torch.no_grad()
    def evaluate(self, batch: RolloutBatch, reference: ReferenceLogprobs) -> dict[str, float]:
        """Held-out responses sampled during PPO -> judge name -> mean score ("gold_judge" when
        the judge knows every prompt, whether or not it watches training; "reward_model";
        each reward function; "total", what PPO trains on), and their mean summed KL to the
        reference ("kl", k1: the sum of logp_policy - logp_ref over each response's tokens)."""
        if reference.batch != batch.key:
            raise RoleFailed("the reference logprobs of the held-out batch are of another batch")
        scores = self.score([batch])
        means = {name: values.float().mean().item() for name, values in scores.components.items()}
        means["total"] = scores.total.mean().item()
        if GOLD_JUDGE not in means and all(self.judge.knows(prompt_text(p)) for p in batch.prompts):
            texts = decode_responses(self._tokenizer(), batch)
            completions = [
                assistant_message(t) if is_conversational(p) else t
                for p, t in zip(batch.prompts, texts, strict=True)
            ]
            means[GOLD_JUDGE] = sum(gold_reward(batch.prompts, completions)) / len(texts)
        mask = batch.response_mask
        kl = ((batch.logprobs - reference.logprobs) * mask).sum(1)
        means["kl"] = kl.mean().item()
        means["response_length"] = mask.sum(1).float().mean().item()
        return means

    def _tokenizer(self):
        if self.tok is None:
            self.tok = load_tokenizer(self.settings.tokenizer_path, self.settings.trust_remote_code)
        return self.tok

    def _reward_model(self, batch: RolloutBatch) -> torch.Tensor:
        """-> (B,) float32 reward-model scores."""
        device = device_of(self.model)
        ids, mask = prompt_response(
            batch.query, batch.query_mask, batch.response, batch.response_mask
        )
        return sequence_scores(self.model, ids.to(device), mask.to(device)).cpu().float()


def _rows(batch: RolloutBatch):
    return zip(batch.response, batch.response_mask, strict=True)
