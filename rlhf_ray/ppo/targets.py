"""The targets of one policy iteration, from the rollout's numbers alone (no model, no Ray).

With a critic (`ppo.estimator: gae`, PPO proper):
    score - missing-EOS penalty -> per-token rewards (-kl_coef * KL, score at the last token)
    -> [optional reward whitening] -> GAE advantages and returns -> advantages whitened
Without one (`rloo`, `grpo`, `reinforce++`, `estimators.py`):
    score - missing-EOS penalty -> per-token rewards as above
    -> rloo / grpo: the response's summed reward, compared within its prompt's group,
                    the same advantage on every token of the response
    -> reinforce++: returns-to-go, normalised over the whole batch
When the KL is a loss term (`ppo.kl_placement`), the rewards carry no KL (kl_coef 0 here).

The learner runs the critic for `values` and passes the numbers in; everything here is a
composition of the pure functions in `token_rewards`, `estimators` and `masked`, tested with
hand-worked values in tests/test_targets.py. B = rollouts, R = response length; padding is 0
in every output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_ray.ppo import estimators, masked, token_rewards


@dataclass
class Targets:
    """Everything that stays fixed during one iteration's epochs."""

    old_logprobs: Tensor  # (B, R) float32 behaviour-policy logprobs, 0 on padding
    old_values: Tensor | None  # (B, R) float32 critic values at rollout time; None: no critic
    rewards: Tensor  # (B, R) float32 per-token rewards the advantages were computed from
    advantages: Tensor  # (B, R) float32 advantages, 0 on padding
    returns: Tensor | None  # (B, R) float32 GAE advantages (before whitening) + old_values
    mask: Tensor  # (B, R) float32, 1 on real response tokens (EOS included)
    kl: Tensor  # (B, R) float32 per-token k1 estimate logp - logp_ref
    scores: Tensor  # (B,) float32 scores after the missing-EOS penalty
    ref_logprobs: Tensor  # (B, R) float32 reference logprobs, for a KL loss term


@torch.no_grad()
def ppo_targets(
    scores: Tensor,  # (B,) float32 reward-model scores
    has_eos: Tensor,  # (B,) bool, False when the response hit the length limit
    logprobs: Tensor,  # (B, R) float32 policy logprobs at rollout time
    ref_logprobs: Tensor,  # (B, R) float32 reference logprobs, same temperature
    values: Tensor,  # (B, R) float32 critic values of the state before each token
    mask: Tensor,  # (B, R), 1 on real response tokens
    *,
    kl_coef: float,  # 0 when the KL is a loss term instead
    gamma: float,
    lam: float,
    missing_eos_penalty: float,
    whiten_rewards: bool,
) -> Targets:
    """Rewards -> GAE -> whitening, as in [lm-hp] `compute_rewards` + `loss` and TRL's PPO."""
    m = mask.bool()
    values = torch.where(m, values, 0)
    logprobs = torch.where(m, logprobs, 0)
    scores = token_rewards.apply_missing_eos_penalty(scores, has_eos, missing_eos_penalty)
    rewards, kl = token_rewards.per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    if whiten_rewards:  # [N-impl] "Reward whitening": rescale only, keep the mean
        rewards = masked.masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = estimators.gae_advantages(rewards, values, mask, gamma, lam)
    advantages = masked.masked_whiten(advantages, mask)  # [N-impl] "Advantage whitening"
    return Targets(
        logprobs, values, rewards, advantages, returns, mask.float(), kl, scores, ref_logprobs
    )


@torch.no_grad()
def critic_free_targets(
    estimator: str,  # "rloo", "grpo" or "reinforce++"
    scores: Tensor,  # (B,) float32 scores
    has_eos: Tensor,  # (B,) bool
    logprobs: Tensor,  # (B, R) float32 policy logprobs at rollout time
    ref_logprobs: Tensor,  # (B, R) float32 reference logprobs, same temperature
    mask: Tensor,  # (B, R), 1 on real response tokens
    group: Tensor,  # (B,) int64 prompt group of each rollout
    *,
    kl_coef: float,  # 0 when the KL is a loss term instead
    gamma: float,
    missing_eos_penalty: float,
) -> Targets:
    """Advantages from the rewards alone: RLOO and GRPO per response within each prompt's
    group (TRL's RLOO: score - kl_coef * summed KL), REINFORCE++ per token over the batch."""
    m = mask.bool()
    logprobs = torch.where(m, logprobs, 0)
    scores = token_rewards.apply_missing_eos_penalty(scores, has_eos, missing_eos_penalty)
    rewards, kl = token_rewards.per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    if estimator == "reinforce++":
        advantages = estimators.reinforce_pp_advantages(rewards, mask, gamma)
    else:
        per_response = rewards.sum(1)  # (B,) score - kl_coef * the response's summed KL
        baseline = {"rloo": estimators.rloo_advantages, "grpo": estimators.grpo_advantages}
        advantage = baseline[estimator](per_response, group)  # (B,)
        advantages = torch.where(m, advantage[:, None], 0)
    return Targets(
        logprobs, None, rewards, advantages, None, mask.float(), kl, scores, ref_logprobs
    )
