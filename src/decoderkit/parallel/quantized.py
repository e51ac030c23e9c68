"""Quantized weights under tensor parallelism: each rank quantizes (or repacks) its own slice as one process does the
whole, so the ranks together hold exactly the one-process model's codes and scales.

Which layers become int8 / int4, and in which form, is decided as for one process: `prepare_quantized` runs on a meta
copy of the whole model, and each local layer takes the form its whole counterpart got (the same converters fill it).
Column-parallel layers (q/k/v, gate/up, the vocab-parallel head and a tied int8 embedding) split by output rows, and
every form keeps its scales per row, so a rank's rows quantize as they do in the whole. Row-parallel layers (o, down)
split their inputs: a group-wise form (int4, GGUF's Q4_0 / Q4_1 / Q8_0 blocks) needs whole groups on every rank, and
int8 per output channel takes each row's max |w| over all the ranks (one all-reduce per layer, at load time).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from decoderkit.layers.quantized import Int4Linear, Int8Embedding, Int8Linear, default_layout
from decoderkit.parallel.tensor_parallel import (
    Partition,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelHead,
    gather_vocab,
)

EMBED = "model.embed_tokens"


class _RowParallel:
    """The input's last axis is split: all-reduce the partial products, then add the (whole) bias once."""

    group: dist.ProcessGroup
    row_bias: nn.Parameter | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = funcol.all_reduce(super().forward(x), "sum", self.group)
        return y if self.row_bias is None else y + self.row_bias


class _VocabParallel:
    """Logits for this rank's rows of the vocabulary, all-gathered into the full (..., V)."""

    per_rank: int
    vocab_size: int
    world_size: int
    group: dist.ProcessGroup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_vocab(super().forward(x), self.per_rank, self.vocab_size, self.world_size, self.group)


class RowParallelInt8Linear(_RowParallel, Int8Linear):
    """A row-parallel `Int8Linear` (its bias, whole, is `row_bias`)."""


class RowParallelInt4Linear(_RowParallel, Int4Linear):
    """A row-parallel `Int4Linear` (its bias, whole, is `row_bias`)."""


class VocabParallelInt8Linear(_VocabParallel, Int8Linear):
    """A vocab-parallel int8 output head."""


class VocabParallelInt4Linear(_VocabParallel, Int4Linear):
    """A vocab-parallel int4 output head."""


class VocabParallelInt8Embedding(Int8Embedding):
    """Rows [start, end) of a tied int8 table; other ids gather zeros, and the all-reduce fills them in."""

    start: int
    end: int
    group: dist.ProcessGroup

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        x = super().forward((ids - self.start).masked_fill(outside, 0)).masked_fill(outside[..., None], 0.0)
        return funcol.all_reduce(x, "sum", self.group)


@dataclass
class QuantizedShards:
    """How this rank's quantized layers are filled: logical weight name (out, in) -> converter of its local slice,
    and the row-parallel layers whose float bias goes to `row_bias`."""

    converters: dict[str, Any] = field(default_factory=dict)
    row_parallel: set[str] = field(default_factory=set)
    forms: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (bits, group; 0: per output channel)

    def entries(self, name: str, value: Any) -> dict[str, torch.Tensor]:
        """State-dict entries for the local slice `value` of the logical tensor `name`."""
        return self.converters[name](value)

    def rename_bias(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.row_parallel:
            if f"{name}.bias" in state:
                state[f"{name}.row_bias"] = state.pop(f"{name}.bias")


def whole_model_forms(model: nn.Module, dtype: torch.dtype, config: Any,
                      gguf_types: dict[str, Any] | None) -> tuple[dict[str, tuple[int, int]], dict[str, Any], bool]:
    """What one process would quantize in the (meta, unsharded) `model`: each layer's (bits, group), the converters
    by logical weight name, and whether a tied head shares an int8 table with the embedding."""
    from decoderkit.quantization import prepare_quantized

    whole = copy.deepcopy(model)
    load = prepare_quantized(whole, dtype, config, gguf_types)
    forms = {}
    for name, module in whole.named_modules():
        if isinstance(module, Int4Linear):
            forms[name] = (4, module.group_size)
        elif isinstance(module, Int8Linear):
            forms[name] = (8, module.group_size or 0)
    return forms, load.converters, isinstance(whole.get_submodule(EMBED), Int8Embedding)


def quantize_shards(model: nn.Module, forms: dict[str, tuple[int, int]], converters: dict[str, Any], tied_int8: bool,
                    dtype: torch.dtype) -> QuantizedShards:
    """Swap the sharded (meta) `model`'s layers named in `forms` for quantized ones of their local sizes; ValueError
    naming the layer, its input size, the group size and the world size when a row-parallel split cuts a group."""
    info = model.tp
    part: Partition = info.partition
    layout = default_layout()
    shards = QuantizedShards(converters=dict(converters), forms=dict(forms))
    for name, (bits, group) in forms.items():
        local = model.get_submodule(name)
        k, n, bias = local.in_features, local.out_features, local.bias is not None
        if isinstance(local, RowParallelLinear):
            whole_k = k * part.world_size
            if group and k % group:
                raise ValueError(
                    f"{name}: tensor-parallel size {part.world_size} splits its input size {whole_k} into {k} per "
                    f"rank, which is not a whole number of quantization groups of {group}; use a size that leaves "
                    f"a multiple of {group} inputs per rank, or quantization='none'")
            new = _build(RowParallelInt8Linear if bits == 8 else RowParallelInt4Linear, bits, group, k, n, False,
                         dtype, layout)
            new.group = info.group
            new.row_bias = nn.Parameter(torch.empty(n, dtype=dtype, device="meta"), requires_grad=False) if bias \
                else None
            shards.row_parallel.add(name)
            if bits == 8 and not group:
                shards.converters[f"{name}.weight"] = _row_int8_converter(f"{name}.", dtype, layout, info.group)
        elif isinstance(local, VocabParallelHead):
            new = _build(VocabParallelInt8Linear if bits == 8 else VocabParallelInt4Linear, bits, group, k, n, bias,
                         dtype, layout)
            new.per_rank, new.vocab_size, new.world_size, new.group = (local.per_rank, local.vocab_size,
                                                                        local.world_size, info.group)
        else:
            new = _build(Int8Linear if bits == 8 else Int4Linear, bits, group, k, n, bias, dtype, layout)
        if bits == 4 and layout == "torch" and n % 16:
            raise ValueError(f"{name}: int4 on torch's kernels needs an output size divisible by 16; tensor-parallel "
                             f"size {part.world_size} leaves {n} rows per rank: use quantization='int8'")
        _swap(model, name, new)
    if tied_int8:
        embed: VocabParallelEmbedding = model.get_submodule(EMBED)
        group = forms["lm_head"][1]
        with torch.device("meta"):
            table = VocabParallelInt8Embedding(embed.num_embeddings, embed.embedding_dim, dtype=dtype,
                                               group_size=group or None, layout=layout)
        table.start, table.end, table.group = embed.start, embed.end, info.group
        _swap(model, EMBED, table)
    return shards


def _build(cls: type, bits: int, group: int, k: int, n: int, bias: bool, dtype: torch.dtype, layout: str) -> Any:
    with torch.device("meta"):
        if bits == 8:
            return cls(k, n, bias, dtype=dtype, group_size=group or None, layout=layout)
        return cls(k, n, bias, group_size=group, dtype=dtype, layout=layout)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _row_int8_converter(prefix: str, dtype: torch.dtype, layout: str, group: dist.ProcessGroup) -> Any:
    """Int8 per output channel of a slice of each row's inputs: the row's max |w|, then its clipping errors, are
    all-reduced over the ranks, so the scale, and so every code, is the whole row's."""

    def convert(value: Any) -> dict[str, torch.Tensor]:
        floats = value.dequantize() if hasattr(value, "dequantize") else value.float()
        amax = floats.abs().amax(dim=1)
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        errors = Int8Linear.clip_errors(floats, amax)
        dist.all_reduce(errors, group=group)
        buffers = Int8Linear.quantize(floats, dtype, layout, amax=amax, errors=errors)
        return {f"{prefix}{k}": v for k, v in buffers.items()}

    return convert
