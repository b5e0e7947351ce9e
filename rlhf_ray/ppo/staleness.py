"""Which sampled batch a PPO step trains on, and when the generators are asked for another, with
`ppo.overlap` (k = `ppo.max_policy_lag`, `ppo.stale_batches`). Ray-free: the driver
(jobs/ppo/loop.py) holds the batches in the order it asked for them and asks these functions.

  wait  The generators run k batches ahead of the learner and then wait for it: each batch is
        trained on k updates after the version that sampled it (fewer in the first k steps).
        Nothing is dropped and a stopped run resumes exactly (prime-rl's async level, AReaL's
        and SkyRL's staleness bound).
  drop  The generators never wait for the learner: whenever every batch asked for is sampled
        and the learner is still updating, they are asked for another. A step trains on the
        newest sampled batch and drops the older ones, as it drops any batch more than k
        updates old (NeMo-RL's trajectory age, TRL's async GRPO). Fresher batches for spare
        generator time; which batches are dropped depends on timing, so a resumed run is not
        the same run.

A batch's version is its oldest shard's (the one a lost generator's stand-in sampled may be
newer); the learner's version at a step is the updates done before it.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("wait", "drop")


@dataclass(frozen=True)
class Choice:
    train: int | None  # index of the batch to train on; None: wait for the oldest still sampling
    drop: tuple[int, ...]  # indices of sampled batches to drop, oldest first


def choose(versions: list[int | None], learner_version: int, max_lag: int, mode: str) -> Choice:
    """`versions`: per batch asked for, oldest first, the policy version it was sampled with,
    or None while it is still being sampled (the generators sample in the order asked, so
    batches finish oldest first)."""
    if mode == "wait":  # first in, first trained: its lag is k by construction
        return Choice(0 if versions[0] is not None else None, ())
    sampled = [i for i, v in enumerate(versions) if v is not None]
    fresh = [i for i in sampled if learner_version - versions[i] <= max_lag]
    if not fresh:
        return Choice(None, tuple(sampled))  # all too old: wait for one still sampling
    newest = fresh[-1]
    return Choice(newest, tuple(i for i in sampled if i < newest))


def batches_ahead(mode: str, max_lag: int, steps_left: int, asked: int, sampling: int) -> int:
    """How many more batches to ask for now, while the learner updates: `asked` batches are
    waiting to be trained on, `sampling` of them still being sampled; `steps_left` steps follow
    this one. wait: up to min(k, steps_left) ahead; drop: one whenever none is being sampled."""
    if mode == "wait":
        return max(0, min(max_lag, steps_left) - asked)
    return 1 if steps_left > 0 and sampling == 0 else 0
