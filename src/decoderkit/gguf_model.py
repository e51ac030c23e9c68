"""Read llama.cpp GGUF model files as a Hugging Face config dict and state dict.

A GGUF file holds metadata (``llama.embedding_length``, ``tokenizer.ggml.tokens``, ...) and tensors named in llama.cpp's
scheme (``blk.0.attn_q.weight``), possibly quantized. ``read_gguf`` turns it into what a Hugging Face model directory
would give: a ``config.json``-style dict and a state dict keyed by transformers' parameter names, dequantized to a torch
dtype. Parsing, dequantization and the GGUF <-> HF tensor-name tables come from the ``gguf`` package; this module only
adds what llama.cpp's ``convert_hf_to_gguf.py`` changed on the way in, and undoes it:

* **q/k row permutation (llama).** transformers' Llama applies rotary embeddings in "rotate half" form: dimension ``i``
  of a head is rotated together with dimension ``i + head_dim/2``. llama.cpp's ``llama`` kernels rotate adjacent pairs
  ``(2i, 2i+1)`` instead (the original Meta layout). So that both compute the same attention, the converter reorders the
  output rows of ``q_proj`` and ``k_proj`` within every head:
  ``w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2)``. Loading such a file into HF-layout code without the
  inverse gives a model that runs but attends wrongly. The inverse uses ``num_attention_heads`` for q and
  ``num_key_value_heads`` for k (the k projection only has that many heads). Gemma, StarCoder and MPT are converted
  without it (Gemma uses rotate-half in llama.cpp too; the other two have no rotary embedding).
* **Gemma norms** are stored as ``1 + weight`` because llama.cpp's RMSNorm multiplies by the stored weight while
  transformers' GemmaRMSNorm multiplies by ``1 + weight``.
* **Llama 3 rope scaling** is stored as a ``rope_freqs`` tensor (per-frequency divisors) instead of config values; the
  ``llama3`` rope parameters are recovered from it.

Tensors are read lazily: ``open_gguf`` memory-maps the file (``decoderkit.gguf_file``), and ``iter_gguf_tensors``
dequantizes one tensor at a time, so a loader can materialise (or move to a device) each tensor before the next is
decoded.
"""

from __future__ import annotations

import errno
import functools
import importlib.metadata
import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, Keys

from decoderkit.gguf_file import GGUFFile

if TYPE_CHECKING:
    from decoderkit.families.base import Family

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "GGUFBlocks",
    "GGUFCheckpoint",
    "gguf_config",
    "iter_gguf_tensors",
    "open_gguf",
    "read_gguf",
    "GGUFMetadata",
    "hf_parameter_names",
    "rotary_decoder_config",
    "unpermute_rope_rows",
]

# GGUF tensors that are not model parameters in transformers; ``gguf_config`` folds them into the config instead.
_ROPE_FREQS = "rope_freqs.weight"


@dataclass
class GGUFCheckpoint:
    """A GGUF model file read into Hugging Face form.

    Attributes:
        config: a transformers ``config.json``-style dict (``model_type``, ``architectures``, sizes, rope parameters,
            ``tie_word_embeddings``, special token ids, ``dtype``).
        state_dict: transformers parameter name -> dequantized tensor in HF layout.
        reader: the open file (`GGUFFile`); the tokenizer code reads ``tokenizer.ggml.*`` fields from it.
        path: the file that was read.
    """

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    reader: GGUFFile
    path: Path


# --------------------------------------------------------------------------------------------------------------------
# Reading metadata


class GGUFMetadata:
    """Typed access to one file's metadata, with errors that name the file and the key."""

    def __init__(self, reader: GGUFFile | gguf.GGUFReader):
        self.reader = reader
        self.path = _reader_path(reader)
        self.arch = self.get(Keys.General.ARCHITECTURE, str)
        self.tensors = {t.name: t for t in reader.tensors}

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        key = key.format(arch=self.arch) if "{arch}" in key else key
        field = self.reader.get_field(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path}: GGUF metadata has no {key!r}, which a {self.arch} model needs")
            return default
        value = field.contents()
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{self.path}: GGUF metadata {key!r} is {value!r}; expected a single {kind.__name__}")
        return value

    def shape(self, tensor_name: str) -> tuple[int, ...] | None:
        """HF-order shape of a tensor (GGUF lists dimensions innermost first), or None when absent."""
        tensor = self.tensors.get(tensor_name)
        return None if tensor is None else tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _reader_path(reader: GGUFFile | gguf.GGUFReader) -> str:
    return str(getattr(reader, "path", None) or getattr(reader.data, "filename", None) or "<GGUF file>")


# --------------------------------------------------------------------------------------------------------------------
# Shared by the families' GGUF support (each family module holds its own config builder, names and fix-ups)


def _rope_parameters(meta: GGUFMetadata, head_dim: int) -> dict[str, Any]:
    theta = meta.get(Keys.Rope.FREQ_BASE, float, 10000.0)
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    kind = meta.get(Keys.Rope.SCALING_TYPE, str, None)
    factor = meta.get(Keys.Rope.SCALING_FACTOR, float, None)
    if kind is None and (legacy := meta.get("{arch}.rope.scale_linear", float, None)) is not None:
        kind, factor = "linear", legacy  # GGUF v1/v2 files wrote linear scaling under this key
    if kind == "linear" and factor not in (None, 1.0):
        params.update(rope_type="linear", factor=factor)
    elif kind == "yarn":
        params.update(rope_type="yarn", factor=factor if factor is not None else 1.0)
        optional = {
            "original_max_position_embeddings": (Keys.Rope.SCALING_ORIG_CTX_LEN, int),
            # convert_hf_to_gguf.py writes HF's attention_factor under this key
            "attention_factor": (Keys.Rope.SCALING_YARN_ATTN_FACTOR, float),
            "beta_fast": (Keys.Rope.SCALING_YARN_BETA_FAST, float),
            "beta_slow": (Keys.Rope.SCALING_YARN_BETA_SLOW, float),
        }
        for hf_key, (gguf_key, kind_) in optional.items():
            if (value := meta.get(gguf_key, kind_, None)) is not None:
                params[hf_key] = value
    elif kind not in (None, "none", "linear"):
        raise ValueError(f"{meta.path}: rope scaling type {kind!r} is not supported (supported: none, linear, yarn)")
    if _ROPE_FREQS in meta.tensors:
        if params["rope_type"] != "default":
            raise ValueError(f"{meta.path}: has both a {_ROPE_FREQS} tensor and rope scaling type {kind!r}")
        factors = _dequantize(meta.tensors[_ROPE_FREQS]).double().numpy()
        params.update(_llama3_rope_parameters(factors, theta, head_dim, meta))
    return params


def _llama3_rope_parameters(factors: np.ndarray, theta: float, head_dim: int, meta: GGUFMetadata) -> dict[str, Any]:
    """Recover transformers' ``llama3`` rope parameters from llama.cpp's per-frequency divisors.

    The converter computes, per inverse frequency with wavelength ``w``: ``1`` when ``w < L / high``, ``factor`` when
    ``w > L / low``, and ``1 / ((1 - s) / factor + s)`` with ``s = (L / w - low) / (high - low)`` in between. ``s`` is
    linear in ``1 / w``, so a line fit through the in-between entries gives ``L / (high - low)`` and ``low / (high -
    low)``; (L, low, high) are only determined up to a common scale, and every scale yields the same frequencies, so
    L is fixed at the original context length when the file records it and at llama.cpp's default of 8192 otherwise.
    """
    if factors.shape != (head_dim // 2,):
        raise ValueError(f"{meta.path}: {_ROPE_FREQS} has shape {factors.shape}; expected ({head_dim // 2},)")
    if np.allclose(factors, 1.0):
        return {}
    factor = float(factors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    mid = (factors > 1.0 + 1e-6) & (factors < factor * (1.0 - 1e-6))
    if mid.sum() < 2:
        raise ValueError(f"{meta.path}: cannot recover llama3 rope parameters from {_ROPE_FREQS} (too few points)")
    smooth = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    slope, intercept = np.polyfit(1.0 / wavelen[mid], smooth, 1)
    original = meta.get(Keys.Rope.SCALING_ORIG_CTX_LEN, int, 8192)
    # the stored divisors are float32; rounding gives back the round numbers configs use (1.0, 4.0)
    low = round(float(-intercept * original / slope), 4)
    high = round(float(low + original / slope), 4)
    smooth_all = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    expected = 1.0 / ((1.0 - smooth_all) / factor + smooth_all)  # 1 where smooth is 1, factor where it is 0
    if not np.allclose(expected, factors, rtol=1e-4):
        raise ValueError(f"{meta.path}: {_ROPE_FREQS} does not follow llama3 rope scaling; cannot represent it")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


def rotary_decoder_config(meta: GGUFMetadata, model_type: str, architecture: str, hidden_act: str) -> dict[str, Any]:
    hidden = meta.get(Keys.LLM.EMBEDDING_LENGTH, int)
    heads = meta.get(Keys.Attention.HEAD_COUNT, int)
    kv_heads = meta.get(Keys.Attention.HEAD_COUNT_KV, int, heads)
    q_shape = meta.shape("blk.0.attn_q.weight")
    head_dim = meta.get(Keys.Attention.KEY_LENGTH, int, q_shape[0] // heads if q_shape else hidden // heads)
    rope_dim = meta.get(Keys.Rope.DIMENSION_COUNT, int, head_dim)
    if rope_dim != head_dim:
        raise ValueError(
            f"{meta.path}: rope covers {rope_dim} of {head_dim} head dimensions; partial rotary is not supported "
            f"for {model_type}"
        )
    return {
        "model_type": model_type,
        "architectures": [architecture],
        "hidden_size": hidden,
        "intermediate_size": meta.get(Keys.LLM.FEED_FORWARD_LENGTH, int),
        "num_hidden_layers": meta.get(Keys.LLM.BLOCK_COUNT, int),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": hidden_act,
        "max_position_embeddings": meta.get(Keys.LLM.CONTEXT_LENGTH, int),
        "rms_norm_eps": meta.get(Keys.Attention.LAYERNORM_RMS_EPS, float),
        # rope_parameters is transformers 5's form; rope_theta is kept for readers of older config.json files
        "rope_theta": meta.get(Keys.Rope.FREQ_BASE, float, 10000.0),
        "rope_parameters": _rope_parameters(meta, head_dim),
        "attention_bias": "blk.0.attn_q.bias" in meta.tensors,
    }


def hf_parameter_names(*modules: str, bias: bool = True) -> tuple[str, ...]:
    """The ``weight`` (and ``bias``) parameter names of ``modules``."""
    return tuple(f"{m}.{p}" for m in modules for p in (("weight", "bias") if bias else ("weight",)))


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (see the module docstring) for a weight ``(rows, in)`` or bias ``(rows,)``.

    ``n_heads`` is ``num_attention_heads`` for q and ``num_key_value_heads`` for k.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of an even size")
    # stored per head as (head_dim/2, 2) pairs; HF wants (2, head_dim/2) halves
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _families_by_architecture() -> dict[str, Family]:
    from decoderkit.families import FAMILIES

    return {f.gguf_architecture: f for f in FAMILIES.values() if f.gguf_architecture}


SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_families_by_architecture())
"""GGUF ``general.architecture`` values this module reads (``starcoder`` becomes transformers' ``gpt_bigcode``)."""


def _architecture(meta: GGUFMetadata) -> Family:
    family = _families_by_architecture().get(meta.arch)
    if family is None:
        raise ValueError(
            f"{meta.path}: GGUF architecture {meta.arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return family


@functools.cache
def _gguf_to_hf_names(arch_name: str, n_layers: int) -> dict[str, str]:
    family = _families_by_architecture()[arch_name]
    # gguf's map of one block gives each template's tensor kind; its GGUF name for any block follows from the kind
    # (a map of every block formats every name of every architecture's mappings once per block: 0.1 s for 30 blocks)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch_name.upper()], 1)
    names = {}
    for template in family.gguf_parameters():
        found = name_map.get_type_and_name(template.format(bid=0), try_suffixes=(".weight", ".bias"))
        if found is None:
            raise RuntimeError(f"gguf {importlib.metadata.version('gguf')} has no {arch_name} tensor for {template}")
        kind, first = found
        suffix = first[len(gguf.TENSOR_NAMES[kind].format(bid=0)):]
        for bid in range(n_layers) if "{bid}" in template else (None,):
            names[gguf.TENSOR_NAMES[kind].format(bid=bid) + suffix] = template.format(bid=bid)
    return names


# --------------------------------------------------------------------------------------------------------------------
# Tensors


@functools.cache
def _can_dequantize(qtype: GGMLQuantizationType) -> bool:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _dequantize(tensor: gguf.ReaderTensor) -> torch.Tensor:
    """One tensor as float32 in HF layout (GGUF dims are innermost-first, so ggml [in, out] is torch (out, in))."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    values = values.reshape(tuple(int(d) for d in reversed(tensor.shape.tolist())))
    if not values.flags.writeable:
        # F32 comes back as a view of the read-only memory map; torch needs memory it may write
        values = np.array(values)
    return torch.from_numpy(values)


def _check_tensors(meta: GGUFMetadata, arch_name: str, n_layers: int) -> dict[str, str]:
    names = _gguf_to_hf_names(arch_name, n_layers)
    for tensor in meta.reader.tensors:
        if tensor.name not in names and tensor.name != _ROPE_FREQS:
            raise ValueError(
                f"{meta.path}: tensor {tensor.name!r} has no counterpart in transformers' "
                f"{_families_by_architecture()[arch_name].model_type} model (an unsupported variant of {arch_name}?)"
            )
        if not _can_dequantize(tensor.tensor_type):
            raise ValueError(
                f"{meta.path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which cannot be dequantized "
                f"(gguf {importlib.metadata.version('gguf')})"
            )
    return names


# --------------------------------------------------------------------------------------------------------------------
# Quantized tensors kept quantized ("gguf-native" loading)

# Q4_0 and Q4_1 are int4 group-32 codes exactly, and Q8_0 is int8 codes with a float16 scale per 32 exactly (the
# layers keep it so where decoderkit's kernel runs, and requantize it per output channel on torch's kernels); Q5 and
# the K-quants have no exact fast form and become int8 per output channel (requantized from gguf's dequantized values:
# the error is measured in tests/test_quantized_gguf.py).
INT4_TYPES = frozenset({GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1})
INT8_TYPES = frozenset({
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q2_K,
    GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K,
})
FLOAT_TYPES = frozenset({GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16})
_ROWS_AT_ONCE = 2048  # rows decoded at a time: bounds the float scratch of a requantized tensor


@dataclass
class GGUFBlocks:
    """One quantized GGUF tensor (out, in) in the form decoderkit's layers hold it: ``w = scale * code + offset``.

    ``data`` is, for Q4_0 / Q4_1, the file's own nibbles, uint8 (out, in / 2): each run of 32 inputs is 16 bytes,
    byte j holding input j in its low nibble and input j + 16 in its high one, which is also the packed layout of
    decoderkit's kernel (layers/quantized.py), so it is copied out of the file unchanged. For the rest it is int8
    (out, in): Q8_0's own codes, or the other types requantized per row. ``scales`` is (out, groups): the file's
    float16 scales (Q4, Q8_0), or float32 per row (requantized); ``offsets`` is float16 (out, groups) for Q4 (Q4_1's
    mins, Q4_0's ``-8 scale``) and None for the symmetric int8 forms. Every part keeps the rows of the tensor, so row
    permutations and splits (llama's q/k un-permute, fused-qkv splits) apply to each part alike (see `parts`).
    """

    data: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    qtype: GGMLQuantizationType

    @property
    def packed(self) -> bool:
        """Two 4-bit codes a byte (Q4_0 / Q4_1)."""
        return self.qtype in INT4_TYPES

    @property
    def shape(self) -> torch.Size:
        rows, cols = self.data.shape
        return torch.Size((rows, cols * 2 if self.packed else cols))

    @property
    def codes(self) -> torch.Tensor:
        """One code a weight (out, in): uint8 0..15 (Q4) or int8."""
        if not self.packed:
            return self.data
        runs = self.data.unflatten(-1, (-1, 16))
        return torch.stack([runs & 0x0F, runs >> 4], dim=-2).flatten(-3)

    @property
    def params(self) -> torch.Tensor:
        """float32 (out, groups, 2): [scale, offset] of each group of ``in / groups`` inputs."""
        scales = self.scales.float()
        offsets = torch.zeros_like(scales) if self.offsets is None else self.offsets.float()
        return torch.stack([scales, offsets], dim=-1)

    def parts(self) -> list[torch.Tensor]:
        """The row-aligned tensors (data, scales, offsets if any); `with_parts` builds blocks from moved ones."""
        return [self.data, self.scales] + ([] if self.offsets is None else [self.offsets])

    def with_parts(self, parts: list[torch.Tensor]) -> GGUFBlocks:
        return GGUFBlocks(parts[0], parts[1], parts[2] if len(parts) > 2 else None, self.qtype)

    def rows(self, rows: slice) -> GGUFBlocks:
        return self.with_parts([p[rows] for p in self.parts()])

    def dequantize(self) -> torch.Tensor:
        params = self.params
        codes = self.codes.float().reshape(self.data.shape[0], params.shape[1], -1)
        w = codes * params[..., :1] + params[..., 1:]
        return w.reshape(self.shape)


# One block of each type as numpy sees it: its float16 scale (and min), then its codes as one opaque field, so that
# picking the codes out of a tensor's blocks is one strided copy of 16 / 32 bytes at a time.
_BLOCK_DTYPES = {
    GGMLQuantizationType.Q4_0: np.dtype([("d", "<f2"), ("qs", "V16")]),
    GGMLQuantizationType.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "V16")]),
    GGMLQuantizationType.Q8_0: np.dtype([("d", "<f2"), ("qs", "V32")]),
}


def _int8_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = np.maximum(np.abs(values).max(axis=1), np.finfo(np.float32).tiny) / 127.0
    codes = np.clip(np.rint(values / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale[:, None].astype(np.float32)


def gguf_blocks(tensor: gguf.ReaderTensor, path: str, row_order: torch.Tensor | None = None) -> GGUFBlocks:
    """A 2-D quantized tensor as `GGUFBlocks`, copied out of the file's bytes (Q4_0 / Q4_1 / Q8_0: one strided copy
    per part; the other types decoded and requantized a few rows at a time).

    `row_order` (out,) reorders the rows on the way (row i of the result is row ``row_order[i]`` of the file).
    """
    qtype = tensor.tensor_type
    if qtype not in INT4_TYPES and qtype not in INT8_TYPES:
        raise ValueError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which decoderkit cannot run quantized (supported: "
            f"{', '.join(t.name for t in sorted(INT4_TYPES | INT8_TYPES))}); load it with quantization='none' to "
            "dequantize it to floats instead"
        )
    rows, cols = (int(d) for d in reversed(tensor.shape.tolist()))
    order = None if row_order is None else row_order.numpy()
    data = np.asarray(tensor.data)  # (rows, bytes per row): a view of the memory map
    if qtype in _BLOCK_DTYPES:
        blocks = data.view(_BLOCK_DTYPES[qtype])  # (rows, blocks)
        if order is not None:
            blocks = blocks[order]
        scales = np.ascontiguousarray(blocks["d"])
        codes = np.ascontiguousarray(blocks["qs"]).view(np.uint8 if qtype in INT4_TYPES else np.int8)
        codes = codes.reshape(rows, -1)
        if qtype == GGMLQuantizationType.Q8_0:
            offsets = None
        elif qtype == GGMLQuantizationType.Q4_1:
            offsets = np.ascontiguousarray(blocks["m"])
        else:
            offsets = scales * np.float16(-8.0)  # w = d (q - 8); a power of two: exact in float16
        return GGUFBlocks(torch.from_numpy(codes), torch.from_numpy(scales),
                          None if offsets is None else torch.from_numpy(offsets), qtype)
    codes = np.empty((rows, cols), dtype=np.int8)
    scales = np.empty((rows, 1), dtype=np.float32)
    for start in range(0, rows, _ROWS_AT_ONCE):
        chunk = data[start:start + _ROWS_AT_ONCE]
        out = _int8_rows(gguf.quants.dequantize(chunk, qtype).reshape(chunk.shape[0], cols))
        codes[start:start + _ROWS_AT_ONCE], scales[start:start + _ROWS_AT_ONCE] = out
    if order is not None:
        codes, scales = codes[order], scales[order]
    return GGUFBlocks(torch.from_numpy(codes), torch.from_numpy(scales), None, qtype)


def _row_order(arch: Family, name: str, rows: int, config: dict[str, Any]) -> torch.Tensor | None:
    """The family's fix-up of a quantized tensor as a reordering of its rows (None: unchanged).

    A packed tensor can only have its rows moved; a fix-up that changes values (Gemma's norm offset: only on float
    norms) cannot apply to one.
    """
    index = torch.arange(rows)[:, None]
    moved = arch.fix_gguf_tensor(name, index, config)
    if moved is index:
        return None
    order = moved.numpy().ravel() if moved.shape == (rows, 1) and moved.dtype == index.dtype else None
    if order is None or not np.array_equal(np.bincount(order, minlength=rows), np.ones(rows, np.int64)):
        raise ValueError(f"tensor {name!r}: the {arch.model_type} fix-up of a quantized tensor is not a reordering "
                         "of its rows; load with quantization='none'")
    return moved.flatten()


def gguf_tensor_types(reader: gguf.GGUFReader,
                      config: dict[str, Any]) -> dict[str, tuple[GGMLQuantizationType, tuple[int, ...]]]:
    """HF parameter name -> (the file's tensor type, HF shape), to choose each layer's form before loading."""
    meta = GGUFMetadata(reader)
    names = _gguf_to_hf_names(meta.arch, config[_architecture(meta).gguf_layers_key])
    return {names[t.name]: (t.tensor_type, meta.shape(t.name)) for t in reader.tensors if t.name in names}


def _release(reader: gguf.GGUFReader, tensor: gguf.ReaderTensor) -> None:
    """Drop a tensor's pages from this process's memory map (they stay in the page cache), so that reading a file
    does not add the whole file to the resident set on top of the model."""
    mapping = getattr(reader.data, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise"):
        return
    start = int(tensor.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
    end = int(tensor.data_offset) + int(tensor.n_bytes)
    mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


# --------------------------------------------------------------------------------------------------------------------
# Public API


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open (memory-map) a GGUF file: its metadata parsed, its tensors left in the map (see `decoderkit.gguf_file`).

    Raises:
        FileNotFoundError: ``path`` does not exist or is not a file.
        ValueError: the file is truncated or corrupt ("truncated or corrupt GGUF file"), is big-endian, or is one
            part of a split model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"GGUF file not found: {path}", str(path))
    reader = GGUFFile(path)
    split = reader.get_field(Keys.Split.LLM_KV_SPLIT_COUNT)
    if split is not None and split.contents() > 1:
        raise ValueError(f"{path}: is one part of a split GGUF model; merge it first (llama-gguf-split --merge)")
    return reader


def gguf_config(reader: GGUFFile | gguf.GGUFReader, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Build a transformers ``config.json``-style dict from a GGUF file's metadata.

    Args:
        reader: an open GGUF file (see ``open_gguf``).
        dtype: recorded as the config's ``dtype`` (the dtype ``iter_gguf_tensors`` is asked to produce).

    Raises:
        ValueError: unsupported architecture, missing or malformed metadata, or tensors the HF model has no place for.
    """
    meta = GGUFMetadata(reader)
    arch = _architecture(meta)
    config = arch.config_from_gguf(meta)
    embed = meta.shape("token_embd.weight")
    vocab = embed[0] if embed else meta.get(Keys.LLM.VOCAB_SIZE, int, None)
    if vocab is None and (tokens := reader.get_field(Keys.Tokenizer.LIST)) is not None:
        vocab = len(tokens.contents())
    if vocab is None:
        raise ValueError(f"{meta.path}: cannot tell the vocabulary size (no token_embd tensor, vocab_size or tokens)")
    config["vocab_size"] = vocab
    config["tie_word_embeddings"] = "output.weight" not in meta.tensors
    for hf_key, gguf_key in (
        ("bos_token_id", Keys.Tokenizer.BOS_ID),
        ("eos_token_id", Keys.Tokenizer.EOS_ID),
        ("pad_token_id", Keys.Tokenizer.PAD_ID),
    ):
        if (token_id := meta.get(gguf_key, int, None)) is not None:
            config[hf_key] = token_id
    config["dtype"] = str(dtype).removeprefix("torch.")
    _check_tensors(meta, meta.arch, config[arch.gguf_layers_key])
    return config


def iter_gguf_tensors(
    reader: gguf.GGUFReader, config: dict[str, Any], dtype: torch.dtype = torch.float32, native: bool = False
) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
    """Yield ``(hf_name, tensor)`` for every parameter in the file, dequantizing one tensor at a time.

    Tensors come out in HF layout (q/k rows un-permuted, Gemma norms shifted back) as ``dtype``. The whole file is
    checked (names, quantization types) before the first tensor is decoded, so a bad file fails before any work.

    Args:
        reader: an open GGUF file (see ``open_gguf``).
        config: the dict ``gguf_config`` built for this reader (head counts drive the q/k un-permute).
        dtype: the floating-point dtype of the yielded tensors; dequantization itself runs in float32.
        native: yield each quantized 2-D tensor as `GGUFBlocks` instead of dequantizing it.
    """
    meta = GGUFMetadata(reader)
    arch = _architecture(meta)
    names = _check_tensors(meta, meta.arch, config[arch.gguf_layers_key])
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue
        if native and tensor.tensor_type not in FLOAT_TYPES and len(tensor.shape) == 2:
            rows = int(tensor.shape[1])
            try:
                order = _row_order(arch, tensor.name, rows, config)
            except ValueError as e:
                raise ValueError(f"{meta.path}: tensor {tensor.name!r} of {rows} rows: {e}") from e
            yield names[tensor.name], gguf_blocks(tensor, meta.path, order)
            _release(reader, tensor)
            continue
        weight = _dequantize(tensor)
        try:
            weight = arch.fix_gguf_tensor(tensor.name, weight, config)
        except ValueError as e:
            raise ValueError(f"{meta.path}: tensor {tensor.name!r} of shape {tuple(weight.shape)}: {e}") from e
        yield names[tensor.name], weight.to(dtype)
        if native:
            _release(reader, tensor)


def read_gguf(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> GGUFCheckpoint:
    """Read a GGUF model file as a transformers config dict and a dequantized state dict.

    Args:
        path: the ``.gguf`` file.
        dtype: dtype of the state dict's tensors (and the config's ``dtype``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a truncated or corrupt GGUF file; an architecture other than ``SUPPORTED_ARCHITECTURES``; a
            tensor type the ``gguf`` package cannot dequantize (the message names the tensor and type); metadata the
            config needs is missing.
    """
    reader = open_gguf(path)
    config = gguf_config(reader, dtype)
    state_dict = dict(iter_gguf_tensors(reader, config, dtype))
    return GGUFCheckpoint(config=config, state_dict=state_dict, reader=reader, path=Path(path))
