"""How many rollout generators a running PPO job has, and which rows each one samples. Ray-free.

Generators join and leave only between steps, when none is sampling: the driver re-splits the
next step's rows over the generators alive then, so no prompt is lost or sampled twice. A
generator's rank is never reused (it seeds its RNG and names its actor, `rollout-<rank>`).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.errors import UserInputError

# The control actor of the run writing into <output_dir> is named CONTROL_PREFIX + output_dir,
# so `rlhf-ray scale` finds it, in any namespace, while the job runs (it dies with the driver).
CONTROL_PREFIX = "rlhf-ray-control:"


def split_rows(count: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` contiguous slices of `count` rows, sizes differing by at most 1
    (the first `count % parts` slices have one row more)."""
    if parts < 1:
        raise ValueError(f"cannot split {count} rows over {parts} generators")
    size, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class ScalePlan:
    start: tuple[int, ...]  # ranks of the generators to start
    retire: tuple[int, ...]  # ranks of the generators to stop after this step

    def __bool__(self) -> bool:
        return bool(self.start or self.retire)


def scale_plan(ranks: list[int], target: int, next_rank: int) -> ScalePlan:
    """From the generators alive (`ranks`) to `target` of them: the newest retire first, new
    ones take ranks from `next_rank` on, which is above every rank the run has used (a retired
    generator's rank is not reused, even when it was the highest)."""
    check_generator_count(target, "the rollout generator target")
    alive = sorted(ranks)
    if alive and next_rank <= alive[-1]:
        raise ValueError(f"next_rank={next_rank} is not above the ranks alive, {alive}")
    return ScalePlan(
        start=tuple(range(next_rank, next_rank + max(0, target - len(alive)))),
        retire=tuple(alive[target:]),
    )


def check_generator_count(count: object, what: str) -> int:
    """A number of generators a user asked for: a whole number >= 1."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserInputError(f"{what} must be a whole number >= 1, got {count!r}")
    return count
