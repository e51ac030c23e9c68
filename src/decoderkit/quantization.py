"""Quantized loading: which layers of a model become int8 / int4, and how each checkpoint tensor fills them.

`prepare_quantized` runs on the model built on the meta device, before a byte of weights is read: it swaps each
chosen `nn.Linear` for an `Int8Linear` / `Int4Linear` (layers/quantized.py) and returns the converters the loader
applies to each weight as it is read (a float weight is quantized there; a GGUF tensor kept quantized is repacked
there), so the model never holds a float copy of a quantized layer. Families never learn of it.

Which layers:
* every linear layer of the decoder stack, and the output head (at batch 1 the head of a small model is a fifth of
  the bytes read per token, so it pays to read it as int8 / int4);
* a head tied to the input embedding becomes int8 for both, sharing one table, except a GGUF file's Q4_0 / Q4_1 tied
  table, which stays int4 for both where decoderkit's kernel runs (`Int4Embedding` gathers and dequantizes only the
  rows looked up) and int4 for the head beside a float embedding on torch's kernels (whose int4 layout is opaque);
* other heads (classification, question answering) and an untied embedding stay float.

Layout (layers/quantized.py): where decoderkit's kernel builds, GGUF's Q4_0 / Q4_1 / Q8_0 blocks keep their exact
values (Q8_0 as int8 with a float16 scale per 32 inputs); on torch's kernels (the fallback) Q8_0 is requantized to
int8 per output channel and int4 needs output sizes divisible by 16.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from decoderkit.layers.quantized import (
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantizationConfig,
    default_layout,
    resolve_quantization,
)

Converter = Callable[[Any], dict[str, torch.Tensor]]
_INT4_ROWS = 16  # _convert_weight_to_int4pack_for_cpu packs output rows in multiples of 16


@dataclass
class QuantizedLoad:
    """What the loader needs: logical weight names (out, in) -> meta tensors for planning, the state-dict names those
    replace, and a converter per logical name turning the tensor read into state-dict entries."""

    logical: dict[str, torch.Tensor] = field(default_factory=dict)
    replaced: set[str] = field(default_factory=set)
    converters: dict[str, Converter] = field(default_factory=dict)


def resolve_load_quantization(value: Any, is_gguf: bool,
                              device: torch.device) -> tuple[QuantizationConfig | None, bool]:
    """(the config that quantizes float weights on load, whether a GGUF file stays quantized) for `from_pretrained`.

    None: a GGUF file keeps its quantized tensors packed ("gguf-native") on CPU; an HF checkpoint stays float.
    "none": everything float (a GGUF file dequantized, as before quantized loading existed).
    "int8" / "int4" / QuantizationConfig: float weights (a GGUF file's dequantized ones too) quantized as read.
    """
    spec = resolve_quantization(value)
    if spec is None:
        return None, is_gguf and device.type == "cpu"
    if spec == "none":
        return None, False
    if device.type != "cpu":
        raise ValueError(f"quantization={value!r} runs on CPU only (torch's int8 / int4 CPU kernels); load with "
                         f"device='cpu', or quantization='none' for {device.type}")
    return spec, False


def _int8_entries(prefix: str, value: Any, dtype: torch.dtype, layout: str) -> dict[str, torch.Tensor]:
    from decoderkit.gguf_model import GGUFBlocks

    if isinstance(value, GGUFBlocks):
        if value.scales.shape[1] == 1 and not value.packed:  # already int8 per row
            return {f"{prefix}weight_int8": value.data.contiguous(),
                    f"{prefix}scales": Int8Linear.row_scales(value.scales[:, 0], dtype, layout)}
        if layout == "kernel" and not value.packed:  # Q8_0: its own codes and float16 scales
            return {f"{prefix}weight_int8": value.data.contiguous(), f"{prefix}scales": value.scales.contiguous()}
        value = _RowDequantized(value)
    return {f"{prefix}{k}": v for k, v in Int8Linear.quantize(value, dtype, layout).items()}


class _RowDequantized:
    """A GGUFBlocks read as float rows on demand, so requantizing it never holds the whole float tensor."""

    def __init__(self, blocks: Any) -> None:
        self.blocks, self.shape = blocks, blocks.shape

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.blocks.rows(rows).dequantize()


def _int4_entries(prefix: str, value: Any, group: int, dtype: torch.dtype, layout: str) -> dict[str, torch.Tensor]:
    from decoderkit.gguf_model import INT4_TYPES, GGUFBlocks

    if isinstance(value, GGUFBlocks):
        if value.qtype not in INT4_TYPES or value.shape[1] // value.scales.shape[1] != group:
            raise ValueError(f"{prefix}weight: a {value.qtype.name} tensor cannot fill an int4 group-{group} layer")
        if layout == "kernel":  # the file's nibbles and float16 scales are the kernel's layout: taken as they are
            entries = {"weight_int4": value.data.contiguous(), "scales": value.scales.contiguous(),
                       "offsets": value.offsets.contiguous()}
        else:  # torch's layout rounds its zero once (exact for Q4_0)
            entries = Int4Linear.pack_affine(value.codes, value.scales, value.offsets, dtype, layout)
    else:
        entries = Int4Linear.quantize(value, group, dtype, layout)
    return {f"{prefix}{k}": v for k, v in entries.items()}


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _linear_targets(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    targets = [(f"model.{n}", m) for n, m in model.model.named_modules() if isinstance(m, nn.Linear)]
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        targets.append(("lm_head", model.lm_head))
    return targets


def _tied(model: nn.Module) -> bool:
    return bool(model.decoder_config.tie_word_embeddings) and isinstance(getattr(model, "lm_head", None), nn.Linear)


def prepare_quantized(model: nn.Module, dtype: torch.dtype, config: QuantizationConfig | None = None,
                      gguf_types: dict[str, Any] | None = None) -> QuantizedLoad:
    """Swap `model`'s (meta) linear layers for quantized ones and say how to fill them.

    `config` quantizes float weights as they are read (Hugging Face checkpoints); `gguf_types` (our parameter name ->
    the file's tensor type) keeps a GGUF file's quantized tensors in their closest packed form instead.
    """
    from gguf import GGMLQuantizationType

    from decoderkit.gguf_model import FLOAT_TYPES, INT4_TYPES

    load = QuantizedLoad()
    embed_name = "model.embed_tokens"
    tied = _tied(model)
    layout = default_layout()
    rows = _INT4_ROWS if layout == "torch" else 1

    def form(name: str, linear: nn.Linear) -> tuple[int, int] | None:
        """(bits, group) for a layer, or None to keep it float; int8 group 0 is per output channel."""
        n, k = linear.out_features, linear.in_features
        if gguf_types is not None:
            qtype = gguf_types.get(f"{embed_name if tied and name == 'lm_head' else name}.weight")
            if qtype is None or qtype in FLOAT_TYPES:
                return None
            if qtype in INT4_TYPES and n % rows == 0:
                return 4, 32
            return 8, 32 if layout == "kernel" and qtype == GGMLQuantizationType.Q8_0 else 0
        if config.bits == 8 or (name == "lm_head" and (tied or n % rows)):
            return 8, 0
        if k % config.group_size:
            raise ValueError(f"{name}: int4 group_size {config.group_size} does not divide its input size {k}; "
                             "choose a group_size that does (32, 64 or 128) or quantization='int8'")
        if n % rows:
            raise ValueError(f"{name}: int4 needs an output size divisible by {_INT4_ROWS} (torch's packed layout); "
                             f"it has {n}: use quantization='int8'")
        return 4, config.group_size

    for name, linear in _linear_targets(model):
        chosen = form(name, linear)
        if chosen is None:
            continue
        bits, group = chosen
        n, k, bias = linear.out_features, linear.in_features, linear.bias is not None
        with torch.device("meta"):
            new = (Int8Linear(k, n, bias, dtype=dtype, group_size=group or None, layout=layout) if bits == 8
                   else Int4Linear(k, n, bias, group_size=group, dtype=dtype, layout=layout))
        _swap(model, name, new)
        prefix = f"{name}."
        load.replaced |= {prefix + b for b, _ in new.named_buffers()}
        if name == "lm_head" and tied:
            _tie_head(model, load, embed_name, bits, group, dtype, layout)
            continue
        load.logical[f"{prefix}weight"] = torch.empty(n, k, device="meta")
        load.converters[f"{prefix}weight"] = (
            (lambda v, p=prefix: _int8_entries(p, v, dtype, layout)) if bits == 8
            else (lambda v, p=prefix, g=group: _int4_entries(p, v, g, dtype, layout)))
    return load


def _tie_head(model: nn.Module, load: QuantizedLoad, embed_name: str, bits: int, group: int,
              dtype: torch.dtype, layout: str) -> None:
    """The tied table fills the head and the embedding from one checkpoint tensor (the embedding's)."""
    embedding = model.get_submodule(embed_name)
    vocab, dim = embedding.num_embeddings, embedding.embedding_dim
    if bits == 8:
        with torch.device("meta"):
            _swap(model, embed_name, Int8Embedding(vocab, dim, dtype=dtype, group_size=group or None, layout=layout))
        load.replaced |= {f"{embed_name}.weight_int8", f"{embed_name}.scales", f"{embed_name}.weight"}

        def convert(value: Any) -> dict[str, torch.Tensor]:
            head = _int8_entries("lm_head.", value, dtype, layout)
            return {**head, f"{embed_name}.weight_int8": head["lm_head.weight_int8"],
                    f"{embed_name}.scales": head["lm_head.scales"]}
    elif layout == "kernel":
        with torch.device("meta"):
            _swap(model, embed_name, Int4Embedding(vocab, dim, group_size=group, dtype=dtype))
        load.replaced |= {f"{embed_name}.{b}" for b in ("weight_int4", "scales", "offsets", "weight")}

        def convert(value: Any) -> dict[str, torch.Tensor]:
            head = _int4_entries("lm_head.", value, group, dtype, layout)
            return {**head, **{f"{embed_name}.{b}": head[f"lm_head.{b}"] for b in ("weight_int4", "scales", "offsets")}}
    else:
        # torch's int4 layout is opaque to a gather: the embedding keeps the table's float values
        def convert(value: Any) -> dict[str, torch.Tensor]:
            return {**_int4_entries("lm_head.", value, group, dtype, layout),
                    f"{embed_name}.weight": value.dequantize().to(dtype)}
        load.replaced.add(f"{embed_name}.weight")
    load.logical[f"{embed_name}.weight"] = torch.empty(vocab, dim, device="meta")
    load.converters[f"{embed_name}.weight"] = convert
