"""Per-epoch checkpoints of the SFT and reward-model loops, through Ray Train.

Each epoch ends with `ray.train.report(metrics, checkpoint)`, so the epoch's metrics show in the
Ray dashboard's Train view and its state survives:
  rank-<r>.safetensors  every rank: its torch RNG states (LoRA dropout draws from them)
  rank-<r>.json         every rank: its data-order RNG (`random.Random.getstate()`)
  trainable.safetensors the chief: the weights that train, whole (under FSDP2 every rank
                        holds a shard; they are gathered)
  optimizer.safetensors the chief: the optimizer's moments, whole (gathered as well)
  state.json            the chief: epochs done, step, optimizer param groups, LR schedule
Whole tensors make the checkpoint the same under ddp and fsdp (`resources.train_sharding`), so
a run may continue from it under either; every rank loads them and keeps its shard.
Ray Train copies every rank's files into one `<storage>/<phase>/checkpoint_*/` and records it
only once all are there. When a worker dies, Ray Train restarts the group (`FailureConfig`) and
`ray.train.get_checkpoint()` returns the newest recorded one; a stopped job run again with the
same output_dir finds the same run in storage and does the same. Nothing is pickled.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf_ray.run.saved_state import rng_state, set_rng_state
from rlhf_ray.train.common import Worker
from rlhf_ray.train.sharding import (
    load_whole_optimizer_state,
    load_whole_trainable_state,
    whole_optimizer_state,
    whole_trainable_state,
)

TRAINABLE_FILE, OPTIMIZER_FILE, STATE_FILE = (
    "trainable.safetensors",
    "optimizer.safetensors",
    "state.json",
)


@dataclass(frozen=True)
class Position:
    """Where a loop stands: epochs finished, optimizer steps taken in them, and the metrics
    the last epoch reported."""

    epochs_done: int = 0
    step: int = 0
    shown: dict = field(default_factory=dict)


@dataclass
class LoopState:
    """What a training loop checkpoints: it changes in place as the loop trains."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    data_rng: random.Random  # this rank's shuffling of its shard


def _rank_files(rank: int) -> tuple[str, str]:
    return f"rank-{rank}.safetensors", f"rank-{rank}.json"


def save_epoch(phase: str, loop: LoopState, worker: Worker, position: Position) -> None:
    """Report the end of an epoch to Ray Train with this rank's part of the checkpoint.

    Every rank must call it (Ray Train waits for all, and under FSDP2 each whole tensor is
    gathered from all); `position.shown` (plain floats) is what the Train view shows.
    """
    import ray.train

    started = time.perf_counter()
    trainable = whole_trainable_state(loop.model, worker)  # None but on the chief
    moments = whole_optimizer_state(loop.optimizer, worker)
    with tempfile.TemporaryDirectory(prefix="rlhf-ray-epoch-") as tmp:
        folder = Path(tmp)
        tensors_file, json_file = _rank_files(worker.rank)
        save_file(rng_state(), folder / tensors_file)
        (folder / json_file).write_text(json.dumps(loop.data_rng.getstate()))
        if worker.is_chief:
            _save_chief_part(trainable, moments, loop, position, folder)
        size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        metrics = {"epoch": position.epochs_done, "step": position.step, **position.shown}
        checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)  # returns once it is in storage
    if worker.is_chief:
        seconds = time.perf_counter() - started
        epoch = position.epochs_done
        line = f"[{phase}] epoch {epoch} checkpoint: {size_mb:.1f} MiB in {seconds:.2f}s"
        print(line, file=sys.__stdout__, flush=True)  # once on the console, as in ProgressLines


def _save_chief_part(
    trainable: dict, moments: tuple[dict, list], loop: LoopState, position: Position, folder: Path
) -> None:
    save_file(trainable, folder / TRAINABLE_FILE)
    tensors, groups = moments
    save_file(tensors, folder / OPTIMIZER_FILE)
    state = {
        "epochs_done": position.epochs_done,
        "step": position.step,
        "shown": position.shown,
        "param_groups": groups,
        "schedule": loop.schedule.state_dict(),
    }
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))


def restore_latest(phase: str, loop: LoopState, worker: Worker) -> Position:
    """Load Ray Train's newest checkpoint of this run into `loop`, if there is one; returns
    where to continue. Call after the model, optimizer and schedule are built as for a new run.
    The chief says so on the console: after a worker failed, this is where the group went on."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Position()
    with checkpoint.as_directory() as tmp:
        position = _load(loop, worker, Path(tmp))
    if worker.is_chief:
        print(
            f"[{phase}] continuing from the checkpoint of epoch {position.epochs_done} (step "
            f"{position.step}): the workers restarted after a failure, or the run resumed",
            file=sys.__stdout__,
            flush=True,
        )
    return position


def _load(loop: LoopState, worker: Worker, folder: Path) -> Position:
    tensors_file, json_file = _rank_files(worker.rank)
    if not (folder / tensors_file).is_file():
        raise FileNotFoundError(
            f"{folder}: this epoch checkpoint has no state for worker rank {worker.rank}; it was "
            "written by fewer Ray Train workers than this run has (resources.train_workers)"
        )
    state = json.loads((folder / STATE_FILE).read_text())
    trainable = load_file(folder / TRAINABLE_FILE, device=str(worker.device))
    load_whole_trainable_state(loop.model, trainable)
    moments = load_file(folder / OPTIMIZER_FILE)
    load_whole_optimizer_state(loop.optimizer, moments, state["param_groups"])
    loop.schedule.load_state_dict(state["schedule"])
    set_rng_state(load_file(folder / tensors_file))
    version, internal, gauss = json.loads((folder / json_file).read_text())
    loop.data_rng.setstate((version, tuple(internal), gauss))
    return Position(state["epochs_done"], state["step"], state["shown"])
