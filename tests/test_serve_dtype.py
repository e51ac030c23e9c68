"""The server's default compute dtype: a half-precision checkpoint runs in float32 on a CPU that lacks native support
for it (torch converts the operands in every matmul there), and stays as it is where the CPU has it or when asked."""

from __future__ import annotations

import pytest
import torch

import decoderkit
from decoderkit.serve import app


@pytest.fixture(scope="module")
def bf16_directory(tmp_path_factory):
    from test_serve import build_tiny_model

    source = build_tiny_model(tmp_path_factory.mktemp("fp32"))
    target = tmp_path_factory.mktemp("bf16")
    decoderkit.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def load(directory, *extra: str) -> torch.nn.Module:
    engine, _, _ = app.load_engine(app.build_parser().parse_args([str(directory), "--device", "cpu", *extra]))
    return engine.model


@pytest.mark.parametrize("native", [False, True])
def test_bf16_checkpoint_computes_in_float32_only_without_native_bf16(bf16_directory, monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    model = load(bf16_directory)
    expected = torch.bfloat16 if native else torch.float32
    assert {p.dtype for p in model.parameters()} == {expected}
    # The conversion keeps the checkpoint's values: bfloat16 widens to float32 exactly.
    reference = decoderkit.AutoModelForCausalLM.from_pretrained(bf16_directory, dtype=torch.bfloat16)
    assert torch.equal(model.lm_head.weight.float(), reference.lm_head.weight.float())


def test_an_explicit_dtype_is_kept(bf16_directory, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert {p.dtype for p in load(bf16_directory, "--dtype", "bfloat16").parameters()} == {torch.bfloat16}
