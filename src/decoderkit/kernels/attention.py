"""Causal attention that reads keys and values in place (see paged_attention.cpp): through a paged pool's block
tables (the server), or from a static cache up to the last written slot (generate's decode steps).

Built and cached like the quantized matmul (`decoderkit.kernels`): compiled at first use, ``DECODERKIT_KERNELS=0``
turns it off, and without a compiler `available` is False (with one warning) so callers keep their torch path.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from decoderkit import kernels

_SOURCE = Path(__file__).with_name("paged_attention.cpp")
_loaded = False  # set by the first successful load (a plain flag: compiled code can read it)


def available() -> bool:
    """Whether the paged-attention kernel is loaded (compiling it first if no cached build exists)."""
    return kernels.enabled() and _load()


def ready() -> bool:
    """`available()` where it can be answered without building: while torch compiles a graph (which cannot trace a
    compiler run), False unless an earlier call has loaded the kernel. DecodeStep loads it before compiling."""
    if torch.compiler.is_compiling():
        return _loaded and kernels.enabled()
    return available()


@functools.cache
def _load() -> bool:
    loaded = kernels.build_and_load(_SOURCE, "the server gathers each request's keys and values for attention "
                                             "instead of reading them in place")
    if loaded:
        global _loaded
        _loaded = True
        # What compilation sees of the static-cache op: the output has the shape of the queries
        torch.library.register_fake("decoderkit_paged::static_attention",
                                    lambda q, k, v, cache_position, key_mask, slopes, scale: torch.empty_like(q))
        # and of the paged op (the server's packaged decode step): one output row per query row
        for op in ("paged_attention", "prefill_attention"):
            torch.library.register_fake(f"decoderkit_paged::{op}",
                                        lambda q, k, v, tables, row_starts, positions, slopes, scale, block_size:
                                        torch.empty_like(q))
    return loaded


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


@functools.cache
def prefill_tiled(head_dim: int) -> bool:
    """Whether `prefill_attention` takes the tiled path for heads of `head_dim` values: the kernel is available and
    its build has it (AVX2, `head_dim` a multiple of 8). Elsewhere it computes exactly what `paged_attention` does."""
    if not available():
        return False
    import ctypes

    return bool(kernels.loaded_library(_SOURCE).decoderkit_prefill_tiled(ctypes.c_int64(head_dim)))


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                      row_starts: torch.Tensor, positions: torch.Tensor, slopes: torch.Tensor | None, scale: float,
                      block_size: int) -> torch.Tensor:
    """`paged_attention` for sequences of many query rows (prefill chunks): where `prefill_tiled(D)`, blocks of 64
    keys meet 64 query vectors as two register-blocked matrix products (scores, then probabilities times values),
    several times faster than one query vector at a time. The values equal paged_attention's up to float rounding
    (summation order), and each row's result depends only on its own queries and keys, not on the rows beside it."""
    if not _load():
        raise RuntimeError("the paged-attention kernel is not available (see decoderkit.kernels.attention)")
    return torch.ops.decoderkit_paged.prefill_attention(q, keys, values, tables, row_starts, positions, slopes,
                                                        scale, block_size)


def static_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cache_position: torch.Tensor,
                     key_mask: torch.Tensor | None, slopes: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Causal attention (B, T, H, D) float32 of query rows q (B, T, H, D) float32 at the consecutive slots
    `cache_position` (T,) of a static cache's keys and values (B, H_kv, S, D) float32 or bfloat16, reading slots 0
    .. cache_position[-1] only. key_mask: (B, S) bool, False for slots a row may not attend to (padding), or None.
    slopes: (H,) float32 ALiBi slopes or None. `available()` must be True."""
    if not (_loaded or _load()):  # the flag first: compiled code can read it, not the cached call
        raise RuntimeError("the attention kernel is not available (see decoderkit.kernels.attention)")
    return torch.ops.decoderkit_paged.static_attention(q, keys, values, cache_position, key_mask, slopes, scale)
