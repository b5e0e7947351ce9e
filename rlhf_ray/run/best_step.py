"""Evaluation during PPO: when it is due, which score it ranks steps by, and the best step so far.

Every `eval.every` PPO steps and at the last step, the held-out prompts are sampled with the
policy as it is and scored; the step with the highest score is exported as `policy/` (the last
step as `policy-last/`), as OpenRLHF's best-checkpoint option does. The score is the gold
judge's where it knows every held-out prompt (synthetic data), else the reward model's, else
(PPO on reward functions only) the weighted total the scorer trains on.

A tie keeps the earlier step: it is as good by the measure, and nearer the reference. Until a
step is better than every earlier one, nothing new is exported; a run resumed from a
checkpoint carries the best so far in the checkpoint (`state`/`from_state`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

GOLD, REWARD_MODEL, TOTAL = "gold_judge", "reward_model", "total"
BEST_DIR = "ppo_best"  # <output_dir>/ppo_best/step-N: the best step's export, staged
LAST_DIR = "policy-last"  # <output_dir>/policy-last: the last step's export
STEP_WEIGHTS = "step_weights.safetensors"  # in a staged step: its trainable weights (the LoRA)


def eval_due(step: int, every: int, steps: int) -> bool:
    """Whether step `step` (1-based) of `steps` is evaluated: every `every` steps and the last
    one; never when `every` is 0."""
    return every > 0 and (step % every == 0 or step == steps)


def eval_steps(every: int, steps: int) -> list[int]:
    """Every step of a run that is evaluated."""
    return [step for step in range(1, steps + 1) if eval_due(step, every, steps)]


def selection_judge(scores: dict[str, float]) -> str:
    """The name in `scores` (an evaluation's mean per judge) that ranks the steps."""
    for name in (GOLD, REWARD_MODEL, TOTAL):
        if name in scores:
            return name
    raise ValueError(f"an evaluation without {GOLD}, {REWARD_MODEL} or {TOTAL}: {sorted(scores)}")


@dataclass
class BestStep:
    """The best evaluated step so far: its step, score, held-out KL and the judge that gave
    the score (None before any)."""

    step: int | None = None
    score: float | None = None
    kl: float | None = None
    judge: str | None = None

    def offer(
        self, step: int, score: float, kl: float | None = None, judge: str | None = None
    ) -> bool:
        """Step `step` was evaluated at `score`: True (and kept) if it beats every step before
        it. A tie keeps the earlier step; a score that is not a number never wins."""
        if math.isnan(score):
            return False
        if self.score is not None and score <= self.score:
            return False
        self.step, self.score, self.kl, self.judge = step, score, kl, judge
        return True

    def state(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict | None) -> BestStep:
        """A checkpoint's best step; an older checkpoint without one has none."""
        return cls(**state) if state else cls()


def staged_dir(out: Path, step: int) -> Path:
    """Where the export of step `step`, the best so far, waits for the end of the run."""
    return out / BEST_DIR / f"step-{step}"


def stale_staged(out: Path, best: BestStep) -> list[Path]:
    """Staged exports other than `best`'s: of steps a stopped run evaluated after its last
    checkpoint, which a resumed run evaluates again."""
    root = out / BEST_DIR
    if not root.is_dir():
        return []
    keep = None if best.step is None else staged_dir(out, best.step).name
    return sorted(p for p in root.iterdir() if p.name != keep)
