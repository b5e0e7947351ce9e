"""What each role asks Ray for: CPUs, GPUs, workers, threads, placement."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rlhf_ray.config.section import Section

RAY_RESOURCE_UNIT = 0.0001  # Ray rounds resource amounts to 4 decimal places
ROLES = ("train_worker", "rollout", "reward", "reference", "learner")
LEARNER_PLACEMENTS = ("pack", "spread")
TRAIN_SHARDINGS = ("ddp", "fsdp")


# Where more GPUs do help, by role (ResourcesConfig's check of *_gpus)
MORE_GPUS = {
    "train_worker": "; to use more GPUs, raise resources.train_workers",
    "rollout": "; to use more GPUs, raise ppo.num_rollout_actors",
}


@dataclass(frozen=True)
class ResourcesConfig(Section):
    """What each role asks Ray for. Fractions of a GPU let roles share one device."""

    section: ClassVar[str] = "resources"
    train_workers: int = 1  # Ray Train data-parallel workers for SFT and the reward model
    train_worker_cpus: float = 1.0  # CPUs per Ray Train worker
    train_worker_gpus: float = 0.0  # GPUs per Ray Train worker
    # Times Ray Train restarts the SFT or reward workers after one dies, from the last epoch
    # checkpoint; past that the phase fails (its checkpoints are kept for a rerun).
    train_worker_restarts: int = 2
    # how the SFT and reward workers train as one: ddp (each holds the whole model; gradients
    # averaged during the backward pass) or fsdp (FSDP2: weights, gradients and optimizer state
    # sharded over the workers, for a model one worker cannot hold). Same result up to float
    # rounding; with one worker nothing is wrapped.
    train_sharding: str = "ddp"
    rollout_cpus: float = 1.0  # CPUs per rollout generator
    rollout_gpus: float = 0.0  # GPUs per rollout generator
    reward_cpus: float = 0.5  # CPUs of the reward scorer
    reward_gpus: float = 0.0  # GPUs of the reward scorer
    reference_cpus: float = 0.5  # CPUs of the reference model
    reference_gpus: float = 0.0  # GPUs of the reference model
    learner_cpus: float = 1.0  # CPUs of the PPO learner (policy + critic)
    learner_gpus: float = 0.0  # GPUs of the PPO learner
    # torch threads of the learner; 0: as many as learner_cpus. More than learner_cpus borrows
    # cores the generators reserved, which without ppo.overlap sit idle during the update
    # (measured: 2 threads update 1.5x faster; 2 threads per generator gained nothing).
    learner_threads: int = 0
    # PPO learner ranks: each trains on its slice of every minibatch, gradients averaged by
    # torch.distributed DDP (gloo on CPU, NCCL on GPU); learner_cpus, learner_gpus and
    # learner_threads are per rank
    learner_workers: int = 1
    # how Ray's placement group lays out the learner ranks: pack (as few nodes as can hold
    # them) or spread (one per node where it can)
    learner_placement: str = "pack"
    # how the learner ranks hold a full-parameter critic (reward.method full, ppo.estimator
    # gae): ddp (each rank holds it whole) or fsdp (FSDP2: its weights, gradients and AdamW
    # moments sharded over the ranks). The LoRA policy is always under DDP: its frozen base is
    # the same on every rank, its adapter small.
    learner_sharding: str = "ddp"

    def validate(self) -> None:
        self.positive("train_workers", "learner_workers")
        self.one_of("train_sharding", TRAIN_SHARDINGS)
        self.one_of("learner_placement", LEARNER_PLACEMENTS)
        self.one_of("learner_sharding", TRAIN_SHARDINGS)
        self.non_negative("train_worker_restarts", "learner_threads")
        for role in ROLES:
            for kind in ("cpus", "gpus"):
                key = f"{role}_{kind}"
                amount = getattr(self, key)
                self.check(
                    amount == 0 or amount >= RAY_RESOURCE_UNIT,
                    key,
                    f"0 or at least {RAY_RESOURCE_UNIT} (Ray's smallest unit)",
                )
                self.non_negative(key)
            # Each role (and each Ray Train worker) runs on one device: a second GPU would be
            # reserved and left idle. Data parallelism over GPUs comes from more train workers
            # (SFT, reward) or more rollout generators; vLLM tensor parallelism and a learner
            # over several GPUs are not built yet.
            self.check(
                getattr(self, f"{role}_gpus") <= 1,
                f"{role}_gpus",
                "at most 1 (a fraction shares one GPU): the role runs on one device, and more "
                f"would be reserved and sit idle{MORE_GPUS.get(role, '')}",
            )

    @property
    def learner_torch_threads(self) -> int:
        """The PPO learner's torch threads: learner_threads, or as many as its whole CPUs."""
        return self.learner_threads or max(1, int(self.learner_cpus))
