"""Early stop and the adaptive KL coefficient, with values worked out by hand; the update's
log (`update_stats`) from hand-made minibatch stats."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.ppo.kl_control import adaptive_kl_coef, stops_update
from rlhf_ray.ppo.learner_stats import update_stats
from rlhf_ray.ppo.losses import policy_loss
from rlhf_ray.ppo.lr_schedule import scheduled_lr
from rlhf_ray.run import metrics


def test_the_update_stops_only_when_approx_kl_passes_the_target():
    assert stops_update(0.03, 0.02)
    assert not stops_update(0.02, 0.02)  # reaching it is not passing it
    assert not stops_update(0.01, 0.02)
    assert not stops_update(5.0, 0.0)  # 0 turns the early stop off


def test_approx_kl_and_the_largest_log_ratio_a_stop_is_decided_on():
    """Log-ratios 0.1, -0.3 and 2.0 on real tokens, 9.0 on padding: approx-KL is
    0.5 * (0.01 + 0.09 + 4) / 3 = 0.68333; the largest |log-ratio| is 2.0 (padding ignored).
    One heavy token is most of the approx-KL: without it 0.5 * 0.1 / 2 = 0.025."""
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.1, -0.3, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    _, stats = policy_loss(new, old, torch.ones(1, 4), mask, clip_range=0.2)
    assert stats["approxkl"].item() == pytest.approx(0.683333, abs=1e-6)
    assert stats["logratio_absmax"].item() == pytest.approx(2.0)
    assert stops_update(stats["approxkl"].item(), 0.5)
    assert not stops_update(stats["approxkl"].item(), 0.7)


def test_adaptive_kl_coefficient_moves_by_the_clipped_error_times_rollouts_over_horizon():
    """Ziegler et al. 2019: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)."""
    # kl 3 against target 2: error 0.5 clipped to 0.2; 128 rollouts over a horizon of 1000:
    # 0.1 * (1 + 0.2 * 0.128) = 0.1 * 1.0256
    assert adaptive_kl_coef(0.1, 3.0, 2.0, 1000, 128) == pytest.approx(0.10256)
    # kl 1.8 against 2: error -0.1, not clipped: 0.1 * (1 - 0.1 * 0.128) = 0.1 * 0.9872
    assert adaptive_kl_coef(0.1, 1.8, 2.0, 1000, 128) == pytest.approx(0.09872)
    # kl 0 (a step with no drift): error -1 clipped to -0.2: 0.2 * (1 - 0.2 * 64 / 6400)
    assert adaptive_kl_coef(0.2, 0.0, 1.0, 6400, 64) == pytest.approx(0.2 * 0.998)
    assert adaptive_kl_coef(0.1, 2.0, 2.0, 1000, 128) == pytest.approx(0.1)  # on target


def _step(approxkl, clipfrac, grad, logratio, ratio):
    return {
        metrics.APPROXKL: approxkl,
        metrics.CLIPFRAC: clipfrac,
        metrics.GRAD_NORM: grad,
        metrics.LOGRATIO_MAX: logratio,
        metrics.RATIO: ratio,
    }


def test_update_stats_means_maxima_and_each_epochs_approx_kl():
    steps = [
        (0, _step(0.0, 0.0, 0.5, 0.0, 1.0)),
        (0, _step(0.02, 0.1, 1.5, 0.4, 1.1)),
        (1, _step(0.3, 0.05, 2.5, 6.0, 0.9)),
    ]
    out = update_stats(steps)
    assert out[metrics.APPROXKL] == pytest.approx(0.32 / 3)
    assert out[metrics.APPROXKL_MAX] == 0.3
    assert out[metrics.CLIPFRAC_MAX] == 0.1
    assert out[metrics.GRAD_NORM] == pytest.approx(1.5)
    assert out[metrics.GRAD_NORM_MAX] == 2.5
    assert out[metrics.LOGRATIO_MAX] == 6.0  # the largest, not the mean
    assert out[metrics.approxkl_epoch(1)] == pytest.approx(0.01)
    assert out[metrics.approxkl_epoch(2)] == pytest.approx(0.3)
    assert metrics.approxkl_epoch(3) not in out
    assert out[metrics.RATIO_FIRST] == 1.0
    assert out[metrics.MINIBATCH_STEPS] == 3


def test_update_stats_of_an_update_stopped_before_its_first_step():
    assert update_stats([]) == {metrics.MINIBATCH_STEPS: 0}


def test_learning_rate_warm_up_then_constant_or_linear_decay():
    # constant, no warm-up: every update lr
    assert scheduled_lr(1e-3, 0, 64, 0, "constant") == 1e-3
    assert scheduled_lr(1e-3, 63, 64, 0, "constant") == 1e-3
    # linear over 64 updates: lr * (64 - u) / 64 -> 1e-3, 0.5e-3 at u = 32, 1e-3 / 64 last
    assert scheduled_lr(1e-3, 0, 64, 0, "linear") == pytest.approx(1e-3)
    assert scheduled_lr(1e-3, 32, 64, 0, "linear") == pytest.approx(0.5e-3)
    assert scheduled_lr(1e-3, 63, 64, 0, "linear") == pytest.approx(1e-3 / 64)
    # 4 warm-up updates: 1/4, 2/4, 3/4, 4/4 of lr; then linear over the 6 left of 10
    assert [scheduled_lr(8.0, u, 10, 4, "linear") for u in range(10)] == pytest.approx(
        [2.0, 4.0, 6.0, 8.0, 8.0, 8.0 * 5 / 6, 8.0 * 4 / 6, 8.0 * 3 / 6, 8.0 * 2 / 6, 8.0 / 6]
    )
    assert scheduled_lr(8.0, 5, 10, 4, "constant") == 8.0
