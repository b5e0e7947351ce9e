"""Tests for rlhf_ray.ppo.messages: shards from several generators made one batch, and the
scores and reference logprobs the learner gets checked against the batches they are for."""

from dataclasses import replace

import pytest
import torch

from rlhf_ray.errors import RoleFailed
from rlhf_ray.ppo.messages import (
    ReferenceLogprobs,
    RolloutBatch,
    Scores,
    check_results_match,
    concat_batches,
    concat_padded,
)
from tests.conftest import raises_with

PAD = 9  # distinct from every real id and from the masks' 0


def shard_a() -> RolloutBatch:
    """One rollout: prompt of 2 tokens, response of 3 (EOS=2 at the end), version 5."""
    return RolloutBatch(
        query=torch.tensor([[11, 12]]),
        query_mask=torch.tensor([[1, 1]]),
        response=torch.tensor([[21, 22, 2]]),
        response_mask=torch.tensor([[1.0, 1.0, 1.0]]),
        has_eos=torch.tensor([True]),
        logprobs=torch.tensor([[-0.1, -0.2, -0.3]]),
        group=torch.tensor([0]),
        prompts=["a"],
        policy_version=5,
        generator_rank=0,
    )


def shard_b() -> RolloutBatch:
    """Two rollouts: prompts 3 wide (row 1 left-padded), responses 1 wide, version 3."""
    return RolloutBatch(
        query=torch.tensor([[31, 32, 33], [PAD, 41, 42]]),
        query_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]),
        response=torch.tensor([[51], [61]]),
        response_mask=torch.tensor([[1.0], [1.0]]),
        has_eos=torch.tensor([False, False]),
        logprobs=torch.tensor([[-1.5], [-2.5]]),
        group=torch.tensor([0, 1]),  # row 0 is the second sample of shard a's prompt
        prompts=["a", "b"],
        policy_version=3,
        generator_rank=1,
    )


def test_concat_batches_re_pads_queries_left_and_responses_right():
    batch, versions = concat_batches([shard_a(), shard_b()], pad_id=PAD)
    # Queries: width max(2, 3) = 3, shard a's row gets one pad on the LEFT.
    assert batch.query.tolist() == [[PAD, 11, 12], [31, 32, 33], [PAD, 41, 42]]
    assert batch.query_mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 1, 1]]
    # Responses: width max(3, 1) = 3, shard b's rows get two pads on the RIGHT.
    assert batch.response.tolist() == [[21, 22, 2], [51, PAD, PAD], [61, PAD, PAD]]
    assert batch.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    # Logprobs of padded response positions are 0 (masked out downstream).
    expected = torch.tensor([[-0.1, -0.2, -0.3], [-1.5, 0.0, 0.0], [-2.5, 0.0, 0.0]])
    torch.testing.assert_close(batch.logprobs, expected, atol=0, rtol=0)
    assert batch.has_eos.tolist() == [True, False, False]
    # Group ids and prompts stay with their rows: prompt "a"'s group is whole again.
    assert batch.group.tolist() == [0, 0, 1] and batch.prompts == ["a", "a", "b"]
    # dtypes survive padding.
    assert batch.response_mask.dtype == torch.float32 and batch.query.dtype == torch.int64
    assert batch.has_eos.dtype == torch.bool


def test_concat_batches_versions_per_row_and_oldest_overall():
    batch, versions = concat_batches([shard_a(), shard_b()], pad_id=PAD)
    assert versions == [5, 3, 3]  # one per row, in row order
    assert batch.policy_version == 3  # min(5, 3): the stalest shard
    assert batch.generator_rank == -1  # a merged batch is no single generator's
    # Real tokens: queries 2 + 3 + 2 = 7, responses 3 + 1 + 1 = 5 -> 12; padding not counted.
    assert batch.num_tokens == 12


def test_concat_batches_of_one_shard_is_unchanged():
    a = shard_a()
    batch, versions = concat_batches([a], pad_id=PAD)
    assert torch.equal(batch.query, a.query) and torch.equal(batch.response, a.response)
    assert versions == [5] and batch.policy_version == 5


def test_concat_padded_right_pads_with_zero():
    out = concat_padded([torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])], width=3)
    assert out.tolist() == [[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 0.0, 0.0]]


def test_concat_padded_never_crops_a_wider_tensor():
    """Logprobs wider than the batch they are set beside belong to another batch."""
    with pytest.raises(ValueError, match=r"shapes \[\(1, 4\)\] are wider than 3"):
        concat_padded([torch.zeros(1, 2), torch.zeros(1, 4)], width=3)


def test_results_of_the_batches_sampled_pass_and_those_of_a_batch_sampled_again_are_named():
    a, b = shard_a(), shard_b()
    scores = Scores(torch.zeros(3), {}, [a.key, b.key])
    refs = [
        ReferenceLogprobs(a.key, torch.zeros(1, 3)),
        ReferenceLogprobs(b.key, torch.zeros(2, 1)),
    ]
    check_results_match([a, b], scores, refs)

    again = replace(b, batch_id="second-sampling")  # Ray ran `generate` again: another batch
    with raises_with("the reward scorer's scores are of", b.key.describe(), exc=RoleFailed):
        check_results_match([a, again], scores, refs)
    scored_again = Scores(torch.zeros(3), {}, [a.key, again.key])
    with raises_with("the reference model's logprobs are of", "second-s", exc=RoleFailed):
        check_results_match([a, again], scored_again, refs)
    with raises_with("the reward scorer gave 2 scores for 3 rows", exc=RoleFailed):
        check_results_match([a, b], Scores(torch.zeros(2), {}, [a.key, b.key]), refs)
    cropped = [refs[0], ReferenceLogprobs(b.key, torch.zeros(2, 2))]
    with raises_with("logprobs have shape (2, 2) for batch", "(2 rows x 1 tokens)", exc=RoleFailed):
        check_results_match([a, b], scores, cropped)
