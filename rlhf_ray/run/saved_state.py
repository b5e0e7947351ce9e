"""Training state as tensors and JSON, for checkpoints that never pickle: prefixed tensor
names, an optimizer's state, torch's RNG states."""

from __future__ import annotations

from collections.abc import Callable

import torch


def with_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{name}": tensor for name, tensor in tensors.items()}


def under_prefix(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors whose names start with `prefix`, with the prefix taken off."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _itself(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def optimizer_to_tensors(
    optimizer: torch.optim.Optimizer, whole: Callable[[torch.Tensor], torch.Tensor] = _itself
) -> tuple[dict[str, torch.Tensor], list]:
    """An optimizer's state as (tensors "<param index>.<key>", param_groups as JSON); the
    tensors are copies on the CPU, so later steps do not change them and a process without a
    GPU (the driver, on a CPU-only head) can read them. Loading moves them back to each
    parameter's device (`Optimizer.load_state_dict`). `whole`: a sharded tensor's whole tensor
    (rlhf_ray/train/sharding.py), called on every tensor in the same order on every rank."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": whole(value.detach()).to("cpu", copy=True)
        if torch.is_tensor(value)
        else torch.tensor(value)
        for index, per_param in state["state"].items()
        for key, value in per_param.items()
    }
    return tensors, state["param_groups"]


def optimizer_from_tensors(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list
) -> None:
    """Load what `optimizer_to_tensors` saved into an optimizer over the same parameters."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, key = name.split(".", 1)
        per_param.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": per_param, "param_groups": param_groups})


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and every CUDA device) as uint8 tensors."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states |= {f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = sorted((k for k in states if k.startswith("cuda")), key=lambda k: int(k[4:]))
    if cuda:
        torch.cuda.set_rng_state_all([states[k] for k in cuda])
