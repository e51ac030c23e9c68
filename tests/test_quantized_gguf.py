"""GGUF files kept quantized on load ("gguf-native"): packed int4 / int8 layers filled from the file's blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_gguf_model import TINY, smollm2_path, write_tiny_llama  # noqa: F401 - smollm2_path is a fixture

from decoderkit import AutoModelForCausalLM, kernels
from decoderkit import gguf_model as gm
from decoderkit.layers.quantized import Int4Linear, Int8Embedding, Int8Linear, QuantizedLinear

LAYOUTS = [pytest.param("kernel", marks=pytest.mark.skipif(not kernels.available(), reason="no kernel build")),
           "torch"]

LINEARS = [f"model.layers.{i}.{p}" for i in range(TINY["layers"])
           for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("tie", [True, False])
def test_q4_tensors_stay_int4_and_dequantize_to_exactly_gguf_values(tmp_path, qtype, tie):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path, qtype, tie=tie)  # gguf's own dequantize, in HF layout (q/k un-permuted)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    for name in LINEARS + ["lm_head"]:
        layer = model.get_submodule(name)
        assert isinstance(layer, Int4Linear) and layer.group_size == 32, name
        source = "model.embed_tokens.weight" if tie and name == "lm_head" else f"{name}.weight"
        assert torch.equal(layer.dequantize(), torch.from_numpy(expected[source])), name
    # the embedding gathers float rows, equal to the file's values
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(expected["model.embed_tokens.weight"]))


def test_quantized_path_matches_the_dequantized_float_path(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, Q.Q4_1, tie=True)
    packed = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    floats = AutoModelForCausalLM.from_pretrained(path, dtype="float32", quantization="none")
    assert not any(isinstance(m, QuantizedLinear) for m in floats.modules())
    exact = AutoModelForCausalLM.from_pretrained(path, dtype="float64", quantization="none")
    ids = torch.tensor([[1, 5, 7, 9, 33, 60]])
    # The packed kernel sums in another order than the float GEMM: both are float32 roundings of the float64
    # model, equally far from it (logits here reach ~12, so the two differ by a few 1e-5)
    truth = exact(ids).logits
    packed_err = (packed(ids).logits.double() - truth).abs().max()
    float_err = (floats(ids).logits.double() - truth).abs().max()
    assert packed_err <= 2 * float_err + 1e-6, (packed_err, float_err)
    a = packed.generate(ids, max_new_tokens=12, do_sample=False)
    b = floats.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.slow
def test_compiled_decode_step_runs_packed_weights(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, Q.Q4_0, tie=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="bfloat16")
    ids = torch.tensor([[1, 5, 7, 9]])
    eager = model.generate(ids, max_new_tokens=8, do_sample=False, cache_implementation="static")
    compiled = model.generate(ids, max_new_tokens=8, do_sample=False, compile=True)
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_q8_0_stays_exact_on_the_kernel_and_becomes_int8_per_channel_on_torch(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("DECODERKIT_KERNELS", "1" if layout == "kernel" else "0")
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama(path, Q.Q8_0, tie=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    head, embed = model.lm_head, model.model.embed_tokens
    assert isinstance(head, Int8Linear) and isinstance(embed, Int8Embedding)
    assert head.weight_int8 is embed.weight_int8
    for name in LINEARS + ["lm_head"]:
        layer = model.get_submodule(name)
        assert isinstance(layer, Int8Linear) and layer.layout == layout, name
        source = "model.embed_tokens.weight" if name == "lm_head" else f"{name}.weight"
        want = torch.from_numpy(expected[source])
        if layout == "kernel":  # Q8_0's own codes and float16 scale per 32 inputs
            assert layer.group_size == 32 and layer.scales.dtype == torch.float16, name
            assert torch.equal(layer.dequantize(), want), name
            continue
        err = (layer.dequantize() - want).abs()
        # requantizing per row: at most half a step of the row's new scale away from the file's value
        assert (err <= layer.scales.float()[:, None] / 2 * (1 + 1e-5)).all(), name
        assert err.max() > 0  # it is an approximation, and the test sees it
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(embed(ids), head.dequantize()[ids])
    x = torch.randn(3, head.in_features)
    torch.testing.assert_close(head(x), x @ head.dequantize().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_becomes_int8_per_row(tmp_path, qtype):
    from test_gguf_model import _finish, _minimal_llama_writer

    # gguf can dequantize K-quants but not quantize them: random blocks (bytes < 0x3c keep fp16 scales finite)
    hidden, ffn = 512, 96
    block_size, type_size = gm.gguf.GGML_QUANT_SIZES[qtype]
    packed = np.random.default_rng(0).integers(0, 0x3C, (ffn, hidden // block_size * type_size), np.uint8)
    path = tmp_path / f"{qtype.name}.gguf"
    writer = _minimal_llama_writer(path, hidden, ffn)
    writer.add_tensor("blk.0.ffn_up.weight", packed, raw_dtype=qtype)
    _finish(writer)
    (name, blocks), *_ = gm.iter_gguf_tensors(gm.open_gguf(path), {"num_hidden_layers": 1}, native=True)
    assert name == "model.layers.0.mlp.up_proj.weight" and isinstance(blocks, gm.GGUFBlocks)
    assert blocks.codes.dtype == torch.int8 and blocks.params.shape == (ffn, 1, 2)
    reference = torch.from_numpy(gm.gguf.quants.dequantize(packed, qtype))
    err = (blocks.dequantize() - reference).abs()
    scale = blocks.params[:, 0, :1]
    assert (err <= scale / 2 * (1 + 1e-5)).all() and err.max() > 0
    print(f"{qtype.name} -> int8 per row: max abs error {err.max():.3g}, relative to max |w| "
          f"{float(err.max() / reference.abs().max()):.3g}")


def test_type_without_a_quantized_form_says_to_use_none(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, Q.Q8_0, tie=True)
    monkeypatch.setattr(gm, "INT8_TYPES", frozenset())  # as for a type gguf reads but we have no packed form of
    with pytest.raises(ValueError, match=r"type Q8_0, which decoderkit cannot run quantized.*quantization='none'"):
        AutoModelForCausalLM.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, quantization="none")
    assert model.dtype == torch.float32


def test_gguf_default_activation_dtype_follows_the_kernel_and_int8_requantizes(tmp_path):
    from decoderkit import kernels

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, Q.Q4_1, tie=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == (torch.float32 if kernels.available() else torch.bfloat16)
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4Linear)
    # an explicit int8 dequantizes the file tensor by tensor and quantizes each float weight again
    int8 = AutoModelForCausalLM.from_pretrained(path, quantization="int8", dtype="float32")
    assert isinstance(int8.model.layers[0].mlp.up_proj, Int8Linear)


@pytest.mark.slow
def test_smollm2_q4_1_loads_packed_and_dequantizes_to_the_float_path(smollm2_path):  # noqa: F811
    packed = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype="float32")
    floats = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype="float32", quantization="none")
    for i in (0, 17, 29):  # three layers: the fp32 read-back through torch's kernel is slow
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
            full = f"model.layers.{i}.{name}"
            layer = packed.get_submodule(full)
            assert isinstance(layer, Int4Linear), full
            assert torch.equal(layer.dequantize(), floats.get_submodule(full).weight), full
    head = packed.lm_head
    assert isinstance(head, Int8Linear) and isinstance(packed.model.embed_tokens, Int8Embedding)
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    if head.layout == "kernel":
        # token_embd is Q8_0 and tied: kept exactly, so the whole model is the float model's weights, and only
        # the kernel's order of sums differs from the float GEMM's
        assert torch.equal(head.dequantize(), floats.lm_head.weight)
        torch.testing.assert_close(packed(ids).logits, floats(ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(packed.generate(ids, max_new_tokens=32, do_sample=False),
                           floats.generate(ids, max_new_tokens=32, do_sample=False))
        return
    # torch's kernels: int8 per row, within half a step of the file's values
    err = (head.dequantize() - floats.lm_head.weight).abs()
    assert (err <= head.scales[:, None] / 2 * (1 + 1e-5)).all()
    a = packed.generate(ids, max_new_tokens=16, do_sample=False)
    b = floats.generate(ids, max_new_tokens=16, do_sample=False)
    # The requantized int8 table moves the logits a little: the texts agree for the first 5 new tokens, then part
    # at a close call (measured: new token 6). With the float model given the same int8 table, they agree exactly.
    assert torch.equal(a[0, :11], b[0, :11]), (a, b)
    with torch.no_grad():
        floats.model.embed_tokens.weight.copy_(head.dequantize())  # tied: the head reads it too
    torch.testing.assert_close(packed(ids).logits, floats(ids).logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(packed.generate(ids, max_new_tokens=16, do_sample=False),
                       floats.generate(ids, max_new_tokens=16, do_sample=False))
