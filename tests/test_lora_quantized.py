"""LoRA adapters over frozen packed int8 / int4 bases: the same training step as LoRA on the float model holding the
dequantized weights, with the input gradient passed through each packed layer's dequantized weight."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from oracle import build, save
from test_gguf_model import write_tiny_llama

from decoderkit import AutoModelForCausalLM, kernels
from decoderkit.layers.quantized import Int4Embedding, Int8Embedding, QuantizedLinear
from decoderkit.training.lora import (
    LoraConfig,
    QuantizedLora,
    apply_lora,
    load_adapter,
    merge_and_unload,
    save_adapter,
)

LAYOUTS = [pytest.param("kernel", marks=pytest.mark.skipif(not kernels.available(), reason="no kernel build")),
           "torch"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # hidden 64, intermediate 128: every projection's input divides by 32, every output by 16 (torch's int4 layout)
    model = build("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=96, tie_word_embeddings=False)
    return save(model, tmp_path_factory.mktemp("lora-q") / "llama")


def _float_twin(quantized: torch.nn.Module, path) -> torch.nn.Module:
    """The float model of the same checkpoint, holding exactly the quantized model's (dequantized) weights."""
    floats = AutoModelForCausalLM.from_pretrained(path, dtype="float32", quantization="none")
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, (QuantizedLinear, Int8Embedding, Int4Embedding)):
                floats.get_submodule(name).weight.copy_(module.dequantize())
    return floats


def _lora_step(model: torch.nn.Module, ids: torch.Tensor, checkpointing: bool = False):
    """Adapters on every decoder linear, A and B drawn from a fixed seed (B non-zero, so every gradient flows), and
    one forward and backward pass of the LM loss: (loss, {adapter parameter: gradient})."""
    apply_lora(model, LoraConfig(r=4, lora_alpha=8.0, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads) and all(g is not None for g in grads.values())
    return loss.detach(), grads


def _assert_same_step(quantized: torch.nn.Module, floats: torch.nn.Module, ids: torch.Tensor,
                      checkpointing: bool = False) -> None:
    loss_q, grads_q = _lora_step(quantized, ids, checkpointing)
    loss_f, grads_f = _lora_step(floats, ids, checkpointing)
    assert any(isinstance(m, QuantizedLora) for m in quantized.modules())
    torch.testing.assert_close(loss_q, loss_f, rtol=1e-5, atol=1e-5)
    assert grads_q.keys() == grads_f.keys()
    for name in grads_q:
        torch.testing.assert_close(grads_q[name], grads_f[name], rtol=1e-5, atol=1e-5, msg=name)


# 7 rows run the packed kernels (one-row and few-row paths), 2 x 12 rows the panel GEMM
IDS = [torch.tensor([[3, 14, 15, 9, 26, 5, 35]]),
       torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(2))]
# 2 x 150 rows: past every layer's kernel rows (layers/quantized.py INT4_KERNEL_ROWS), the dequantized GEMM
LONG_IDS = torch.randint(3, 96, (2, 150), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("ids", IDS, ids=["kernel-rows", "panel-rows"])
def test_lora_step_on_a_quantized_base_equals_lora_on_its_dequantized_float_model(llama_dir, quantization, layout,
                                                                                   ids, monkeypatch):
    monkeypatch.setenv("DECODERKIT_KERNELS", "1" if layout == "kernel" else "0")
    quantized = AutoModelForCausalLM.from_pretrained(llama_dir, dtype="float32", quantization=quantization)
    assert quantized.lm_head.layout == layout
    packed = {n: b.clone() for n, b in quantized.named_buffers()}
    _assert_same_step(quantized, _float_twin(quantized, llama_dir), ids)
    # the base stays as it was: packed, frozen
    assert all(torch.equal(b, packed[n]) for n, b in quantized.named_buffers() if n in packed)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_lora_step_on_a_gguf_packed_base_equals_lora_on_the_dequantized_file(tmp_path, qtype):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, qtype, tie=True)
    quantized = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    assert isinstance(quantized.model.layers[0].mlp.up_proj, QuantizedLinear)
    floats = AutoModelForCausalLM.from_pretrained(path, dtype="float32", quantization="none")
    _assert_same_step(quantized, floats, LONG_IDS)


def test_gradient_checkpointing_over_a_quantized_base(llama_dir):
    quantized = AutoModelForCausalLM.from_pretrained(llama_dir, dtype="float32", quantization="int4")
    _assert_same_step(quantized, _float_twin(quantized, llama_dir), IDS[1], checkpointing=True)
    assert quantized.model.gradient_checkpointing and quantized.training


def test_quantized_lora_trains_saves_and_refuses_to_merge(llama_dir, tmp_path):
    from decoderkit.training.trainer import Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype="float32", quantization="int8")
    data = [{"input_ids": [3, 4, 5, 6, 7, 8], "labels": [3, 4, 5, 6, 7, 8]}] * 4
    # full fine-tuning of packed weights: an error naming both ways out
    with pytest.raises(ValueError, match=r"cannot be fully fine-tuned: train LoRA adapters .*quantization='none'"):
        Trainer(model, TrainingArguments(output_dir=str(tmp_path / "full"), max_steps=1, per_device_batch_size=2),
                data)
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_B." in n}
    codes = model.model.layers[0].self_attn.q_proj.weight_int8.clone()
    Trainer(model, TrainingArguments(output_dir=str(tmp_path / "lora"), max_steps=1, per_device_batch_size=2,
                                     learning_rate=1e-2), data).train()
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], b) for n, b in before.items())  # B left zero
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight_int8, codes)
    adapter = save_adapter(model, tmp_path / "adapter")
    # the adapter loads on the float model of the same weights, and computes what it computed over the packed base
    floats = load_adapter(_float_twin(model, llama_dir), adapter)
    model.eval()
    torch.testing.assert_close(floats(IDS[0]).logits, model(IDS[0]).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot be merged into them: save the adapter .*quantization='none'"):
        merge_and_unload(model)


def test_modules_to_save_cannot_name_a_packed_module(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype="float32", quantization="int8")
    with pytest.raises(ValueError, match="modules_to_save: lm_head holds packed"):
        apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))


def test_cli_trains_lora_over_a_quantized_base(tmp_path, capsys):
    import json
    from pathlib import Path

    from decoderkit.training.__main__ import main

    asset = Path(__file__).resolve().parents[1] / "src/decoderkit/assets/default-model"
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog and sings " * 40)
    common = ["--model", str(asset), "--data", str(tmp_path / "train.txt"), "--block-size", "32", "--steps", "2",
              "--batch-size", "2", "--no-progress", "--no-plot"]
    assert main([*common, "--out", str(tmp_path / "q"), "--lora", "--quantize", "int4"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    assert (tmp_path / "q/final/adapter_model.safetensors").exists()
    # packed weights: adapters only, and no merge into them
    assert main([*common, "--out", str(tmp_path / "full"), "--quantize", "int8"]) == 1
    assert "--quantize int8 applies to --lora runs" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "m"), "--lora", "--quantize", "int8", "--merge"]) == 1
    assert "--merge folds the adapters into float weights" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "g"), "--lora", "--quantize", "gguf"]) == 1
    assert "--quantize gguf keeps a GGUF file's quantized blocks" in capsys.readouterr().err
