"""Phase 2, the reward model: a scalar head on the SFT model, Bradley-Terry loss, on Ray Train."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from peft import TaskType

from rlhf_ray.data.encoding import Limits, completion_ids, pad_right, prompt_ids
from rlhf_ray.data.jsonl import write_jsonl
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.adapters import save_merged
from rlhf_ray.models.forward import SequenceScores
from rlhf_ray.models.loading import load_scalar_model
from rlhf_ray.run import metrics
from rlhf_ray.run.checkpoints import atomic_dir, is_complete, write_metrics
from rlhf_ray.run.trackers import MetricWriter
from rlhf_ray.train.common import (
    ProgressLines,
    Worker,
    batches,
    phase_optimizer,
    ready_to_train,
    shard,
    step_count,
    trainable_params,
    warmup_cosine,
    worker_setup,
)
from rlhf_ray.train.epoch_checkpoints import LoopState, Position, restore_latest, save_epoch
from rlhf_ray.train.settings import EVAL_SCORES_FILE, RewardWorkerSettings
from rlhf_ray.train.sharding import optimizer_step, trained_model, wrap


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), mean over pairs; chosen/rejected (B,) float."""
    return -F.logsigmoid(chosen - rejected).mean()


def encode_pair(tok, row: dict, limits: Limits) -> tuple[list[int], list[int]]:
    prompt = row["prompt"]
    p = prompt_ids(tok, prompt, limits)
    chosen, rejected = (completion_ids(tok, prompt, row[k], limits) for k in ("chosen", "rejected"))
    return p + chosen, p + rejected


def pair_scores(scorer, pairs: list[tuple[list[int], list[int]]], pad_id: int, device):
    """Score chosen and rejected in one forward of `scorer` (a SequenceScores, or one wrapped for
    training): -> (chosen (B,), rejected (B,))."""
    ids, mask = pad_right([p[0] for p in pairs] + [p[1] for p in pairs], pad_id)
    scores = scorer(ids.to(device), mask.to(device))
    return scores[: len(pairs)], scores[len(pairs) :]


def pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    return {
        "accuracy": (chosen > rejected).float().mean().item(),
        "margin": (chosen - rejected).mean().item(),
    }


@torch.no_grad()
def evaluate_pairs(model, pairs, pad_id, device, batch_size):
    """Scores of all held-out pairs: -> (chosen (N,), rejected (N,))."""
    scorer = SequenceScores(model).eval()
    parts = [
        pair_scores(scorer, pairs[i : i + batch_size], pad_id, device)
        for i in range(0, len(pairs), batch_size)
    ]
    scorer.train()
    return torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts])


def build_reward_model(settings: RewardWorkerSettings, worker: Worker, pad_id: int):
    """The reward model to train, on this worker's device, not yet wrapped (`sharding.wrap`);
    its `score` head is new and random."""
    model = load_scalar_model(settings.sft_path, settings.model, settings.quantization, pad_id)
    lora = settings.lora if settings.reward.method == "lora" else None
    return ready_to_train(
        model, worker, lora, TaskType.SEQ_CLS, settings.model.gradient_checkpointing
    )


def reward_worker_loop(config: dict) -> None:
    """Ray Train worker entry point; continues from the newest epoch checkpoint if any."""
    settings: RewardWorkerSettings = config["settings"]
    if is_complete(settings.out_dir):  # a restart after the chief saved the finished phase
        return
    worker = worker_setup(settings.worker_cpus, settings.seed, settings.sharding)
    tok = load_tokenizer(settings.sft_path, settings.model.trust_remote_code)
    train = [
        encode_pair(tok, r, settings.limits) for r in read_rows(settings.data_dir, "preferences")
    ]
    train = shard(train, worker.rank, worker.world)
    model = build_reward_model(settings, worker, tok.pad_token_id)
    scorer = wrap(SequenceScores(model), worker)  # the training forward; `model` for saving
    params = trainable_params(model)  # after wrap: FSDP2 replaces them by DTensors
    opt = phase_optimizer(params, settings.reward)
    total = step_count(len(train), settings.reward.batch_size, settings.reward.epochs)
    loop = LoopState(
        model, opt, warmup_cosine(opt, total), random.Random(settings.seed + worker.rank)
    )
    start_at = restore_latest("reward", loop, worker)
    bar = ProgressLines("reward", total, worker, done=start_at.step)
    writer = (
        MetricWriter(settings.tracking, "reward", purge_step=start_at.step + 1)
        if worker.is_chief
        else None
    )
    step = start_at.step
    for epoch in range(start_at.epochs_done, settings.reward.epochs):
        losses, accuracies = [], []
        for batch in batches(train, settings.reward.batch_size, loop.data_rng):
            chosen, rejected = pair_scores(scorer, batch, tok.pad_token_id, worker.device)
            loss = bradley_terry_loss(chosen, rejected)
            loss.backward()  # several workers: their gradients averaged (DDP, FSDP2)
            optimizer_step(opt, params, settings.reward.max_grad_norm)
            loop.schedule.step()
            step += 1
            stats = pair_stats(chosen.detach(), rejected.detach())
            losses.append(loss.item())
            accuracies.append(stats["accuracy"])
            bar.update(step, loss=loss.item(), accuracy=stats["accuracy"])
            if writer:
                writer.scalars(
                    {
                        metrics.REWARD_LOSS: loss.item(),
                        metrics.REWARD_ACCURACY: stats["accuracy"],
                        metrics.REWARD_MARGIN: stats["margin"],
                    },
                    step,
                )
        shown = {"loss": _mean(losses), "accuracy": _mean(accuracies)}
        save_epoch("reward", loop, worker, Position(epoch + 1, step, shown))
    trained = trained_model(
        model, worker, lambda: build_reward_model(settings, worker, tok.pad_token_id)
    )
    if worker.is_chief:
        _finish(settings, trained, tok, writer, step, worker.device, start_at.step)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _finish(
    settings: RewardWorkerSettings, model, tok, writer, step: int, device, resumed_at_step: int
) -> None:
    """Held-out accuracy, then the merged model and its metrics, atomically."""
    rows = read_rows(settings.data_dir, "preferences_eval")
    pairs = [encode_pair(tok, r, settings.limits) for r in rows]
    chosen, rejected = evaluate_pairs(
        model, pairs, tok.pad_token_id, device, settings.reward.batch_size
    )
    stats = pair_stats(chosen, rejected)
    writer.scalars(
        {
            metrics.REWARD_EVAL_ACCURACY: stats["accuracy"],
            metrics.REWARD_EVAL_MARGIN: stats["margin"],
        },
        step,
    )
    writer.close()
    with atomic_dir(settings.out_dir) as tmp:
        save_merged(model, tok, tmp, reload_base=settings.sft_path, model_cfg=settings.model)
        write_jsonl(
            tmp / EVAL_SCORES_FILE,
            (
                {"chosen": c, "rejected": r}
                for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True)
            ),
        )
        write_metrics(
            tmp,
            {
                "eval_accuracy": stats["accuracy"],
                "eval_margin": stats["margin"],
                "eval_pairs": len(pairs),
                "steps": step,
                "resumed_at_step": resumed_at_step,
            },
        )
