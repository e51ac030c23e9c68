"""Weight-only quantized linear layers, family-neutral, in one of two layouts chosen when a layer is built.

* ``"kernel"`` (where decoderkit's own kernel compiles, see decoderkit.kernels): codes with a float16 / float32
  scale (and offset) per group, run by decoderkit's kernel. GGUF's Q4_0 / Q4_1 / Q8_0 blocks map onto it exactly.
  A layer's `activations` says how the kernel multiplies: "float" (`DEFAULT_ACTIVATIONS`) in float32 exactly, at
  decode and prefill-chunk sized batches (up to `INT4_KERNEL_ROWS` / `INT8_KERNEL_ROWS` rows; more rows multiply by
  the dequantized weight); "int8" rounds each run of 32 inputs of a row to int8 against its largest magnitude and
  takes integer dot products, llama.cpp's way
  (about 1.5-2x faster per call at batch 1; every row, prefill too, so that perplexity measures what decoding
  computes); "bfloat16" rounds x and the dequantized weight to bfloat16 and sums their exact products in float32,
  a bfloat16 matmul's numbers (every row count on the kernel, VDPBF16PS where the CPU has AVX512-BF16: 1.1-1.9x
  "float"'s speed from 4 rows, for serving batches and prefill). `set_activations` switches a model's layers
  (``from_pretrained(activations=...)``).
* ``"torch"`` (the fallback): torch's own CPU kernels, ``aten._weight_int8pack_mm`` and
  ``aten._weight_int4pack_mm_for_cpu`` (codes in their packed layout, scales in the activation dtype).

* `Int8Linear`: ``w[n, k] = q[n, k] * scale[n, g]``, q int8, one scale per output channel (or, kernel layout, per
  group of 32 inputs: GGUF's Q8_0).
* `Int4Linear`: q in 0..15, a scale and an offset per group of ``group_size`` inputs. Kernel layout:
  ``w = scale * q + offset``, two codes a byte, each run of 32 inputs 16 bytes with input j in the low nibble of byte
  j and input j + 16 in the high one (GGUF's order). Torch layout: ``w = (q - 8) * scale + zero`` (the formula of
  ``aten._weight_int4pack_mm_for_cpu``).
* `Int8Embedding` / `Int4Embedding`: the gather for an embedding tied to an `Int8Linear` / kernel-layout
  `Int4Linear` output head, reading the head's own buffers and dequantizing only the rows looked up.

The packed data are buffers, not parameters: nothing trains them (`check_trainable` says what to do instead; LoRA
adapters over them train, the layers passing input gradients through their dequantized weight), and
inductor's freezing folds them into a compiled graph as constants without repacking them. Torch's kernels have fast
paths for bfloat16 activations only on CPUs without AVX-512 (float32 is exact but about 10x slower there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SUPPORTED_BITS = (8, 4)
LAYOUTS = ("kernel", "torch")
ACTIVATIONS = ("int8", "float", "bfloat16")
# Not int8: on SmolLM2 (benchmarks/quantized.py) int8 activations raise perplexity by 0.45% over the exact path on
# the Q4_1 file (llama.cpp's own figure, within 0.01%) and by 0.74% over bf16 with int8 weights: past the 0.1% and
# 0.5% the quantized paths are held to. They are for who wants llama.cpp's numbers and speed.
DEFAULT_ACTIVATIONS = "float"
# Rows up to which the kernel runs with float activations; past them (long prefills, perplexity) the dequantized weight
# and torch's float GEMM win. Measured on SmolLM2's layer shapes (2-core EPYC with AVX-512, 1 and 2 threads, the
# kernel's panel GEMM against dequantize + matmul): 4-bit codes 2.6-9x at 32 rows, 1.0-1.6x at 256, 0.83-0.93x at 512;
# 8-bit codes 1.3-7x at 32 rows, 0.75-2.3x at 128. A layer whose groups are not runs of 32 inputs (int8 rows of
# another length) has no panel GEMM, and stops at KERNEL_ROWS.
INT4_KERNEL_ROWS = 256
INT8_KERNEL_ROWS = 64
KERNEL_ROWS = 16
SUPPORTED_GROUP_SIZES = (32, 64, 128)
# Rows converted at a time: _convert_weight_to_int4pack_for_cpu wants int32 codes, 4 bytes a weight. The kernel's
# packed layout is blocked by 64 output rows, so chunks of a multiple of 64 rows concatenate to the whole.
_PACK_ROWS = 4096
# An int8 row's scale is its max |w| / 127 times the one of these ratios that leaves the least squared error over the
# row (the L2 criterion of torch.ao's HistogramObserver). Clipping pays little on weights whose rounding errors are
# random (a ratio 1 - f trades the row's rounding error, about K step^2 / 12, which falls by 2f of itself, for the
# clipped weights' (f max)^2: at most f ~ K / 100,000 for one clipped weight, so 0.90 covers K up to ~10,000); it pays
# most where the weights lie on a coarser grid of their own, as those of a model converted from a GGUF's Q4 / Q8
# blocks do: a ratio then lines the int8 steps up with the grid. SmolLM2-135M from its Q4_1 file: int8 perplexity with
# bfloat16 activations +0.61% of bfloat16's at ratio 1 alone, +0.33% with these (every row picks 0.96-1.00).
INT8_CLIP_RATIOS = tuple(round(1 - i / 100, 2) for i in range(11))  # 1.00 down to 0.90
_ROUNDING = 1.5 * 2.0**23


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


def default_layout() -> str:
    """"kernel" where decoderkit's kernel is built and loaded, else "torch"."""
    from decoderkit import kernels

    return "kernel" if kernels.available() else "torch"


def _layout(layout: str | None) -> str:
    layout = layout or default_layout()
    if layout not in LAYOUTS:
        raise ValueError(f"quantized layout {layout!r} is not one of {list(LAYOUTS)}")
    return layout


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The kernels take 2-D row-major activations in the dtype of their scales.
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous()


class QuantizedLinear(nn.Module):
    """What the int8 and int4 layers share: sizes, an optional float bias, and the float view of the weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None, layout: str | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.layout = _layout(layout)
        # torch's kernels take their activations as given
        self.activations = DEFAULT_ACTIVATIONS if self.layout == "kernel" else "float"
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @property
    def activation_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kernel_rows(self) -> int:
        """Rows of input up to which the kernel layout multiplies by the codes (float activations); past them by the
        dequantized weight."""
        return KERNEL_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            return _FrozenWeight.apply(x, self)
        flat = _flat(x, self.activation_dtype)
        if self.layout == "kernel" and self.activations == "float" and flat.shape[0] > self.kernel_rows():
            y = flat @ self.dequantize().t()
        elif self.activations == "bfloat16" and not self._runs_of_32():
            # No panel GEMM for these groups: the same rounded operands in a float32 matmul (exact products, float32
            # sums; torch's bfloat16 matmul would round its output to bfloat16)
            y = flat.bfloat16().float() @ self.dequantize().bfloat16().float().t()
        else:
            y = self._matmul(flat)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _runs_of_32(self) -> bool:
        return True

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The weight (out, in) as float32, as the kernel sees it (each column read back through the kernel)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout={self.layout}, activations={self.activations}")


class _FrozenWeight(torch.autograd.Function):
    """A packed layer's output, differentiable in its input (LoRA adapters below it train): the packed weight is
    frozen, and the backward pass multiplies by this one layer's dequantized weight, made there and dropped after,
    so that no float copy of the model's weights exists at any time."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return QuantizedLinear.forward(layer, x)  # grad mode is off here: the packed kernels run, adapters not

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        layer = ctx.layer
        weight = layer.dequantize()  # (out, in) float32
        grad_x = grad.reshape(-1, layer.out_features).float() @ weight
        return grad_x.reshape(*grad.shape[:-1], layer.in_features).to(grad.dtype), None


class Int8Linear(QuantizedLinear):
    """y = x (q * scale)^T + b with q int8 (out, in) and one scale per output channel or per `group_size` inputs.

    `group_size` (kernel layout only) is 32 for GGUF's Q8_0 blocks (float16 scales); None is one float32 scale per
    output channel (torch layout: one scale per channel in the activation dtype).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, group_size: int | None = None,
                 layout: str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, device, layout)
        if group_size is not None and (self.layout != "kernel" or group_size % 32 or in_features % group_size):
            raise ValueError(f"int8 group_size={group_size} needs the kernel layout and a multiple of 32 dividing "
                             f"the input size {in_features}")
        self.group_size = group_size
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        shape, scale_dtype = _int8_scales(self.layout, out_features, in_features, group_size, dtype)
        self.register_buffer("scales", torch.empty(shape, dtype=scale_dtype, device=device))

    @property
    def activation_dtype(self) -> torch.dtype:
        return torch.float32 if self.layout == "kernel" else self.scales.dtype

    def kernel_rows(self) -> int:
        return INT8_KERNEL_ROWS if self._runs_of_32() else KERNEL_ROWS

    def _runs_of_32(self) -> bool:
        return (self.group_size or self.in_features) % 32 == 0

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "kernel":
            from decoderkit import kernels

            return kernels.qmm(x, self.weight_int8, self.scales, None, 8, self.group_size or self.in_features,
                               self.activations)
        return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        return _int8_rows(self.weight_int8, self.scales)

    @staticmethod
    @torch.no_grad()
    def quantize(weight: torch.Tensor, dtype: torch.dtype, layout: str | None = None,
                 amax: torch.Tensor | None = None, errors: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Buffers for a float weight (out, in): round-to-nearest against a per-row scale ``max|w| * r / 127``, the
        ratio r of `INT8_CLIP_RATIOS` with the least squared error over the row (`clip_errors`).

        A tensor-parallel shard holds only some of each row's inputs: `amax` (out,) then gives each row's max |w| and
        `errors` its `clip_errors` summed over the shards, so that every shard picks the whole row's scale."""
        out = torch.empty(weight.shape, dtype=torch.int8)
        scales = torch.empty(weight.shape[0], dtype=torch.float32)
        ratios = torch.tensor(INT8_CLIP_RATIOS)
        for start in range(0, weight.shape[0], _PACK_ROWS):
            rows = weight[start:start + _PACK_ROWS].float()
            base = _int8_base(rows, None if amax is None else amax[start:start + _PACK_ROWS])
            units = rows / base[:, None]
            row_errors = _clip_errors(units) if errors is None else errors[start:start + _PACK_ROWS]
            ratio = ratios[row_errors.argmin(dim=1)]
            out[start:start + _PACK_ROWS] = _int8_codes(units, ratio).to(torch.int8)
            scales[start:start + _PACK_ROWS] = base * ratio
        return {"weight_int8": out, "scales": Int8Linear.row_scales(scales, dtype, layout)}

    @staticmethod
    @torch.no_grad()
    def clip_errors(weight: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
        """(out, len(INT8_CLIP_RATIOS)) float64: each row's squared rounding error at each candidate scale, in units
        of ``(max|w| / 127)^2`` (`amax` (out,) gives max |w| for a shard of the row's inputs): additive over the
        shards of a row, whose sum `quantize(errors=...)` takes."""
        errors = torch.empty(weight.shape[0], len(INT8_CLIP_RATIOS), dtype=torch.float64)
        for start in range(0, weight.shape[0], _PACK_ROWS):
            rows = weight[start:start + _PACK_ROWS].float()
            base = _int8_base(rows, None if amax is None else amax[start:start + _PACK_ROWS])
            errors[start:start + _PACK_ROWS] = _clip_errors(rows / base[:, None])
        return errors

    @staticmethod
    def row_scales(scales: torch.Tensor, dtype: torch.dtype, layout: str | None = None) -> torch.Tensor:
        """Per-channel scales (out,) as the layout holds them."""
        if _layout(layout) == "kernel":
            return scales.float().reshape(-1, 1).contiguous()
        return scales.to(dtype).contiguous()


def _int8_base(rows: torch.Tensor, amax: torch.Tensor | None) -> torch.Tensor:
    """max |w| / 127 of each row (never 0: an all-zero row keeps zero codes)."""
    peak = torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_()) if amax is None else amax.float()
    return peak.clamp_min(torch.finfo(torch.float32).tiny) / 127.0


def _int8_codes(units: torch.Tensor, ratio: torch.Tensor | float) -> torch.Tensor:
    """Float codes of rows in units of their max |w| / 127, against the scale ``ratio`` times that unit: clamped to
    +-127, then rounded half to even by adding and taking away 1.5 * 2^23 (where float32's step is 1), torch.round's
    result at a third of its cost (the clipping search rounds every weight once per ratio)."""
    inverse = 1.0 / ratio[:, None] if isinstance(ratio, torch.Tensor) else 1.0 / ratio
    return (units * inverse).clamp_(-127, 127).add_(_ROUNDING).sub_(_ROUNDING)


def _clip_errors(units: torch.Tensor) -> torch.Tensor:
    """(rows, len(INT8_CLIP_RATIOS)) float64 sums of squared rounding errors, in the rows' units."""
    # a few hundred thousand weights at a time: their temporaries stay in cache (5x faster than 4096 rows at once)
    step = max(1, 2**18 // max(1, units.shape[1]))
    return torch.cat([torch.stack([_square_sums(_int8_codes(part, r).mul_(r).sub_(part)) for r in INT8_CLIP_RATIOS],
                                  dim=1) for part in units.split(step)])


def _square_sums(x: torch.Tensor) -> torch.Tensor:
    """Each row's sum of squares (rows,) in float64, from float32 sums of runs of 32 inputs where they divide the row:
    the same runs whether a row is whole or split into shards of whole runs (tensor parallelism), so a shard's
    errors add up to the whole row's but for the order of the float64 sum, and float64 is cast from 1 value in 32."""
    if x.shape[1] % 32 == 0:
        return x.unflatten(1, (-1, 32)).square_().sum(dim=-1).double().sum(dim=-1)
    return x.double().square_().sum(dim=-1)


def _int8_scales(layout: str, out_features: int, in_features: int, group_size: int | None,
                 dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
    if layout == "torch":
        return (out_features,), dtype
    if group_size is None:
        return (out_features, 1), torch.float32
    return (out_features, in_features // group_size), torch.float16


def _int8_rows(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 rows of int8 codes (..., in) times their scales: (...,) per row or (..., groups) per group."""
    if scales.dim() == codes.dim():
        groups = scales.shape[-1]
        w = codes.float().unflatten(-1, (groups, codes.shape[-1] // groups)) * scales.float()[..., None]
        return w.flatten(-2)
    return codes.float() * scales.float()[..., None]


class Int4Linear(QuantizedLinear):
    """y = x W^T + b with 4-bit codes q in 0..15 and a scale and offset per group of `group_size` inputs.

    Kernel layout: ``W[n, k] = scale[n, g] * q + offset[n, g]`` (buffers ``weight_int4`` (out, in / 2),
    ``scales`` and ``offsets`` (out, in / group)); torch layout: ``W[n, k] = (q - 8) * scale + zero``
    (``weight_int4pack``, ``scales_and_zeros``). g = k // group_size.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None,
                 layout: str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, device, layout)
        if group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"int4 group_size={group_size!r} is not supported; supported: "
                             f"{list(SUPPORTED_GROUP_SIZES)}")
        self.group_size = group_size
        groups = in_features // group_size
        if self.layout == "kernel":
            self.register_buffer("weight_int4",
                                 torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
            self.register_buffer("offsets", torch.empty(out_features, groups, dtype=torch.float16, device=device))
            return
        self.register_buffer("weight_int4pack",
                             torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        # (in / group, out, 2): [..., 0] the scale, [..., 1] the zero; the kernel's layout
        self.register_buffer("scales_and_zeros", torch.empty(groups, out_features, 2, dtype=dtype, device=device))

    @property
    def activation_dtype(self) -> torch.dtype:
        return torch.float32 if self.layout == "kernel" else self.scales_and_zeros.dtype

    def kernel_rows(self) -> int:
        return INT4_KERNEL_ROWS  # groups of 32, 64 or 128 inputs: always the panel GEMM

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "kernel":
            from decoderkit import kernels

            return kernels.qmm(x, self.weight_int4, self.scales, self.offsets, 4, self.group_size, self.activations)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight_int4pack, self.group_size,
                                                          self.scales_and_zeros)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        if self.layout == "kernel":
            return _int4_rows(self.weight_int4, self.scales, self.offsets)
        # The packed layout is torch's own; reading columns back through it (one-hot inputs, fp32 scales: a
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
    def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype,
             layout: str | None = None) -> dict[str, torch.Tensor]:
        """Buffers from codes (out, in) in 0..15 and per-group scales and zeros (out, in / group), for
        ``w = (q - 8) * scale + zero`` (the kernel layout holds them as float32 ``scale * q + (zero - 8 scale)``)."""
        if _layout(layout) == "kernel":
            scales = scales.float()
            return Int4Linear.pack_affine(codes, scales, zeros.float() - 8.0 * scales, torch.float32, layout)
        packed = torch.cat([
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes[start:start + _PACK_ROWS].to(torch.int32), 1)
            for start in range(0, codes.shape[0], _PACK_ROWS)
        ])
        return {"weight_int4pack": packed,
                "scales_and_zeros": torch.stack([scales.t(), zeros.t()], dim=-1).to(dtype).contiguous()}

    @staticmethod
    @torch.no_grad()
    def pack_affine(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype,
                    layout: str | None = None) -> dict[str, torch.Tensor]:
        """Buffers for ``w = scale * q + offset`` (GGUF's Q4_0 / Q4_1 form): the kernel layout keeps `scales` and
        `offsets` in their own dtype (float16 from a GGUF file: exact); the torch layout rounds its zero
        ``offset + 8 scale`` once in float32, then to `dtype`."""
        if _layout(layout) == "torch":
            return Int4Linear.pack(codes, scales.float(), offsets.float() + 8.0 * scales.float(), dtype, "torch")
        return {"weight_int4": pack_nibbles(codes), "scales": scales.contiguous(), "offsets": offsets.contiguous()}

    @staticmethod
    @torch.no_grad()
    def quantize(weight: torch.Tensor, group_size: int, dtype: torch.dtype,
                 layout: str | None = None) -> dict[str, torch.Tensor]:
        """Buffers for a float weight (out, in): each group's [min, max] spread over the 16 codes (kernel layout:
        float16 scale and offset, the codes rounded against the float16 values)."""
        kernel = _layout(layout) == "kernel"
        n, k = weight.shape
        codes = torch.empty(n, k, dtype=torch.uint8)
        scales = torch.empty(n, k // group_size, dtype=torch.float16 if kernel else torch.float32)
        offsets = torch.empty_like(scales)
        for start in range(0, n, _PACK_ROWS):
            rows = weight[start:start + _PACK_ROWS].float().reshape(-1, k // group_size, group_size)
            low, high = rows.amin(dim=-1), rows.amax(dim=-1)
            scale = ((high - low) / 15.0).clamp_min(torch.finfo(torch.float16 if kernel else torch.float32).tiny)
            if kernel:
                low, scale = low.half().float(), scale.half().float()
            q = torch.round((rows - low[..., None]) / scale[..., None]).clamp_(0, 15)
            codes[start:start + _PACK_ROWS] = q.reshape(-1, k).to(torch.uint8)
            scales[start:start + _PACK_ROWS] = scale
            offsets[start:start + _PACK_ROWS] = low
        return Int4Linear.pack_affine(codes, scales, offsets, dtype, layout)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) in 0..15 -> (out, in / 2) bytes, each run of 32 inputs as GGUF's Q4 blocks hold them."""
    runs = codes.to(torch.uint8).unflatten(-1, (-1, 2, 16))
    return (runs[..., 0, :] | (runs[..., 1, :] << 4)).flatten(-2).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`."""
    runs = packed.unflatten(-1, (-1, 16))
    return torch.stack([runs & 0x0F, runs >> 4], dim=-2).flatten(-3)


def _int4_rows(packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Float32 rows (..., in) of kernel-layout int4 codes (..., in / 2) with their scales and offsets (..., groups)."""
    # the kernel's fma(q, scale, offset), one rounding: float32 does it where scale * q is exact (float16 scales),
    # float64 otherwise
    work = torch.float32 if scales.dtype == torch.float16 else torch.float64
    codes = unpack_nibbles(packed).to(work).unflatten(-1, (scales.shape[-1], -1))
    w = torch.addcmul(offsets.to(work)[..., None], codes, scales.to(work)[..., None])
    return w.flatten(-2).float()


class Int8Embedding(nn.Module):
    """Embedding rows gathered from an int8 table (the tied output head's `weight_int8` and `scales`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, group_size: int | None = None,
                 layout: str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.output_dtype = dtype
        self.register_buffer("weight_int8",
                             torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        shape, scale_dtype = _int8_scales(_layout(layout), num_embeddings, embedding_dim, group_size, dtype)
        self.register_buffer("scales", torch.empty(shape, dtype=scale_dtype, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _int8_rows(self.weight_int8[ids], self.scales[ids]).to(self.output_dtype)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        return _int8_rows(self.weight_int8, self.scales)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Int4Embedding(nn.Module):
    """Embedding rows gathered from a kernel-layout int4 table (the tied output head's `weight_int4`, `scales` and
    `offsets`): only the looked-up rows are unpacked, to the values the head multiplies by."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int = 32,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        if group_size not in SUPPORTED_GROUP_SIZES or embedding_dim % group_size:
            raise ValueError(f"int4 embedding group_size={group_size!r}: needs one of {list(SUPPORTED_GROUP_SIZES)} "
                             f"dividing the embedding size {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.group_size = num_embeddings, embedding_dim, group_size
        self.output_dtype = dtype
        groups = embedding_dim // group_size
        self.register_buffer("weight_int4",
                             torch.empty(num_embeddings, embedding_dim // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, groups, dtype=torch.float16, device=device))
        self.register_buffer("offsets", torch.empty(num_embeddings, groups, dtype=torch.float16, device=device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _int4_rows(self.weight_int4[ids], self.scales[ids], self.offsets[ids]).to(self.output_dtype)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        return _int4_rows(self.weight_int4, self.scales, self.offsets)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, group_size={self.group_size}"


QUANTIZED_MODULES = (QuantizedLinear, Int8Embedding, Int4Embedding)


def check_activations(activations: str | None) -> None:
    """ValueError unless `activations` is None (the default) or one of `ACTIVATIONS`."""
    if activations is not None and activations not in ACTIVATIONS:
        raise ValueError(f"activations={activations!r} is not supported; use None (the default, "
                         f"{DEFAULT_ACTIVATIONS!r}) or one of {list(ACTIVATIONS)}")


def set_activations(model: nn.Module, activations: str | None) -> int:
    """Make every quantized linear layer of `model` multiply with `activations` ("int8": rounded to int8 per run of
    32 inputs, or "float": exact float32; None: `DEFAULT_ACTIVATIONS`; torch's kernels always take float).
    Returns how many layers it set. "int8" and "bfloat16" (x and the dequantized weight rounded to bfloat16, their
    products summed in float32: a bfloat16 matmul's numbers, 1.1-1.9x faster than "float" from 4 rows on CPUs with
    AVX512-BF16) need quantized layers on decoderkit's kernel: ValueError otherwise."""
    check_activations(activations)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if activations in ("int8", "bfloat16"):
        if not layers:
            raise ValueError(f"activations={activations!r} applies to quantized layers and this model has none: "
                             "load with quantization='int8' | 'int4', or a quantized GGUF file")
        if any(m.layout != "kernel" for m in layers):
            raise ValueError(f"activations={activations!r} needs decoderkit's quantized kernel, which is not in use "
                             "here (no C++ compiler, or DECODERKIT_KERNELS=0): leave activations unset or pass "
                             "'float'")
    if activations == "bfloat16":
        from decoderkit import kernels

        if kernels.bf16_products() is None:
            raise ValueError("activations='bfloat16' needs the kernel's AVX2 build, and this CPU or build has none: "
                             "leave activations unset or pass 'float' or 'int8'")
    for m in layers:
        m.activations = (activations or DEFAULT_ACTIVATIONS) if m.layout == "kernel" else "float"
    return len(layers)


def check_trainable(model: nn.Module, adapters: bool = False) -> None:
    """Raise when `model` holds quantized weights and is to be trained in full: they are packed integers that no
    optimizer can update. `adapters` (the model has LoRA adapters, its base frozen) allows them."""
    names = [name for name, module in model.named_modules() if isinstance(module, QUANTIZED_MODULES)]
    if names and not adapters:
        raise ValueError(
            f"this model holds quantized weights ({len(names)} modules, e.g. {names[0]}), which cannot be fully "
            "fine-tuned: train LoRA adapters over the frozen quantized base (apply_lora, or --lora on the command "
            "line), or load it with quantization='none' (or a float dtype of an HF checkpoint) to fine-tune every "
            "weight"
        )
