"""Which batch a step trains on and how many the generators are asked for ahead, by hand
(rlhf_ray/ppo/staleness.py); the driver doing it with real roles: tests/test_actors.py."""

from __future__ import annotations

import pytest

from rlhf_ray.ppo.staleness import Choice, batches_ahead, choose


def test_wait_trains_on_the_oldest_batch_once_it_is_sampled():
    # batches sampled with versions 3 and 4 and one still sampling; the learner is at 5
    assert choose([3, 4, None], 5, 2, "wait") == Choice(0, ())
    assert choose([None, None], 5, 2, "wait") == Choice(None, ())  # wait for the oldest


def test_drop_trains_on_the_newest_sampled_batch_and_drops_the_older_ones():
    # learner at 5, k = 2: versions 3 and 4 sampled (lags 2 and 1), one still sampling.
    # The newest sampled (lag 1) trains; the one of version 3 is dropped though within k.
    assert choose([3, 4, None], 5, 2, "drop") == Choice(1, (0,))
    # k = 1: version 3 (lag 2) is too old, version 4 (lag 1) is the newest: the same choice
    assert choose([3, 4, None], 5, 1, "drop") == Choice(1, (0,))
    # nothing sampled yet: wait for the oldest, drop nothing
    assert choose([None, None], 5, 1, "drop") == Choice(None, ())


def test_drop_waits_for_a_fresh_batch_when_every_sampled_one_is_too_old():
    # learner at 6, k = 1: versions 3 and 4 (lags 3 and 2) are both too old: both dropped,
    # and the step waits for the one still sampling
    assert choose([3, 4, None], 6, 1, "drop") == Choice(None, (0, 1))
    assert choose([3, 4], 6, 1, "drop") == Choice(None, (0, 1))  # the driver asks anew


@pytest.mark.parametrize(
    ("k", "steps_left", "asked", "expected"),
    [
        (1, 10, 0, 1),  # overlap as before: one batch ahead
        (2, 10, 0, 2),  # step 1 of a k = 2 run: two ahead
        (2, 10, 1, 1),  # a later step: one queued, one more
        (2, 1, 0, 1),  # one step left: nothing beyond the run's end
        (2, 0, 0, 0),  # the last step
        (3, 10, 3, 0),  # already k ahead
    ],
)
def test_wait_keeps_k_batches_ahead_within_the_steps_left(k, steps_left, asked, expected):
    assert batches_ahead("wait", k, steps_left, asked, sampling=asked) == expected


def test_drop_asks_for_one_more_whenever_none_is_being_sampled():
    assert batches_ahead("drop", 2, 10, asked=3, sampling=0) == 1  # three sampled, waiting
    assert batches_ahead("drop", 2, 10, asked=3, sampling=1) == 0  # the generators are busy
    assert batches_ahead("drop", 2, 0, asked=0, sampling=0) == 0  # the last step
