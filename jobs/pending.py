"""A step's batch while it is sampled (Pending: per generator a Shard of rows, a batch ref and
a receipt ref), and how a finished one is written into and read back from a PPO checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.roles import generator_name
from rlhf_ray.ppo.messages import RolloutBatch
from rlhf_ray.run import saved_state


@dataclass
class Shard:
    """The rows of a step one generator samples."""

    rank: int  # the generator's
    prompts: list[str]  # one per row: a prompt appears once per sample
    group: list[int]  # each row's prompt group id


@dataclass
class Pending:
    """A step's batch being generated: per shard a RolloutBatch ref and a receipt ref (rows,
    policy version, seconds; `messages.receipt`), and when it was asked for."""

    shards: list[Shard]
    refs: list
    receipts: list
    prompt_ids: list[int]  # the step's prompts (rows of the prompt file), each sampled k times
    dispatched_at: float
    ready_at: float | None = None  # set when a checkpoint waited for it (or it was restored)
    sampled: list[dict] | None = None  # every shard's receipt, once sampled

    def generator_stats(self) -> dict[str, dict]:
        """Per generator of a sampled step: rows, policy version, completions per second."""
        totals: dict[str, list] = {}  # name -> [rows, seconds, oldest version]
        for shard, got in zip(self.shards, self.sampled or [], strict=True):
            total = totals.setdefault(generator_name(shard.rank), [0, 0.0, got["policy_version"]])
            total[0] += got["rows"]  # a generator that took over a lost one's rows has two shards
            total[1] += got["sample_seconds"]
            total[2] = min(total[2], got["policy_version"])
        return {
            name: {
                "rows": rows,
                "policy_version": version,
                "completions_per_s": rows / max(seconds, 1e-9),
            }
            for name, (rows, seconds, version) in totals.items()
        }


BATCH_TENSORS = (
    "query",
    "query_mask",
    "response",
    "response_mask",
    "has_eos",
    "logprobs",
    "group",
)


def batch_tensors(batch: RolloutBatch) -> dict:
    return {name: getattr(batch, name) for name in BATCH_TENSORS}


def batch_info(batch: RolloutBatch) -> dict:
    return {
        "policy_version": batch.policy_version,
        "generator_rank": batch.generator_rank,
        "prompts": batch.prompts,
        "engine": batch.engine,  # a vLLM batch's logprobs are recomputed after a resume too
    }


def batch_fields(tensors: dict, rank: int, info: dict) -> dict:
    return {**saved_state.under_prefix(f"pending{rank}/", tensors), **info}
