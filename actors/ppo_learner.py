"""PPOLearner: the policy (SFT + LoRA) and the critic (from the reward model), updated by PPO.

One rank of the learner group (jobs/ppo/learner_group.py): with resources.learner_workers N,
N of these join one torch.distributed group and train every step together."""

from __future__ import annotations

import os
import socket

import ray

from rlhf_ray.errors import RoleFailed, UserInputError
from rlhf_ray.ppo.data_parallel import Ranks, join_group
from rlhf_ray.ppo.messages import Weights
from rlhf_ray.ppo.settings import LearnerSettings
from rlhf_ray.run.busy import BusyClock
from rlhf_ray.run.console import quiet_libraries, skip_bitsandbytes


@ray.remote
class PPOLearner:
    def __init__(self, settings: LearnerSettings, timeout_s: float, ranks: Ranks) -> None:
        skip_bitsandbytes(settings.policy.quantization.load_in_4bit)  # before peft is imported
        quiet_libraries()  # before any library loads a model
        # Imported here, in the role's process: the driver imports this module only to create
        # the actor, and never needs the model libraries the core imports (~4 s of CPU).
        from rlhf_ray.ppo.learner import LearnerCore

        self.learner = LearnerCore(settings)
        self.settings, self.timeout_s, self.ranks = settings, timeout_s, ranks
        self.busy = BusyClock()  # the update itself, not the wait for its inputs

    def ready(self) -> int:
        return os.getpid()

    def address(self) -> tuple[str, int]:
        """(this node's address, a port free on it now): where the group meets, on rank 0."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, address: str, port: int) -> int:
        """Join the group at rank 0's address; from now on every update is the group's."""
        import torch

        gpu = self.settings.policy.gpus > 0 and torch.cuda.is_available()
        join_group(address, port, self.ranks, self.timeout_s, gpu)
        self.learner.use_ranks(self.ranks)
        return self.ranks.rank

    def version(self) -> int:
        """Updates done: the version the next weights sync carries."""
        return self.learner.version

    def weights(self) -> Weights:
        """Trainable tensors only; stored once in the object store, read by every generator."""
        with self.busy.working():
            return self.learner.weights()

    def train(self, shards: list[tuple], scores: list) -> dict[str, float]:
        """`shards`: (RolloutBatch ref, reference-logprobs ref) per generator; `scores`: [the
        ref of the scorer's Scores for all of them]. Refs inside lists are not resolved by Ray
        before the call, so they are fetched here, where a failure names the role that failed."""
        batches, refs = zip(*shards, strict=True)
        batches = self._fetch(batches, "a rollout generator")
        scores = self._fetch(scores, "the reward scorer")[0]
        refs = self._fetch(refs, "the reference model")
        with self.busy.working():
            return self.learner.train(batches, scores, refs)

    def busy_seconds(self) -> float:
        return self.busy.seconds

    def _fetch(self, refs, role: str) -> list:
        """The results of one role's calls; an error says which role failed, and why. A
        mistake of the user's (a reward function that raised) is passed on as it is."""
        try:
            return ray.get(list(refs), timeout=self.timeout_s)
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, UserInputError):
                raise err.cause from None
            raise RoleFailed(f"{role} failed: {err}") from err
        except ray.exceptions.RayError as err:
            raise RoleFailed(f"{role} failed (after its restarts, if any): {err}") from err

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(tensors, JSON state) for a PPO checkpoint: rank 0's weights, optimizers, RNG and
        version; another rank's RNG alone. Every rank is called (a sharded critic is gathered)."""
        return self.learner.checkpoint_state()

    def trainable_digest(self) -> dict[str, str]:
        """Model -> a hash of this rank's trainable tensors: equal on every rank under DDP."""
        return self.learner.trainable_digest()

    def restore(self, tensors: dict, state: dict) -> int:
        self.learner.restore(tensors, state)
        return self.learner.version

    def export(self, out_dir: str, run_metrics: dict, step_weights: str | None = None) -> str:
        self.learner.export(out_dir, run_metrics, step_weights)
        return out_dir

    def stage(self, out_dir: str, run_metrics: dict) -> str:
        self.learner.stage(out_dir, run_metrics)
        return out_dir
