"""A role's busy clock counts only its work, and survives a restart of the role."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rlhf_ray.ppo.run_state import RunTotals
from rlhf_ray.run.busy import BusyClock, busy_since


class ManualClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_clock_counts_only_the_time_inside_working():
    clock = ManualClock()
    busy = BusyClock(clock)
    clock.now += 5.0  # idle: not counted
    with busy.working():
        clock.now += 2.0
    clock.now += 3.0
    with pytest.raises(RuntimeError), busy.working():  # work that fails still took its time
        clock.now += 0.5
        raise RuntimeError("failed work")
    assert busy.seconds == 2.5


def test_busy_since_counts_a_restarted_role_from_zero():
    before = {"learner": 10.0, "rollout-0": 4.0}
    now = {"learner": 12.5, "rollout-0": 1.0, "rollout-1": 2.0}  # rollout-0 restarted; -1 is new
    assert busy_since(before, now) == {"learner": 2.5, "rollout-0": 1.0, "rollout-1": 2.0}


def test_busy_shares_add_up_over_segments_and_survive_a_checkpoint():
    progress = RunTotals()
    progress.add_segment(10.0, {"learner": 4.0, "rollout-0": 5.0})
    saved = RunTotals(**json.loads(json.dumps(dataclasses.asdict(progress))))  # as resumed
    saved.add_segment(10.0, {"learner": 6.0, "rollout-0": 5.0})
    assert saved.busy_fractions() == {"learner": 0.5, "rollout-0": 0.5}
    assert saved.summary(2)["role_busy"] == {"learner": 0.5, "rollout-0": 0.5}
