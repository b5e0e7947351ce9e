"""The PPO arithmetic of RLHF as pure torch functions (no Ray, no transformers).

Shapes: B = batch, T = response length, V = vocabulary. A `mask` is a float or bool (B, T)
tensor, 1 for real response tokens (including the EOS token) and 0 for the padding after it.
Padding never enters a mean, a variance or a loss: masked positions are selected away with
`torch.where`, so even inf/nan on padding cannot leak in.

References (cited next to each trick below):
  [N-impl]  Huang et al. 2024, "The N Implementation Details of RLHF with PPO",
            https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/
  [lm-hp]   OpenAI lm-human-preferences (Ziegler et al. 2019),
            https://github.com/openai/lm-human-preferences/blob/master/lm_human_preferences/train_policy.py
  [GAE]     Schulman et al. 2015, "High-Dimensional Continuous Control Using GAE", arXiv:1506.02438
  [PPO]     Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of values (any float shape) over mask == 1 (same shape). An all-zero mask gives 0."""
    m = mask.bool()
    total = torch.where(m, values, 0).sum() if dim is None else torch.where(m, values, 0).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows of each row's masked mean: values, mask (B, T) -> scalar. Every response
    weighs the same whatever its length (GRPO's 1/G sum_i 1/|o_i| sum_t); `masked_mean` weighs
    every token the same instead. A row without real tokens contributes 0."""
    return masked_mean(values, mask, dim=1).mean()


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of values over mask == 1; Bessel's n/(n-1) when unbiased (n >= 2)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(var.dtype)
        var = var * n / (n - 1).clamp(min=1)  # n == 1 leaves var == 0
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(values - mean) / sqrt(var + 1e-8) over masked elements of values (B, T); 0 on padding.

    shift_mean=False adds the mean back (only rescales), as lm-human-preferences does for
    rewards; advantages are whitened with shift_mean=True. [lm-hp] utils/core.py `whiten`,
    [N-impl] "Advantage whitening" / "Reward whitening".
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    white = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return torch.where(mask.bool(), white, 0)


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """log_softmax(logits / temperature) at labels: logits (B, T, V) float, labels (B, T) int64
    -> (B, T) float32. Computed in float32 (bf16 logits are upcast).

    The logits must be divided by the *sampling* temperature at rollout, for the reference
    model and during the update, or the ratio/KL compare different distributions.
    [N-impl] "Scale the logits by sampling temperature"; [lm-hp] policy.py.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor, temperature: float) -> Tensor:
    """Entropy of softmax(logits / temperature): logits (B, T, V) finite float -> (B, T) float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def truncate_after_eos(
    response_ids: Tensor, eos_id: int, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each sampled response (B, T) int64 after its first EOS.

    Returns ids (B, T) int64 with every token after the first EOS set to pad_id; mask (B, T)
    float32, 1.0 up to and including the first EOS (all 1.0 if there is none); has_eos (B,)
    bool. Only EOS ends a response: a pad_id sampled before EOS is a real token (pad != eos).
    [N-impl] "Truncate after EOS" / the EOS trick; [lm-hp] lm_tasks.py postprocess.
    """
    is_eos = response_ids == eos_id
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # EOS count strictly before t
    after = eos_before > 0
    ids = torch.where(after, torch.full_like(response_ids, pad_id), response_ids)
    return ids, (~after).float(), is_eos.any(1)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of mask (B, T) -> (B,) int64; an all-zero row gives 0."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.bool().long()).amax(1)


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


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation [GAE] eq. 16 over the response tokens.

    rewards, values (B, T) float; mask (B, T). Rewards and values on padding are taken as 0, so
    the value after the last real token is 0 (the episode ends at EOS).
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    Returns (advantages (B, T), returns = advantages + values (B, T)), both 0 on padding and
    without gradient (they are targets). Advantages are NOT whitened here. [lm-hp] `loss`.
    """
    m = mask.bool()
    rewards, values = torch.where(m, rewards, 0), torch.where(m, values, 0)
    T = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t < T - 1 else torch.zeros_like(last_gae)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_adv.append(last_gae)
    advantages = torch.where(m, torch.stack(reversed_adv[::-1], dim=1), 0)
    return advantages, torch.where(m, advantages + values, 0)


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
    Returns (scalar loss, detached scalar stats "clipfrac",
    "approxkl", "ratio"). The log-ratio is zeroed on padding so exp() cannot overflow there.
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
