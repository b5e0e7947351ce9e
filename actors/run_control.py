"""RunControl: a running PPO job's handle for `rlhf-ray scale`. It holds the number of rollout
generators asked for, or that the count follows the cluster (ppo.rollout_scaling auto, until
`rlhf-ray scale` fixes a count); the driver reads it between steps and reports what is alive."""

from __future__ import annotations

import ray

from rlhf_ray.ppo.scaling import check_generator_count


@ray.remote(num_cpus=0)
class RunControl:
    def __init__(self, output_dir: str, generators: int, auto: bool) -> None:
        self.output_dir = output_dir
        self.target, self.auto = generators, auto
        self.status: dict = {"output_dir": output_dir, "generators": [], "step": 0}

    def scale_rollout(self, count: int) -> dict:
        """Ask for `count` generators from the next step on (auto scaling, if on, ends);
        -> the status before, the target now and whether auto scaling was on. A count below
        1 is refused (UserInputError, re-raised to the caller)."""
        self.target = check_generator_count(count, "--rollout")
        was_auto, self.auto = self.auto, False
        return {**self.status, "target": self.target, "was_auto": was_auto}

    def rollout_target(self) -> tuple[int, bool]:
        """(generators asked for, whether the count follows the cluster instead)."""
        return self.target, self.auto

    def report(self, status: dict) -> None:
        """The driver's view after each step: the step and the generators alive."""
        self.status = {"output_dir": self.output_dir, **status}
