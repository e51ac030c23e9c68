"""decoderkit's kernel with int8 activations (``qmm_q8``) against a float64 reference of the same math, and the
``activations=`` switch that chooses it."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_gguf_model import write_tiny_llama

from decoderkit import AutoModelForCausalLM, kernels
from decoderkit.layers import quantized as qmod
from decoderkit.layers.quantized import Int4Linear, Int8Linear, pack_nibbles, set_activations

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="decoderkit's kernel did not build here")
EPS = torch.finfo(torch.float32).eps


def reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
              group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, a bound on the magnitudes the kernel sums) in float64: each run of 32 inputs of a row (the last one
    shorter) rounded to int8 against its largest magnitude in float32, as qmatmul.cpp states, then exact integer dot
    products with the codes (the kernel sums partial products per lane, so their size is bounded by |a| |q|)."""
    y = torch.zeros(x.shape[0], codes.shape[0], dtype=torch.float64)
    size = torch.zeros_like(y)
    for k in range(0, x.shape[1], 32):
        run = x[:, k:k + 32]
        amax = run.abs().amax(dim=1, keepdim=True)
        a = torch.round(run * torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))).long()
        d = (amax / 127.0).double()
        assert a.abs().max() <= 127
        g = k // group
        w = codes[:, k:k + 32].long().t()
        y += (a @ w).double() * d * scales[:, g].double()
        size += (a.abs() @ w.abs()).double() * d * scales[:, g].double().abs()
        if offsets is not None:
            y += a.sum(1, keepdim=True).double() * d * offsets[:, g].double()
            size += a.abs().sum(1, keepdim=True).double() * d * offsets[:, g].double().abs()
    return y, size


# (bits, offset, scale dtype, group, K): GGUF's Q4_1 / Q4_0 (offset, float16), int4 without offset, int4 groups of
# 64 / 128 with float32 scales (quantization="int4" via pack), Q8_0 (float16 per 32), int8 per channel (float32,
# one group; K = 100 ends in a short run), int8 with offsets
VARIANTS = [(4, True, torch.float16, 32, 320), (4, False, torch.float16, 32, 96), (4, True, torch.float32, 64, 256),
            (4, False, torch.float32, 128, 256), (8, False, torch.float16, 32, 96), (8, False, torch.float32, 100, 100),
            (8, False, torch.float32, 576, 576), (8, True, torch.float16, 32, 64)]


def random_codes(bits: int, offset: bool, dtype: torch.dtype, group: int, n: int, k: int, gen: torch.Generator):
    """(codes one a byte, codes as the kernel takes them, scales, offsets or None) of a random (n, k) layer."""
    if bits == 4:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        codes = pack_nibbles(q)
    else:
        q = codes = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, k // group, generator=gen) / 16).to(dtype)
    offsets = (torch.randn(n, k // group, generator=gen) / 4).to(dtype) if offset else None
    return q, codes, scales, offsets


@needs_kernel
@pytest.mark.parametrize("bits, offset, dtype, group, k", VARIANTS, ids=lambda v: str(v).removeprefix("torch."))
def test_int8_activations_equal_the_float64_reference_of_the_same_math(bits, offset, dtype, group, k):
    gen = torch.Generator().manual_seed(bits * k + group)
    n = 37  # not a multiple of the kernel's 4-column tiles
    q, codes, scales, offsets = random_codes(bits, offset, dtype, group, n, k, gen)
    for rows in (1, 2, 3, 5, 7, 16, 17):
        x = torch.randn(rows, k, generator=gen) * torch.rand(rows, k, generator=gen)
        x[0, :32] = 0.0  # a run of zeros: scale 0, codes 0
        y = kernels.qmm(x, codes, scales, offsets, bits, group, activations="int8").double()
        want, size = reference(x, q, scales, offsets, group)
        # float32 sums of the runs' and groups' terms, in another order than float64's
        terms = k // 32 + 1 + k // group + 8
        assert ((y - want).abs() <= terms * EPS * size + 1e-30).all(), rows
        # and not the float path: the activations really were rounded
        assert not torch.equal(y, kernels.qmm(x, codes, scales, offsets, bits, group).double())


def kernel_layer(bits: int, n: int, k: int, gen: torch.Generator) -> Int4Linear | Int8Linear:
    """A kernel-layout layer of a random weight: int4 in groups of 32, or int8 per output channel."""
    if bits == 4:
        layer = Int4Linear(k, n, group_size=32, dtype=torch.float32, layout="kernel")
        buffers = Int4Linear.quantize(torch.randn(n, k, generator=gen), 32, torch.float32, "kernel")
    else:
        layer = Int8Linear(k, n, dtype=torch.float32, layout="kernel")
        buffers = Int8Linear.quantize(torch.randn(n, k, generator=gen), torch.float32, "kernel")
    for name, value in buffers.items():
        setattr(layer, name, value)
    return layer


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
def test_layers_use_int8_activations_for_every_row_count(bits):
    gen = torch.Generator().manual_seed(bits)
    n, k = 24, 128
    layer = kernel_layer(bits, n, k, gen)
    assert layer.activations == qmod.DEFAULT_ACTIVATIONS == "float"
    layer.activations = "int8"
    codes = qmod.unpack_nibbles(layer.weight_int4) if bits == 4 else layer.weight_int8
    offsets = layer.offsets if bits == 4 else None
    for rows in (1, 5, qmod.INT8_KERNEL_ROWS + 1, 40):  # prefill-sized inputs too: what perplexity measures is decoding
        x = torch.randn(2, rows, k, generator=gen)
        want, size = reference(x.reshape(-1, k), codes, layer.scales, offsets, layer.group_size or k)
        got = layer(x).double().reshape(-1, n)
        assert ((got - want).abs() <= 24 * EPS * size + 1e-30).all(), rows


def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, Q.Q4_1, tie=True)
    return path


@needs_kernel
def test_from_pretrained_switches_the_activations(tmp_path):
    path = tiny_gguf(tmp_path)
    ids = torch.tensor([[1, 5, 7, 9, 33, 60]])
    int8 = AutoModelForCausalLM.from_pretrained(path, dtype="float32", activations="int8")
    exact = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    floats = AutoModelForCausalLM.from_pretrained(path, dtype="float32", quantization="none")
    layers = [m for m in int8.modules() if isinstance(m, qmod.QuantizedLinear)]
    assert layers and all(m.activations == "int8" for m in layers)
    assert all(m.activations == "float" for m in exact.modules() if isinstance(m, qmod.QuantizedLinear))
    truth = floats(ids).logits
    exact_err = (exact(ids).logits - truth).abs().max()
    int8_err = (int8(ids).logits - truth).abs().max()
    # a random tiny model: the rounding of its activations moves its logits by a few percent, float32 by ~1e-5
    assert exact_err < 1e-4 < int8_err < 0.1 * truth.abs().max(), (exact_err, int8_err)
    assert set_activations(int8, None) == len(layers)
    torch.testing.assert_close(int8(ids).logits, exact(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("value", ["int4", "bf16", "INT8", 8])
def test_unknown_activations_say_what_is_supported(tmp_path, value):
    with pytest.raises(ValueError,
                       match=r"activations=.* is not supported; use None .* \['int8', 'float', 'bfloat16'\]"):
        AutoModelForCausalLM.from_pretrained(tiny_gguf(tmp_path), activations=value)
    with pytest.raises(ValueError, match="is not one of"):
        kernels.qmm(torch.zeros(1, 32), torch.zeros(1, 16, dtype=torch.uint8), torch.ones(1, 1), None, 4, 32,
                    activations=value)


def test_int8_activations_without_quantized_layers_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="applies to quantized layers and this model has none"):
        AutoModelForCausalLM.from_pretrained(tiny_gguf(tmp_path), quantization="none", activations="int8")


def test_without_the_kernel_layers_fall_back_to_float_and_int8_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODERKIT_KERNELS", "0")
    path = tiny_gguf(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    layers = [m for m in model.modules() if isinstance(m, qmod.QuantizedLinear)]
    assert layers and all(m.layout == "torch" and m.activations == "float" for m in layers)
    ids = torch.tensor([[1, 5, 7, 9]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 8)
    with pytest.raises(ValueError, match="needs decoderkit's quantized kernel.*DECODERKIT_KERNELS=0"):
        AutoModelForCausalLM.from_pretrained(path, dtype="float32", activations="int8")
