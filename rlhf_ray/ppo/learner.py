"""The policy learner's work, Ray-free: the policy (SFT + LoRA) and, for PPO, its critic.

One `train` call is one iteration over a step's rollouts (CleanRL's loop, the RLHF details
from "The N Implementation Details of RLHF with PPO", Huang et al. 2024):
  1. targets (`targets.py`): the score minus a penalty when the response has no EOS; per-token
     KL penalty -kl_coef * (logp - logp_ref) unless the KL is a loss term; then advantages by
     `ppo.estimator`: GAE with the critic's values (PPO, whitened, returns = advantages +
     values), or without a critic RLOO / GRPO within each prompt's group, or REINFORCE++.
  2. `epochs` passes over shuffled minibatches: the clipped policy loss (GRPO: averaged per
     response), plus kl_coef * the k3 KL when it is a loss term, plus the clipped value loss when
     there is a critic; gradients clipped, one AdamW optimizer per model.
No critic is built when the estimator uses none. There is no value-loss coefficient
(`vf_coef`): policy and critic share no parameter, so each loss reaches only its own model, and
a constant factor on the critic's gradient would be normalised away by Adam. The critic's
learning rate, `ppo.critic_lr`, sets how hard it trains.
`val/ratio_first` is the ratio of each iteration's first minibatch, before any update: 1 when
the rollout's logprobs match the learner's own forward pass.
With `rollout.logprob_source` learner (vLLM, or a bf16/4-bit policy) the old logprobs (for the
ratio and the KL) are the learner's own, from one no-grad pass over the batch before the update:
the sampler's travel with the batch, and their gap is logged (`rollout/logprob_gap_*`).
`rollout.logprob_correction: tis` also weights each token's policy loss by
min(pi_learner / pi_sampler, tis_cap), truncated importance sampling ("Your Efficient RL
Framework Secretly Brings You Off-Policy RL Training", Yao et al. 2025).
`ppo.objective: decoupled` (Hilton et al. 2021, "Batch size-invariance for policy
optimization"; AReaL) does the same for a batch sampled by an older policy version (lag > 0):
the learner's own logprobs are then the proximal policy's, the clip is taken around them, and
the weight min(pi_proximal / pi_behaviour, tis_cap) corrects for the version that sampled it.
Every dropout is off (`models.disable_dropout`), so the logprobs match the rollout's; the
models stay in train mode so that gradient checkpointing, when configured, applies (and the
reference model computes in train mode too: some kernels differ by mode).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from peft import TaskType
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor

from rlhf_ray.models import token_math
from rlhf_ray.models.adapters import add_lora, save_merged
from rlhf_ray.models.forward import ResponseLogits, ResponseValues, response_logprobs
from rlhf_ray.models.loading import (
    disable_dropout,
    load_scalar_model,
    load_trainable_state,
    to_device,
    trainable_state,
)
from rlhf_ray.models.source import ADAPTER_DIR
from rlhf_ray.ppo import estimators, kl_control, learner_stats, losses, lr_schedule, masked
from rlhf_ray.ppo.data_parallel import Ranks
from rlhf_ray.ppo.messages import (
    ReferenceLogprobs,
    RolloutBatch,
    Scores,
    Weights,
    check_results_match,
    concat_batches,
    concat_padded,
)
from rlhf_ray.ppo.rollout_generator import build_policy
from rlhf_ray.ppo.settings import LearnerSettings
from rlhf_ray.ppo.targets import Targets, critic_free_targets, ppo_targets
from rlhf_ray.run import metrics
from rlhf_ray.run.best_step import STEP_WEIGHTS
from rlhf_ray.run.checkpoints import atomic_dir, write_metrics
from rlhf_ray.run.saved_state import rng_state, set_rng_state, under_prefix, with_prefix
from rlhf_ray.train.common import Worker
from rlhf_ray.train.sharding import (
    fully_shard_model,
    load_whole_optimizer_state,
    load_whole_trainable_state,
    whole_optimizer_state,
    whole_trainable_state,
)


class LearnerCore:
    def __init__(self, settings: LearnerSettings) -> None:
        self.settings, self.cfg = settings, settings.ppo
        torch.manual_seed(settings.policy.seed)
        self.tok, policy = build_policy(settings.policy)
        self.policy = policy.train()
        self.critic = self._build_critic().train() if self.cfg.uses_critic else None
        self.trained = {"policy": self._optimized(self.policy, self.cfg.lr)}
        if self.critic is not None:
            self.trained["critic"] = self._optimized(self.critic, self.cfg.critic_lr)
        self.version = 0
        self.kl_coef = self.cfg.kl_coef  # beta; adapted after each step with ppo.kl_target
        self.critic_sharded = False
        self.use_ranks(Ranks())

    def _optimized(self, model: torch.nn.Module, lr: float) -> tuple[list, torch.optim.AdamW]:
        """(`model`'s trainable parameters, a new AdamW over them)."""
        params = [p for p in model.parameters() if p.requires_grad]
        return params, torch.optim.AdamW(params, lr=lr, weight_decay=self.cfg.weight_decay)

    def use_ranks(self, ranks: Ranks) -> None:
        """Train as `ranks.rank` of `ranks.world` learner ranks, in the process group this
        process has joined (`data_parallel.join_group`): the training passes go through DDP,
        or the critic's through FSDP2 (`critic_sharding` fsdp). Called before any update or
        restore: a sharded critic gets a new AdamW over its sharded parameters."""
        self.ranks = ranks
        self.policy_pass = ranks.wrap(ResponseLogits(self.policy))
        self.critic_pass = None
        if self.critic is None:
            return
        values = ResponseValues(self.critic)
        if not (ranks.distributed and self.settings.critic_sharding == "fsdp"):
            self.critic_pass = ranks.wrap(values)
            return
        # its parameters become DTensors in place, each rank holding 1/N of every weight
        self.critic_pass = fully_shard_model(values, chief=ranks.rank == 0)
        self.critic_sharded = True
        self.trained["critic"] = self._optimized(self.critic, self.cfg.critic_lr)

    def _build_critic(self):
        policy = self.settings.policy
        critic = load_scalar_model(
            self.settings.critic_path, policy.model, policy.quantization, self.tok.pad_token_id
        )
        if self.settings.critic_method == "lora":
            checkpointing = policy.model.gradient_checkpointing
            critic = add_lora(critic, policy.lora, TaskType.SEQ_CLS, checkpointing)
        disable_dropout(critic)
        return to_device(critic, policy.gpus)

    def weights(self) -> Weights:
        return Weights(trainable_state(self.policy), self.version)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON state) to continue exactly. Rank 0: the trainable weights and
        optimizer of each trained model (policy, and critic if any), whole, its RNG and the
        policy version; any other rank: its RNG alone, and {}. Every rank calls it: a sharded
        critic's tensors are gathered whole (a collective), so the checkpoint is the same with
        any rank count or sharding, and resumes with any."""
        tensors = with_prefix("rng/", rng_state())
        state: dict = {"version": self.version, "kl_coef": self.kl_coef}
        for name, (_, opt) in self.trained.items():
            place = self._place(name)
            weights = whole_trainable_state(self._model(name), place)
            moments = whole_optimizer_state(opt, place)
            if place.is_chief:
                opt_tensors, state[f"{name}_opt"] = moments
                tensors |= with_prefix(f"{name}/", weights)
                tensors |= with_prefix(f"{name}_opt/", opt_tensors)
        return (tensors, state) if self.ranks.rank == 0 else (tensors, {})

    def restore(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """The inverse of `checkpoint_state` (rank 0's tensors, this rank's RNG), on a learner
        built with the same settings; a sharded critic keeps its own shard of each tensor."""
        for name, (_, opt) in self.trained.items():
            load_whole_trainable_state(self._model(name), under_prefix(f"{name}/", tensors))
            moments = under_prefix(f"{name}_opt/", tensors)
            load_whole_optimizer_state(opt, moments, state[f"{name}_opt"])
        set_rng_state(under_prefix("rng/", tensors))
        self.version = state["version"]
        self.kl_coef = state.get("kl_coef", self.cfg.kl_coef)  # older checkpoints: fixed

    def trainable_digest(self) -> dict[str, str]:
        """Trained model ("policy", "critic") -> a SHA-256 of its trainable tensors as this rank
        holds them (a sharded critic: its shards). Under DDP every rank's are the same."""
        digests = {}
        for name, (params, _) in self.trained.items():
            digest = hashlib.sha256()
            for param in params:
                local = param.to_local() if isinstance(param, DTensor) else param
                digest.update(local.detach().cpu().contiguous().view(torch.uint8).numpy())
            digests[name] = digest.hexdigest()
        return digests

    def _model(self, name: str) -> torch.nn.Module:
        return {"policy": self.policy, "critic": self.critic}[name]

    def _place(self, name: str) -> Worker:
        """Where `name`'s state lives, as rlhf_ray/train/sharding.py reads it: on this rank,
        whole (DDP, or one rank) or as shards (the FSDP2 critic)."""
        device = next(self._model(name).parameters()).device
        sharded = name == "critic" and self.critic_sharded
        return Worker(self.ranks.rank, self.ranks.world, device, sharded)

    def train(
        self, batches: list[RolloutBatch], scores: Scores, refs: list[ReferenceLogprobs]
    ) -> dict[str, float]:
        """One iteration on a step's rollouts (a batch per generator; their scores, in the same
        order; their reference logprobs); returns metric name -> value, bumps the version."""
        check_results_match(batches, scores, refs)
        batch, versions = concat_batches(batches, self.tok.pad_token_id)
        self._check_groups(batch.group)
        lag = self.version - min(versions)
        if lag > self.cfg.max_policy_lag:
            raise RuntimeError(
                f"rollouts sampled with policy version {min(versions)} are {lag} updates old; "
                f"ppo.max_policy_lag is {self.cfg.max_policy_lag}"
            )
        device = next(self.policy.parameters()).device
        batch = _to(batch, device)
        staleness = learner_stats.staleness_stats(batch, versions, self.version)
        ref = concat_padded([r.logprobs for r in refs], batch.response.shape[1]).to(device)
        # from the learner (rollout.logprob_source, or a vLLM batch): batch.logprobs its own
        recompute = self.settings.recomputes_logprobs or any(b.engine == "vllm" for b in batches)
        decoupled = self.cfg.objective == "decoupled" and lag > 0  # at lag 0 it is PPO
        sampler, loss_weights = self._own_old_logprobs(batch, recompute or decoupled, decoupled)
        targets = self._targets(batch, scores.total.to(device), ref)
        lr = self._schedule_lr()
        stats = {**self._update(batch, targets, loss_weights), metrics.LEARNING_RATE: lr}
        self.version += 1
        rollout = learner_stats.rollout_stats(batch, targets, self._reward_kl_coef)
        rollout[metrics.KL_COEF] = self.kl_coef
        self._adapt_kl_coef(rollout[metrics.KL], batch.response.shape[0])
        return {
            **stats,
            **sampler,
            **rollout,
            **{metrics.reward_source(n): v.mean().item() for n, v in scores.components.items()},
            **staleness,
        }

    def _schedule_lr(self) -> float:
        """Set the policy optimizer's learning rate for this update (`ppo.lr_schedule`) -> it."""
        cfg = self.cfg
        lr = lr_schedule.scheduled_lr(
            cfg.lr, self.version, cfg.steps, cfg.lr_warmup_steps, cfg.lr_schedule
        )
        for group in self.trained["policy"][1].param_groups:
            group["lr"] = lr
        return lr

    @property
    def _reward_kl_coef(self) -> float:
        """beta in the per-token rewards: 0 when the KL is a loss term instead."""
        return 0.0 if self.cfg.kl_in_loss else self.kl_coef

    def _adapt_kl_coef(self, kl: float, rollouts: int) -> None:
        """With `ppo.kl_target`, the next step's beta from this step's KL [Ziegler et al.]."""
        cfg = self.cfg
        if cfg.kl_target > 0:
            self.kl_coef = kl_control.adaptive_kl_coef(
                self.kl_coef, kl, cfg.kl_target, cfg.kl_horizon, rollouts
            )

    def _own_old_logprobs(
        self, batch: RolloutBatch, recompute: bool, decoupled: bool = False
    ) -> tuple[dict, torch.Tensor | None]:
        """With `recompute`: replace the sampler's logprobs by the learner's own (in place) ->
        (the gap stats, under tis or the `decoupled` objective the (B, R) importance weights
        min(pi_learner / pi_sampler, tis_cap) of the policy loss, else None). For a lagging
        batch the learner's own are the proximal policy's, the sampler's the behaviour's."""
        if not recompute:
            return {}, None
        sampler_logprobs = batch.logprobs
        batch.logprobs = self._own_logprobs(batch)
        out = losses.logprob_gap(batch.logprobs, sampler_logprobs, batch.response_mask)
        stats = {
            metrics.LOGPROB_GAP_MEAN: out["mean"].item(),
            metrics.LOGPROB_GAP_MAX: out["max"].item(),
        }
        rollout = self.settings.rollout
        if rollout.logprob_correction != "tis" and not decoupled:
            return stats, None
        weights = losses.truncated_importance_weights(
            batch.logprobs, sampler_logprobs, batch.response_mask, rollout.tis_cap
        )
        stats[metrics.TIS_WEIGHT] = masked.masked_mean(weights, batch.response_mask).item()
        return stats, weights

    @torch.no_grad()
    def _own_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """(B, R) logprobs of the response tokens under the policy as it is, before the update,
        in minibatches of this rank's rows, gathered from every rank; 0 on padding."""
        parts = []
        mine = self.ranks.share(torch.arange(batch.response.shape[0]))
        for idx in mine.split(self.cfg.minibatch_size):
            parts.append(
                response_logprobs(
                    self.policy,
                    batch.query[idx],
                    batch.query_mask[idx],
                    batch.response[idx],
                    batch.response_mask[idx],
                    self.settings.policy.temperature,
                )
            )
        return self.ranks.gather_rows(torch.cat(parts)) * batch.response_mask

    def _check_groups(self, group: torch.Tensor) -> None:
        """Every prompt group of the step is whole: samples_per_prompt rows each."""
        k = self.cfg.samples_per_prompt
        sizes = torch.bincount(group)
        sizes = sizes[sizes > 0]  # ids are unique per step, not necessarily 0..G-1
        if bool((sizes != k).any()):
            raise RuntimeError(
                f"a step's rollouts hold prompt groups of sizes {sorted(set(sizes.tolist()))}; "
                f"expected ppo.samples_per_prompt={k} samples of every prompt"
            )

    @torch.no_grad()
    def _targets(
        self, batch: RolloutBatch, scores: torch.Tensor, ref_logprobs: torch.Tensor
    ) -> Targets:
        cfg = self.cfg
        kl_coef = self._reward_kl_coef  # 0 when the KL is a loss term instead
        if self.critic is None:
            return critic_free_targets(
                cfg.estimator,
                scores,
                batch.has_eos,
                batch.logprobs,
                ref_logprobs,
                batch.response_mask,
                batch.group,
                kl_coef=kl_coef,
                gamma=cfg.gamma,
                missing_eos_penalty=cfg.missing_eos_penalty,
            )
        mine = self.ranks.share(torch.arange(batch.response.shape[0], device=scores.device))
        # through the critic's pass: a sharded critic is gathered by its forward hooks
        values = self.critic_pass(
            batch.query[mine],
            batch.query_mask[mine],
            batch.response[mine],
            batch.response_mask[mine],
        )
        return ppo_targets(
            scores,
            batch.has_eos,
            batch.logprobs,
            ref_logprobs,
            self.ranks.gather_rows(values),
            batch.response_mask,
            kl_coef=kl_coef,
            gamma=cfg.gamma,
            lam=cfg.lam,
            missing_eos_penalty=cfg.missing_eos_penalty,
            whiten_rewards=cfg.whiten_rewards,
        )

    def _update(
        self, batch: RolloutBatch, targets: Targets, weights: torch.Tensor | None
    ) -> dict[str, float]:
        """`epochs` passes over shuffled minibatches -> the update's stats (`update_stats`).
        `weights`: (B, R) per-token weights of the policy loss (tis), or None. Every rank
        draws the same order (the same seed, the same draws) and trains on its slice. With
        `ppo.target_kl`, a minibatch whose approx-KL passed it ends the update without its
        step (`kl_control.stops_update`)."""
        steps: list[tuple[int, dict[str, float]]] = []  # (epoch, a minibatch step's stats)
        for epoch in range(self.cfg.epochs):
            order = torch.randperm(batch.response.shape[0], device=batch.response.device)
            for idx in order.split(self.cfg.minibatch_size):
                mine = self.ranks.share(idx)
                step = self._minibatch_step(
                    batch, targets, idx, mine, None if weights is None else weights[mine]
                )
                if step is None:
                    return learner_stats.update_stats(steps)
                steps.append((epoch, step))
        return learner_stats.update_stats(steps)

    def _minibatch_step(
        self,
        batch: RolloutBatch,
        targets: Targets,
        idx: torch.Tensor,
        mine: torch.Tensor,
        weights: torch.Tensor | None,
    ) -> dict[str, float] | None:
        """One gradient step on minibatch `idx` (row indices), this rank training on its rows
        `mine`; every loss is scaled to the mean over the whole minibatch (`Ranks.loss_scale`)
        and every stat is the whole minibatch's. None, and no step, when its approx-KL passed
        `ppo.target_kl` (every rank decides on the whole minibatch's)."""
        cfg, ranks, mask = self.cfg, self.ranks, targets.mask[mine]
        query, query_mask = batch.query[mine], batch.query_mask[mine]
        response = batch.response[mine]
        tokens = mask.sum().item()
        token_scale = ranks.loss_scale(tokens, targets.mask[idx].sum().item())
        if cfg.loss_per_sequence:  # GRPO's mean over responses weighs rows, not tokens
            policy_count, policy_scale = len(mine), ranks.loss_scale(len(mine), len(idx))
        else:
            policy_count, policy_scale = tokens, token_scale
        logits = self.policy_pass(query, query_mask, response, mask)
        temperature = self.settings.policy.temperature
        logprobs = token_math.logprobs_from_logits(logits, response, temperature)
        pg_loss, pg = losses.policy_loss(
            logprobs,
            targets.old_logprobs[mine],
            targets.advantages[mine],
            mask,
            cfg.clip_range,
            per_sequence=cfg.loss_per_sequence,
            weights=weights,
        )
        if cfg.target_kl > 0 and self._stops(pg["approxkl"], tokens, pg_loss):
            return None
        loss = pg_loss * policy_scale
        stats = {
            metrics.POLICY_LOSS: pg_loss.item(),
            metrics.APPROXKL: pg["approxkl"].item(),
            metrics.CLIPFRAC: pg["clipfrac"].item(),
            metrics.RATIO: pg["ratio"].item(),
        }
        counts = dict.fromkeys(stats, tokens)
        counts[metrics.POLICY_LOSS] = policy_count
        if cfg.kl_in_loss:  # [GRPO]: beta * k3 KL to the reference, aggregated as the loss is
            kl = estimators.kl_k3(logprobs, targets.ref_logprobs[mine], mask)
            aggregate = masked.sequence_mean if cfg.loss_per_sequence else masked.masked_mean
            kl_loss = aggregate(kl, mask)
            loss = loss + self.kl_coef * kl_loss * policy_scale
            stats[metrics.KL_LOSS] = kl_loss.item()
            counts[metrics.KL_LOSS] = policy_count
        if self.critic is not None:
            values = self.critic_pass(query, query_mask, response, mask)
            vf_loss, vf = losses.value_loss(
                values, targets.old_values[mine], targets.returns[mine], mask, cfg.value_clip_range
            )
            # Disjoint parameters: the policy terms reach only the policy, vf_loss the critic.
            loss = loss + vf_loss * token_scale
            stats[metrics.VALUE_LOSS] = vf_loss.item()
            stats[metrics.VALUE_CLIPFRAC] = vf["value_clipfrac"].item()
            counts[metrics.VALUE_LOSS] = counts[metrics.VALUE_CLIPFRAC] = tokens
        loss.backward()  # under DDP: the gradients averaged over the ranks
        norms = {}
        for name, (params, opt) in self.trained.items():
            norms[name] = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            entropy = token_math.entropy_from_logits(logits, temperature)
            stats[metrics.ENTROPY] = masked.masked_mean(entropy, mask).item()
            counts[metrics.ENTROPY] = tokens
        return {
            **ranks.global_means(stats, counts, mask.device),
            # the policy's gradients are whole and alike on every rank (DDP reduced them)
            metrics.GRAD_NORM: norms["policy"].item(),
            metrics.LOGRATIO_MAX: ranks.global_max(pg["logratio_absmax"], mask.device),
        }

    def _stops(self, approxkl: torch.Tensor, tokens: float, pg_loss: torch.Tensor) -> bool:
        """Whether the whole minibatch's approx-KL passed `ppo.target_kl`; if so the policy's
        forward pass is closed with a zero backward (DDP waits for one) and nothing steps."""
        name, device = metrics.APPROXKL, approxkl.device
        kl = self.ranks.global_means({name: approxkl.item()}, {name: tokens}, device)[name]
        if not kl_control.stops_update(kl, self.cfg.target_kl):
            return False
        (pg_loss * 0.0).backward()
        for _, opt in self.trained.values():
            opt.zero_grad(set_to_none=True)
        return True

    def stage(self, out_dir: str, run_metrics: dict) -> None:
        """The policy's trainable weights as they are (a step's, for `export` at the end of the
        run), in `out_dir/STEP_WEIGHTS` with `run_metrics`, written atomically; training goes on."""
        with atomic_dir(Path(out_dir)) as tmp:
            save_file(trainable_state(self.policy), tmp / STEP_WEIGHTS)
            write_metrics(tmp, run_metrics)

    def export(self, out_dir: str, run_metrics: dict, step_weights: str | None = None) -> None:
        """The policy as a standard model directory (LoRA merged, and the adapter alone: on the
        original base model where SFT was LoRA too), written atomically. The policy trained is
        merged in place, so this ends training; `step_weights`: a file `stage` wrote, exported
        from a policy built afresh instead, the one trained left as it was."""
        policy = self.policy
        if step_weights is not None:
            _, policy = build_policy(self.settings.policy)
            load_trainable_state(policy, load_file(step_weights))
        with atomic_dir(Path(out_dir)) as tmp:
            settings = self.settings.policy
            sft_adapter = Path(settings.sft_path) / ADAPTER_DIR
            stack_on = sft_adapter if sft_adapter.is_dir() else None
            save_merged(policy, self.tok, tmp, settings.sft_path, settings.model, stack_on)
            write_metrics(tmp, run_metrics)


def _to(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    """The same batch with every tensor on `device`."""
    return RolloutBatch(
        **{
            name: value.to(device) if isinstance(value, torch.Tensor) else value
            for name, value in vars(batch).items()
        }
    )
