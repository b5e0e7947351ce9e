"""Per-token numbers from a causal LM's logits, pure torch: logprobs and entropy of sampled
tokens at a sampling temperature, and where responses end.

Shapes: B = batch, T = response length, V = vocabulary. [N-impl] Huang et al. 2024, "The N
Implementation Details of RLHF with PPO" (cited next to each trick below).
"""

from __future__ import annotations

import torch
from torch import Tensor


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """log_softmax(logits / temperature) at labels: logits (B, T, V) float, labels (B, T) int64
    -> (B, T) float32. Computed in float32 (bf16 logits are upcast).

    The logits must be divided by the *sampling* temperature at rollout, for the reference
    model and during the update, or the ratio/KL compare different distributions.
    [N-impl] "Scale the logits by sampling temperature"; [lm-hp] policy.py.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor, temperature: float) -> Tensor:
    """Entropy of softmax(logits / temperature): logits (B, T, V) finite float -> (B, T) float32."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def truncate_after_eos(
    response_ids: Tensor, eos_id: int, pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each sampled response (B, T) int64 after its first EOS.

    Returns ids (B, T) int64 with every token after the first EOS set to pad_id; mask (B, T)
    float32, 1.0 up to and including the first EOS (all 1.0 if there is none); has_eos (B,)
    bool. Only EOS ends a response: a pad_id sampled before EOS is a real token (pad != eos).
    [N-impl] "Truncate after EOS" / the EOS trick; [lm-hp] lm_tasks.py postprocess.
    """
    is_eos = response_ids == eos_id
    eos_before = is_eos.long().cumsum(1) - is_eos.long()  # EOS count strictly before t
    after = eos_before > 0
    ids = torch.where(after, torch.full_like(response_ids, pad_id), response_ids)
    return ids, (~after).float(), is_eos.any(1)


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of mask (B, T) -> (B,) int64; an all-zero row gives 0."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * mask.bool().long()).amax(1)
