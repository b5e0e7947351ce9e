"""Tier 1: the SFT and reward phases' optimizer and learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.config import RewardConfig, SFTConfig
from rlhf_ray.train.common import phase_optimizer


@pytest.mark.parametrize(
    ("phase", "decay"),
    [
        (SFTConfig(), 0.0),  # the defaults: what each phase did before it was a setting
        (RewardConfig(), 0.01),
        (SFTConfig(weight_decay=0.05), 0.05),
        (RewardConfig(weight_decay=0.0), 0.0),
    ],
)
def test_each_phase_trains_with_its_own_weight_decay(phase, decay):
    weight = torch.nn.Parameter(torch.ones(2))
    opt = phase_optimizer([weight], phase)
    assert opt.param_groups[0]["weight_decay"] == decay
    assert opt.param_groups[0]["lr"] == phase.lr
    # Decoupled decay: with a zero gradient Adam's update is 0, so only the decay moves it.
    weight.grad = torch.zeros(2)
    opt.step()
    expected = torch.full((2,), 1 - phase.lr * decay)  # float32, as the weight is
    assert torch.equal(weight.detach(), expected)
