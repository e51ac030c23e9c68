"""Write a model as a llama.cpp GGUF file: the inverse of `decoderkit.gguf_model`.

What llama.cpp's `convert_hf_to_gguf.py` (and, for Q4_0 / Q4_1, `llama-quantize`) does, for the families llama.cpp
and decoderkit share (llama, gemma, starcoder, mpt), with the `gguf` package's writer, name tables and quantizers:

* metadata: each family's `config_to_gguf` (sizes, norm epsilon, rope or ALiBi settings), `general.file_type`, the
  quantization version, and the tokenizer (`decoderkit.gguf_vocab_writer`);
* tensors: transformers' names mapped through gguf's tensor name map, each family's `fix_tensor_for_gguf` applied
  (llama's q/k rows permuted into llama.cpp's rotary order, Gemma's norms stored as 1 + weight), llama3 rope
  scaling stored as a `rope_freqs` tensor;
* types, as llama.cpp chooses them: 1-D tensors, norms and position embeddings stay F32; a tensor whose rows are not
  a whole number of quantization blocks falls back to F16; with Q4_0 / Q4_1 the output projection (the token
  embedding when tied) is Q8_0 (llama-quantize picks Q6_K where the row is a multiple of 256, which the `gguf`
  package cannot write; Q8_0 is what it picks otherwise, as in the SmolLM2 Q4_1 file).

The file is written under a temporary name beside the target and renamed into place when complete.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import Keys, LlamaFileType

from decoderkit.fileio import atomic_path

if TYPE_CHECKING:
    from decoderkit.families.base import Family
    from decoderkit.tokenizer import Tokenizer

__all__ = ["GGUF_TYPES", "GGUFWriteResult", "llama3_rope_freqs", "permute_rope_rows", "rotary_gguf_metadata",
           "write_gguf", "write_gguf_from_state"]

logger = logging.getLogger(__name__)

GGUF_TYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
"""`--type` names and the GGUF tensor type of the 2-D weights (``auto``: bf16 for a bfloat16 model, else f16)."""

_FILE_TYPES = {
    Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.BF16: LlamaFileType.MOSTLY_BF16,
    Q.Q8_0: LlamaFileType.MOSTLY_Q8_0, Q.Q4_0: LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: LlamaFileType.MOSTLY_Q4_1,
}
_ROPE_FREQS = "rope_freqs.weight"


@dataclass
class GGUFWriteResult:
    """What `write_gguf` wrote: the file, its weight type, and each tensor's GGUF type by GGUF name."""

    path: Path
    type: str
    tensor_types: dict[str, Q] = field(default_factory=dict)
    tokenizer: bool = False


# --------------------------------------------------------------------------------------------------------------------
# Shared by the families' config_to_gguf / fix_tensor_for_gguf


def rotary_gguf_metadata(hf: dict[str, Any]) -> dict[str, Any]:
    """Metadata of a rotary, RMS-normed decoder (llama, gemma): the inverse of `gguf_model.rotary_decoder_config`."""
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    metadata: dict[str, Any] = {
        Keys.LLM.CONTEXT_LENGTH: hf["max_position_embeddings"],
        Keys.LLM.EMBEDDING_LENGTH: hf["hidden_size"],
        Keys.LLM.BLOCK_COUNT: hf["num_hidden_layers"],
        Keys.LLM.FEED_FORWARD_LENGTH: hf["intermediate_size"],
        Keys.Attention.HEAD_COUNT: heads,
        Keys.Attention.HEAD_COUNT_KV: hf.get("num_key_value_heads") or heads,
        Keys.Attention.KEY_LENGTH: head_dim,
        Keys.Attention.VALUE_LENGTH: head_dim,
        Keys.Attention.LAYERNORM_RMS_EPS: float(hf["rms_norm_eps"]),
        Keys.Rope.DIMENSION_COUNT: head_dim,
        Keys.Rope.FREQ_BASE: theta,
    }
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        metadata[Keys.Rope.SCALING_TYPE] = gguf.RopeScalingType.LINEAR.value
        metadata[Keys.Rope.SCALING_FACTOR] = float(rope["factor"])
    elif kind == "yarn":
        metadata[Keys.Rope.SCALING_TYPE] = gguf.RopeScalingType.YARN.value
        metadata[Keys.Rope.SCALING_FACTOR] = float(rope["factor"])
        metadata[Keys.Rope.SCALING_ORIG_CTX_LEN] = rope.get("original_max_position_embeddings",
                                                            hf["max_position_embeddings"])
        for key, gguf_key in (("attention_factor", Keys.Rope.SCALING_YARN_ATTN_FACTOR),
                              ("beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
                              ("beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW)):
            if rope.get(key) is not None:
                metadata[gguf_key] = float(rope[key])
    elif kind == "llama3":
        # the scaling itself travels as the rope_freqs tensor (llama3_rope_freqs); the length makes it recoverable
        metadata[Keys.Rope.SCALING_ORIG_CTX_LEN] = rope.get("original_max_position_embeddings", 8192)
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} cannot be written to GGUF; supported: default, linear, yarn, llama3")
    return metadata


def llama3_rope_freqs(hf: dict[str, Any]) -> dict[str, torch.Tensor]:
    """llama.cpp's ``rope_freqs`` tensor (per-frequency divisors) for llama3 rope scaling; none otherwise."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return {}
    dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    smooth = np.clip((original / wavelen - low) / (high - low), 0.0, 1.0)
    factors = 1.0 / ((1.0 - smooth) / factor + smooth)  # 1 for short wavelengths, factor for long ones
    return {_ROPE_FREQS: torch.from_numpy(factors.astype(np.float32))}


def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (``LlamaModel.permute``) for a weight ``(rows, in)`` or bias ``(rows,)``.

    The inverse of `decoderkit.gguf_model.unpermute_rope_rows`; ``n_heads`` is ``num_key_value_heads`` for k.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of an even size")
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


# --------------------------------------------------------------------------------------------------------------------
# Types


def resolve_type(name: str, hf_config: dict[str, Any]) -> Q:
    """The GGUF type for a `--type` name; ``auto`` is llama.cpp's converter default (bf16 stays bf16, else f16)."""
    key = name.lower()
    if key == "auto":
        return Q.BF16 if str(hf_config.get("dtype", hf_config.get("torch_dtype"))) == "bfloat16" else Q.F16
    if key not in GGUF_TYPES:
        raise ValueError(f"GGUF type {name!r} is not supported; supported: auto, {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[key]


def tensor_type(gguf_name: str, shape: tuple[int, ...], requested: Q, is_output: bool) -> Q:
    """The type llama.cpp's converter / llama-quantize gives one tensor (see the module docstring)."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return Q.F32
    if gguf_name.startswith("position_embd."):
        return Q.F32
    qtype = Q.Q8_0 if is_output and requested in (Q.Q4_0, Q.Q4_1) else requested
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        return Q.F16
    return qtype


# --------------------------------------------------------------------------------------------------------------------
# Writing


def _families_by_architecture() -> dict[str, Family]:
    from decoderkit.families import FAMILIES

    return {f.gguf_architecture: f for f in FAMILIES.values() if f.gguf_architecture}


def _family_for(hf_config: dict[str, Any]) -> Family:
    from decoderkit.families import get_family

    family = get_family(hf_config.get("model_type", ""))
    if not family.gguf_architecture:
        raise ValueError(f"model_type {family.model_type!r} has no llama.cpp architecture; GGUF files can be written "
                         f"for {', '.join(f.model_type for f in _families_by_architecture().values())}")
    return family


def _typed(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        raise TypeError(f"GGUF metadata {key}: cannot write a {type(value).__name__}")


def write_gguf_from_state(
    output: str | os.PathLike[str],
    hf_config: dict[str, Any],
    hf_state: dict[str, torch.Tensor],
    tokenizer: Tokenizer | None = None,
    type: str = "auto",
    name: str | None = None,
) -> GGUFWriteResult:
    """Write a GGUF file from a transformers config.json dict and a causal LM's state dict (transformers' names).

    Args:
        output: the .gguf file to write (replaced atomically if it exists).
        hf_config: the model's config.json dict (``model_type`` picks the family).
        hf_state: transformers parameter name -> tensor (any float dtype; a tied ``lm_head.weight`` may be absent).
        tokenizer: written as ``tokenizer.ggml.*``; without one the file says ``tokenizer.ggml.model = none``.
        type: ``auto`` or one of `GGUF_TYPES`.
        name: ``general.name``.

    Raises:
        ValueError: an architecture llama.cpp lacks, an unsupported type, settings or tensors llama.cpp cannot
            represent (the message names them); nothing is left on disk.
    """
    from decoderkit.gguf_model import _gguf_to_hf_names

    family = _family_for(hf_config)
    requested = resolve_type(type, hf_config)
    arch = family.gguf_architecture
    metadata = family.config_to_gguf(hf_config)
    n_layers = hf_config[family.gguf_layers_key]
    to_hf = _gguf_to_hf_names(arch, n_layers)
    to_gguf = {hf: g for g, hf in to_hf.items()}
    state = {k: v for k, v in hf_state.items() if not (k == "lm_head.weight" and "lm_head.weight" not in to_gguf)}
    unknown = sorted(set(state) - set(to_gguf))
    if unknown:
        raise ValueError(f"{family.model_type}: tensors {unknown[:5]} have no place in llama.cpp's {arch} "
                         "architecture (as decoderkit reads it back)")

    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or family.architecture("causal_lm"))
    for key, value in metadata.items():
        _typed(writer, key.format(arch=arch), value)
    writer.add_file_type(_FILE_TYPES[requested])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab_size = hf_config.get("vocab_size") or state[to_hf["token_embd.weight"]].shape[0]
    # llama.cpp sizes token_embd from the vocabulary, or from this key when the file has none (tokenizer "none")
    writer.add_vocab_size(vocab_size)
    if tokenizer is not None:
        from decoderkit.gguf_vocab_writer import add_tokenizer

        add_tokenizer(writer, tokenizer, vocab_size, hf_config)
    else:
        writer.add_tokenizer_model("none")
        for key in ("bos", "eos", "pad"):
            if isinstance(token_id := hf_config.get(f"{key}_token_id"), int):
                getattr(writer, f"add_{key}_token_id")(token_id)

    result = GGUFWriteResult(path=Path(output), type=requested.name.lower(), tokenizer=tokenizer is not None)
    has_output = "lm_head.weight" in state
    tensors = {**family.gguf_extra_tensors(hf_config), **{to_gguf[k]: v for k, v in state.items()}}
    for gguf_name, tensor in tensors.items():
        weight = family.fix_tensor_for_gguf(gguf_name, tensor.detach().to("cpu", torch.float32), hf_config)
        is_output = gguf_name == "output.weight" or (gguf_name == "token_embd.weight" and not has_output)
        qtype = tensor_type(gguf_name, tuple(weight.shape), requested, is_output)
        writer.add_tensor(gguf_name, gguf.quants.quantize(weight.contiguous().numpy(), qtype), raw_dtype=qtype)
        result.tensor_types[gguf_name] = qtype
    _write_atomic(writer, Path(output))
    return result


def _write_atomic(writer: gguf.GGUFWriter, path: Path) -> None:
    # GGUFWriter writes to a path of its own opening, so the atomic helper hands it the temporary path
    with atomic_path(path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def write_gguf(
    model_dir: str | os.PathLike[str], output: str | os.PathLike[str], type: str = "auto"
) -> GGUFWriteResult:
    """Write the causal LM in a Hugging Face model directory (and its tokenizer.json, if any) as a GGUF file.

    The weights are read in float32 (bf16 and f16 checkpoints exactly) and converted to ``type`` tensor by tensor.

    Raises:
        ValueError: see `write_gguf_from_state`; also a directory without a causal LM.
    """
    from decoderkit import AutoModelForCausalLM
    from decoderkit.saving import _hf_config, _hf_state_dict

    resolve_type(type, {})  # an unknown type fails before the model is read
    model_dir = Path(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device="cpu", progress=False)
    hf_config = _hf_config(model)
    source_dtype = model.decoder_config.hf_config.get("dtype", model.decoder_config.hf_config.get("torch_dtype"))
    hf_config["dtype"] = source_dtype  # "auto" follows the checkpoint's own dtype, not the float32 we read it in
    tokenizer = None
    if (model_dir / "tokenizer.json").is_file():
        from decoderkit.tokenizer import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    else:
        logger.warning("%s: no tokenizer.json; the GGUF file will carry no vocabulary", model_dir)
    return write_gguf_from_state(output, hf_config, _hf_state_dict(model), tokenizer, type, name=model_dir.name)
