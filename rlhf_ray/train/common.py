"""What the SFT and reward-model loops share on their workers: set-up, the model to train, their
shares of the data, the optimizer and its schedule, progress lines. How the workers train as one
model (DDP or FSDP2) is rlhf_ray/train/sharding.py.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass

import torch
from peft import TaskType
from transformers import PreTrainedModel

from rlhf_ray.config import LoraConfig, RewardConfig, SFTConfig
from rlhf_ray.models.adapters import add_lora
from rlhf_ray.models.loading import use_cpus
from rlhf_ray.run.console import Lines, quiet_libraries


@dataclass(frozen=True)
class Worker:
    rank: int
    world: int
    device: torch.device
    sharded: bool  # FSDP2 over several workers: each holds a shard of every weight

    @property
    def is_chief(self) -> bool:
        return self.rank == 0


def worker_setup(cpus: float, seed: int, sharding: str) -> Worker:
    """Threads to match the CPUs Ray gave us, the torch seed, the device, and whether the model
    is sharded (`sharding` "fsdp" over several workers; rlhf_ray/train/sharding.py).

    Torch gets the base seed on every rank, not `seed + rank`: the model's random parts (a new
    reward head, LoRA's `lora_A`) start equal on all ranks (and `sharding.wrap` then makes sure
    of it from rank 0), because averaged gradients applied to different weights never
    converge. Data order differs per rank through the loops' own `random.Random(seed + rank)`.
    """
    import ray.train
    import ray.train.torch

    quiet_libraries()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_cpus(cpus)
    torch.manual_seed(seed)
    return Worker(
        rank, world, ray.train.torch.get_device(), sharded=world > 1 and sharding == "fsdp"
    )


def ready_to_train(
    model: PreTrainedModel,
    worker: Worker,
    lora: LoraConfig | None,
    task: TaskType,
    gradient_checkpointing: bool,
) -> torch.nn.Module:
    """The model as a loop trains it, not yet wrapped (`sharding.wrap`): with a new LoRA adapter
    when `lora` is given, on this worker's device in train mode.

    Call after `worker_setup`: the random parts (a new reward head, LoRA's `lora_A`) are drawn
    from its shared seed.
    """
    if lora is not None:
        model = add_lora(model, lora, task, gradient_checkpointing)
    return model.to(worker.device).train()


def step_count(examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of a loop over `examples` per rank: ceil(examples / batch_size) a pass."""
    return -(-examples // batch_size) * epochs


def shard(items: list, rank: int, world: int) -> list:
    """This rank's share; short shards wrap around so every rank takes the same step count."""
    per_rank = -(-len(items) // world)  # ceil
    return [items[(rank + world * i) % len(items)] for i in range(per_rank)]


def batches(items: list, batch_size: int, rng: random.Random) -> list[list]:
    order = items[:]
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def phase_optimizer(params: list, phase: SFTConfig | RewardConfig) -> torch.optim.AdamW:
    """AdamW at the phase's peak learning rate (the schedule scales it) and weight decay."""
    return torch.optim.AdamW(params, lr=phase.lr, weight_decay=phase.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float = 0.05):
    """Linear warm-up over the first `warmup_frac` of steps, then cosine decay to 10%.

    Not transformers' `get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=0.1)`: the same
    rates after the warm-up, but its warm-up runs one step behind, from 0, so its first step
    would move no weight (a quarter of a 4-step run; tests/test_optimizers.py)."""
    warmup = max(1, int(total_steps * warmup_frac))

    def scale(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, scale)


class ProgressLines:
    """Progress lines from the chief worker, about every 10% of the steps, with time left.

    Straight to the process's stdout: Ray Train's patched `print` would send a line both there
    and through its logger, and the console would show it twice.
    """

    def __init__(self, name: str, total: int, worker: Worker, done: int = 0) -> None:
        self.lines = Lines(name, total, done, enabled=worker.is_chief)

    def update(self, step: int, **values: float) -> None:
        line = self.lines.line(step, **{k: f"{v:.4f}" for k, v in values.items()})
        if line:
            print(line, file=sys.__stdout__, flush=True)
