"""WeightsBoard: the newest policy weights of a run whose vLLM generators sample in chunks
(`rollout.partial_chunk_tokens`). The driver posts each update's weights here as soon as the
learner has made them; a generator asks between chunks for weights newer than its own and goes
on sampling its batch with them, instead of loading them after its queued batches (partial
rollouts: a long response spans updates). It holds a ref, never the tensors."""

from __future__ import annotations

import ray

BOARD_PREFIX = "rlhf-weights:"  # + the run's output directory: one board per run


@ray.remote(num_cpus=0)
class WeightsBoard:
    def __init__(self) -> None:
        self.version, self.ref = -1, None

    def post(self, version: int, wrapped: list) -> None:
        """`wrapped`: [the ref of a `Weights`] (in a list, so Ray hands over the ref, not the
        tensors); an older version than the one posted is ignored."""
        if version > self.version:
            self.version, self.ref = version, wrapped[0]

    def newer_than(self, version: int) -> list:
        """[the ref of the posted Weights] if they are newer than `version`, else []."""
        return [self.ref] if self.version > version else []
