"""The per-token RLHF reward, pure torch: the scorer's score at the response's last token, a
penalty where it never ended, and -kl_coef * KL on every token.

Shapes: B = batch, T = response length. A `mask` (B, T) is 1 for real response tokens (the EOS
token included) and 0 for the padding after it, which never enters a mean or a loss (see `masked`).

References (cited next to each trick below):
  [N-impl]  Huang et al. 2024, "The N Implementation Details of RLHF with PPO",
            https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/
  [lm-hp]   OpenAI lm-human-preferences (Ziegler et al. 2019),
            https://github.com/openai/lm-human-preferences/blob/master/lm_human_preferences/train_policy.py
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_ray.models.token_math import last_token_index


def apply_missing_eos_penalty(scores: Tensor, has_eos: Tensor, penalty: float) -> Tensor:
    """scores (B,) float minus penalty where has_eos (B,) bool is False.

    Responses that never finish get a worse score so the policy learns to stop. [N-impl]
    "EOS trick" (there: score set to -1); TRL `missing_eos_penalty`.
    """
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def per_token_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF reward: -kl_coef * KL on each token, the score added at the last real one.

    scores (B,) float; logprobs, ref_logprobs (B, T) float (policy / reference, same
    temperature); mask (B, T). kl uses the k1 estimator logp - ref_logp
    (http://joschu.net/blog/kl-approx.html). Returns (rewards (B, T), kl (B, T)), both 0 on
    padding (a row with an all-zero mask drops its score). [lm-hp] `compute_rewards`;
    [N-impl] "Reward = score at the EOS token - KL penalty".
    """
    m = mask.bool()
    kl = torch.where(m, logprobs - ref_logprobs, 0)
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return torch.where(m, rewards, 0), kl
