"""Rotary position embeddings with every scaling rule transformers uses for these families.

Each rule returns the inverse frequencies and a factor that scales cos and sin ("attention scaling"). `dynamic` and
`longrope` depend on the sequence length, which `RotaryEmbedding` takes per row instead of keeping state.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _rotary_dim(params: dict[str, Any], head_dim: int, use_partial: bool = True) -> int:
    return int(head_dim * params.get("partial_rotary_factor", 1.0)) if use_partial else head_dim


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_inv_freq(
    params: dict[str, Any], head_dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) for a standardized `rope_parameters` dict."""
    rope_type = params.get("rope_type", "default")
    base = params["rope_theta"]
    if rope_type == "default":
        # transformers' default rule ignores partial_rotary_factor for these families.
        return _base_inv_freq(base, head_dim), 1.0
    dim = _rotary_dim(params, head_dim)
    if rope_type == "linear":
        return _base_inv_freq(base, dim) / params["factor"], 1.0
    if rope_type == "dynamic":
        factor = params["factor"]
        seq_len = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if rope_type == "yarn":
        return _yarn(params, dim, base, max_position_embeddings)
    if rope_type == "longrope":
        return _longrope(params, dim, base, max_position_embeddings, seq_len)
    if rope_type == "llama3":
        return _llama3(params, dim, base), 1.0
    raise ValueError(f"rope_type {rope_type!r} is not supported")


def _yarn(params: dict[str, Any], dim: int, base: float, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = params.get("factor")
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def _longrope(
    params: dict[str, Any], dim: int, base: float, max_pos: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_pos / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = params["long_factor"] if seq_len and seq_len > original else params["short_factor"]
    ext_factors = torch.tensor(ext, dtype=torch.float32)
    if ext_factors.numel() != dim // 2:
        raise ValueError(f"longrope: long/short factors need {dim // 2} entries, got {ext_factors.numel()}")
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext_factors * base**shape), attention_factor


def _llama3(params: dict[str, Any], dim: int, base: float) -> torch.Tensor:
    inv_freq = _base_inv_freq(base, dim)
    factor, low_ff, high_ff = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low_ff, old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for position ids.

    Stateless, so one module serves concurrent callers (generate and the server on one model). `dynamic` and
    `longrope` pick their frequencies from the length of the sequence each position belongs to, per row: what
    transformers computes for that sequence on its own, whatever shares the batch. (transformers takes the longest
    position of the whole batch, and its `dynamic` rule also remembers the longest length of earlier calls.)
    """

    def __init__(self, params: dict[str, Any], head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        self.params = params
        self.head_dim = head_dim
        self.rope_type = params.get("rope_type", "default")
        self.max_position_embeddings = max_position_embeddings
        # Computed on the CPU whatever the default device: on "meta" (lean loading) the math would route through
        # torch._refs and cost seconds of imports, and the values are recomputed after loading anyway.
        target = torch.empty(0).device
        with torch.device("cpu"):
            inv_freq, self.attention_scaling = rope_inv_freq(params, head_dim, max_position_embeddings)
            long_inv_freq = None
            if self.rope_type == "longrope":
                long_inv_freq, _ = rope_inv_freq(params, head_dim, max_position_embeddings,
                                                 params["original_max_position_embeddings"] + 1)
        self.register_buffer("inv_freq", inv_freq.to(target), persistent=False)
        if long_inv_freq is not None:
            self.register_buffer("long_inv_freq", long_inv_freq.to(target), persistent=False)

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.shape[0]

    def _inv_freq_for(self, seq_len: torch.Tensor) -> torch.Tensor:
        """seq_len (...) -> inv_freq (..., rotary_dim / 2) for sequences of those lengths."""
        if self.rope_type == "longrope":
            is_long = seq_len[..., None] > self.params["original_max_position_embeddings"]
            return torch.where(is_long, self.long_inv_freq, self.inv_freq)
        # dynamic: the base grows with lengths past the trained one; a handful of distinct lengths per call
        lengths, index = torch.unique(seq_len.clamp(min=self.max_position_embeddings), return_inverse=True)
        table = torch.stack([
            self.inv_freq if n == self.max_position_embeddings else
            rope_inv_freq(self.params, self.head_dim, self.max_position_embeddings, n)[0].to(self.inv_freq.device)
            for n in lengths.tolist()
        ])
        return table[index]

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype,
                seq_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, rotary_dim) in `dtype`.

        `seq_len`, broadcastable to `position_ids`: the length of the sequence each position belongs to, which
        `dynamic` and `longrope` depend on. Default: each row's largest position + 1.
        """
        inv_freq = self.inv_freq
        if self.rope_type in ("dynamic", "longrope") and position_ids.numel():
            if seq_len is None:
                seq_len = position_ids.amax(-1, keepdim=True) + 1  # (B, 1)
            inv_freq = self._inv_freq_for(seq_len)
        freqs = position_ids[..., None].float() * inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B, T, R); with R < D only the first R dims rotate (partial rotary)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
