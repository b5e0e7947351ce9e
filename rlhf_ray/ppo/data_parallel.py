"""The PPO learner's ranks, Ray-free: one torch.distributed process group, DDP for the update.

Every rank holds the whole step's batch (the object store shares it), so every batch statistic
is computed once over all of it, identically on every rank: reward and advantage whitening,
RLOO / GRPO group baselines, REINFORCE++ normalisation. Ranks split only the model passes:
  - the no-grad passes (the learner's own logprobs, the critic's values): rank r computes rows
    r*B/N .. (r+1)*B/N - 1 and `gather_rows` gives every rank all B;
  - each minibatch of M rows: rank r trains on its M/N rows. Its loss is scaled so that DDP's
    average over ranks of the gradients is the gradient of the loss over the whole minibatch
    (`loss_scale`), then clipped on that global norm.
With one rank nothing is wrapped or sent, and every scale is exactly 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's equal slice of `rows` (1-D indices; len divisible by world, checked by
        the config: ppo.minibatch_size is a multiple of resources.learner_workers)."""
        return rows.tensor_split(self.world)[self.rank]

    def gather_rows(self, mine: torch.Tensor) -> torch.Tensor:
        """(B/N, ...) this rank's rows -> (B, ...) every rank's, in rank order."""
        if not self.distributed:
            return mine
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine.contiguous())
        return torch.cat(parts)

    def loss_scale(self, mine: float, whole: float) -> float:
        """The factor on this rank's mean loss over `mine` (its count of tokens or rows) for a
        mean over `whole` (the minibatch's count), given that DDP averages over ranks:
        N * mine / whole, so the ranks' gradients average to the whole minibatch's (exactly 1
        with one rank)."""
        return self.world * mine / whole

    def global_means(
        self, means: dict[str, float], counts: dict[str, float], device: torch.device
    ) -> dict[str, float]:
        """Each stat's mean over the whole minibatch from every rank's mean over its rows,
        weighted by the count (tokens or rows) it was taken over; reduced on `device` (the
        models': NCCL reduces GPU tensors only)."""
        if not self.distributed:
            return means
        names = sorted(means)
        weighted = [[means[n] * counts[n] for n in names], [counts[n] for n in names]]
        sums = torch.tensor(weighted, dtype=torch.float64, device=device)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return {n: (sums[0, i] / sums[1, i]).item() for i, n in enumerate(names)}

    def global_max(self, value: torch.Tensor, device: torch.device) -> float:
        """The largest of every rank's scalar `value`."""
        if not self.distributed:
            return value.item()
        top = value.detach().to(device=device, dtype=torch.float64).reshape(1)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        return top.item()

    def wrap(self, module: torch.nn.Module | None) -> torch.nn.Module | None:
        """`module` under DDP when there are several ranks: its forward then readies the
        gradient reduction that its backward runs. Only trainable parameters are broadcast
        from rank 0 at the start and reduced: frozen weights and buffers (rotary tables, a
        4-bit base) come from the same files on every rank."""
        if module is None or not self.distributed:
            return module
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        device = next(module.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, forward_sync_buffers=False)


def join_group(address: str, port: int, ranks: Ranks, timeout_s: float, gpu: bool) -> None:
    """Join the learner's process group at rank 0's `address`:`port` (gloo on CPU, NCCL on
    GPU); a collective that waits longer than `timeout_s` (a rank died) raises."""
    dist.init_process_group(
        backend="nccl" if gpu else "gloo",
        init_method=f"tcp://{address}:{port}",
        rank=ranks.rank,
        world_size=ranks.world,
        timeout=timedelta(seconds=timeout_s),
    )
