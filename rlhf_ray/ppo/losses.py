"""PPO's losses, pure torch: the clipped policy loss, the clipped value loss, and the
truncated importance weights that correct for a sampler whose logprobs differ from the learner's.

Shapes: B = batch, T = response length. A `mask` (B, T) is 1 for real response tokens (the EOS
token included) and 0 for the padding after it, which never enters a mean or a loss (see `masked`).

References (cited next to each trick below):
  [N-impl]  Huang et al. 2024, "The N Implementation Details of RLHF with PPO",
            https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/
  [lm-hp]   OpenAI lm-human-preferences (Ziegler et al. 2019),
            https://github.com/openai/lm-human-preferences/blob/master/lm_human_preferences/train_policy.py
  [PPO]     Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_ray.ppo.masked import masked_mean, sequence_mean


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    per_sequence: bool = False,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate [PPO] eq. 7, as a loss to minimise, over the masked tokens.

    logprobs (B, T) float with grad (current policy); old_logprobs, advantages (B, T) float
    from the rollout; mask (B, T). The loss is the mean over tokens, or with `per_sequence`
    the mean over responses of each one's token mean (`sequence_mean`, as GRPO defines it).
    `weights` (B, T) float, no grad: each token's clipped loss is multiplied by its weight
    (truncated importance weights of the sampler/learner mismatch), as in Yao et al. 2025.
    Returns (scalar loss, detached scalar stats "clipfrac", "approxkl", "ratio",
    "logratio_absmax": the largest |log-ratio| of a token). The log-ratio is zeroed on padding
    so exp() cannot overflow there.
    [lm-hp] `loss`; [N-impl] "Policy loss" (clipfrac, approxkl = 0.5 * mean(logratio^2)).
    """
    m = mask.bool()
    log_ratio = torch.where(m, logprobs - old_logprobs, 0)
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    aggregate = sequence_mean if per_sequence else masked_mean
    per_token = torch.maximum(pg_loss1, pg_loss2)
    loss = aggregate(per_token if weights is None else per_token * weights, mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
            "logratio_absmax": log_ratio.abs().max(),  # 0 on padding
        }
    return loss, stats


def logprob_gap(logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the learner's logprobs (B, T) are from the sampler's (B, T) on the masked
    tokens: "mean" and "max" of |difference|, scalars."""
    gap = torch.where(mask.bool(), (logprobs - sampler_logprobs).abs(), 0)
    return {"mean": masked_mean(gap, mask), "max": gap.max()}


def truncated_importance_weights(
    logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, cap: float
) -> Tensor:
    """min(pi_learner / pi_sampler, cap) per token: (B, T) float, 0 on padding. The tokens were
    sampled by the sampler; the PPO loss assumes the learner's policy ("TIS", Yao et al. 2025)."""
    log_ratio = torch.where(mask.bool(), logprobs - sampler_logprobs, 0)
    return torch.where(mask.bool(), torch.exp(log_ratio).clamp(max=cap), 0)


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: values (B, T) float with grad; old_values, returns (B, T) float from
    the rollout; mask (B, T). Returns (scalar loss, detached stats "value_clipfrac").

    v_clipped = old + clamp(values - old, -c, c);
    loss = 0.5 * mean(max((values - R)^2, (v_clipped - R)^2)). [lm-hp] `loss`;
    [N-impl] "Value function loss clipping".
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(vf_loss1, vf_loss2), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((vf_loss2 > vf_loss1).float(), mask)}
    return loss, stats
