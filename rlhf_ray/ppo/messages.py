"""What the PPO roles send each other through the Ray object store.

B = rollouts in a batch, P = prompt length, R = response length. Token tensors travel
generator -> scorer / reference / learner as ObjectRefs; the driver never pulls them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import torch

from rlhf_ray.data.chat import Prompt
from rlhf_ray.errors import RoleFailed


@dataclass
class Samples:
    """Responses sampled for a batch of prompts (by a rollout generator, or for evaluation)."""

    query: torch.Tensor  # (B, P) int64 prompt ids, left-padded with pad_id
    query_mask: torch.Tensor  # (B, P) int64, 1 on real prompt tokens
    response: torch.Tensor  # (B, R) int64, pad_id after the first EOS
    response_mask: torch.Tensor  # (B, R) float32, 1 up to and including the first EOS
    has_eos: torch.Tensor  # (B,) bool, False when the response hit the length limit


@dataclass
class RolloutBatch(Samples):
    """Samples from one rollout generator, with what the learner needs to train on them."""

    logprobs: torch.Tensor  # (B, R) float32 behaviour-policy logprobs at the sampling temperature
    # (B,) int64 prompt group: rows with the same id are the samples_per_prompt samples of one
    # prompt. Ids are unique within a step, so a group split over several generators is whole
    # again in the learner's concatenation of the step's batches (estimators.py).
    group: torch.Tensor
    prompts: list[Prompt]  # B raw prompts as the data gave them: text or message lists
    policy_version: int  # learner version whose weights sampled this batch (its oldest token's)
    generator_rank: int
    engine: str = "hf"  # what sampled it: "hf" (generate) or "vllm"
    # (B, R) int64, partial rollouts (rollout.partial_chunk_tokens): the policy version that
    # sampled each response token (0 on padding); None: every token was policy_version's
    token_versions: torch.Tensor | None = None
    # New for every batch sampled: a batch sampled again (a lost object Ray rebuilt by running
    # `generate` again) is another batch, and the scores or logprobs of the first do not fit it.
    batch_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def num_tokens(self) -> int:
        return int(self.query_mask.sum()) + int(self.response_mask.sum())

    @property
    def key(self) -> BatchKey:
        return BatchKey(self.batch_id, *self.response.shape)


@dataclass(frozen=True)
class BatchKey:
    """Which batch a role's result was computed on, and its shape."""

    batch_id: str
    rows: int  # B
    width: int  # R, the response tokens' width

    def describe(self) -> str:
        return f"batch {self.batch_id[:8]} ({self.rows} rows x {self.width} tokens)"


def receipt(rows: int, policy_version: int, sample_seconds: float) -> dict:
    """What a generator tells the driver of a batch it made (the batch itself goes by ref)."""
    return {"rows": rows, "policy_version": policy_version, "sample_seconds": sample_seconds}


@dataclass
class Scores:
    """What the reward scorer gives for a step's rollouts, in the order of `concat_batches`."""

    total: torch.Tensor  # (B,) float32 weighted sum of the components
    components: dict[str, torch.Tensor]  # source ("reward_model" or module:function) -> (B,)
    batches: list[BatchKey]  # the batches scored, in order: B = the sum of their rows


@dataclass
class ReferenceLogprobs:
    """The reference model's logprobs of one batch's responses."""

    batch: BatchKey
    logprobs: torch.Tensor  # (B, R) float32 at the sampling temperature, 0 on padding


def check_results_match(
    batches: list[RolloutBatch], scores: Scores, refs: list[ReferenceLogprobs]
) -> None:
    """The scorer's scores and the reference's logprobs are of exactly these batches, in this
    order and shape; else RoleFailed naming the role whose result is of another batch."""
    sampled = [b.key for b in batches]
    found = {
        "the reward scorer's scores": scores.batches,
        "the reference model's logprobs": [r.batch for r in refs],
    }
    for role, keys in found.items():
        if keys != sampled:
            raise RoleFailed(
                f"{role} are of {_describe(keys)}, but the rollout generators' batches for this "
                f"step are {_describe(sampled)}: a batch was sampled again after that role read "
                "it; the step is refused instead of training on mismatched rows"
            )
    if int(scores.total.shape[0]) != sum(key.rows for key in sampled):
        raise RoleFailed(
            f"the reward scorer gave {scores.total.shape[0]} scores for "
            f"{sum(key.rows for key in sampled)} rows"
        )
    for ref in refs:
        if tuple(ref.logprobs.shape) != (ref.batch.rows, ref.batch.width):
            raise RoleFailed(
                f"the reference model's logprobs have shape {tuple(ref.logprobs.shape)} for "
                f"{ref.batch.describe()}"
            )


def _describe(keys: list[BatchKey]) -> str:
    return ", ".join(key.describe() for key in keys) or "no batch"


@dataclass
class Weights:
    """The trainable policy tensors (the LoRA adapter) after learner update `version`."""

    tensors: dict[str, torch.Tensor]  # name -> tensor, as in model.named_parameters()
    version: int


def concat_batches(batches: list[RolloutBatch], pad_id: int) -> tuple[RolloutBatch, list[int]]:
    """One batch from several generators' shards, re-padded to common widths.

    Returns the batch (policy_version = the oldest shard's, generator_rank = -1) and the
    policy version of every row, so the learner can check staleness per row.
    """
    p_width = max(b.query.shape[1] for b in batches)
    r_width = max(b.response.shape[1] for b in batches)
    versions = [b.policy_version for b in batches for _ in range(b.response.shape[0])]
    merged = RolloutBatch(
        query=torch.cat([_pad(b.query, p_width, pad_id, left=True) for b in batches]),
        query_mask=torch.cat([_pad(b.query_mask, p_width, 0, left=True) for b in batches]),
        response=torch.cat([_pad(b.response, r_width, pad_id) for b in batches]),
        response_mask=torch.cat([_pad(b.response_mask, r_width, 0) for b in batches]),
        has_eos=torch.cat([b.has_eos for b in batches]),
        logprobs=torch.cat([_pad(b.logprobs, r_width, 0) for b in batches]),
        group=torch.cat([b.group for b in batches]),
        prompts=[p for b in batches for p in b.prompts],
        policy_version=min(versions),
        generator_rank=-1,
        token_versions=torch.cat([_pad(token_versions(b), r_width, 0) for b in batches]),
    )
    return merged, versions


def token_versions(batch: RolloutBatch) -> torch.Tensor:
    """(B, R) int64: the version that sampled each response token (0 on padding)."""
    if batch.token_versions is not None:
        return batch.token_versions
    real = batch.response_mask > 0
    return torch.where(real, batch.policy_version, 0).to(torch.int64)


def concat_padded(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """(B_i, R_i) tensors, R_i <= width -> (sum B_i, width), zero-padded on the right."""
    wider = [tuple(tensor.shape) for tensor in tensors if tensor.shape[1] > width]
    if wider:
        raise ValueError(f"tensors of shapes {wider} are wider than {width}: never cropped")
    return torch.cat([_pad(tensor, width, 0) for tensor in tensors])


def _pad(tensor: torch.Tensor, width: int, value: float, left: bool = False) -> torch.Tensor:
    """Pad the last dimension of a (B, T) tensor to `width` columns."""
    extra = width - tensor.shape[1]
    return torch.nn.functional.pad(tensor, (extra, 0) if left else (0, extra), value=value)
