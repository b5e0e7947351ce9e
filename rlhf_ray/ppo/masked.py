"""Means, variances and whitening over the real tokens of padded (B, T) tensors, pure torch.

A `mask` is a float or bool (B, T) tensor, 1 for real response tokens (including the EOS
token) and 0 for the padding after it. Padding never enters a mean, a variance or a loss: masked
positions are selected away with `torch.where`, so even inf/nan on padding cannot leak in.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of values (any float shape) over mask == 1 (same shape). An all-zero mask gives 0."""
    m = mask.bool()
    total = torch.where(m, values, 0).sum() if dim is None else torch.where(m, values, 0).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def sequence_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows of each row's masked mean: values, mask (B, T) -> scalar. Every response
    weighs the same whatever its length (GRPO's 1/G sum_i 1/|o_i| sum_t); `masked_mean` weighs
    every token the same instead. A row without real tokens contributes 0."""
    return masked_mean(values, mask, dim=1).mean()


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Scalar variance of values over mask == 1; Bessel's n/(n-1) when unbiased (n >= 2)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum().to(var.dtype)
        var = var * n / (n - 1).clamp(min=1)  # n == 1 leaves var == 0
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(values - mean) / sqrt(var + 1e-8) over masked elements of values (B, T); 0 on padding.

    shift_mean=False adds the mean back (only rescales), as lm-human-preferences does for
    rewards; advantages are whitened with shift_mean=True. [lm-hp] utils/core.py `whiten`,
    [N-impl] "Advantage whitening" / "Reward whitening".
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    white = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return torch.where(mask.bool(), white, 0)
