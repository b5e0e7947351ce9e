"""How the SFT and reward workers train as one model (`resources.train_sharding`).

  ddp   Ray Train's `prepare_model` wraps the model in DistributedDataParallel. At wrap time it
        broadcasts rank 0's trainable weights, so every rank starts from the same ones; each
        backward pass then averages the gradients over the ranks in buckets, overlapping the
        rest of the backward. Every rank holds the whole model and optimizer.
  fsdp  FSDP2 (`fully_shard`) on each decoder layer and on the root: each rank holds 1/N of
        every weight (frozen ones too), gradient and optimizer moment, as DTensors. A layer's
        weights are gathered just before its forward and backward, its gradients
        reduce-scattered after. For a model one worker cannot hold; the same result as ddp up to
        float rounding (the reductions sum in another order).
With one worker nothing is wrapped, and a step is what it is without Ray Train.

The loops run their training forward through what `wrap` returns (the hooks that ready DDP's
reduction, or gather FSDP2's shards, fire on its forward) and keep the model itself for names,
checkpoints and saving: its parameter names never gain a `module.` prefix. Under FSDP2 a whole
tensor exists on no rank, so reading one (a checkpoint, the saved model) is a collective that
every rank takes part in, in the same order; that is what the functions below do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from rlhf_ray.models.loading import load_trainable_state, trainable_state
from rlhf_ray.run.saved_state import optimizer_from_tensors, optimizer_to_tensors
from rlhf_ray.train.common import Worker


def wrap(module: torch.nn.Module, worker: Worker) -> torch.nn.Module:
    """`module` as its training forward runs on `worker`: as it is with one worker, else under
    DDP or sharded by FSDP2 (in place: its parameters become DTensors, so take the optimizer's
    parameters after this)."""
    if worker.world == 1:
        return module
    if worker.sharded:
        return fully_shard_model(module, worker.is_chief)
    return _ddp(module)


def _ddp(module: torch.nn.Module) -> torch.nn.Module:
    """DDP over the trainable parameters only: frozen weights (a 4-bit base) and buffers (rotary
    tables) come from the same files on every rank, and are neither broadcast nor checked."""
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    # already on its device (`ready_to_train`; a 4-bit model is placed at load)
    return ray.train.torch.prepare_model(module, move_to_device=False, parallel_strategy="ddp")


def fully_shard_model(module: torch.nn.Module, chief: bool) -> torch.nn.Module:
    """FSDP2 on every decoder layer (each gathered on its own, so at most one layer is whole at
    a time) and on the root (the embeddings, final norm and head), then rank 0's trainable
    weights loaded into every rank's shards: FSDP2 keeps each rank's own slice and checks
    nothing, and the ranks' random parts (a new head, LoRA's `lora_A`) are equal only while
    nothing drew from torch's RNG on one rank and not the other. `chief`: this is rank 0.
    Also the PPO learner's full-parameter critic (rlhf_ray/ppo/learner.py)."""
    first = trainable_state(module) if chief else {}
    layers = {c for m in module.modules() for c in getattr(m, "_no_split_modules", None) or ()}
    for sub in module.modules():
        if type(sub).__name__ in layers:
            fully_shard(sub)
    fully_shard(module)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(module, first, options=options)
    return module


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole tensor (a collective: every rank calls it), else `tensor` itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _shard_like(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` (whole, on every rank) as this rank's shard of it when `param` is sharded and of
    its shape; else `tensor` itself. No communication: each rank cuts its own slice."""
    if not isinstance(param, DTensor) or tensor.shape != param.shape:
        return tensor
    local = tensor.to(param.device_mesh.device_type)
    return distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None)


def optimizer_step(optimizer: torch.optim.Optimizer, params: list, max_grad_norm: float) -> float:
    """Clip the gradients to a global norm, step, clear them; returns the norm before clipping.
    The gradients are already averaged over the ranks (DDP or FSDP2 did it in the backward);
    under FSDP2 `clip_grad_norm_` takes the norm over every rank's shards."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(whole(norm))


def whole_trainable_state(model: torch.nn.Module, worker: Worker) -> dict | None:
    """The chief: `trainable_state(model)`, every tensor whole; the other ranks: None. Every
    rank calls it (under FSDP2 each tensor is gathered, one at a time)."""
    if not worker.sharded:
        return trainable_state(model) if worker.is_chief else None
    state = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensor = whole(param.detach())
            if worker.is_chief:
                state[name] = tensor.to("cpu", copy=True)
    return state if worker.is_chief else None


def load_whole_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """`load_trainable_state` from whole tensors (every rank holds them), into shards too."""
    params = dict(model.named_parameters())
    load_trainable_state(model, {n: _shard_like(params.get(n), t) for n, t in state.items()})


def whole_optimizer_state(optimizer: torch.optim.Optimizer, worker: Worker) -> tuple | None:
    """The chief: `optimizer_to_tensors(optimizer)`, every moment whole; the other ranks: None.
    Every rank calls it (under FSDP2 each moment is gathered)."""
    if not worker.sharded:
        return optimizer_to_tensors(optimizer) if worker.is_chief else None

    def gathered(tensor: torch.Tensor) -> torch.Tensor:  # kept by the chief alone
        tensor = whole(tensor)
        return tensor if worker.is_chief else tensor.new_empty(0)

    tensors, groups = optimizer_to_tensors(optimizer, gathered)
    return (tensors, groups) if worker.is_chief else None


def load_whole_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list
) -> None:
    """`optimizer_from_tensors` from whole moments (every rank holds them), into shards too:
    "<param index>.<key>" names a moment of the optimizer's index-th parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    local = {n: _shard_like(params[int(n.split(".", 1)[0])], t) for n, t in tensors.items()}
    optimizer_from_tensors(optimizer, local, param_groups)


def trained_model(
    model: torch.nn.Module, worker: Worker, rebuild: Callable[[], torch.nn.Module]
) -> torch.nn.Module | None:
    """The trained model whole, for the chief to evaluate and save; None on the other ranks.
    Every rank calls it. Under FSDP2 no rank holds it whole, so the chief builds it again
    (`rebuild`: as the loop built `model`, not wrapped) and loads the gathered trainable
    weights; the frozen ones come from the same files."""
    if not worker.sharded:
        return model if worker.is_chief else None
    state = whole_trainable_state(model, worker)
    if not worker.is_chief:
        return None
    plain = rebuild()
    load_trainable_state(plain, state)
    return plain
