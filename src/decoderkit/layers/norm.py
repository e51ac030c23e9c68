"""RMSNorm (Llama and Gemma variants) and LayerNorm with or without bias."""

from __future__ import annotations

import torch
from torch import nn

from decoderkit.config import DecoderConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32.

    With `weight_offset == 0` (Llama) the normalised activations are cast back to the input dtype before the weight
    multiplies them; with an offset (Gemma: `1 + weight`) the product is taken in fp32 and cast afterwards. The two
    orders give different bf16 results, and each family's checkpoints were trained with its own.
    """

    def __init__(self, dim: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.zeros(dim) if weight_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_offset:
            return (h * (self.weight_offset + self.weight.float())).type_as(x)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, weight_offset={self.weight_offset}"


def make_norm(config: DecoderConfig) -> nn.Module:
    if config.norm_type == "rms":
        return RMSNorm(config.hidden_size, config.norm_eps, config.norm_weight_offset)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)
