"""Weight-only quantized linear layers over torch's own CPU kernels, family-neutral.

* `Int8Linear`: symmetric int8 per output channel, ``w[n, k] = q[n, k] * scale[n]``, run by
  ``aten._weight_int8pack_mm`` (the int8 weight is kept unpacked; the kernel reads it as is).
* `Int4Linear`: int4 group-wise with a scale and a zero per group of ``group_size`` inputs,
  ``w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g]`` (q in 0..15, g = k // group_size), the formula of
  ``aten._weight_int4pack_mm_for_cpu`` (checked against a float reference in tests/test_quantized.py). The codes are
  held in the kernel's packed layout (``aten._convert_weight_to_int4pack_for_cpu``), two codes a byte.
* `Int8Embedding`: the gather for an embedding tied to an `Int8Linear` output head, reading the head's own buffers.

The packed data are buffers, not parameters: nothing trains them (`check_trainable` says what to do instead), and
inductor's freezing folds them into a compiled graph as constants without repacking them. Scales and zeros are held in
the activation dtype because the kernels require it. On CPUs without AVX-512 (the 2-core EPYC this was measured on)
the kernels have fast paths for bfloat16 activations only: float32 activations are exact but about 10x slower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

SUPPORTED_BITS = (8, 4)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# Rows converted at a time: _convert_weight_to_int4pack_for_cpu wants int32 codes, 4 bytes a weight. The kernel's
# packed layout is blocked by 64 output rows, so chunks of a multiple of 64 rows concatenate to the whole.
_PACK_ROWS = 4096


@dataclass(frozen=True)
class QuantizationConfig:
    """Weight-only quantization of the linear layers: `bits` 8 (per output channel) or 4 (group-wise).

    `group_size` (int4 only; 32, 64 or 128, default 32) is the number of inputs sharing one scale and zero.
    """

    bits: int = 8
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"quantization bits={self.bits!r} is not supported; supported: {list(SUPPORTED_BITS)}")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("int8 quantization is per output channel and takes no group_size; group_size "
                             f"({list(SUPPORTED_GROUP_SIZES)}) applies to bits=4")
        if self.bits == 4:
            if self.group_size is None:
                object.__setattr__(self, "group_size", 32)
            if self.group_size not in SUPPORTED_GROUP_SIZES:
                raise ValueError(f"int4 group_size={self.group_size!r} is not supported; supported: "
                                 f"{list(SUPPORTED_GROUP_SIZES)}")

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4 (group {self.group_size})"


QUANTIZATION_NAMES = ("none", "int8", "int4")


def resolve_quantization(value: None | str | QuantizationConfig) -> QuantizationConfig | str | None:
    """None (the loader's default), "none", or a QuantizationConfig, from what a user may pass."""
    if value is None or isinstance(value, QuantizationConfig):
        return value
    if isinstance(value, str):
        name = value.strip().lower()
        if name == "none":
            return "none"
        if name == "int8":
            return QuantizationConfig(bits=8)
        if name == "int4":
            return QuantizationConfig(bits=4)
    raise ValueError(f"quantization={value!r} is not supported; use None, one of {list(QUANTIZATION_NAMES)}, or "
                     f"QuantizationConfig(bits=8|4, group_size={'|'.join(map(str, SUPPORTED_GROUP_SIZES))})")


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The kernels take 2-D row-major activations in the dtype of their scales.
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous()


class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: sizes, an optional float bias, and the float view of the weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @property
    def activation_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(_flat(x, self.activation_dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) as float32, as the kernel sees it (each column read back through the kernel)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """y = x (q * scale)^T + b with q int8 (out, in) and one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.scales.dtype

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    @staticmethod
    @torch.no_grad()
    def quantize(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Buffers for a float weight (out, in): round-to-nearest with the row's max |w| mapped to 127."""
        out = torch.empty(weight.shape, dtype=torch.int8)
        scales = torch.empty(weight.shape[0], dtype=torch.float32)
        for start in range(0, weight.shape[0], _PACK_ROWS):
            rows = weight[start:start + _PACK_ROWS].float()
            scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
            out[start:start + _PACK_ROWS] = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            scales[start:start + _PACK_ROWS] = scale
        return {"weight_int8": out, "scales": scales.to(dtype)}


class Int4Linear(QuantizedLinear):
    """y = x W^T + b with W[n, k] = (q - 8) * scale[n, k // group] + zero[n, k // group], q in 0..15."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"int4 group_size={group_size!r} is not supported; supported: "
                             f"{list(SUPPORTED_GROUP_SIZES)}")
        self.group_size = group_size
        self.register_buffer("weight_int4pack",
                             torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # (in / group, out, 2): [..., 0] the scale, [..., 1] the zero; the kernel's layout
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device))

    @property
    def activation_dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight_int4pack, self.group_size,
                                                          self.scales_and_zeros)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        # The packed layout is the kernel's own; reading columns back through it (one-hot inputs, fp32 scales: a
        # single product and sum each) gives exactly the weight the kernel multiplies by.
        sz = self.scales_and_zeros.float()
        out = torch.empty(self.out_features, self.in_features)
        eye = torch.eye(self.in_features)
        for start in range(0, self.in_features, 256):
            cols = torch.ops.aten._weight_int4pack_mm_for_cpu(eye[start:start + 256].contiguous(),
                                                              self.weight_int4pack, self.group_size, sz)
            out[:, start:start + 256] = cols.t()
        return out

    @staticmethod
    @torch.no_grad()
    def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Buffers from codes (out, in) in 0..15 and per-group scales and zeros (out, in / group)."""
        packed = torch.cat([
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[start:start + _PACK_ROWS].to(torch.int32), 1)
            for start in range(0, codes.shape[0], _PACK_ROWS)
        ])
        return {"weight_int4pack": packed,
                "scales_and_zeros": torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()}

    @staticmethod
    @torch.no_grad()
    def quantize(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Buffers for a float weight (out, in): each group's [min, max] spread over the 16 codes."""
        n, k = weight.shape
        codes = torch.empty(n, k, dtype=torch.uint8)
        scales = torch.empty(n, k // group_size)
        zeros = torch.empty(n, k // group_size)
        for start in range(0, n, _PACK_ROWS):
            rows = weight[start:start + _PACK_ROWS].float().reshape(-1, k // group_size, group_size)
            low, high = rows.amin(dim=-1), rows.amax(dim=-1)
            scale = ((high - low) / 15.0).clamp_min(torch.finfo(torch.float32).tiny)
            q = torch.round((rows - low[..., None]) / scale[..., None]).clamp_(0, 15)
            codes[start:start + _PACK_ROWS] = q.reshape(-1, k).to(torch.uint8)
            scales[start:start + _PACK_ROWS] = scale
            zeros[start:start + _PACK_ROWS] = low + 8.0 * scale
        return Int4Linear.pack(codes, scales, zeros, dtype)


class Int8Embedding(nn.Module):
    """Embedding rows gathered from an int8 table (the tied output head's `weight_int8` and `scales`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_int8",
                             torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[ids].to(self.scales.dtype) * self.scales[ids][..., None]

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scales.float()[:, None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


QUANTIZED_MODULES = (QuantizedLinear, Int8Embedding)


def check_trainable(model: nn.Module) -> None:
    """Raise when `model` holds quantized weights: they are packed integers that no optimizer can update."""
    names = [name for name, module in model.named_modules() if isinstance(module, QUANTIZED_MODULES)]
    if names:
        raise ValueError(
            f"this model holds quantized weights ({len(names)} modules, e.g. {names[0]}), which cannot be trained: "
            "load it with quantization='none' (or a float dtype of an HF checkpoint) to fine-tune, or train LoRA "
            "adapters on the float model and merge them before quantizing"
        )
