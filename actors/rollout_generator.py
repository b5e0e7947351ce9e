"""RolloutGenerator: samples responses with a copy of the policy. N replicas, scaled freely."""

from __future__ import annotations

import os
import time

import ray

from rlhf_ray.ppo.messages import RolloutBatch, Weights, receipt
from rlhf_ray.ppo.settings import EngineSettings, PolicySettings
from rlhf_ray.run.busy import BusyClock
from rlhf_ray.run.console import quiet_libraries, skip_bitsandbytes
from rlhf_ray.run.saved_state import rng_state, set_rng_state


def pick_engine(engine: EngineSettings | None) -> tuple[str, str | None]:
    """The engine this generator samples with, decided here, on its own node: ("hf" or
    "vllm", why vLLM was not taken under rollout.engine auto, or None)."""
    if engine is None:
        return "hf", None
    why_not = engine.runs_here()
    if why_not is None:
        return "vllm", None
    if engine.auto:
        return "hf", why_not
    raise RuntimeError(f"rollout.engine vllm: {why_not}")


@ray.remote
class RolloutGenerator:
    def __init__(
        self,
        settings: PolicySettings,
        engine: EngineSettings | None,  # None: Hugging Face generate
        rank: int,
        learner: str,  # the actor name of the learner rank that serves the weights
        timeout_s: float,
        board: str | None = None,  # partial rollouts: the run's WeightsBoard actor name
    ) -> None:
        # before peft is imported; vLLM's imports are not ours to change
        skip_bitsandbytes(settings.quantization.load_in_4bit or engine is not None)
        quiet_libraries()  # before any library loads a model
        self.engine, self.why_not_vllm = pick_engine(engine)
        # Imported here, in the role's process: the driver imports this module only to create
        # the actor, and never needs the model libraries the engines import (~4 s of CPU).
        if self.engine == "hf":
            from rlhf_ray.ppo.rollout_generator import HFGeneratorCore

            self.generator = HFGeneratorCore(settings, rank)
        else:
            from rlhf_ray.ppo.vllm_generator import VllmGeneratorCore

            self.generator = VllmGeneratorCore(settings, engine, rank)
        self.busy = BusyClock()
        # Fresh start or restart after a crash: take the learner's current weights, so a
        # restarted generator never samples from a stale policy. The learner is found by name:
        # an actor handle among the arguments would put them in the object store, where a
        # restart depends on them staying (Ray says so at level E, ray-project/ray#53727).
        learner_rank = ray.get_actor(learner)
        self.generator.load_weights(ray.get(learner_rank.weights.remote(), timeout=timeout_s))
        self.board = ray.get_actor(board) if board else None
        self.timeout_s = timeout_s

    def _newer(self, version: int) -> Weights | None:
        """Partial rollouts: the weights posted on the board if newer than `version`."""
        posted = ray.get(self.board.newer_than.remote(version), timeout=self.timeout_s)
        return ray.get(posted[0], timeout=self.timeout_s) if posted else None

    def ready(self) -> int:
        return os.getpid()

    def engine_choice(self) -> tuple[str, str | None]:
        """("hf" or "vllm", why not vLLM where rollout.engine auto chose hf; else None)."""
        return self.engine, self.why_not_vllm

    def busy_seconds(self) -> float:
        return self.busy.seconds

    # Never run again by Ray, neither after a crash nor to rebuild a lost result: a batch
    # sampled again is another batch, and the scorer may have scored the first. The driver asks
    # again itself (PPOLoop.wait_sampled), before anything reads the batch.
    @ray.method(num_returns=2, max_task_retries=0)
    def generate(self, prompts: list[str], group: list[int]) -> tuple[RolloutBatch, dict]:
        """-> the batch (for the scorer, reference and learner) and a receipt the driver reads:
        rows, the policy version they were sampled with, and the seconds sampling took."""
        start = time.perf_counter()
        with self.busy.working():
            if self.board is None:
                batch = self.generator.generate(prompts, group)
            else:  # the vLLM engine: rollout.partial_chunk_tokens needs it
                batch = self.generator.generate(prompts, group, newer=self._newer)
        seconds = time.perf_counter() - start
        return batch, receipt(len(prompts), batch.policy_version, seconds)

    def evaluate(self, prompts: list[str], seed: int) -> RolloutBatch:
        """The held-out `prompts` (each once per sample) sampled with the weights loaded, from
        its own seed: the sampling RNG the training's batches draw from is left as it was, so a
        run samples the same training batches with or without evaluations."""
        import torch

        with self.busy.working(), torch.random.fork_rng():
            if self.board is not None:  # the step's weights may be on the board only
                weights = self._newer(self.generator.version)
                if weights is not None:
                    self.generator.load_weights(weights)
            torch.manual_seed(seed)
            return self.generator.generate(prompts, list(range(len(prompts))))

    def load_weights(self, weights: Weights) -> int:
        with self.busy.working():
            self.generator.load_weights(weights)
        return weights.version

    def rng_state(self) -> dict:
        """The sampling RNG after every batch asked of it so far (calls run in order)."""
        return rng_state()

    def set_rng_state(self, states: dict) -> None:
        set_rng_state(states)
