"""The decode GEMV kernel (kernels/gemv.cpp) and `DecodeLinear`, the default CPU decode path's linear layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import decoderkit
from decoderkit import kernels
from decoderkit.layers.linear import DECODE_ROWS, DecodeLinear, use_decode_linear

oracle = pytest.importorskip("oracle")

pytestmark = pytest.mark.skipif(not kernels.decode_linear_available(), reason="the decode kernel did not build here")

FAMILIES = ["llama", "gemma", "gpt_bigcode", "mpt"]


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # float32 sums of k products in another order than float64's: a few ulps of sum |w x| per output
    k = w.shape[1]
    return 4 * k * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().t()) + 1e-30


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n, k", [(1, 8), (7, 13), (37, 96), (64, 200)])
def test_float32_rows_equal_the_float64_product(weight_dtype, n, k):
    gen = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=gen).to(weight_dtype)
    bias = torch.randn(n, generator=gen)
    for rows in range(1, 6):  # every remainder of the kernel's 4-row tiles
        x = torch.randn(rows, k, generator=gen)
        want = x.double() @ w.double().t() + bias.double()
        got = kernels.decode_linear(x, w, bias)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        assert ((got.double() - want).abs() <= _bound(x, w.float())).all(), rows


def test_bfloat16_activations_come_back_rounded_once():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(40, 64, generator=gen).bfloat16()
    x = torch.randn(1, 3, 64, generator=gen).bfloat16()
    got = kernels.decode_linear(x, w, None)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 3, 40)
    exact = (x.double() @ w.double().t()).float()
    # one rounding of a float32 sum: within one bfloat16 ulp of the exact product
    ulp = exact.abs() * 2.0**-7
    assert ((got.float() - exact).abs() <= ulp + 1e-6).all()


def test_bad_shapes_are_named():
    with pytest.raises(RuntimeError, match="x has 5 features, weight expects 4"):
        kernels.decode_linear(torch.randn(1, 5), torch.randn(3, 4), None)
    with pytest.raises(RuntimeError, match="weight must be float32 or bfloat16"):
        kernels.decode_linear(torch.randn(1, 4), torch.randn(3, 4).half(), None)


def test_decode_linear_routes_only_small_inference_calls(monkeypatch):
    linear = nn.Linear(24, 10)
    model = nn.Sequential(linear)
    assert use_decode_linear(model) and type(linear) is DecodeLinear
    calls = []
    kernel = kernels.decode_linear
    monkeypatch.setattr(kernels, "decode_linear", lambda *a: calls.append(a[0].shape) or kernel(*a))
    x = torch.randn(DECODE_ROWS, 24)
    with torch.no_grad():
        small = linear(x)
        linear(torch.randn(DECODE_ROWS + 1, 24))
    assert calls == [x.shape]
    assert torch.allclose(small, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-6)
    # Training keeps autograd (the kernel has no backward)
    linear(x).sum().backward()
    assert calls == [x.shape] and linear.weight.grad is not None


def test_kernels_off_restores_nn_linear(monkeypatch):
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    assert use_decode_linear(model)
    monkeypatch.setenv("DECODERKIT_KERNELS", "0")
    assert not use_decode_linear(model)
    assert all(type(m) is nn.Linear for m in model)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    hf = oracle.build(request.param)
    directory = oracle.save(hf, tmp_path_factory.mktemp(request.param))
    return hf, decoderkit.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_default_decode_path_gives_the_eager_greedy_ids(pair, cache, monkeypatch):
    hf, dk = pair
    ids, mask, _ = oracle.left_padded_batch(hf.config.vocab_size, [5, 3])
    # use_cache: MPT checkpoints turn it off, and without a cache every step reruns the whole sequence
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, cache_implementation=cache, use_cache=True)
    with torch.no_grad():
        want = hf.generate(ids, **kwargs)
        fast = dk.generate(ids, **kwargs)
        assert any(type(m) is DecodeLinear for m in dk.modules()), "the default CPU path should use the kernel"
        monkeypatch.setenv("DECODERKIT_KERNELS", "0")
        eager = dk.generate(ids, **kwargs)
        assert not any(type(m) is DecodeLinear for m in dk.modules())
    assert torch.equal(fast, eager)
    assert torch.equal(fast, want)
