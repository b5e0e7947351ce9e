"""The PPO learner's work, Ray-free: policy (SFT + LoRA) and critic (from the reward model).

One `train` call is one PPO iteration over a batch of rollouts (CleanRL's loop, the RLHF
details from "The N Implementation Details of RLHF with PPO", Huang et al. 2024):
  1. old values from the critic; then `targets.ppo_targets`: the reward-model score at the
     last token, minus a penalty when the response has no EOS; per-token reward
     -kl_coef * (logp - logp_ref); GAE advantages (gamma, lam), whitened over real tokens;
     returns = advantages + values.
  2. `epochs` passes over shuffled minibatches: clipped policy loss and clipped value loss,
     gradients clipped, one AdamW optimizer each for policy and critic.
There is no value-loss coefficient (`vf_coef`): policy and critic share no parameter, so each
loss reaches only its own model, and a constant factor on the critic's gradient would be
normalised away by Adam. The critic's learning rate, `ppo.critic_lr`, sets how hard it trains.
`val/ratio_first` is the ratio of each iteration's first minibatch, before any update: 1 when
the rollout's logprobs match the learner's own forward pass.
Every dropout is off (`models.disable_dropout`), so the logprobs match the rollout's; the
models stay in train mode only so that gradient checkpointing, when configured, applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import TaskType

from rlhf_ray.config import PPOConfig
from rlhf_ray.models.forward import response_logits, response_values
from rlhf_ray.models.loading import (
    add_lora,
    disable_dropout,
    load_scalar_model,
    load_trainable_state,
    save_merged,
    to_device,
    trainable_state,
)
from rlhf_ray.ppo import arithmetic
from rlhf_ray.ppo.messages import RolloutBatch, Weights, concat_batches, concat_padded
from rlhf_ray.ppo.rollout_generator import PolicySettings, build_policy
from rlhf_ray.ppo.targets import Targets, ppo_targets
from rlhf_ray.run import metrics
from rlhf_ray.run.checkpoints import atomic_dir, write_metrics
from rlhf_ray.run.saved_state import (
    optimizer_from_tensors,
    optimizer_to_tensors,
    rng_state,
    set_rng_state,
    under_prefix,
    with_prefix,
)


@dataclass(frozen=True)
class LearnerSettings:
    policy: PolicySettings
    reward_path: str  # the critic starts from the trained reward model
    critic_method: str  # "full" or "lora", as the reward model was trained
    ppo: PPOConfig


class PPOLearner:
    def __init__(self, settings: LearnerSettings) -> None:
        self.settings, self.cfg = settings, settings.ppo
        torch.manual_seed(settings.policy.seed)
        self.tok, policy = build_policy(settings.policy)
        self.policy, self.critic = policy.train(), self._build_critic().train()
        self.policy_params = [p for p in self.policy.parameters() if p.requires_grad]
        self.critic_params = [p for p in self.critic.parameters() if p.requires_grad]
        self.policy_opt = torch.optim.AdamW(self.policy_params, lr=self.cfg.lr)
        self.critic_opt = torch.optim.AdamW(self.critic_params, lr=self.cfg.critic_lr)
        self.version = 0

    def _build_critic(self):
        policy = self.settings.policy
        critic = load_scalar_model(
            self.settings.reward_path, policy.model, policy.quantization, self.tok.pad_token_id
        )
        if self.settings.critic_method == "lora":
            checkpointing = policy.model.gradient_checkpointing
            critic = add_lora(critic, policy.lora, TaskType.SEQ_CLS, checkpointing)
        disable_dropout(critic)
        return to_device(critic, policy.gpus)

    def weights(self) -> Weights:
        return Weights(trainable_state(self.policy), self.version)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON state) to continue exactly: trainable weights of policy and critic,
        both optimizers, this process's RNG and the policy version."""
        policy_opt, policy_groups = optimizer_to_tensors(self.policy_opt)
        critic_opt, critic_groups = optimizer_to_tensors(self.critic_opt)
        tensors = {
            **with_prefix("policy/", trainable_state(self.policy)),
            **with_prefix("critic/", trainable_state(self.critic)),
            **with_prefix("policy_opt/", policy_opt),
            **with_prefix("critic_opt/", critic_opt),
            **with_prefix("rng/", rng_state()),
        }
        state = {"version": self.version, "policy_opt": policy_groups, "critic_opt": critic_groups}
        return tensors, state

    def restore(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """The inverse of `checkpoint_state`, on a learner built with the same settings."""
        load_trainable_state(self.policy, under_prefix("policy/", tensors))
        load_trainable_state(self.critic, under_prefix("critic/", tensors))
        optimizer_from_tensors(
            self.policy_opt, under_prefix("policy_opt/", tensors), state["policy_opt"]
        )
        optimizer_from_tensors(
            self.critic_opt, under_prefix("critic_opt/", tensors), state["critic_opt"]
        )
        set_rng_state(under_prefix("rng/", tensors))
        self.version = state["version"]

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
    def _targets(
        self, batch: RolloutBatch, scores: torch.Tensor, ref_logprobs: torch.Tensor
    ) -> Targets:
        values = response_values(
            self.critic, batch.query, batch.query_mask, batch.response, batch.response_mask
        )
        return ppo_targets(
            scores,
            batch.has_eos,
            batch.logprobs,
            ref_logprobs,
            values,
            batch.response_mask,
            kl_coef=self.cfg.kl_coef,
            gamma=self.cfg.gamma,
            lam=self.cfg.lam,
            missing_eos_penalty=self.cfg.missing_eos_penalty,
            whiten_rewards=self.cfg.whiten_rewards,
        )

    def _update(self, batch: RolloutBatch, targets: Targets) -> dict[str, float]:
        """`epochs` passes over shuffled minibatches -> each stat averaged over all minibatch
        steps, plus RATIO_FIRST: the ratio of the very first step, before any update."""
        sums: dict[str, float] = {}
        first_ratio, count = None, 0
        for _ in range(self.cfg.epochs):
            order = torch.randperm(batch.response.shape[0], device=batch.response.device)
            for idx in order.split(self.cfg.minibatch_size):
                step = self._minibatch_step(batch, targets, idx)
                first_ratio = step[metrics.RATIO] if first_ratio is None else first_ratio
                for name, value in step.items():
                    sums[name] = sums.get(name, 0.0) + value
                count += 1
        return {
            **{name: total / count for name, total in sums.items()},
            metrics.RATIO_FIRST: first_ratio,
        }

    def _minibatch_step(
        self, batch: RolloutBatch, targets: Targets, idx: torch.Tensor
    ) -> dict[str, float]:
        mask = targets.mask[idx]
        logits = response_logits(
            self.policy, batch.query[idx], batch.query_mask[idx], batch.response[idx], mask
        )
        logprobs = arithmetic.logprobs_from_logits(
            logits, batch.response[idx], self.settings.policy.temperature
        )
        values = response_values(
            self.critic, batch.query[idx], batch.query_mask[idx], batch.response[idx], mask
        )
        pg_loss, pg = arithmetic.policy_loss(
            logprobs, targets.old_logprobs[idx], targets.advantages[idx], mask, self.cfg.clip_range
        )
        vf_loss, vf = arithmetic.value_loss(
            values, targets.old_values[idx], targets.returns[idx], mask, self.cfg.value_clip_range
        )
        # Disjoint parameters: pg_loss reaches only the policy, vf_loss only the critic.
        (pg_loss + vf_loss).backward()
        for params, opt in (
            (self.policy_params, self.policy_opt),
            (self.critic_params, self.critic_opt),
        ):
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            entropy = arithmetic.masked_mean(
                arithmetic.entropy_from_logits(logits, self.settings.policy.temperature), mask
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
            policy = self.settings.policy
            save_merged(self.policy, self.tok, tmp, policy.sft_path, policy.model)
            write_metrics(tmp, run_metrics)


def _rollout_stats(batch: RolloutBatch, targets: Targets, kl_coef: float) -> dict[str, float]:
    """What the batch looked like: TRL's objective/* metrics, lengths, EOS."""
    kl_sum = targets.kl.sum(1)  # (B,) summed over each response's tokens
    return {
        metrics.KL: kl_sum.mean().item(),
        metrics.SCORES: targets.scores.mean().item(),
        metrics.NON_SCORE_REWARD: (-kl_coef * kl_sum).mean().item(),
        metrics.RLHF_REWARD: (targets.scores - kl_coef * kl_sum).mean().item(),
        metrics.RESPONSE_LENGTH: targets.mask.sum(1).mean().item(),
        metrics.NO_EOS_FRACTION: (~batch.has_eos).float().mean().item(),
        metrics.BATCH_TOKENS: float(batch.num_tokens),
    }


def _to(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    """The same batch with every tensor on `device`."""
    return RolloutBatch(
        **{
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in vars(batch).items()
        }
    )
