"""Tests for rlhf_ray.ppo.estimators (RLOO, GRPO, REINFORCE++, k3 KL); values worked by hand."""

import math

import pytest
import torch

from rlhf_ray.ppo import estimators, losses, masked


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, t(b) if not isinstance(b, torch.Tensor) else b, atol=atol, rtol=0)


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    # group 0 = rows 0, 1, 2 (k = 3), rewards 1, 2, 4 (sum 7):
    #   row 0: baseline (7 - 1) / 2 = 3.0 -> 1 - 3 = -2.0
    #   row 1: baseline (7 - 2) / 2 = 2.5 -> 2 - 2.5 = -0.5
    #   row 2: baseline (7 - 4) / 2 = 1.5 -> 4 - 1.5 =  2.5
    # group 1 = rows 3, 4 (k = 2), equal rewards 3, 3: each baseline is the other's 3 -> 0.
    adv = estimators.rloo_advantages(t([1.0, 2.0, 4.0, 3.0, 3.0]), t([0, 0, 0, 1, 1], torch.int64))
    close(adv, [-2.0, -0.5, 2.5, 0.0, 0.0])


def test_rloo_groups_are_found_by_id_in_any_row_order():
    """A group split over two generators' shards arrives interleaved with others."""
    adv = estimators.rloo_advantages(t([3.0, 1.0, 3.0, 2.0, 4.0]), t([1, 0, 1, 0, 0], torch.int64))
    close(adv, [0.0, -2.0, 0.0, -0.5, 2.5])  # the same rows as above, reordered


def test_rloo_and_grpo_refuse_a_group_of_one():
    for advantages in (estimators.rloo_advantages, estimators.grpo_advantages):
        with pytest.raises(ValueError, match="at least 2 samples of every prompt"):
            advantages(t([1.0, 2.0, 5.0]), t([0, 0, 1], torch.int64))


def test_grpo_normalises_by_group_mean_and_std():
    # group 0: rewards 0, 2, 4 -> mean 2, deviations -2, 0, 2, unbiased variance
    #   (4 + 0 + 4) / (3 - 1) = 4, std 2 -> advantages -2/(2 + eps), 0, 2/(2 + eps)
    # group 1: rewards 1, 3 -> mean 2, deviations -1, 1, variance (1 + 1) / 1 = 2, std sqrt(2)
    eps = estimators.GRPO_STD_EPS
    adv = estimators.grpo_advantages(t([0.0, 2.0, 4.0, 1.0, 3.0]), t([0, 0, 0, 1, 1], torch.int64))
    s2 = math.sqrt(2)
    close(adv, [-2 / (2 + eps), 0.0, 2 / (2 + eps), -1 / (s2 + eps), 1 / (s2 + eps)])


def test_grpo_group_of_equal_rewards_has_zero_advantage_not_nan():
    """std 0: (r - mean) = 0 exactly, divided by eps -> 0; nothing to learn from that prompt."""
    adv = estimators.grpo_advantages(t([5.0, 5.0, 5.0, -1.0, 1.0]), t([0, 0, 0, 1, 1], torch.int64))
    assert torch.isfinite(adv).all()
    close(adv[:3], [0.0, 0.0, 0.0], atol=0)
    close(
        adv[3:],
        [
            -1 / (math.sqrt(2) + estimators.GRPO_STD_EPS),
            1 / (math.sqrt(2) + estimators.GRPO_STD_EPS),
        ],
    )


REWARDS = [[-0.1, 1.0, 0.0], [0.2, -0.2, 0.5]]
MASK = [[1, 1, 0], [1, 1, 1]]


def test_returns_to_go_sum_future_rewards_and_stop_at_padding():
    # gamma 1: row 0: [-0.1 + 1.0, 1.0, pad 0] = [0.9, 1.0, 0];
    #          row 1: [0.2 - 0.2 + 0.5, -0.2 + 0.5, 0.5] = [0.5, 0.3, 0.5]
    close(estimators.returns_to_go(t(REWARDS), t(MASK), 1.0), [[0.9, 1.0, 0.0], [0.5, 0.3, 0.5]])
    # gamma 0.5, row 1: G_2 = 0.5; G_1 = -0.2 + 0.5 * 0.5 = 0.05; G_0 = 0.2 + 0.5 * 0.05 = 0.225
    # A junk reward on padding (row 0, t = 2) must not flow back into real tokens.
    junk = t([[-0.1, 1.0, 50.0], [0.2, -0.2, 0.5]])
    close(estimators.returns_to_go(junk, t(MASK), 0.5), [[0.4, 1.0, 0.0], [0.225, 0.05, 0.5]])


def test_reinforce_pp_normalises_returns_over_the_whole_batch():
    # Returns (gamma 1) on the 5 real tokens: 0.9, 1.0 | 0.5, 0.3, 0.5; mean 3.2 / 5 = 0.64;
    # deviations 0.26, 0.36, -0.14, -0.34, -0.14; squares sum 0.352; unbiased variance
    # 0.352 / 4 = 0.088. One mean and std for the batch, not one per prompt.
    adv = estimators.reinforce_pp_advantages(t(REWARDS), t(MASK), 1.0)
    std = math.sqrt(0.088 + 1e-8)
    expected = [[0.26 / std, 0.36 / std, 0.0], [-0.14 / std, -0.34 / std, -0.14 / std]]
    close(adv, expected, atol=1e-5)


def test_kl_k3_is_nonnegative_and_zero_on_padding():
    # d = logp_ref - logp: row 0: -1.5 - (-1.0) = -0.5 ; -1.0 - (-2.0) = 1.0 ; pad (junk 30)
    #   k3 = exp(d) - d - 1: exp(-0.5) + 0.5 - 1 = 0.1065307 ; e - 2 = 0.7182818 ; pad 0
    kl = estimators.kl_k3(t([[-1.0, -2.0, -30.0]]), t([[-1.5, -1.0, 0.0]]), t([[1, 1, 0]]))
    close(kl, [[math.exp(-0.5) - 0.5, math.e - 2, 0.0]])
    # equal logprobs: 0
    close(estimators.kl_k3(t([[-1.0]]), t([[-1.0]]), t([[1]])), [[0.0]])


def test_sequence_mean_weighs_each_response_the_same():
    # row means: (1 + 3) / 2 = 2 and 5 / 1 = 5 -> 3.5; a token mean would give 9 / 3 = 3.
    values, mask = t([[1.0, 3.0, 99.0], [5.0, 0.0, 0.0]]), t([[1, 1, 0], [1, 0, 0]])
    close(masked.sequence_mean(values, mask), 3.5)
    close(masked.masked_mean(values, mask), 3.0)


def test_policy_loss_per_sequence_as_grpo_defines_it():
    # ratio 1 (logprobs equal the old ones): the loss is -advantage on each real token.
    #   token mean: -(1 + 1 + 4) / 3 = -2 ;  per sequence: -((1 + 1) / 2 + 4 / 1) / 2 = -2.5
    logp = t([[-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    adv, mask = t([[1.0, 1.0, 0.0], [4.0, 0.0, 0.0]]), t([[1, 1, 0], [1, 0, 0]])
    token, _ = losses.policy_loss(logp, logp, adv, mask, 0.2)
    sequence, _ = losses.policy_loss(logp, logp, adv, mask, 0.2, per_sequence=True)
    close(token, -2.0)
    close(sequence, -2.5)
