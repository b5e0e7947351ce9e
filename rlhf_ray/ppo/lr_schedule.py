"""The policy adapter's learning rate over the PPO steps, pure arithmetic: an optional linear
warm-up, then constant or a linear decay towards 0 at the last step (as TRL's PPO trainer's
default linear schedule and CleanRL's `anneal_lr`)."""

from __future__ import annotations


def scheduled_lr(lr: float, update: int, steps: int, warmup: int, schedule: str) -> float:
    """The learning rate of update `update` (0-based: the number of updates done before it) of
    `steps`: lr * (update + 1) / warmup during the first `warmup` updates, then lr ("constant")
    or lr * (steps - update) / (steps - warmup) ("linear": the last update gets lr / the
    updates after the warm-up)."""
    if update < warmup:
        return lr * (update + 1) / warmup
    if schedule == "constant":
        return lr
    return lr * (steps - update) / (steps - warmup)
