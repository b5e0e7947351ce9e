"""Tests for rlhf_ray.ppo.targets (rewards -> GAE -> whitening); every value worked by hand."""

import math
import statistics

import torch

from rlhf_ray.ppo.targets import critic_free_targets, ppo_targets


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, t(b), atol=atol, rtol=0)


# Two rollouts, R = 3. Row 0: two real tokens ending in EOS, then padding (its junk logprobs
# and value must not leak in). Row 1: three real tokens and no EOS (length limit).
MASK = [[1, 1, 0], [1, 1, 1]]
HAS_EOS = [True, False]
SCORES = [1.0, 0.5]
LOGPROBS = [[-1.0, -2.0, 7.0], [-0.5, -1.0, -1.5]]
REF_LOGPROBS = [[-1.5, -1.5, -9.0], [-0.5, -2.0, -1.0]]
VALUES = [[0.375, 1.5, 4.0], [-1.0, -1.375, -1.0]]
SETTINGS = dict(kl_coef=0.5, gamma=1.0, lam=0.5, missing_eos_penalty=1.0, whiten_rewards=False)


def _targets(logprobs, ref_logprobs):
    return ppo_targets(
        t(SCORES),
        torch.tensor(HAS_EOS),
        t(logprobs),
        t(ref_logprobs),
        t(VALUES),
        t(MASK),
        **SETTINGS,
    )


def test_two_rows_rewards_gae_and_whitening():
    out = _targets(LOGPROBS, REF_LOGPROBS)
    # scores: row 0 has EOS -> 1.0; row 1 has none -> 0.5 - penalty 1.0 = -0.5
    close(out.scores, [1.0, -0.5])
    # kl = logp_policy - logp_ref on real tokens, 0 on padding (7 - (-9) = 16 never enters):
    #   row 0: -1.0 - (-1.5) = 0.5 ;  -2.0 - (-1.5) = -0.5 ;  pad 0
    #   row 1: -0.5 - (-0.5) = 0.0 ;  -1.0 - (-2.0) =  1.0 ;  -1.5 - (-1.0) = -0.5
    close(out.kl, [[0.5, -0.5, 0.0], [0.0, 1.0, -0.5]])
    # rewards = -kl_coef * kl = -0.5 * kl, plus the score at the last real token:
    #   row 0: -0.25 ;  0.25 + 1.0 = 1.25 (index 1, the EOS) ;  pad 0
    #   row 1:  0.0  ; -0.5 ;  0.25 + (-0.5) = -0.25 (index 2, last token, no EOS)
    close(out.rewards, [[-0.25, 1.25, 0.0], [0.0, -0.5, -0.25]])
    # GAE, gamma = 1, lam = 0.5; the value after the last real token is 0 (pad value 4.0 unused)
    #   delta_t = r_t + V_{t+1} - V_t ;  A_t = delta_t + 0.5 * A_{t+1}
    #   row 0 (V = 0.375, 1.5):
    #     delta_1 = 1.25 + 0 - 1.5 = -0.25            A_1 = -0.25
    #     delta_0 = -0.25 + 1.5 - 0.375 = 0.875       A_0 = 0.875 + 0.5 * (-0.25) = 0.75
    #   row 1 (V = -1.0, -1.375, -1.0):
    #     delta_2 = -0.25 + 0 - (-1.0) = 0.75         A_2 = 0.75
    #     delta_1 = -0.5 + (-1.0) - (-1.375) = -0.125 A_1 = -0.125 + 0.5 * 0.75 = 0.25
    #     delta_0 = 0.0 + (-1.375) - (-1.0) = -0.375  A_0 = -0.375 + 0.5 * 0.25 = -0.25
    # returns = A + V (before whitening):
    #   row 0: 0.75 + 0.375 = 1.125 ;  -0.25 + 1.5 = 1.25 ;  pad 0
    #   row 1: -0.25 - 1.0 = -1.25 ;  0.25 - 1.375 = -1.125 ;  0.75 - 1.0 = -0.25
    close(out.returns, [[1.125, 1.25, 0.0], [-1.25, -1.125, -0.25]])
    # whitening over the 5 real tokens only: A = 0.75, -0.25, -0.25, 0.25, 0.75
    #   mean = 1.25 / 5 = 0.25 ; deviations 0.5, -0.5, -0.5, 0, 0.5 ; squares sum to 1.0
    #   unbiased var = 1.0 / (5 - 1) = 0.25 ; std = 0.5 ; whitened = deviation / 0.5
    #   (a mean over 6 slots with the padding counted would give 1.25 / 6 instead)
    close(out.advantages, [[1.0, -1.0, 0.0], [-1.0, 0.0, 1.0]], atol=1e-5)
    # what the epochs compare against: old values and logprobs, zeroed on padding
    close(out.old_values, [[0.375, 1.5, 0.0], [-1.0, -1.375, -1.0]])
    close(out.old_logprobs, [[-1.0, -2.0, 0.0], [-0.5, -1.0, -1.5]])
    close(out.mask, MASK)


def test_swapping_policy_and_reference_logprobs_flips_the_kl():
    # The KL penalty is on logp_policy - logp_ref: swapped inputs give kl = -0.5, 0.5 on row 0,
    # rewards -> 0.25, -0.25 + 1.0 = 0.75, a different target. The hand-worked test above must
    # catch such a swap; here it is shown directly.
    swapped = _targets(REF_LOGPROBS, LOGPROBS)
    close(swapped.kl, [[-0.5, 0.5, 0.0], [0.0, -1.0, 0.5]])
    close(swapped.rewards, [[0.25, 0.75, 0.0], [0.0, 0.5, -0.75]])


def test_whiten_rewards_rescales_before_gae():
    # One row of 3 real tokens, kl = logp - ref = 1, -1, 0; kl_coef 1; score 3 (has EOS)
    #   rewards = -1, 1, 0 + 3 = 3 ; mean 1 ; deviations -2, 0, 2 ; squares 8 ; var 8 / 2 = 4
    #   whitened with the mean kept: (r - 1) / 2 + 1 = 0.0, 1.0, 2.0
    # GAE with gamma = lam = 1: A_t = (sum of rewards from t on) - V_t, V = 2, 2.5, 2
    #   A = 3 - 2 = 1.0, 3 - 2.5 = 0.5, 2 - 2 = 0.0 ; returns = A + V = 3.0, 3.0, 2.0
    # advantages whitened: mean 1.5 / 3 = 0.5 ; deviations 0.5, 0, -0.5 ; squares 0.5 ;
    #   var 0.5 / 2 = 0.25 ; std 0.5 -> 1, 0, -1
    out = ppo_targets(
        t([3.0]),
        torch.tensor([True]),
        t([[1.0, -1.0, 0.0]]),
        t([[0.0, 0.0, 0.0]]),
        t([[2.0, 2.5, 2.0]]),
        t([[1, 1, 1]]),
        kl_coef=1.0,
        gamma=1.0,
        lam=1.0,
        missing_eos_penalty=1.0,
        whiten_rewards=True,
    )
    close(out.rewards, [[0.0, 1.0, 2.0]])
    close(out.returns, [[3.0, 3.0, 2.0]])
    close(out.advantages, [[1.0, 0.0, -1.0]], atol=1e-5)


# Critic-free targets: 4 rollouts of 2 prompts, k = 2, groups interleaved [0, 1, 0, 1] (as
# rows from two generators arrive). R = 2; row 3 is one token long and has no EOS.
FREE = dict(
    scores=[1.0, 2.0, 3.0, 0.0],
    has_eos=[True, True, True, False],
    logprobs=[[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, 9.0]],
    ref_logprobs=[[-1.5, -1.0], [-1.0, -1.0], [-1.0, -2.0], [-1.0, -9.0]],
    mask=[[1, 1], [1, 1], [1, 1], [1, 0]],
    group=[0, 1, 0, 1],
)
# Worked once for all estimators, kl_coef 0.5, missing-EOS penalty 1:
#   scores after the penalty: 1, 2, 3, 0 - 1 = -1
#   kl = logp - ref: row 0 [0.5, 0]; row 1 [0, 0]; row 2 [0, 1]; row 3 [0, pad]
#   per-token rewards -0.5 * kl, score at the last real token:
#     row 0 [-0.25, 1.0]; row 1 [0, 2.0]; row 2 [0, 2.5]; row 3 [-1.0, pad 0]
#   per response (summed): 0.75, 2.0, 2.5, -1.0
FREE_REWARDS = [[-0.25, 1.0], [0.0, 2.0], [0.0, 2.5], [-1.0, 0.0]]


def _free(estimator, kl_coef=0.5, gamma=1.0):
    return critic_free_targets(
        estimator,
        t(FREE["scores"]),
        torch.tensor(FREE["has_eos"]),
        t(FREE["logprobs"]),
        t(FREE["ref_logprobs"]),
        t(FREE["mask"]),
        torch.tensor(FREE["group"]),
        kl_coef=kl_coef,
        gamma=gamma,
        missing_eos_penalty=1.0,
    )


def test_rloo_targets_one_advantage_per_response_from_its_group():
    out = _free("rloo")
    close(out.rewards, FREE_REWARDS)
    close(out.scores, [1.0, 2.0, 3.0, -1.0])
    # group 0 = rows 0, 2 (0.75, 2.5): 0.75 - 2.5 = -1.75 and 2.5 - 0.75 = 1.75
    # group 1 = rows 1, 3 (2.0, -1.0): 2.0 - (-1.0) = 3.0 and -3.0; padding stays 0
    close(out.advantages, [[-1.75, -1.75], [3.0, 3.0], [1.75, 1.75], [-3.0, 0.0]])
    assert out.old_values is None and out.returns is None  # no critic
    close(out.old_logprobs, [[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-1.0, 0.0]])


def test_grpo_targets_normalise_within_each_group():
    out = _free("grpo")
    # group 0: 0.75, 2.5 -> mean 1.625, deviations -/+0.875, std sqrt(2 * 0.875^2 / 1)
    # group 1: 2.0, -1.0 -> mean 0.5, deviations +/-1.5, std sqrt(2 * 1.5^2 / 1)
    eps = 1e-4
    a0 = 0.875 / (math.sqrt(2) * 0.875 + eps)
    a1 = 1.5 / (math.sqrt(2) * 1.5 + eps)
    close(out.advantages, [[-a0, -a0], [a1, a1], [a0, a0], [-a1, 0.0]], atol=1e-5)


def test_kl_in_the_loss_leaves_the_rewards_without_it():
    """kl_coef 0 here (the learner puts kl_coef * k3 in the loss instead): the responses'
    rewards are the scores alone, 1, 2, 3, -1 -> RLOO: 1 - 3 = -2, 2 - (-1) = 3, 2, -3."""
    out = _free("rloo", kl_coef=0.0)
    close(out.advantages, [[-2.0, -2.0], [3.0, 3.0], [2.0, 2.0], [-3.0, 0.0]])
    close(out.kl, [[0.5, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # still measured
    close(out.ref_logprobs, FREE["ref_logprobs"])  # kept for the loss term


def test_reinforce_pp_targets_batch_normalised_returns():
    out = _free("reinforce++")
    # returns-to-go of FREE_REWARDS (gamma 1): [0.75, 1.0], [2.0, 2.0], [2.5, 2.5], [-1.0, pad]
    returns = [0.75, 1.0, 2.0, 2.0, 2.5, 2.5, -1.0]  # the 7 real tokens
    mean, std = statistics.mean(returns), statistics.stdev(returns)  # stdev: Bessel's n - 1
    w = [(r - mean) / math.sqrt(std**2 + 1e-8) for r in returns]
    close(out.advantages, [[w[0], w[1]], [w[2], w[3]], [w[4], w[5]], [w[6], 0.0]], atol=1e-5)
