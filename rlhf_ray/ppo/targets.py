"""The targets of one PPO iteration, from the rollout's numbers alone (no model, no Ray).

    score - missing-EOS penalty -> per-token rewards (-kl_coef * KL, score at the last token)
    -> [optional reward whitening] -> GAE advantages and returns -> advantages whitened

The learner runs the critic for `values` and passes the numbers in; everything here is a
composition of the pure functions in `arithmetic`, tested with hand-worked values in
tests/test_targets.py. B = rollouts, R = response length; padding is 0 in every output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_ray.ppo import arithmetic


@dataclass
class Targets:
    """Everything that stays fixed during one iteration's epochs."""

    old_logprobs: Tensor  # (B, R) float32 behaviour-policy logprobs, 0 on padding
    old_values: Tensor  # (B, R) float32 critic values at rollout time, 0 on padding
    rewards: Tensor  # (B, R) float32 per-token rewards that went into GAE
    advantages: Tensor  # (B, R) float32 GAE advantages whitened over real tokens
    returns: Tensor  # (B, R) float32 advantages (before whitening) + old_values
    mask: Tensor  # (B, R) float32, 1 on real response tokens (EOS included)
    kl: Tensor  # (B, R) float32 per-token k1 estimate logp - logp_ref
    scores: Tensor  # (B,) float32 reward-model scores after the missing-EOS penalty


@torch.no_grad()
def ppo_targets(
    scores: Tensor,  # (B,) float32 reward-model scores
    has_eos: Tensor,  # (B,) bool, False when the response hit the length limit
    logprobs: Tensor,  # (B, R) float32 policy logprobs at rollout time
    ref_logprobs: Tensor,  # (B, R) float32 reference logprobs, same temperature
    values: Tensor,  # (B, R) float32 critic values of the state before each token
    mask: Tensor,  # (B, R), 1 on real response tokens
    *,
    kl_coef: float,
    gamma: float,
    lam: float,
    missing_eos_penalty: float,
    whiten_rewards: bool,
) -> Targets:
    """Rewards -> GAE -> whitening, as in [lm-hp] `compute_rewards` + `loss` and TRL's PPO."""
    m = mask.bool()
    values = torch.where(m, values, 0)
    logprobs = torch.where(m, logprobs, 0)
    scores = arithmetic.apply_missing_eos_penalty(scores, has_eos, missing_eos_penalty)
    rewards, kl = arithmetic.per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    if whiten_rewards:  # [N-impl] "Reward whitening": rescale only, keep the mean
        rewards = arithmetic.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = arithmetic.gae_advantages(rewards, values, mask, gamma, lam)
    advantages = arithmetic.masked_whiten(advantages, mask)  # [N-impl] "Advantage whitening"
    return Targets(logprobs, values, rewards, advantages, returns, mask.float(), kl, scores)
