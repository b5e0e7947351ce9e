"""How the driver's part of a PPO checkpoint is laid out: the state to continue a run exactly,
written after a step (PPOLoop.save_checkpoint) and read back by a new loop:
learner weights, optimizers and RNG, every generator's RNG, the prompt order, the running
totals and the batch already generated for the next step (so a resume neither loses nor redoes
it). Files: `<output_dir>/ppo_checkpoints/step-N/` (rlhf_ray/run/ppo_checkpoints.py)."""

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
)


def checkpoint_tensors(learner: dict, rngs: dict[int, dict], batches: list[RolloutBatch]) -> dict:
    """One flat name -> tensor dict: the learner's, each generator's RNG, the next batch."""
    tensors = saved_state.with_prefix("learner/", learner)
    for rank, rng in rngs.items():
        tensors |= saved_state.with_prefix(f"generator{rank}/rng/", rng)
    for i, batch in enumerate(batches):
        tensors |= saved_state.with_prefix(f"pending{i}/", batch_tensors(batch))
    return tensors


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


def restored_pending(tensors: dict, state: dict) -> Pending:
    """The batch that was generated for the next step, back in the object store."""
    batches = [
        RolloutBatch(**saved_state.under_prefix(f"pending{i}/", tensors), **info)
        for i, info in enumerate(state["pending"])
    ]
    shards = [Shard(b.generator_rank, b.prompts, b.group.tolist()) for b in batches]
    now = time.perf_counter()  # generated before the stop; not timed again here
    return Pending(
        shards,
        [ray.put(b) for b in batches],
        [ray.put(r) for r in state["pending_receipts"]],
        state["pending_prompt_ids"],
        dispatched_at=now,
        ready_at=now,
    )


def batch_tensors(batch: RolloutBatch) -> dict:
    return {name: getattr(batch, name) for name in BATCH_TENSORS}


def batch_info(batch: RolloutBatch) -> dict:
    return {
        "policy_version": batch.policy_version,
        "generator_rank": batch.generator_rank,
        "prompts": batch.prompts,
        "engine": batch.engine,  # a vLLM batch's logprobs are recomputed after a resume too
        "batch_id": batch.batch_id,
    }
