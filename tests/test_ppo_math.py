"""Tests for the pure PPO functions (masked, token_math, token_rewards, estimators, losses)
on tiny tensors; every expected value is worked out by hand."""

import math

import pytest
import torch

from rlhf_ray.models.token_math import (
    entropy_from_logits,
    last_token_index,
    logprobs_from_logits,
    truncate_after_eos,
)
from rlhf_ray.ppo.estimators import gae_advantages
from rlhf_ray.ppo.losses import logprob_gap, policy_loss, truncated_importance_weights, value_loss
from rlhf_ray.ppo.masked import masked_mean, masked_var, masked_whiten
from rlhf_ray.ppo.token_rewards import apply_missing_eos_penalty, per_token_rewards

MASK = [[1, 1, 0], [1, 0, 0]]  # real values: 2, 4 (row 0) and 6 (row 1)


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, t(b) if not isinstance(b, torch.Tensor) else b, atol=atol, rtol=0)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool])
@pytest.mark.parametrize("pad", [99.0, 1e9, float("inf"), float("nan")])
def test_masked_stats_ignore_padding(mask_dtype, pad):
    x = t([[2.0, 4.0, pad], [6.0, pad, pad]])
    mask = t(MASK, mask_dtype)
    # mean = (2 + 4 + 6) / 3 = 4
    close(masked_mean(x, mask), 4.0)
    # per row: (2 + 4) / 2 = 3 ; 6 / 1 = 6
    close(masked_mean(x, mask, dim=1), [3.0, 6.0])
    # squared deviations from 4: 4, 0, 4 -> sum 8; unbiased 8 / (3-1) = 4; biased 8 / 3
    close(masked_var(x, mask), 4.0)
    close(masked_var(x, mask, unbiased=False), 8.0 / 3.0)
    # whiten: (x - 4) / sqrt(4) = -1, 0, 1; padding returned as 0
    close(masked_whiten(x, mask), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    # shift_mean=False adds the mean 4 back: 3, 4, 5
    close(masked_whiten(x, mask, shift_mean=False), [[3.0, 4.0, 0.0], [5.0, 0.0, 0.0]])


def test_masked_mean_empty_mask_and_single_element_var():
    x = t([[3.0, 5.0]])
    close(masked_mean(x, t([[0.0, 0.0]])), 0.0)  # documented: all-zero mask gives 0
    close(masked_var(x, t([[0.0, 1.0]])), 0.0)  # one element: variance 0, no division by 0


def test_logprobs_divide_by_temperature():
    # vocab of 3, temperature 2.
    # position 0: logits [0, 2 ln 2, 2 ln 3] / 2 = [0, ln 2, ln 3] -> exp = 1, 2, 3
    #   -> p = 1/6, 2/6, 3/6
    #   label 2 -> ln(3/6) = -ln 2
    # position 1: logits [0, 2 ln 3, 0] / 2 = [0, ln 3, 0] -> exp = 1, 3, 1 -> p = 1/5, 3/5, 1/5
    #   label 1 -> ln(3/5)
    logits = t([[[0.0, 2 * math.log(2), 2 * math.log(3)], [0.0, 2 * math.log(3), 0.0]]])
    labels = torch.tensor([[2, 1]])
    close(logprobs_from_logits(logits, labels, temperature=2.0), [[-math.log(2), math.log(0.6)]])
    # at temperature 1, position 0: exp = 1, 4, 9 -> p(label 2) = 9/14, a different answer
    out1 = logprobs_from_logits(logits, labels, temperature=1.0)
    close(out1[0, 0], math.log(9 / 14))
    # bf16 logits come back as float32
    out_bf16 = logprobs_from_logits(logits.bfloat16(), labels, 2.0)
    assert out_bf16.dtype == torch.float32
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, labels, temperature=0.0)


def test_entropy():
    # uniform over V = 4 (all logits equal, any temperature): H = ln 4
    logits = torch.full((2, 3, 4), 7.0)
    close(entropy_from_logits(logits, 0.7), torch.full((2, 3), math.log(4)))
    # logits [0, 2 ln 3] / 2 = [0, ln 3] -> p = 1/4, 3/4
    # H = -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - 3/4 ln 3 = 1.386294 - 0.823959 = 0.562335
    h = entropy_from_logits(t([[[0.0, 2 * math.log(3)]]]), 2.0)
    close(h, [[0.562335]])


def test_truncate_after_eos():
    eos, pad = 2, 0
    sampled = torch.tensor(
        [
            [5, 2, 7, 2],  # EOS in the middle: the 7 and the second EOS become pad
            [5, 6, 7, 2],  # EOS at the end: unchanged
            [5, 6, 7, 8],  # no EOS: unchanged, mask all 1, has_eos False
            [0, 5, 2, 9],  # pad sampled before EOS is a real token; the 9 after EOS is cut
            [2, 5, 6, 7],  # EOS first: only the EOS is real
        ]
    )
    ids, mask, has_eos = truncate_after_eos(sampled, eos_id=eos, pad_id=pad)
    expected_ids = [[5, 2, 0, 0], [5, 6, 7, 2], [5, 6, 7, 8], [0, 5, 2, 0], [2, 0, 0, 0]]
    assert ids.tolist() == expected_ids
    assert ids.dtype == torch.int64
    close(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]])
    assert has_eos.tolist() == [True, True, False, True, True]
    # last real token: index of the first EOS, or T-1 = 3 without EOS
    assert last_token_index(mask).tolist() == [1, 3, 3, 2, 0]
    assert last_token_index(mask.bool()).dtype == torch.int64
    assert last_token_index(t([[0.0, 0.0, 0.0]])).tolist() == [0]  # documented: all-zero -> 0


def test_missing_eos_penalty():
    # 1.0 keeps its score (has EOS); 0.5 - 1.0 = -0.5 (no EOS)
    close(apply_missing_eos_penalty(t([1.0, 0.5]), torch.tensor([True, False]), 1.0), [1.0, -0.5])


def test_per_token_rewards_score_at_last_real_token():
    logprobs = t([[-1.0, -2.0, -0.5], [-1.0, -3.0, 55.0]])
    ref_logprobs = t([[-1.5, -1.0, -0.5], [-2.0, -3.0, -77.0]])  # junk on row 1 padding
    mask = t([[1, 1, 1], [1, 1, 0]])
    scores = t([2.0, -1.0])
    rewards, kl = per_token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1)
    # row 0: kl = -1 - (-1.5) = 0.5, -2 - (-1) = -1.0, -0.5 - (-0.5) = 0
    #        rewards = -0.1*0.5 = -0.05, -0.1*(-1) = 0.1, -0.1*0 + score 2.0 = 2.0
    # row 1: kl = -1 - (-2) = 1.0, -3 - (-3) = 0, padding -> 0
    #        rewards = -0.1*1 = -0.1, 0 + score (-1.0) = -1.0 at index 1 (last real), padding 0
    close(kl, [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]])
    close(rewards, [[-0.05, 0.1, 2.0], [-0.1, -1.0, 0.0]])


def test_gae_length_3_with_padded_row():
    rewards = t([[0.1, -0.2, 1.0], [0.5, 1.0, 9.0]])
    values = t([[0.5, 0.4, 0.3], [0.2, 0.6, 9.0]], torch.float32).requires_grad_()
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0 (gamma = 1, lam = 0.95, V_3 = 0):
    #   delta_2 = r_2 + V_3 - V_2 = 1.0 + 0 - 0.3 = 0.7      A_2 = 0.7
    #   delta_1 = -0.2 + 0.3 - 0.4 = -0.3                   A_1 = -0.3 + 0.95*0.7 = 0.365
    #   delta_0 = 0.1 + 0.4 - 0.5 = 0.0                     A_0 = 0.0 + 0.95*0.365 = 0.34675
    #   returns = A + V = 0.84675, 0.765, 1.0
    # row 1 (t = 2 is padding: its value 9.0 is treated as 0, so V_2 = 0):
    #   delta_1 = 1.0 + 0 - 0.6 = 0.4                       A_1 = 0.4
    #   delta_0 = 0.5 + 0.6 - 0.2 = 0.9                     A_0 = 0.9 + 0.95*0.4 = 1.28
    #   returns = 1.28 + 0.2 = 1.48, 0.4 + 0.6 = 1.0, padding 0
    close(adv, [[0.34675, 0.365, 0.7], [1.28, 0.4, 0.0]])
    close(ret, [[0.84675, 0.765, 1.0], [1.48, 1.0, 0.0]])
    assert not adv.requires_grad and not ret.requires_grad  # targets carry no gradient


def test_gae_discount_gamma():
    # gamma = 0.5, lam = 1 (Monte Carlo): rewards [0, 1], values [0.4, 0.2]
    #   delta_1 = 1 + 0.5*0 - 0.2 = 0.8                     A_1 = 0.8
    #   delta_0 = 0 + 0.5*0.2 - 0.4 = -0.3                  A_0 = -0.3 + 0.5*1*0.8 = 0.1
    #   check: discounted return_0 = 0 + 0.5*1 = 0.5 = A_0 + V_0 = 0.1 + 0.4
    adv, ret = gae_advantages(t([[0.0, 1.0]]), t([[0.4, 0.2]]), t([[1, 1]]), gamma=0.5, lam=1.0)
    close(adv, [[0.1, 0.8]])
    close(ret, [[0.5, 1.0]])


def test_policy_loss_clipping():
    # old logprobs 0, so ratio = exp(logprobs); clip_range 0.2 -> clamp to [0.8, 1.2]
    ratios = [1.1, 1.5, 0.5, 1.5, 0.5, 1.0]
    adv = t([[1.0, 1.0, -1.0, -1.0, 1.0, 1000.0]])
    mask = t([[1, 1, 1, 1, 1, 0]])  # last position is padding
    logprobs = torch.log(t([ratios])).requires_grad_()
    old = t([[0.0] * 5 + [-50.0]])  # padding: huge log-ratio, must not overflow or count
    loss, stats = policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    # pos   A  ratio  -A*ratio  -A*clamp   max   clipped?
    #  0   +1   1.1    -1.1      -1.1      -1.1  no  (inside the range)
    #  1   +1   1.5    -1.5      -1.2      -1.2  yes (A > 0, ratio above 1.2)
    #  2   -1   0.5     0.5       0.8       0.8  yes (A < 0, ratio below 0.8)
    #  3   -1   1.5     1.5       1.2       1.5  no  (A < 0, ratio above: pessimistic term)
    #  4   +1   0.5    -0.5      -0.8      -0.5  no  (A > 0, ratio below: pessimistic term)
    # loss = (-1.1 - 1.2 + 0.8 + 1.5 - 0.5) / 5 = -0.5 / 5 = -0.1 ; clipfrac = 2/5 = 0.4
    close(loss, -0.1)
    close(stats["clipfrac"], 0.4)
    # ratio mean = (1.1 + 1.5 + 0.5 + 1.5 + 0.5) / 5 = 5.1 / 5 = 1.02
    close(stats["ratio"], 1.02)
    # approxkl = 0.5 * mean(log r ^2); ln 1.1 = 0.0953102, ln 1.5 = 0.4054651, ln 0.5 = -0.6931472
    # squares 0.0090840 + 2*0.1644020 + 2*0.4804530 = 1.2987940 ; / 5 = 0.2597588 ; * 0.5
    close(stats["approxkl"], 0.1298794)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    # gradient: clipped and padded positions get 0; otherwise d/dlogp (-A*ratio)/5 = -A*ratio/5
    # pos 0: -1.1/5 = -0.22 ; pos 3: 1.5/5 = 0.3 ; pos 4: -0.5/5 = -0.1
    loss.backward()
    close(logprobs.grad, [[-0.22, 0.0, 0.0, 0.3, -0.1, 0.0]])


def test_value_loss_clipped_and_unclipped():
    values = t([[0.1, 0.5, 0.5, -0.5, 100.0]])
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    returns = t([[1.0, 1.0, 0.0, -1.0, -100.0]])
    mask = t([[1, 1, 1, 1, 0]])  # last position is padding
    loss, stats = value_loss(values, old, returns, mask, clip_range=0.2)
    # pos  v     R    v_clip  (v-R)^2  (v_clip-R)^2  max   clipped?
    #  0   0.1   1.0   0.1    0.81     0.81          0.81  no  (inside the range)
    #  1   0.5   1.0   0.2    0.25     0.64          0.64  yes
    #  2   0.5   0.0   0.2    0.25     0.04          0.25  no
    #  3  -0.5  -1.0  -0.2    0.25     0.64          0.64  yes
    # loss = 0.5 * (0.81 + 0.64 + 0.25 + 0.64) / 4 = 0.5 * 2.34 / 4 = 0.2925 ; clipfrac = 2/4
    close(loss, 0.2925)
    close(stats["value_clipfrac"], 0.5)
    # wide clip range: nothing clipped, loss = 0.5 * (0.81 + 0.25 + 0.25 + 0.25) / 4 = 0.195
    loss, stats = value_loss(values, old, returns, mask, clip_range=10.0)
    close(loss, 0.195)
    close(stats["value_clipfrac"], 0.0)


def test_policy_loss_weights_scale_each_tokens_clipped_term():
    # ratios 1.1 and 1.5 with A = +1 (clip 0.2): per-token max terms -1.1 and -1.2 (see above)
    logprobs = torch.log(t([[1.1, 1.5, 1.0]]))
    old, adv, mask = t([[0.0, 0.0, 0.0]]), t([[1.0, 1.0, 9.0]]), t([[1, 1, 0]])
    loss, _ = policy_loss(logprobs, old, adv, mask, clip_range=0.2, weights=t([[2.0, 0.5, 7.0]]))
    # (2 * -1.1 + 0.5 * -1.2) / 2 = (-2.2 - 0.6) / 2 = -1.4 ; padding's weight never counts
    close(loss, -1.4)


def test_logprob_gap_and_truncated_importance_weights():
    learner = t([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]])
    sampler = t([[-1.5, -1.0, -3.0], [-0.5, 0.0, 0.0]])
    mask = t([[1, 1, 1], [1, 0, 0]])
    gap = logprob_gap(learner, sampler, mask)
    # |diff| on real tokens: 0.5, 1.0, 0, 0 -> mean 1.5 / 4 = 0.375, max 1.0
    close(gap["mean"], 0.375)
    close(gap["max"], 1.0)
    weights = truncated_importance_weights(learner, sampler, mask, cap=1.5)
    # exp(0.5) = 1.6487 -> 1.5 ; exp(-1) = 0.3679 ; exp(0) = 1 ; padding 0
    close(weights, t([[1.5, 0.3678794, 1.0], [1.0, 0.0, 0.0]]))


def test_decoupled_objective_by_hand():
    """One token, A = +1, clip 0.2: behaviour (the version that sampled it) p = 0.25, proximal
    (the learner before this update) 0.5, the policy now 0.65. PPO clips pi_now / pi_behaviour
    = 2.6 to 1.2: loss -1.2, as if the policy had barely moved. The decoupled objective clips
    pi_now / pi_proximal = 1.3 to 1.2 and weighs it by pi_proximal / pi_behaviour = 2 (cap 5):
    loss -2.4; with cap 1.5 the weight is 1.5: loss -1.8. When proximal and behaviour are one
    policy (no lag) every weight is 1 and the two objectives are the same."""
    now, proximal, behaviour = (torch.log(t([[p]])) for p in (0.65, 0.5, 0.25))
    adv, mask = t([[1.0]]), t([[1]])
    ppo, _ = policy_loss(now, behaviour, adv, mask, clip_range=0.2)
    close(ppo, -1.2)
    for cap, expected in ((5.0, -2.4), (1.5, -1.8)):
        weights = truncated_importance_weights(proximal, behaviour, mask, cap)
        decoupled, stats = policy_loss(now, proximal, adv, mask, clip_range=0.2, weights=weights)
        close(decoupled, expected)
        close(stats["ratio"], 1.3)
    at_lag_zero = truncated_importance_weights(behaviour, behaviour, mask, cap=5.0)
    same, _ = policy_loss(now, behaviour, adv, mask, clip_range=0.2, weights=at_lag_zero)
    close(same, ppo)
