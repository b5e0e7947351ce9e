"""Advantage estimators, pure torch: GAE with a critic; without one RLOO, GRPO and REINFORCE++;
and the KL as a loss term.

Shapes: B = rollouts, T = response length. `group` (B,) int64 says which prompt each rollout
answers: rows with the same id are the k = `ppo.samples_per_prompt` samples of one prompt, in
any order (the learner receives a step's rows from several generators and never reorders them).
A `mask` (B, T) is 1 on real response tokens, as in `masked`.

References (cited next to each function):
  [GAE]   Schulman et al. 2015, "High-Dimensional Continuous Control Using GAE", arXiv:1506.02438
  [lm-hp] OpenAI lm-human-preferences (Ziegler et al. 2019), train_policy.py
  [RLOO]  Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
          Learning from Human Feedback in LLMs", arXiv:2402.14740 (RLOO, leave-one-out baseline)
  [GRPO]  Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, sec. 4.1 (the GRPO objective,
          its KL estimator, and "outcome supervision": A_i = (r_i - mean(r)) / std(r) on every
          token of output i)
  [R++]   Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
          Models", arXiv:2501.03262 (token-level KL penalty, global batch normalisation)
  [k3]    Schulman 2020, "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_ray.ppo.masked import masked_whiten

GRPO_STD_EPS = 1e-4  # added to each group's std, as in TRL's GRPOTrainer


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


def group_stats(values: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (sum, count, unbiased std) of the row's group: values (B,) float, group (B,)
    int64 -> three (B,) tensors on their device. A group of one has std 0."""
    size = int(group.max()) + 1
    sums = values.new_zeros(size).index_add_(0, group, values)
    counts = torch.bincount(group, minlength=size).to(values.dtype)
    means = sums / counts.clamp(min=1)
    squares = values.new_zeros(size).index_add_(0, group, (values - means[group]) ** 2)
    stds = torch.sqrt(squares / (counts - 1).clamp(min=1))
    return sums[group], counts[group], stds[group]


def rloo_advantages(rewards: Tensor, group: Tensor) -> Tensor:
    """[RLOO]: each sample's baseline is the mean reward of the other k - 1 samples of
    its prompt. rewards (B,) float, group (B,) int64 -> (B,) advantages; every group needs
    k >= 2 (k = 1 has no other sample to compare with)."""
    sums, counts, _ = group_stats(rewards, group)
    if bool((counts < 2).any()):
        raise ValueError("RLOO needs at least 2 samples of every prompt (samples_per_prompt >= 2)")
    baseline = (sums - rewards) / (counts - 1)
    return rewards - baseline


def grpo_advantages(rewards: Tensor, group: Tensor, eps: float = GRPO_STD_EPS) -> Tensor:
    """[GRPO] outcome supervision: (r_i - mean(r)) / (std(r) + eps) over the k samples of each
    prompt (std with Bessel's correction, as torch.std and TRL). A group whose rewards are all
    equal gets advantage 0 (std 0: 0 / eps). rewards, group (B,) -> (B,)."""
    sums, counts, stds = group_stats(rewards, group)
    if bool((counts < 2).any()):
        raise ValueError("GRPO needs at least 2 samples of every prompt (samples_per_prompt >= 2)")
    return (rewards - sums / counts) / (stds + eps)


def returns_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} over the response tokens, 0 on padding (the episode ends at
    EOS). rewards (B, T) float, mask (B, T) -> (B, T)."""
    m = mask.bool()
    rewards = torch.where(m, rewards, 0)
    running = torch.zeros_like(rewards[:, 0])
    reversed_returns = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        reversed_returns.append(running)
    return torch.where(m, torch.stack(reversed_returns[::-1], dim=1), 0)


def reinforce_pp_advantages(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """[R++]: returns-to-go of the per-token rewards (KL penalty on every token, score
    at the last one), normalised with the mean and std of every real token in the whole batch
    (not per prompt, which is what sets REINFORCE++ apart from GRPO). (B, T) -> (B, T)."""
    return masked_whiten(returns_to_go(rewards, mask, gamma), mask)


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """[k3] per-token KL(policy || reference) estimate exp(d) - d - 1 with d = logp_ref - logp,
    >= 0 and unbiased, which [GRPO] puts in the loss. (B, T) float -> (B, T), 0 on
    padding (where d is taken as 0, so exp cannot overflow there)."""
    d = torch.where(mask.bool(), ref_logprobs - logprobs, 0)
    return torch.exp(d) - d - 1
