"""ALiBi attention biases in MPT's formulation."""

from __future__ import annotations

import math

import torch


def alibi_slopes(num_heads: int, bias_max: float = 8.0, device: torch.device | None = None) -> torch.Tensor:
    """Per-head slopes (H,). For head counts that are not a power of two, MPT interleaves the slopes of the next
    power of two (odd ones first) and keeps the first H."""
    n = 2 ** math.ceil(math.log2(num_heads))
    base = torch.arange(1, n + 1, dtype=torch.int64, device=device).float() * (bias_max / n)
    slopes = 1.0 / torch.pow(2, base)
    if n != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def alibi_bias(slopes: torch.Tensor, key_length: int) -> torch.Tensor:
    """(1, H, 1, K) fp32 bias: slope * (j - (K - 1)).

    It is relative to the last key rather than to each query; softmax is invariant to a per-row constant, so this
    equals slope * (j - i) where it matters, and it needs no position ids (left padding shifts every row alike).
    """
    distance = torch.arange(1 - key_length, 1, dtype=torch.int32, device=slopes.device)
    return (distance.view(1, 1, 1, key_length) * slopes.view(1, -1, 1, 1)).float()
