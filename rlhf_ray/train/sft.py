"""Phase 1, supervised fine-tuning: cross-entropy on completion tokens only, on Ray Train."""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F
from peft import TaskType

from rlhf_ray.data.encoding import IGNORE_INDEX, pad_right, sft_example
from rlhf_ray.data.prepare import read_rows
from rlhf_ray.data.tokenizer import load_tokenizer
from rlhf_ray.models.adapters import save_merged
from rlhf_ray.models.forward import causal_logits
from rlhf_ray.models.loading import load_causal_lm
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
from rlhf_ray.train.settings import SFTWorkerSettings
from rlhf_ray.train.sharding import optimizer_step, trained_model, wrap


def completion_only_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens.

    logits (B, T, V) float; labels (B, T) int64 with IGNORE_INDEX on prompt and padding.
    Position t predicts token t+1, hence the shift.
    """
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """-> ids (B, T) int64 right-padded, mask (B, T), labels (B, T) with IGNORE_INDEX on padding."""
    ids, mask = pad_right([e[0] for e in examples], pad_id)
    labels, _ = pad_right([e[1] for e in examples], IGNORE_INDEX)
    return ids, mask, labels


def build_sft_model(settings: SFTWorkerSettings, worker: Worker):
    """The policy to fine-tune, on this worker's device, not yet wrapped (`sharding.wrap`)."""
    model = load_causal_lm(settings.base_path, settings.model, settings.quantization)
    lora = settings.lora if settings.sft.method == "lora" else None
    return ready_to_train(
        model, worker, lora, TaskType.CAUSAL_LM, settings.model.gradient_checkpointing
    )


def sft_worker_loop(config: dict) -> None:
    """Ray Train worker entry point; continues from the newest epoch checkpoint if any."""
    settings: SFTWorkerSettings = config["settings"]
    if is_complete(settings.out_dir):  # a restart after the chief saved the finished phase
        return
    worker = worker_setup(settings.worker_cpus, settings.seed, settings.sharding)
    tok = load_tokenizer(
        settings.base_path, settings.model.trust_remote_code, settings.limits.chat_template
    )
    rows = shard(read_rows(settings.data_dir, "sft"), worker.rank, worker.world)
    examples = [sft_example(tok, r["prompt"], r["completion"], settings.limits) for r in rows]
    model = build_sft_model(settings, worker)
    net = wrap(model, worker)  # the training forward; `model` keeps the names for saving
    params = trainable_params(model)  # after wrap: FSDP2 replaces them by DTensors
    opt = phase_optimizer(params, settings.sft)
    total = step_count(len(examples), settings.sft.batch_size, settings.sft.epochs)
    loop = LoopState(
        model, opt, warmup_cosine(opt, total), random.Random(settings.seed + worker.rank)
    )
    start_at = restore_latest("sft", loop, worker)
    bar = ProgressLines("sft", total, worker, done=start_at.step)
    writer = (
        MetricWriter(settings.tracking, "sft", purge_step=start_at.step + 1)
        if worker.is_chief
        else None
    )
    step, tokens, start = start_at.step, 0, time.time()
    epoch_loss = start_at.shown.get("loss")
    for epoch in range(start_at.epochs_done, settings.sft.epochs):
        losses = []
        for batch in batches(examples, settings.sft.batch_size, loop.data_rng):
            ids, mask, labels = (t.to(worker.device) for t in collate(batch, tok.pad_token_id))
            loss = completion_only_loss(causal_logits(net, ids, mask), labels)
            loss.backward()  # several workers: their gradients averaged (DDP, FSDP2)
            optimizer_step(opt, params, settings.sft.max_grad_norm)
            loop.schedule.step()
            step, tokens = step + 1, tokens + int(mask.sum()) * worker.world
            losses.append(loss.item())
            bar.update(step, loss=loss.item())
            if writer:
                writer.scalars({metrics.SFT_LOSS: loss.item()}, step)
        epoch_loss = sum(losses) / len(losses)
        if writer:
            writer.scalars({metrics.SFT_EPOCH_LOSS: epoch_loss}, step)
        save_epoch("sft", loop, worker, Position(epoch + 1, step, {"loss": epoch_loss}))
    trained = trained_model(model, worker, lambda: build_sft_model(settings, worker))
    if worker.is_chief:
        # Throughput of this process's own steps (none if it only saved a finished phase).
        tokens_per_s = tokens / (time.time() - start) if tokens else None
        if tokens_per_s is not None:
            writer.scalars({metrics.SFT_TOKENS_PER_S: tokens_per_s}, step)
        writer.close()
        result = {"final_epoch_loss": epoch_loss, "steps": step, "tokens_per_s": tokens_per_s}
        result["resumed_at_step"] = start_at.step
        with atomic_dir(settings.out_dir) as tmp:
            save_merged(trained, tok, tmp, reload_base=settings.base_path, model_cfg=settings.model)
            write_metrics(tmp, result)
