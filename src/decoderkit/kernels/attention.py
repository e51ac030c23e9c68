"""Paged attention: causal attention that reads keys and values through block tables (see paged_attention.cpp).

Built and cached like the quantized matmul (`decoderkit.kernels`): compiled at first use, ``DECODERKIT_KERNELS=0``
turns it off, and without a compiler `available` is False (with one warning) so callers keep their torch path.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from decoderkit import kernels

_SOURCE = Path(__file__).with_name("paged_attention.cpp")


def available() -> bool:
    """Whether the paged-attention kernel is loaded (compiling it first if no cached build exists)."""
    return kernels.enabled() and _load()


@functools.cache
def _load() -> bool:
    return kernels.build_and_load(_SOURCE, "the server gathers each request's keys and values for attention "
                                           "instead of reading them in place")


def paged_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                    row_starts: torch.Tensor, positions: torch.Tensor, slopes: torch.Tensor | None, scale: float,
                    block_size: int) -> torch.Tensor:
    """Causal attention (N, H, D) float32 of query rows q (N, H, D) float32 over one layer of a block pool.

    keys, values: (rows, H_kv, D) float32 or bfloat16, buffer row ``table[b] * block_size + i`` holding position
    ``b * block_size + i``; tables (S, B) int64, one block table per sequence; sequence s owns query rows
    row_starts[s] .. row_starts[s + 1] - 1 (int64, S + 1), the first at position positions[s] (int64, S), each row
    attending to keys 0 .. its position. slopes: (H,) float32 ALiBi slopes or None. `available()` must be True."""
    if not _load():
        raise RuntimeError("the paged-attention kernel is not available (see decoderkit.kernels.attention)")
    return torch.ops.decoderkit_paged.paged_attention(q, keys, values, tables, row_starts, positions, slopes, scale,
                                                      block_size)
