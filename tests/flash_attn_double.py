"""A CPU stand-in for the flash_attn package: `flash_attn_func` and `flash_attn_varlen_func` in plain PyTorch.

It follows the kernels' documented semantics, not decoderkit's code, so the flash_attention_2 backend's plumbing (what
it slices, unpads and aligns) can be tested where no GPU is:

- q (B, Tq, H, D), k / v (B, Tk, H_kv, D); the varlen form takes (total, H, D) with int32 cu_seqlens (sequences+1,).
- H must be a multiple of H_kv: query head h reads key/value head h // (H / H_kv) (GQA / MQA).
- causal masks align to the bottom-right corner: query i attends key j iff j <= i + Tk - Tq.
- window_size (left, right) keeps keys in [i + Tk - Tq - left, i + Tk - Tq + right]; -1 is unbounded.
- alibi_slopes (H,) or (B, H), fp32, add -slope * |i + Tk - Tq - j| to the scaled scores.
- softmax_scale defaults to 1 / sqrt(D); softcap > 0 caps the scaled scores with softcap * tanh(s / softcap).
- a query that may attend no key gets zeros.

Unlike the kernels it takes fp32 on CPU (the tests' dtype), and it checks what the kernels require of their inputs
(matching dtypes and head dims, int32 cu_seqlens, max_seqlen covering every sequence) so a plumbing slip fails loudly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise ValueError(f"flash_attn double: {name} must be {rank}-D, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"flash_attn double: {name} must be contiguous in its last dimension")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attn double: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"flash_attn double: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"flash_attn double: {q.shape[-2]} query heads are not a multiple of {k.shape[-2]} kv heads")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float, scale: float, causal: bool,
            window_size: tuple[int, int], slopes: torch.Tensor | None, softcap: float) -> torch.Tensor:
    """One sequence: q (Tq, H, D), k / v (Tk, H_kv, D), slopes (H,) -> (Tq, H, D)."""
    Tq, H, _ = q.shape
    Tk = k.shape[0]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale  # (H, Tq, Tk)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    diagonal = torch.arange(Tq, device=q.device)[:, None] + Tk - Tq  # the key each query lines up with
    j = torch.arange(Tk, device=q.device)[None, :]
    if slopes is not None:
        scores = scores - slopes.double()[:, None, None] * (diagonal - j).abs()
    left, right = window_size
    if causal:
        right = 0
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    if left >= 0:
        allowed &= j >= diagonal - left
    if right >= 0:
        allowed &= j <= diagonal + right
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return torch.einsum("hqk,khd->qhd", probs, v.double()).to(q.dtype)


def _options(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs, batch):
    if return_attn_probs:
        raise NotImplementedError("flash_attn double: return_attn_probs is not implemented")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if alibi_slopes is not None:
        if alibi_slopes.dtype != torch.float32:
            raise ValueError(f"flash_attn double: alibi_slopes must be fp32, got {alibi_slopes.dtype}")
        heads = q.shape[-2]
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            raise ValueError(f"flash_attn double: alibi_slopes has shape {tuple(alibi_slopes.shape)}; expected "
                             f"({heads},) or ({batch}, {heads})")
        alibi_slopes = alibi_slopes.expand(batch, heads)
    return dict(dropout_p=dropout_p, scale=scale, causal=causal, window_size=tuple(window_size), softcap=softcap), \
        alibi_slopes


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Dense batch: q (B, Tq, H, D), k / v (B, Tk, H_kv, D) -> (B, Tq, H, D)."""
    _check(q, k, v, 4)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"flash_attn double: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}")
    options, slopes = _options(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                               return_attn_probs, q.shape[0])
    return torch.stack([_attend(q[b], k[b], v[b], slopes=None if slopes is None else slopes[b], **options)
                        for b in range(q.shape[0])])


def _lengths(cu: torch.Tensor, total: int, max_seqlen: int, name: str) -> list[int]:
    if cu.dtype != torch.int32 or cu.dim() != 1:
        raise ValueError(f"flash_attn double: cu_seqlens_{name} must be a 1-D int32 tensor, got {cu.dtype} "
                         f"{tuple(cu.shape)}")
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"flash_attn double: cu_seqlens_{name} {bounds} must rise from 0 to {total}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if max(lengths) > int(max_seqlen):
        raise ValueError(f"flash_attn double: max_seqlen_{name}={int(max_seqlen)} is below a sequence of "
                         f"{max(lengths)}")
    return bounds


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """Ragged batch: q (total_q, H, D), k / v (total_k, H_kv, D), sequence b at rows cu[b]:cu[b + 1]."""
    if block_table is not None:
        raise NotImplementedError("flash_attn double: paged KV (block_table) is not implemented")
    _check(q, k, v, 3)
    bq = _lengths(cu_seqlens_q, q.shape[0], max_seqlen_q, "q")
    bk = _lengths(cu_seqlens_k, k.shape[0], max_seqlen_k, "k")
    if len(bq) != len(bk):
        raise ValueError(f"flash_attn double: {len(bq) - 1} query sequences but {len(bk) - 1} key sequences")
    options, slopes = _options(q, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                               return_attn_probs, len(bq) - 1)
    out = torch.zeros_like(q)
    for b in range(len(bq) - 1):
        if bq[b + 1] > bq[b]:
            out[bq[b]:bq[b + 1]] = _attend(q[bq[b]:bq[b + 1]], k[bk[b]:bk[b + 1]], v[bk[b]:bk[b + 1]],
                                           slopes=None if slopes is None else slopes[b], **options)
    return out
