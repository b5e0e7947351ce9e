"""How the driver's part of a PPO checkpoint is laid out: the state to continue a run exactly,
written after a step (PPOLoop.save_checkpoint) and read back by a new loop:
learner weights, optimizers and RNG, every generator's RNG, the prompt order, the running
totals and the batches already generated for the next steps (so a resume neither loses nor
redoes them). Files: `<output_dir>/ppo_checkpoints/step-N/` (rlhf_ray/run/ppo_checkpoints.py)."""

from __future__ import annotations

import time
from pathlib import Path

import ray

from jobs.ppo.pending import Pending, Shard
from rlhf_ray.errors import UserInputError
from rlhf_ray.ppo.messages import RolloutBatch
from rlhf_ray.run import saved_state

BATCH_TENSORS = (
    "query",
    "query_mask",
    "response",
    "response_mask",
    "has_eos",
    "logprobs",
    "group",
    "token_versions",  # partial rollouts only
)


def checkpoint_tensors(
    learner: dict, rngs: dict[int, dict], queued: list[list[RolloutBatch]]
) -> dict:
    """One flat name -> tensor dict: the learner's, each generator's RNG, the batches queued
    for the next steps (each a RolloutBatch per shard)."""
    tensors = saved_state.with_prefix("learner/", learner)
    for rank, rng in rngs.items():
        tensors |= saved_state.with_prefix(f"generator{rank}/rng/", rng)
    for j, batches in enumerate(queued):
        for i, batch in enumerate(batches):
            tensors |= saved_state.with_prefix(_shard_prefix(j, i), batch_tensors(batch))
    return tensors


def _shard_prefix(j: int, i: int) -> str:
    """Queued batch j's shard i (the first batch's names are those of checkpoints that held
    one batch, so those resume too)."""
    return f"pending{i}/" if j == 0 else f"queued{j}/pending{i}/"


def queue_info(queue, queued: list[list[RolloutBatch]]) -> list[dict]:
    """The JSON part of each queued batch (a Pending of rollout_queue.RolloutQueue, with its
    shards' RolloutBatches): its shards' non-tensor fields, receipts and prompts."""
    return [
        {
            "shards": [batch_info(b) for b in batches],
            "receipts": pending.sampled,
            "prompt_ids": pending.prompt_ids,
        }
        for pending, batches in zip(queue, queued, strict=True)
    ]


def check_resumable(state: dict, rollouts_per_step: int, path: Path) -> None:
    if state["rollouts_per_step"] != rollouts_per_step:
        raise UserInputError(
            f"ppo.rollouts_per_step={rollouts_per_step}, but the checkpoint in {path} "
            f"was taken with {state['rollouts_per_step']}: resume with the same setting or "
            "use a new run.output_dir"
        )


def say_learner_change(learner_state: dict, workers: int) -> None:
    """A checkpoint of another learner rank count resumes (it holds the whole weights and
    optimizers, a sharded critic's gathered; only the floats' summation order changes): say
    so."""
    saved = learner_state.get("learner_workers", 1)
    if saved != workers:
        print(
            f"[ppo] the checkpoint was written by {saved} learner rank(s); resuming with "
            f"resources.learner_workers={workers}",
            flush=True,
        )


def restored_queue(tensors: dict, state: dict) -> list[Pending]:
    """The batches that were generated for the next steps, back in the object store."""
    queued = state.get("queue")
    if queued is None:  # written before the queue: at most one batch
        keys = ("shards", "receipts", "prompt_ids")
        one = (state["pending"], state["pending_receipts"], state["pending_prompt_ids"])
        queued = [dict(zip(keys, one, strict=True))] if state["pending"] else []
    # serials before any this process asks for (a generator retired is none of theirs)
    return [_restored_batch(tensors, j, saved, j - len(queued)) for j, saved in enumerate(queued)]


def _restored_batch(tensors: dict, j: int, saved: dict, serial: int) -> Pending:
    batches = [
        RolloutBatch(**saved_state.under_prefix(_shard_prefix(j, i), tensors), **info)
        for i, info in enumerate(saved["shards"])
    ]
    shards = [Shard(b.generator_rank, b.prompts, b.group.tolist()) for b in batches]
    now = time.perf_counter()  # generated before the stop; not timed again here
    return Pending(
        shards,
        [ray.put(b) for b in batches],
        [ray.put(r) for r in saved["receipts"]],
        saved["prompt_ids"],
        dispatched_at=now,
        ready_at=now,
        serial=serial,
    )


def batch_tensors(batch: RolloutBatch) -> dict:
    tensors = {name: getattr(batch, name) for name in BATCH_TENSORS}
    return {name: tensor for name, tensor in tensors.items() if tensor is not None}


def batch_info(batch: RolloutBatch) -> dict:
    return {
        "policy_version": batch.policy_version,
        "generator_rank": batch.generator_rank,
        "prompts": batch.prompts,
        "engine": batch.engine,  # a vLLM batch's logprobs are recomputed after a resume too
        "batch_id": batch.batch_id,
    }
