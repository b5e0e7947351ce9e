"""Tier 1: the SFT and reward phases' optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from rlhf_ray.config import RewardConfig, SFTConfig
from rlhf_ray.train.common import phase_optimizer, warmup_cosine


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


def _learning_rates(schedule, total: int) -> list[float]:
    """The learning rate of each of `total` optimizer steps under `schedule(opt, total)`, for a
    peak learning rate of 1."""
    weight = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([weight], lr=1.0)
    scheduler = schedule(opt, total)
    rates = []
    for _ in range(total):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return rates


def test_warmup_cosine_learns_from_the_first_step_where_transformers_waits_one():
    """Why the loops keep their own schedule rather than transformers'
    get_cosine_with_min_lr_schedule_with_warmup (min_lr_rate 0.1, the same warm-up length): the
    cosine part is the same, but the library's warm-up is (step / warmup), one step behind ours
    ((step + 1) / warmup), so its first optimizer step has learning rate 0 and moves no weight
    (AdamW's decay is scaled by the learning rate too). 40 steps: warm-up 2 (5%)."""
    ours = _learning_rates(warmup_cosine, 40)
    library = _learning_rates(
        lambda opt, total: get_cosine_with_min_lr_schedule_with_warmup(
            opt, max(1, int(total * 0.05)), total, min_lr_rate=0.1
        ),
        40,
    )
    assert ours[:3] == [0.5, 1.0, 1.0]  # warm-up to the peak, then the cosine starts at 1
    assert library[:3] == [0.0, 0.5, 1.0]
    assert ours[2:] == pytest.approx(library[2:], rel=1e-12, abs=1e-15)
    # the last step, 37 of the 38 cosine steps done: 0.1 + 0.9 * (1 + cos(pi * 37 / 38)) / 2
    assert ours[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 37 / 38)), rel=1e-12)
