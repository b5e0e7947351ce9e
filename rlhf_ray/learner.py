"""The PPO learner's work, Ray-free: policy (SFT + LoRA) and critic (from the reward model).

One `train` call is one PPO iteration over a batch of rollouts (CleanRL's loop, the RLHF
details from "The N Implementation Details of RLHF with PPO", Huang et al. 2024):
  1. old values from the critic; the reward-model score at the last token, minus a penalty
     when the response has no EOS; per-token reward -kl_coef * (logp - logp_ref).
  2. GAE advantages (gamma, lam), whitened over real tokens; returns = advantages + values.
  3. `epochs` passes over shuffled minibatches: clipped policy loss + vf_coef * clipped value
     loss, gradients clipped, one optimizer each for policy and critic.
Every dropout is off (`models.disable_dropout`), so the logprobs match the rollout's; the
models stay in train mode only so that gradient checkpointing, when configured, applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import TaskType

from rlhf_ray import metrics
from rlhf_ray import ppo_math as pm
from rlhf_ray.checkpoints import atomic_dir, write_metrics
from rlhf_ray.config import PPOConfig
from rlhf_ray.forward import response_logits, response_values
from rlhf_ray.messages import RolloutBatch, Weights, concat_batches, concat_padded
from rlhf_ray.models import (
    add_lora,
    disable_dropout,
    load_scalar_model,
    save_merged,
    to_device,
    trainable_state,
)
from rlhf_ray.rollout import PolicyJob, build_policy


@dataclass(frozen=True)
class LearnerJob:
    policy: PolicyJob
    reward_path: str  # the critic starts from the trained reward model
    critic_method: str  # "full" or "lora", as the reward model was trained
    ppo: PPOConfig


@dataclass
class Targets:
    """Everything fixed during one iteration's epochs. All (B, R) float32 but `scores` (B,)."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor  # whitened over real tokens
    returns: torch.Tensor
    mask: torch.Tensor
    kl: torch.Tensor  # per-token k1 estimate logp - logp_ref
    scores: torch.Tensor  # after the missing-EOS penalty


class Learner:
    def __init__(self, job: LearnerJob) -> None:
        self.job, self.cfg = job, job.ppo
        torch.manual_seed(job.policy.seed)
        self.tok, policy = build_policy(job.policy)
        self.policy, self.critic = policy.train(), self._build_critic().train()
        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        self.policy_opt = torch.optim.AdamW(self.policy_params, lr=self.cfg.lr)
        self.critic_opt = torch.optim.AdamW(self.critic_params, lr=self.cfg.critic_lr)
        self.version = 0

    def _build_critic(self):
        p = self.job.policy
        critic = load_scalar_model(
            self.job.reward_path, p.model, p.quantization, self.tok.pad_token_id
        )
        if self.job.critic_method == "lora":
            critic = add_lora(critic, p.lora, TaskType.SEQ_CLS, p.model.gradient_checkpointing)
        disable_dropout(critic)
        return to_device(critic, p.gpus)

    def weights(self) -> Weights:
        return Weights(trainable_state(self.policy), self.version)

    def train(
        self, batches: list[RolloutBatch], scores: list[torch.Tensor], refs: list[torch.Tensor]
    ) -> dict[str, float]:
        """One PPO iteration; returns metric name -> value, and bumps the policy version."""
        batch, versions = concat_batches(batches, self.tok.pad_token_id)
        lag = self.version - min(versions)
        if lag > self.cfg.max_policy_lag:
            raise RuntimeError(
                f"rollouts sampled with policy version {min(versions)} are {lag} updates old; "
                f"ppo.max_policy_lag is {self.cfg.max_policy_lag}"
            )
        device = next(self.policy.parameters()).device
        batch = _to(batch, device)
        ref = concat_padded(refs, batch.response.shape[1]).to(device)
        targets = self._targets(batch, torch.cat(scores).to(device), ref)
        stats = self._update(batch, targets)
        self.version += 1
        return {
            **stats,
            **_rollout_stats(batch, targets, self.cfg.kl_coef),
            metrics.POLICY_LAG: lag,
        }

    @torch.no_grad()
    def _targets(self, b: RolloutBatch, scores: torch.Tensor, ref: torch.Tensor) -> Targets:
        mask = b.response_mask
        values = response_values(self.critic, b.query, b.query_mask, b.response, mask) * mask
        scores = pm.apply_missing_eos_penalty(scores, b.has_eos, self.cfg.missing_eos_penalty)
        rewards, kl = pm.per_token_rewards(scores, b.logprobs, ref, mask, self.cfg.kl_coef)
        if self.cfg.whiten_rewards:
            rewards = pm.masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = pm.gae_advantages(rewards, values, mask, self.cfg.gamma, self.cfg.lam)
        advantages = pm.masked_whiten(advantages, mask)
        return Targets(b.logprobs, values, advantages, returns, mask, kl, scores)

    def _update(self, b: RolloutBatch, t: Targets) -> dict[str, float]:
        sums: dict[str, float] = {}
        count = 0
        for _ in range(self.cfg.epochs):
            order = torch.randperm(b.response.shape[0], device=b.response.device)
            for idx in order.split(self.cfg.minibatch_size):
                for name, value in self._minibatch_step(b, t, idx).items():
                    sums[name] = sums.get(name, 0.0) + value
                count += 1
        return {name: total / count for name, total in sums.items()}

    def _minibatch_step(self, b: RolloutBatch, t: Targets, idx: torch.Tensor) -> dict[str, float]:
        mask = t.mask[idx]
        logits = response_logits(
            self.policy, b.query[idx], b.query_mask[idx], b.response[idx], mask
        )
        logprobs = pm.logprobs_from_logits(logits, b.response[idx], self.job.policy.temperature)
        values = response_values(
            self.critic, b.query[idx], b.query_mask[idx], b.response[idx], mask
        )
        pg_loss, pg = pm.policy_loss(
            logprobs, t.old_logprobs[idx], t.advantages[idx], mask, self.cfg.clip_range
        )
        vf_loss, vf = pm.value_loss(
            values, t.old_values[idx], t.returns[idx], mask, self.cfg.value_clip_range
        )
        (pg_loss + self.cfg.vf_coef * vf_loss).backward()
        for params, opt in (
            (self.policy_params, self.policy_opt),
            (self.critic_params, self.critic_opt),
        ):
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            entropy = pm.masked_mean(
                pm.entropy_from_logits(logits, self.job.policy.temperature), mask
            )
        return {
            metrics.POLICY_LOSS: pg_loss.item(),
            metrics.VALUE_LOSS: vf_loss.item(),
            metrics.APPROXKL: pg["approxkl"].item(),
            metrics.CLIPFRAC: pg["clipfrac"].item(),
            metrics.RATIO: pg["ratio"].item(),
            metrics.VALUE_CLIPFRAC: vf["value_clipfrac"].item(),
            metrics.ENTROPY: entropy.item(),
        }

    def export(self, out_dir: str, run_metrics: dict) -> None:
        """The policy as a standard model directory (LoRA merged), written atomically."""
        with atomic_dir(Path(out_dir)) as tmp:
            save_merged(self.policy, self.tok, tmp, self.job.policy.sft_path, self.job.policy.model)
            write_metrics(tmp, run_metrics)


def _rollout_stats(b: RolloutBatch, t: Targets, kl_coef: float) -> dict[str, float]:
    """What the batch looked like: TRL's objective/* metrics, lengths, EOS."""
    kl_sum = t.kl.sum(1)  # (B,) summed over each response's tokens
    return {
        metrics.KL: kl_sum.mean().item(),
        metrics.SCORES: t.scores.mean().item(),
        metrics.NON_SCORE_REWARD: (-kl_coef * kl_sum).mean().item(),
        metrics.RLHF_REWARD: (t.scores - kl_coef * kl_sum).mean().item(),
        metrics.RESPONSE_LENGTH: t.mask.sum(1).mean().item(),
        metrics.NO_EOS_FRACTION: (~b.has_eos).float().mean().item(),
        "tokens": float(b.num_tokens),
    }


def _to(b: RolloutBatch, device: torch.device) -> RolloutBatch:
    """The same batch with every tensor on `device`."""
    return RolloutBatch(
        **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(b).items()}
    )
