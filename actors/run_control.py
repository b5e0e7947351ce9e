"""RunControl: a running PPO job's handle for `rlhf-ray scale`. It holds the number of rollout
generators asked for; the driver reads it between steps and reports back what is alive."""

from __future__ import annotations

import ray

from rlhf_ray.ppo.scaling import check_generator_count


@ray.remote(num_cpus=0)
class RunControl:
    def __init__(self, output_dir: str, generators: int) -> None:
        self.output_dir = output_dir
        self.target = generators
        self.status: dict = {"output_dir": output_dir, "generators": [], "step": 0}

    def scale_rollout(self, count: int) -> dict:
        """Ask for `count` generators from the next step on; -> the status before, and the
        target now. A count below 1 is refused (UserInputError, re-raised to the caller)."""
        self.target = check_generator_count(count, "--rollout")
        return {**self.status, "target": self.target}

    def rollout_target(self) -> int:
        return self.target

    def report(self, status: dict) -> None:
        """The driver's view after each step: the step and the generators alive."""
        self.status = {"output_dir": self.output_dir, **status}

    def describe(self) -> dict:
        return {**self.status, "target": self.target}
