"""Attention: one module for multi-head, grouped-query and multi-query attention, with three backends.

- "eager": explicit matmuls and an fp32 softmax; the only backend that can return attention weights.
- "sdpa": `torch.nn.functional.scaled_dot_product_attention` (the default).
- "flash_attention_2": the flash_attn package on CUDA, with the varlen path for padded batches and packed sequences.

Masks arrive as a boolean (B, 1, Q, K) tensor where True means "may attend", or None for plain causal attention with
no padding. ALiBi arrives as an fp32 (1, H, 1, K) bias.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from decoderkit.cache import Cache
from decoderkit.config import DecoderConfig
from decoderkit.layers.rope import apply_rotary


@dataclass
class AttentionInputs:
    """What every layer's attention needs besides its hidden states, computed once per forward."""

    mask: torch.Tensor | None  # (B, 1, Q, K) bool, True = attend; None = causal without padding
    causal: bool
    rope: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin (B, T, R)
    alibi: torch.Tensor | None = None  # (1, H, 1, K) fp32
    alibi_slopes: torch.Tensor | None = None  # (H,) for flash attention
    cache_position: torch.Tensor | None = None
    # For the flash kernels, which take no dense mask:
    padding_mask: torch.Tensor | None = None  # (B, filled) bool, True = a real token
    filled: int | None = None  # key slots written so far (a static cache's later slots are unused); None = all
    packed_segments: torch.Tensor | None = None  # (B, T) document ids of packed sequences


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


class Attention(nn.Module):
    """Self-attention (or cross-attention when `cross=True`) with separate q/k/v projections."""

    def __init__(self, config: DecoderConfig, layer_idx: int, cross: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.cross = cross
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_attention_heads if cross else config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.attention_scale if config.attention_scale is not None else self.head_dim**-0.5
        self.clip_qkv = config.clip_qkv
        self.dropout = config.attention_dropout
        self.implementation = config.attn_implementation
        d, hd = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=config.attention_out_bias)

    def _project(self, proj: nn.Linear, x: torch.Tensor, heads: int) -> torch.Tensor:
        y = proj(x)
        if self.clip_qkv is not None:
            y = y.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        return y.view(*x.shape[:2], heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttentionInputs,
        cache: Cache | None = None,
        encoder_states: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        kv_source = encoder_states if self.cross else x
        q = self._project(self.q_proj, x, self.num_heads)  # (B, H, T, D)
        k = self._project(self.k_proj, kv_source, self.num_kv_heads)  # (B, H_kv, S, D)
        v = self._project(self.v_proj, kv_source, self.num_kv_heads)
        if inputs.rope is not None:
            cos, sin = inputs.rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, inputs.cache_position)

        dropout = self.dropout if self.training else 0.0
        # ALiBi in half precision: MPT adds its fp32 bias to the half-precision scores (promoting them to fp32);
        # SDPA would take the bias in half precision, so such models use the eager math to give the same numbers.
        # (flash_attention_2 applies ALiBi inside its kernel and stays as asked.)
        half_alibi_sdpa = self.implementation == "sdpa" and inputs.alibi is not None and q.dtype != torch.float32
        if output_attentions or self.implementation == "eager" or half_alibi_sdpa:
            out, weights = eager_attention(q, k, v, inputs, self.scale, dropout, self.training)
        elif self.implementation == "sdpa" and reads_filled_slots(q, cache, inputs, dropout, self.cross):
            out = static_cache_attention(q, k, v, inputs, self.scale)
        elif self.implementation == "flash_attention_2":
            out = flash_attention(q, k, v, inputs, self.scale, dropout, queries_are_keys=not self.cross)
            weights = None
        else:
            out, weights = sdpa_attention(q, k, v, inputs, self.scale, dropout), None
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(out), (weights if output_attentions else None)


# Query rows per sequence up to which attention over a static cache's filled slots runs decoderkit's kernel: a decode
# step's one, or a speculative verify step's few (verify_step.MAX_VERIFY_TOKENS)
STATIC_KERNEL_ROWS = 16


def reads_filled_slots(q: torch.Tensor, cache: Cache | None, inputs: AttentionInputs, dropout: float,
                       cross: bool) -> bool:
    """Whether attention over a static cache runs decoderkit's kernel over its filled slots only: float32 or
    bfloat16 on CPU (the kernel computes in float32: bf16 queries are widened and the output rounded once), causal,
    no dropout, one query row per sequence (a decode step) or up to `STATIC_KERNEL_ROWS` of an unpadded batch (a
    speculative verify step; padded query rows would attend to nothing). SDPA there reads every slot of the cache
    (all 256 of a compiled step's bucket at the first generated token): at batch 16 on SmolLM2 a quarter of a
    step's time, at batch 1 most of a verify step's cost above a decode step's, and in a bf16 step on a CPU without
    bf16 instructions (decoderkit's shipped model) more than half of it."""
    rows = q.shape[2]
    if cross or dropout or rows > STATIC_KERNEL_ROWS or cache is None or not cache.is_static or not inputs.causal:
        return False
    if rows > 1 and inputs.padding_mask is not None:
        return False
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16) or inputs.cache_position is None:
        return False
    from decoderkit.kernels import attention as kernel

    return kernel.ready()


def static_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs,
                           scale: float) -> torch.Tensor:
    """(B, H, T, D) attention of q over a static cache's (B, H_kv, S, D) keys and values, each query row up to its own
    slot, with the key padding of the last query row's `inputs.mask` ((B, 1, T, S)) and ALiBi from its slopes."""
    from decoderkit.kernels import attention as kernel

    B, H, T, D = q.shape
    mask = inputs.mask[:, 0, -1].expand(B, -1) if inputs.mask is not None else None  # (B, S)
    slopes = inputs.alibi_slopes.float() if inputs.alibi is not None else None
    # The kernel's queries and output are float32 (its products and sums are, whatever the cache's dtype)
    out = kernel.static_attention(q.transpose(1, 2).float().contiguous(), k, v, inputs.cache_position, mask, slopes,
                                  scale)
    return out.transpose(1, 2).to(q.dtype)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, groups, S, D).reshape(B, H * groups, S, D)


def _dense_mask(inputs: AttentionInputs, q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
    if inputs.mask is not None:
        return inputs.mask
    if not inputs.causal or q_len == 1:
        return None
    offset = k_len - q_len
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(offset)[None, None]


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float, dropout: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, Q, K)
    if inputs.alibi is not None:
        # Added in fp32 as transformers' MPT does (the fp32 bias promotes half-precision scores).
        scores = scores + inputs.alibi
    mask = _dense_mask(inputs, q.shape[2], k.shape[2], q.device)
    if mask is not None:
        # Additive, as transformers does: padding rows (every key masked) then still pass gradients to their scores.
        scores = scores + torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(
            ~mask, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, v), weights


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float, dropout: float
) -> torch.Tensor:
    mask = inputs.mask
    is_causal = mask is None and inputs.causal and q.shape[2] > 1
    if inputs.alibi is not None:
        dense = _dense_mask(inputs, q.shape[2], k.shape[2], q.device)
        bias = inputs.alibi.to(q.dtype)
        # A finite minimum rather than -inf keeps fully masked (padding) rows finite, as in the eager path.
        mask = bias if dense is None else bias.masked_fill(~dense, torch.finfo(q.dtype).min)
        is_causal = False
    # SDPA shares each key/value head across its query group itself: no expanded copy of the cache per step.
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scale,
                                          enable_gqa=gqa)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: AttentionInputs, scale: float, dropout: float,
    queries_are_keys: bool = True,
) -> torch.Tensor:
    """flash_attn 2 kernels on (B, H, T, D) tensors; padded batches and packed sequences go through the varlen kernel.

    flash_attn aligns a causal mask to the bottom-right corner (query i sees keys j <= i + Tk - Tq), so the keys must
    end where the queries end: a static cache's unwritten tail is cut off first (`inputs.filled`). With
    `queries_are_keys` (self-attention) the queries are the last Tq of those keys and share their padding.
    """
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, _, Tq, _ = q.shape
    filled = k.shape[2] if inputs.filled is None else inputs.filled
    q = q.transpose(1, 2)  # (B, Tq, H, D) as flash_attn expects
    k, v = (t[:, :, :filled].transpose(1, 2) for t in (k, v))  # (B, Tk, H_kv, D)
    # Decoding needs no mask (the one query sees every key), and flash_attn before 2.1 aligned it to the top-left
    kwargs: dict = dict(dropout_p=dropout, softmax_scale=scale, causal=inputs.causal and Tq > 1)
    if inputs.alibi_slopes is not None:
        # -slope * |i - j| under a causal mask equals MPT's slope * (j - i); varlen measures i, j within each sequence
        kwargs["alibi_slopes"] = inputs.alibi_slopes.float()
    keys, queries = inputs.padding_mask, None
    if inputs.packed_segments is not None:
        # Each packed document is its own sequence of the varlen kernel (no cache here, so queries are keys)
        segments = inputs.packed_segments
        starts = F.pad(segments[:, 1:] != segments[:, :-1], (1, 0), value=True)  # (B, T): a document starts here
        cu = F.pad(starts.flatten().nonzero().squeeze(1).to(torch.int32), (0, 1), value=B * Tq)
        longest = int(cu.diff().max())
        out = flash_attn_varlen_func(q.reshape(B * Tq, *q.shape[2:]), k.reshape(B * Tq, *k.shape[2:]),
                                     v.reshape(B * Tq, *v.shape[2:]), cu, cu, longest, longest, **kwargs)
        return out.view(B, Tq, *out.shape[1:]).transpose(1, 2)
    if keys is not None:
        keys = keys[:, :filled]
        queries = keys[:, filled - Tq:] if queries_are_keys else None
    if keys is None or bool(keys.all()):
        return flash_attn_func(q, k, v, **kwargs).transpose(1, 2)
    k_idx = keys.flatten().nonzero().squeeze(1)
    cu_k = F.pad(keys.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    if queries is None:
        q_idx = torch.arange(B * Tq, device=q.device)
        cu_q = torch.arange(0, B * Tq + 1, Tq, dtype=torch.int32, device=q.device)
        longest_q = Tq
    else:
        q_idx = queries.flatten().nonzero().squeeze(1)
        cu_q = F.pad(queries.sum(1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        longest_q = int(queries.sum(1).max())
    out = flash_attn_varlen_func(
        q.reshape(B * Tq, *q.shape[2:])[q_idx], k.reshape(B * filled, *k.shape[2:])[k_idx],
        v.reshape(B * filled, *v.shape[2:])[k_idx], cu_q, cu_k, longest_q, int(keys.sum(1).max()), **kwargs,
    )
    # Padding queries attend to nothing: zeros, as transformers' flash path leaves them
    full = torch.zeros(B * Tq, *out.shape[1:], dtype=out.dtype, device=out.device)
    full[q_idx] = out
    return full.view(B, Tq, *out.shape[1:]).transpose(1, 2)
