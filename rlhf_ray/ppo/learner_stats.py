"""What the PPO learner logs of an iteration, Ray-free: the update's log from its minibatch
steps, what the batch looked like (TRL's objective/* metrics), and how stale its rows were."""

from __future__ import annotations

import torch

from rlhf_ray.ppo import masked
from rlhf_ray.ppo.messages import RolloutBatch
from rlhf_ray.ppo.targets import Targets
from rlhf_ray.run import metrics


def update_stats(steps: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """An update's log from its minibatch steps, each (epoch, its stats), in order: each stat's
    mean over the steps, RATIO_FIRST the first step's ratio (before any update), the largest
    approx-KL, clip fraction, |log-ratio| and gradient norm, the mean approx-KL of each epoch,
    and the number of steps taken. No step (target_kl stopped the first): the count alone."""
    if not steps:
        return {metrics.MINIBATCH_STEPS: 0}
    names = steps[0][1]
    out = {name: sum(s[name] for _, s in steps) / len(steps) for name in names}
    out[metrics.LOGRATIO_MAX] = max(s[metrics.LOGRATIO_MAX] for _, s in steps)
    for name, top in (
        (metrics.APPROXKL, metrics.APPROXKL_MAX),
        (metrics.CLIPFRAC, metrics.CLIPFRAC_MAX),
        (metrics.GRAD_NORM, metrics.GRAD_NORM_MAX),
    ):
        out[top] = max(s[name] for _, s in steps)
    for epoch in sorted({e for e, _ in steps}):
        kls = [s[metrics.APPROXKL] for e, s in steps if e == epoch]
        out[metrics.approxkl_epoch(epoch + 1)] = sum(kls) / len(kls)
    out[metrics.RATIO_FIRST] = steps[0][1][metrics.RATIO]
    out[metrics.MINIBATCH_STEPS] = len(steps)
    return out


def rollout_stats(batch: RolloutBatch, targets: Targets, kl_coef: float) -> dict[str, float]:
    """What the batch looked like: TRL's objective/* metrics, lengths, EOS. `kl_coef`: the KL
    penalty's weight in the rewards (0 when the KL is a loss term: loss/kl_avg shows that)."""
    kl_sum = targets.kl.sum(1)  # (B,) summed over each response's tokens
    mask = targets.mask.bool()
    stats = {}
    if targets.returns is not None:  # gae: the advantages before whitening
        raw = targets.returns - targets.old_values
        stats[metrics.ADVANTAGE_RAW_STD] = masked.masked_var(raw, mask).sqrt().item()
    return {
        **stats,
        metrics.KL: kl_sum.mean().item(),
        metrics.KL_MAX: kl_sum.max().item(),
        metrics.KL_MEDIAN: kl_sum.median().item(),
        metrics.KL_TOKEN_MAX: torch.where(mask, targets.kl, -torch.inf).max().item(),
        metrics.ADVANTAGE_ABSMAX: torch.where(mask, targets.advantages.abs(), 0).max().item(),
        metrics.SCORES: targets.scores.mean().item(),
        metrics.NON_SCORE_REWARD: (-kl_coef * kl_sum).mean().item(),
        metrics.RLHF_REWARD: (targets.scores - kl_coef * kl_sum).mean().item(),
        metrics.RESPONSE_LENGTH: targets.mask.sum(1).mean().item(),
        metrics.NO_EOS_FRACTION: (~batch.has_eos).float().mean().item(),
        metrics.BATCH_TOKENS: float(batch.num_tokens),
    }


def _newer_token_share(batch: RolloutBatch, versions: list[int]) -> float:
    """The share of response tokens sampled by a newer version than their row's first token
    (partial rollouts: a sync reached the row while it was sampled); 0 without them."""
    first = torch.tensor(versions, device=batch.response_mask.device)[:, None]  # (B, 1)
    real = batch.response_mask > 0
    newer = (batch.token_versions.to(first.device) > first) & real
    return (newer.sum() / real.sum().clamp(min=1)).item()


def staleness_stats(batch: RolloutBatch, versions: list[int], learner_version: int) -> dict:
    """How old the batch's rows were when `learner_version` trained on them (each row's version
    in `versions`): mean and largest updates since sampled, and the share of tokens sampled by
    a newer version than their row's first (partial rollouts)."""
    staleness = [learner_version - v for v in versions]
    return {
        metrics.STALENESS_MEAN: sum(staleness) / len(staleness),
        metrics.STALENESS_MAX: max(staleness),
        metrics.PARTIAL_TOKENS: _newer_token_share(batch, versions),
    }
