"""Quantized linear layers (decoderkit.layers.quantized) and Hugging Face checkpoints quantized on load."""

from __future__ import annotations

import pytest
import torch
from oracle import build, rel_err, save

import decoderkit
from decoderkit import AutoModelForCausalLM, QuantizationConfig, kernels
from decoderkit.layers import quantized as qmod
from decoderkit.layers.quantized import Int4Linear, Int8Embedding, Int8Linear


def _reference_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """The documented formula, in float64: w = (q - 8) * scale + zero, per group of `group` inputs."""
    s = scales.double().repeat_interleave(group, dim=1)
    z = zeros.double().repeat_interleave(group, dim=1)
    return (codes.double() - 8.0) * s + z


needs_kernel = pytest.mark.skipif(not kernels.available(), reason="decoderkit's kernel did not build here")
LAYOUTS = [pytest.param("kernel", marks=needs_kernel), "torch"]


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_layer_equals_its_float_reference(group, bias):
    """torch's layout, from codes with (q - 8) * scale + zero."""
    gen = torch.Generator().manual_seed(group)
    n, k = 48, 256
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=gen) + 0.1
    zeros = torch.randn(n, k // group, generator=gen)
    layer = Int4Linear(k, n, bias=bias, group_size=group, dtype=torch.float32, layout="torch")
    for name, value in Int4Linear.pack(codes, scales, zeros, torch.float32, layout="torch").items():
        setattr(layer, name, value)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n, generator=gen), requires_grad=False)
    x = torch.randn(2, 3, k, generator=gen)
    weight = _reference_int4(codes, scales, zeros, group)
    expected = x.double() @ weight.t() + (layer.bias.double() if bias else 0.0)
    assert layer(x).shape == (2, 3, n)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-4)
    # dequantize() reads the kernel's packed layout back: the very weight the kernel multiplies by
    assert torch.equal(layer.dequantize(), weight.float())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_layer_equals_its_float_reference(bias, layout):
    gen = torch.Generator().manual_seed(1)
    n, k = 40, 96
    layer = Int8Linear(k, n, bias=bias, dtype=torch.float32, layout=layout)
    layer.weight_int8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    layer.scales = Int8Linear.row_scales(torch.rand(n, generator=gen) * 0.01, torch.float32, layout)
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n, generator=gen), requires_grad=False)
    x = torch.randn(5, k, generator=gen)
    weight = layer.weight_int8.double() * layer.scales.double().reshape(n, 1)
    expected = x.double() @ weight.t() + (layer.bias.double() if bias else 0.0)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantize_error_is_within_half_a_step(layout):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=gen)
    int8 = Int8Linear(128, 64, dtype=torch.float32, layout=layout)
    for name, value in Int8Linear.quantize(w, torch.float32, layout).items():
        setattr(int8, name, value)
    # each row's step is its scale, max |w| / 127 times the clip ratio quantize chose: half a step off within the
    # 127 steps, the clipped weights beyond them saturated
    step8 = int8.scales.float().reshape(-1, 1)
    assert (step8 <= w.abs().amax(dim=1, keepdim=True) / 127 * (1 + 1e-6)).all()
    inside = w.abs() <= 127 * step8
    assert (int8.weight_int8[~inside].abs() == 127).all()
    assert ((int8.dequantize() - w).abs() <= step8 / 2 + 1e-6)[inside].all()
    int4 = Int4Linear(128, 64, group_size=32, dtype=torch.float32, layout=layout)
    for name, value in Int4Linear.quantize(w, 32, torch.float32, layout).items():
        setattr(int4, name, value)
    groups = w.reshape(64, 4, 32)
    step4 = ((groups.amax(-1) - groups.amin(-1)) / 15).repeat_interleave(32, dim=1)
    # the kernel layout rounds each group's scale and minimum to float16 first (relative error 2^-11; the codes
    # are rounded against the float16 values): the end codes may then sit that much further out
    slack = 1e-5 if layout == "torch" else 1e-5 + 2**-10 * (15 * step4 + groups.abs().amax(-1).repeat_interleave(32, 1))
    assert ((int4.dequantize() - w).abs() <= step4 / 2 + slack).all()


def _row_errors(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Squared error of each row of `w` rounded to int8 against its scale (out,), in float64."""
    q = torch.round(w.double() / scale.double()[:, None]).clamp(-127, 127)
    return (q * scale.double()[:, None] - w.double()).square().sum(1)


def test_int8_scale_is_the_least_squared_error_candidate():
    """Every row's scale is max|w| / 127 times the ratio of INT8_CLIP_RATIOS with the least squared error (checked
    against all of them in float64), never worse than plain absmax; a row on a grid of its own (a model converted
    from GGUF blocks) with one weight off it clips that weight and lines its steps up with the grid."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(48, 2048, generator=gen)
    w[0] = torch.randint(-100, 101, (2048,), generator=gen) * 0.01
    w[0, 7] = 1.35  # absmax: steps of 1.35 / 127 that miss the 0.01 grid; 0.94 of it is 0.99920 grid steps
    scales = Int8Linear.quantize(w, torch.float32, "torch")["scales"]
    base = w.abs().amax(1) / 127
    candidates = torch.stack([_row_errors(w, base * r) for r in qmod.INT8_CLIP_RATIOS], 1)
    chosen = _row_errors(w, scales)
    assert torch.allclose(chosen, candidates.min(1).values, rtol=1e-9)
    assert (chosen <= _row_errors(w, base) * (1 + 1e-9)).all()
    assert scales[0] < 0.95 * base[0] and chosen[0] < 0.5 * _row_errors(w, base)[0], (scales[0], base[0])


def test_int8_shards_with_summed_clip_errors_pick_the_whole_rows_scale():
    """Tensor parallelism quantizes slices of each row's inputs: with the rows' max |w| and their clipping errors
    summed over the slices, each slice gets the codes and scales of the whole row."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(40, 128, generator=gen) * torch.rand(40, 1, generator=gen)
    w[3, 100] = 6.0
    whole = Int8Linear.quantize(w, torch.float32, "torch")
    halves = w[:, :64], w[:, 64:]
    amax = torch.maximum(halves[0].abs().amax(1), halves[1].abs().amax(1))
    errors = sum(Int8Linear.clip_errors(h, amax) for h in halves)
    parts = [Int8Linear.quantize(h, torch.float32, "torch", amax=amax, errors=errors) for h in halves]
    for part in parts:
        assert torch.equal(part["scales"], whole["scales"])
    assert torch.equal(torch.cat([p["weight_int8"] for p in parts], 1), whole["weight_int8"])
    # on its own, a half without the outlier would choose another scale for row 3
    alone = Int8Linear.quantize(halves[0], torch.float32, "torch")["scales"]
    assert not torch.equal(alone[3], whole["scales"][3])


@needs_kernel
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_int4_kernel_layout_equals_its_float_reference(group, scale_dtype):
    """decoderkit's layout, from codes with scale * q + offset (GGUF's Q4_1 form; Q4_0 is offset = -8 scale)."""
    gen = torch.Generator().manual_seed(group)
    n, k = 40, 256
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) + 0.1).to(scale_dtype)
    offsets = torch.randn(n, k // group, generator=gen).to(scale_dtype)
    layer = Int4Linear(k, n, group_size=group, dtype=torch.float32, layout="kernel")
    for name, value in Int4Linear.pack_affine(codes, scales, offsets, torch.float32, layout="kernel").items():
        setattr(layer, name, value)
    weight = codes.double() * scales.double().repeat_interleave(group, 1) + offsets.double().repeat_interleave(group, 1)
    assert torch.equal(layer.dequantize(), weight.float())
    for rows in (1, 3, 16, 17, 40):  # the kernel's tiles and, past KERNEL_ROWS, the dequantized GEMM
        x = torch.randn(rows, k, generator=gen)
        torch.testing.assert_close(layer(x).double(), x.double() @ weight.float().double().t(), rtol=1e-5, atol=1e-4)


def test_int4_packing_in_row_chunks_equals_packing_at_once(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (320, 64), generator=gen, dtype=torch.uint8)
    scales, zeros = torch.rand(320, 2, generator=gen), torch.randn(320, 2, generator=gen)
    whole = Int4Linear.pack(codes, scales, zeros, torch.float32, layout="torch")["weight_int4pack"]
    monkeypatch.setattr(qmod, "_PACK_ROWS", 64)
    assert torch.equal(Int4Linear.pack(codes, scales, zeros, torch.float32, layout="torch")["weight_int4pack"], whole)


# ---------------------------------------------------------------------------------------------- HF checkpoints
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # intermediate 128 and hidden 64: every projection has inputs divisible by 32 and 64, outputs by 16
    model = build("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=96, tie_word_embeddings=False)
    return save(model, tmp_path_factory.mktemp("q") / "llama")


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    model = build("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=96, tie_word_embeddings=True)
    return save(model, tmp_path_factory.mktemp("q") / "tied")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("quantization, bound", [("int8", 0.05), ("int4", 0.5),
                                                 (QuantizationConfig(bits=4, group_size=64), 0.5)])
def test_hf_checkpoint_quantized_on_load_is_close_to_float(llama_dir, quantization, bound, layout, monkeypatch):
    monkeypatch.setenv("DECODERKIT_KERNELS", "1" if layout == "kernel" else "0")
    ids = torch.tensor([[3, 14, 15, 9, 26, 5, 35]])
    ref = AutoModelForCausalLM.from_pretrained(llama_dir, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype="float32", quantization=quantization)
    kind = Int8Linear if quantization == "int8" else Int4Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, kind)
    assert model.lm_head.layout == layout
    assert isinstance(model.lm_head, kind)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)  # untied: the embedding stays float
    assert model.dtype == torch.float32
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    err = rel_err(model(ids).logits, ref(ids).logits)
    print(f"{quantization}: logits max error relative to max |logit|: {err:.4f}")
    assert 0 < err < bound
    # and exactly (to float rounding) the float model holding the dequantized weights
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, qmod.QuantizedLinear):
                ref.get_submodule(name).weight.copy_(module.dequantize())
    assert rel_err(model(ids).logits, ref(ids).logits) < 1e-5


def test_tied_head_and_embedding_share_one_int8_table(tied_dir):
    model = AutoModelForCausalLM.from_pretrained(tied_dir, dtype="float32", quantization="int4")
    head, embed = model.lm_head, model.model.embed_tokens
    assert isinstance(head, Int8Linear) and isinstance(embed, Int8Embedding)
    assert head.weight_int8 is embed.weight_int8
    ref = AutoModelForCausalLM.from_pretrained(tied_dir, dtype="float32")
    ids = torch.tensor([[1, 2, 3, 40, 50]])
    torch.testing.assert_close(embed(ids), ref.model.embed_tokens(ids), atol=0.02, rtol=0)
    assert rel_err(model(ids).logits, ref(ids).logits) < 0.3


def test_bfloat16_activations_and_greedy_generation(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype="bfloat16", quantization="int8")
    assert model.dtype == torch.bfloat16
    # torch's kernels take their scales in the activation dtype; decoderkit's keeps float32 per-channel scales
    assert model.lm_head.scales.dtype == (torch.float32 if model.lm_head.layout == "kernel" else torch.bfloat16)
    out = model.generate(torch.tensor([[3, 14, 15]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 8)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("value, message", [
    ("int3", "quantization='int3' is not supported"),
    ("q4_0", "one of ['none', 'int8', 'int4']"),
    (8, "quantization=8 is not supported"),
])
def test_unknown_quantization_names_say_what_is_supported(llama_dir, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization=value)


def test_unsupported_bits_and_group_sizes():
    with pytest.raises(ValueError, match=r"group_size=48 is not supported; supported: \[32, 64, 128\]"):
        QuantizationConfig(bits=4, group_size=48)
    with pytest.raises(ValueError, match=r"bits=2 is not supported; supported: \[8, 4\]"):
        QuantizationConfig(bits=2)
    with pytest.raises(ValueError, match="int8 quantization is per output channel"):
        QuantizationConfig(bits=8, group_size=32)


def test_group_size_that_does_not_divide_a_layer_names_the_layer(llama_dir):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: int4 group_size 128 does not "
                                         r"divide its input size 64"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization=QuantizationConfig(bits=4, group_size=128))


def test_quantized_weights_cannot_be_fully_fine_tuned_but_take_lora(llama_dir):
    from decoderkit.training.lora import LoraConfig, QuantizedLora, apply_lora
    from decoderkit.training.trainer import Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype="float32", quantization="int8")
    data = [{"input_ids": [3, 4, 5, 6], "labels": [3, 4, 5, 6]}]
    with pytest.raises(ValueError, match="cannot be fully fine-tuned: train LoRA adapters over the frozen quantized "
                                         "base .* or load it with quantization='none'"):
        Trainer(model, TrainingArguments(output_dir="unused", max_steps=1, per_device_batch_size=1), data)
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # tests/test_lora_quantized.py
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLora)


def test_quantization_config_is_exported():
    assert decoderkit.QuantizationConfig is qmod.QuantizationConfig


def test_a_quantized_model_is_not_saved_as_a_float_checkpoint(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization="int8")
    with pytest.raises(ValueError, match="quantization='none' to save it"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- CLI and server
@pytest.mark.parametrize("flag, kind", [("int8", Int8Linear), ("int4", Int4Linear), ("none", torch.nn.Linear)])
def test_cli_quantize_reaches_the_loader(capsys, monkeypatch, tmp_path, flag, kind):
    from test_cli import save_tiny_model

    from decoderkit import cli

    directory = save_tiny_model(tmp_path / "tiny")
    loaded = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(original(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    code = cli.main(["generate", "--model", str(directory), "--quantize", flag, "--greedy", "--max-new-tokens", "4",
                     "--dtype", "float32", "hello"])
    out, err = capsys.readouterr()
    assert code == 0, err
    # isinstance: a float layer may have become a DecodeLinear (an nn.Linear) when the decode step ran
    assert isinstance(loaded[0].model.layers[0].mlp.up_proj, kind)
    bench = cli.main(["bench", "--model", str(directory), "--quantize", flag, "-p", "4", "-n", "2", "--json"])
    assert bench == 0
    assert isinstance(loaded[1].model.layers[0].mlp.up_proj, kind)


def test_cli_rejects_an_unknown_quantize_value(capsys):
    from decoderkit import cli

    assert cli.main(["generate", "--quantize", "int3", "hi"]) == 2
    assert "--quantize: invalid choice: 'int3' (choose from 'int8', 'int4', 'none')" in capsys.readouterr().err


def test_server_engine_runs_a_quantized_model(tmp_path):
    from test_serve import build_tiny_model, reference_greedy

    from decoderkit.serve.app import build_parser, load_engine
    from decoderkit.serve.engine import SamplingParams

    directory = build_tiny_model(tmp_path / "tiny")
    engine, _, _ = load_engine(build_parser().parse_args([str(directory), "--quantize", "int8", "--device", "cpu",
                                                       "--dtype", "float32"]))
    model = engine.model
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)
    prompt = [1, 5, 9, 14, 20]
    try:
        engine.start()
        out = engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0))
    finally:
        engine.stop()
    assert list(out.token_ids) == reference_greedy(model, prompt, 6)
