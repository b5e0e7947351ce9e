"""How busy a role's process is: the seconds it spends on its work, for its share of a phase."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class BusyClock:
    """Seconds spent inside `working()` since this process started (a restart starts at 0)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.seconds, self.clock = 0.0, clock

    @contextmanager
    def working(self) -> Iterator[None]:
        start = self.clock()
        try:
            yield
        finally:
            self.seconds += self.clock() - start


def busy_since(before: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    """Each role's busy seconds between two readings of its clock; a role whose clock went
    back was restarted in between, and counts from 0."""
    since = {}
    for role, seconds in now.items():
        start = before.get(role, 0.0)
        since[role] = seconds - start if seconds >= start else seconds
    return since
