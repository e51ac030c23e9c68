"""decoderkit's kernel with bfloat16 products (``qmm_bf16``, ``activations="bfloat16"``) against a float64 reference of
the same math: x and the dequantized weight rounded to bfloat16, their products summed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from test_kernels_int8 import kernel_layer, random_codes, tiny_gguf

from decoderkit import AutoModelForCausalLM, kernels
from decoderkit.layers import quantized as qmod
from decoderkit.layers.quantized import set_activations

needs_kernel = pytest.mark.skipif(not kernels.available() or kernels.bf16_products() is None,
                                  reason="decoderkit's kernel has no AVX2 build here")
EPS = torch.finfo(torch.float32).eps


def weights(bits: int, offset: bool, dtype: torch.dtype, group: int, n: int, k: int, seed: int):
    q, codes, scales, offsets = random_codes(bits, offset, dtype, group, n, k, torch.Generator().manual_seed(seed))
    # The dequantized weight as the float path builds it: fma(q, scale, offset) in float32
    w = torch.repeat_interleave(scales.float(), group, dim=1) * q.float()
    if offsets is not None:
        w = w + torch.repeat_interleave(offsets.float(), group, dim=1)
    return codes, scales, offsets, w


def reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, sum of |products|) in float64 of x and w rounded to bfloat16 (nearest even, torch's conversion)."""
    xb, wb = x.bfloat16().double(), w.bfloat16().double()
    return xb @ wb.t(), xb.abs() @ wb.abs().t()


# (bits, offset, scale dtype, group, K): GGUF's Q4_1 / Q4_0, int4 groups of 64 / 128 with float32 scales, Q8_0,
# int8 per channel (one group of a multiple of 32), over a panel block (K > 768: two blocks of inputs)
VARIANTS = [(4, True, torch.float16, 32, 320), (4, False, torch.float16, 32, 96), (4, True, torch.float32, 64, 256),
            (4, False, torch.float32, 128, 256), (8, False, torch.float16, 32, 96), (8, False, torch.float32, 576, 576),
            (4, True, torch.float16, 32, 1536)]


@needs_kernel
@pytest.mark.parametrize("bits, offset, dtype, group, k", VARIANTS, ids=lambda v: str(v).removeprefix("torch."))
def test_bfloat16_products_equal_the_float64_reference_of_the_same_math(bits, offset, dtype, group, k):
    n = 37  # not a multiple of the panel's 6 columns
    codes, scales, offsets, w = weights(bits, offset, dtype, group, n, k, bits * k + group)
    gen = torch.Generator().manual_seed(k)
    for rows in (1, 2, 3, 4, 5, 7, 16, 17, 70):
        x = torch.randn(rows, k, generator=gen) * torch.rand(rows, k, generator=gen)
        y = kernels.qmm(x, codes, scales, offsets, bits, group, activations="bfloat16").double()
        want, size = reference(x, w)
        # float32 sums of k exact products (VDPBF16PS adds two at a time to each lane), in another order
        assert ((y - want).abs() <= (k // 16 + 16) * EPS * size + 1e-30).all(), rows
        # and not the float path: the operands really were rounded
        assert not torch.equal(y, kernels.qmm(x, codes, scales, offsets, bits, group).double())


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """Decode (a few rows: the weights go straight to the products) and panel (4 rows and more) add the same products
    in the same order: a request's logits in the server are the same bits however many requests share its step."""
    codes, scales, offsets, _ = weights(4, True, torch.float16, 32, 45, 640, 0)
    x = torch.randn(33, 640, generator=torch.Generator().manual_seed(1))
    alone = torch.cat([kernels.qmm(x[i:i + 1], codes, scales, offsets, 4, 32, activations="bfloat16")
                       for i in range(x.shape[0])])
    for rows in (2, 3, 4, 9, 33):
        together = kernels.qmm(x[:rows], codes, scales, offsets, 4, 32, activations="bfloat16")
        assert torch.equal(together, alone[:rows]), rows


@needs_kernel
@pytest.mark.parametrize("bits, k", [(4, 128), (8, 128), (8, 100)])
def test_layers_multiply_every_row_count_in_bfloat16(bits, k):
    """Prefill-sized inputs too (no switch to the dequantized weight past the decode sizes), and int8 rows whose one
    group is not runs of 32 inputs through a float32 matmul of the rounded operands: the same products."""
    gen = torch.Generator().manual_seed(bits + k)
    layer = kernel_layer(bits, 24, k, gen)
    layer.activations = "bfloat16"
    w = layer.dequantize()
    for rows in (1, 5, qmod.INT4_KERNEL_ROWS + 1):
        x = torch.randn(rows, k, generator=gen)
        want, size = reference(x, w)
        got = layer(x).double()
        assert ((got - want).abs() <= (k // 16 + 16) * EPS * size + 1e-30).all(), rows


@needs_kernel
def test_from_pretrained_takes_bfloat16_activations(tmp_path):
    path = tiny_gguf(tmp_path)
    ids = torch.tensor([[1, 5, 7, 9, 33, 60]])
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype="float32", activations="bfloat16")
    exact = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    layers = [m for m in bf16.modules() if isinstance(m, qmod.QuantizedLinear)]
    assert layers and all(m.activations == "bfloat16" for m in layers)
    # The oracle: the file dequantized to float32, every linear layer's input and weight rounded to bfloat16
    floats = AutoModelForCausalLM.from_pretrained(path, dtype="float32", quantization="none")

    def rounded(module, inputs, output):  # noqa: ANN001, ANN202 - a forward hook's arguments
        return torch.nn.functional.linear(inputs[0].bfloat16().float(), module.weight.bfloat16().float(),
                                          module.bias)

    linears = [m for m in floats.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == len(layers)
    for m in linears:
        m.register_forward_hook(rounded)
    with torch.no_grad():
        want, got, truth = floats(ids).logits, bf16(ids).logits, exact(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        assert (got - truth).abs().max() > 1e-3 * truth.abs().max()  # the rounding is really there
        assert set_activations(bf16, "float") == len(layers)
        torch.testing.assert_close(bf16(ids).logits, truth, rtol=0, atol=0)


def test_bfloat16_activations_need_quantized_layers_on_the_kernel(tmp_path, monkeypatch):
    path = tiny_gguf(tmp_path)
    with pytest.raises(ValueError, match="activations='bfloat16' applies to quantized layers"):
        AutoModelForCausalLM.from_pretrained(path, quantization="none", activations="bfloat16")
    monkeypatch.setenv("DECODERKIT_KERNELS", "0")
    with pytest.raises(ValueError, match="activations='bfloat16' needs decoderkit's quantized kernel"):
        AutoModelForCausalLM.from_pretrained(path, dtype="float32", activations="bfloat16")


@needs_kernel
def test_groups_not_runs_of_32_are_refused_by_the_op():
    codes, scales, _, _ = weights(8, False, torch.float32, 100, 4, 100, 0)
    with pytest.raises(RuntimeError, match="groups must be runs of 32 inputs, got 100"):
        kernels.qmm(torch.zeros(2, 100), codes, scales, None, 8, 100, activations="bfloat16")


@pytest.mark.slow
def test_the_float32_fma_build_passes_the_same_tests(tmp_path):
    """Where the CPU has AVX512-BF16 the default build multiplies with VDPBF16PS; this forces the AVX2 build, which
    rounds the operands and takes float32 FMAs (ATEN_CPU_CAPABILITY), into a fresh cache and runs this file on it."""
    if not torch.cpu._is_avx2_supported():
        pytest.skip("no AVX2 on this CPU: qmm_bf16 has no build here")
    env = {**os.environ, "DECODERKIT_CACHE_DIR": str(tmp_path), "ATEN_CPU_CAPABILITY": "avx2"}
    check = "from decoderkit import kernels; assert kernels.available() and kernels.bf16_products() == 'fma'"
    subprocess.run([sys.executable, "-c", check], check=True, env=env, timeout=600)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           "not fma_build"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


def test_the_native_build_is_taken_where_the_cpu_has_avx512_bf16():
    if not kernels.available():
        pytest.skip("decoderkit's kernel did not build here")
    native = torch.backends.cpu.get_cpu_capability() == "AVX512" and kernels._cpu_has("avx512_bf16")
    assert kernels.bf16_products() == ("vdpbf16ps" if native else "fma" if torch.cpu._is_avx2_supported() else None)


@needs_kernel
def test_the_command_line_passes_activations_on(capsys):
    """`--activations` on generate (the shipped model quantized on load), and the loader's refusal for a float model
    reported as a command-line error."""
    from decoderkit import cli

    args = ["generate", "--max-new-tokens", "6", "--greedy", "--no-compile", "--json", "To be"]
    assert cli.main([*args, "--quantize", "int4", "--activations", "bfloat16"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["completions"][0].strip()
    assert cli.main([*args, "--activations", "bfloat16"]) == 1
    assert "activations='bfloat16' applies to quantized layers and this model has none" in capsys.readouterr().err
