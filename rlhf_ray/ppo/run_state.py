"""What the PPO driver carries from step to step, Ray-free, so a checkpoint can hold it: the
order prompts are taken in, and the running totals the metrics report."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from rlhf_ray.errors import UserInputError
from rlhf_ray.run import metrics


class PromptStream:
    """Prompts in a fresh seeded order each pass over the RL prompt set."""

    def __init__(self, prompts: list[str], seed: int) -> None:
        self.prompts, self.rng = prompts, random.Random(seed)
        self.queue: list[int] = []  # indices into prompts, in the order they will be taken

    def take(self, count: int) -> list[int]:
        """The next `count` prompts, as indices into `prompts` (the RL prompt file's rows)."""
        while len(self.queue) < count:
            order = list(range(len(self.prompts)))
            self.rng.shuffle(order)
            self.queue += order
        taken, self.queue = self.queue[:count], self.queue[count:]
        return taken

    def state(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "num_prompts": len(self.prompts),
            "queue": self.queue,
            "rng": [version, internal, gauss],
        }

    def restore(self, state: dict) -> None:
        if state["num_prompts"] != len(self.prompts):
            raise UserInputError(
                f"the PPO checkpoint was taken with {state['num_prompts']} RL prompts, this run "
                f"has {len(self.prompts)}: use a new run.output_dir for other data"
            )
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.queue = list(state["queue"])


@dataclass
class RunTotals:
    """What the metrics accumulate over steps; saved in checkpoints so a resumed run reports
    the same totals (wall-clock figures count the time of every process that ran steps)."""

    step: int = 0
    tokens: float = 0.0
    seconds: float = 0.0  # PPO wall time of earlier processes and finished segments
    stage_seconds: dict = dataclasses.field(
        default_factory=lambda: dict.fromkeys(metrics.STAGES, 0.0)
    )
    last: dict = dataclasses.field(default_factory=dict)  # the latest step's stats
    busy: dict = dataclasses.field(default_factory=dict)  # role -> seconds it was working

    def add(self, tokens: float, times: dict, stats: dict, step: int) -> None:
        self.step, self.tokens, self.last = step, self.tokens + tokens, dict(stats)
        for stage, seconds in times.items():
            self.stage_seconds[stage] += seconds

    def add_segment(self, seconds: float, busy: dict[str, float]) -> None:
        """A stretch of steps ended (a checkpoint, the end): its wall time and each role's
        busy seconds in it."""
        self.seconds += seconds
        for role, busy_s in busy.items():
            self.busy[role] = self.busy.get(role, 0.0) + busy_s

    def busy_fractions(self) -> dict[str, float]:
        """role -> share of the PPO wall time it was working (1.0: never waiting)."""
        return {role: round(s / max(self.seconds, 1e-9), 3) for role, s in self.busy.items()}

    def tokens_per_s(self, running_seconds: float) -> float:
        return self.tokens / (self.seconds + running_seconds)

    def summary(self, steps: int) -> dict:
        return {
            **self.last,
            metrics.TOKENS_PER_S: self.tokens / max(self.seconds, 1e-9),
            "stage_seconds": {s: round(t, 2) for s, t in self.stage_seconds.items()},
            "role_busy": self.busy_fractions(),
            "steps": steps,
            "seconds": round(self.seconds, 1),
        }
