"""A step's batch while it is sampled (Pending: per generator a Shard of rows, a batch ref and
a receipt ref)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.ppo.roles import generator_name


@dataclass
class Shard:
    """The rows of a step one generator samples."""

    rank: int  # the generator's
    prompts: list[str]  # one per row: a prompt appears once per sample
    group: list[int]  # each row's prompt group id
    asked: int = 0  # times a generator was asked for these rows


@dataclass
class Pending:
    """A step's batch being generated: per shard a RolloutBatch ref and a receipt ref (rows,
    policy version, seconds; `messages.receipt`), and when it was asked for."""

    shards: list[Shard]
    refs: list
    receipts: list
    prompt_ids: list[int]  # the step's prompts (rows of the prompt file), each sampled k times
    dispatched_at: float
    # when the driver saw it sampled (it may have waited before the step that trains on it:
    # queued behind others, for a checkpoint, or it was restored)
    ready_at: float | None = None
    sampled: list[dict] | None = None  # every shard's receipt, once sampled
    serial: int = 0  # the order the driver asked for it in (rollout_queue.RolloutQueue.asked)
    started_at: float = 0.0  # when its sampling began, as near as the driver knows

    def rows(self) -> int:
        return sum(len(shard.prompts) for shard in self.shards)

    def version(self) -> int:
        """The policy version of a sampled batch: its oldest shard's."""
        return min(got["policy_version"] for got in self.sampled or [])

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
