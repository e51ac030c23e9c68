"""decoderkit's compiled quantized matmul (decoderkit.kernels), float32 activations, against the dequantized float
reference (int8 activations: test_kernels_int8.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from decoderkit import gguf_model as gm
from decoderkit import kernels
from decoderkit.layers import quantized as qmod
from decoderkit.layers.quantized import Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="decoderkit's kernel did not build here")


def _gguf_layer(qtype: Q, n: int, k: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A layer filled from blocks that gguf's own quantizer wrote, and gguf's own dequantization of them."""
    rng = np.random.default_rng(seed)
    raw = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    tensor = type("Tensor", (), {"tensor_type": qtype, "shape": np.array([k, n]), "data": raw, "name": "w"})
    blocks = gm.gguf_blocks(tensor, "test")
    if qtype == Q.Q8_0:
        layer = Int8Linear(k, n, dtype=torch.float32, group_size=32, layout="kernel")
        layer.weight_int8, layer.scales = blocks.codes, blocks.params[..., 0].half()
    else:
        layer = Int4Linear(k, n, group_size=32, dtype=torch.float32, layout="kernel")
        for name, value in Int4Linear.pack_affine(blocks.codes, blocks.params[..., 0].half(),
                                                  blocks.params[..., 1].half(), torch.float32).items():
            setattr(layer, name, value)
    layer.activations = "float"
    return layer, torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("n, k", [(1, 32), (7, 96), (40, 320), (64, 1024)])
def test_gguf_blocks_multiply_as_their_dequantized_values(qtype, n, k):
    layer, weight = _gguf_layer(qtype, n, k, seed=n + k)
    assert torch.equal(layer.dequantize(), weight)  # the layer holds the file's values exactly
    gen = torch.Generator().manual_seed(k)
    for rows in range(1, 18):  # every remainder of the kernel's 4-row tiles, one- and several-row paths
        x = torch.randn(rows, k, generator=gen)
        want = x.double() @ weight.double().t()
        # float32 sums of k products, in another order than float64's: a few ulps of sum |w x| each
        bound = 4 * k * torch.finfo(torch.float32).eps * (x.abs().double() @ weight.abs().double().t())
        assert ((layer(x).double() - want).abs() <= bound + 1e-30).all(), rows


@pytest.mark.parametrize("bits, group, half", [(4, 64, False), (4, 128, True), (8, 32, True), (8, 1664, False)])
def test_many_rows_and_long_rows_through_the_op(bits, group, half):
    """The op itself: rows in several of the panel GEMM's 4-row tiles and a remainder, inputs in three
    uneven panels, output columns past its last whole tile, every group size and scale dtype."""
    gen = torch.Generator().manual_seed(bits + group)
    n, k = 13, 1664
    scales = torch.rand(n, k // group, generator=gen) / 16
    if bits == 4:
        codes = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
        offsets = -8 * scales + torch.randn(n, k // group, generator=gen) / 64
        q = torch.stack([codes.view(n, -1, 16) & 15, codes.view(n, -1, 16) >> 4], 2).reshape(n, k)
    else:
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
        offsets, q = None, codes
    if half:
        scales = scales.half()
        offsets = offsets.half() if offsets is not None else None
    weight = q.double() * scales.double().repeat_interleave(group, 1)
    if offsets is not None:
        weight += offsets.double().repeat_interleave(group, 1)
    for rows in (2, 7, 8, 25, 31):
        x = torch.randn(rows, k, generator=gen)
        want = x.double() @ weight.t()
        bound = 4 * k * torch.finfo(torch.float32).eps * (x.abs().double() @ weight.abs().t())
        got = kernels.qmm(x, codes, scales, offsets, bits, group).double()
        assert ((got - want).abs() <= bound + 1e-30).all(), rows


@pytest.mark.parametrize("qtype, limit", [(Q.Q4_1, qmod.INT4_KERNEL_ROWS), (Q.Q8_0, qmod.INT8_KERNEL_ROWS)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_prefill_sized_inputs_run_the_kernel_up_to_the_layers_limit(qtype, limit, monkeypatch):
    """A prefill chunk of up to `limit` rows multiplies by the codes (the kernel's panel GEMM), one row more by the
    dequantized weight; both to float rounding of the float64 product."""
    layer, weight = _gguf_layer(qtype, 40, 320, seed=limit)
    assert layer.kernel_rows() == limit
    calls = []
    qmm = kernels.qmm
    monkeypatch.setattr(kernels, "qmm", lambda x, *args: calls.append(x.shape[0]) or qmm(x, *args))
    gen = torch.Generator().manual_seed(limit)
    for rows in (limit, limit + 1):
        x = torch.randn(rows, 320, generator=gen)
        want = x.double() @ weight.double().t()
        bound = 4 * 320 * torch.finfo(torch.float32).eps * (x.abs().double() @ weight.abs().double().t())
        assert ((layer(x).double() - want).abs() <= bound + 1e-30).all(), rows
    assert calls == [limit]


def test_int8_rows_of_other_lengths_stop_at_the_decode_limit():
    """Without runs of 32 inputs there is no panel GEMM: past KERNEL_ROWS the dequantized weight multiplies."""
    assert Int8Linear(100, 8, dtype=torch.float32, layout="kernel").kernel_rows() == qmod.KERNEL_ROWS
    assert Int8Linear(576, 8, dtype=torch.float32, layout="kernel").kernel_rows() == qmod.INT8_KERNEL_ROWS


@pytest.mark.parametrize("k", [8, 40, 100, 576])
def test_int8_per_channel_rows_of_any_length(k):
    gen = torch.Generator().manual_seed(k)
    n = 24
    layer = Int8Linear(k, n, dtype=torch.float32, layout="kernel")
    layer.activations = "float"
    for name, value in Int8Linear.quantize(torch.randn(n, k, generator=gen), torch.float32).items():
        setattr(layer, name, value)
    weight = layer.weight_int8.double() * layer.scales.double()
    for rows in (1, 2, 5, 16):
        x = torch.randn(rows, k, generator=gen)
        torch.testing.assert_close(layer(x).double(), x.double() @ weight.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0], ids=lambda q: q.name)
def test_bfloat16_activations_run_in_float32(qtype):
    layer, weight = _gguf_layer(qtype, 48, 192, seed=5)
    x = torch.randn(3, 2, 192).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 2, 48)
    # the input converted exactly, products summed in float32, one rounding to bfloat16 at the end
    want = (x.float() @ weight.t()).bfloat16()
    torch.testing.assert_close(y, want, rtol=2**-7, atol=1e-2)


def test_bad_arguments_are_refused_with_the_reason():
    x = torch.randn(2, 64)
    codes = torch.zeros(8, 32, dtype=torch.uint8)
    scales = torch.ones(8, 2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="group 48 does not divide K = 64"):
        kernels.qmm(x, codes, scales, None, 4, 48)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        kernels.qmm(x, codes, scales, None, 3, 32)
    with pytest.raises(RuntimeError, match="scales must be contiguous"):
        kernels.qmm(x, codes, torch.ones(8, 3, dtype=torch.float16), None, 4, 32)


def test_fake_kernel_gives_the_shape_for_compilation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = kernels.qmm(torch.empty(3, 64), torch.empty(10, 32, dtype=torch.uint8),
                        torch.empty(10, 2, dtype=torch.float16), None, 4, 32)
    assert y.shape == (3, 10) and y.dtype == torch.float32


def test_a_second_process_loads_the_cached_build(tmp_path):
    target = kernels.library_path(kernels._compiler())
    before = (target.stat().st_mtime_ns, sorted(os.listdir(target.parent)))
    code = ("from decoderkit import kernels; assert kernels.available(); "
            "print(kernels.library_path(kernels._compiler()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "DECODERKIT_CACHE_DIR": str(target.parent.parent)})
    assert out.stdout.strip() == str(target)
    assert (target.stat().st_mtime_ns, sorted(os.listdir(target.parent))) == before


def test_without_a_compiler_the_layers_fall_back_to_torch_with_one_warning(monkeypatch):
    from decoderkit.layers.quantized import default_layout

    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    kernels._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*torch's"):
            assert default_layout() == "torch"
        assert default_layout() == "torch"  # cached: no second warning, no second search
    finally:
        kernels._load.cache_clear()
    monkeypatch.undo()
    assert kernels.available()


_PORTABLE_CHECK = """
import torch
from decoderkit import kernels
assert kernels.available() and not kernels._simd_flags()
g = torch.Generator().manual_seed(0)
x = torch.randn(5, 100, generator=g)
c = torch.randint(0, 256, (9, 48), generator=g, dtype=torch.uint8)
s, o = torch.rand(9, 3, generator=g).half(), torch.randn(9, 3, generator=g).half()
q = torch.stack([c.view(9, 3, 16) & 15, c.view(9, 3, 16) >> 4], 2).reshape(9, 96).double()
w = q * s.double().repeat_interleave(32, 1) + o.double().repeat_interleave(32, 1)
y = kernels.qmm(x[:, :96].contiguous(), c, s, o, 4, 32).double()
torch.testing.assert_close(y, x[:, :96].double() @ w.t(), rtol=1e-5, atol=1e-4)
c8, s8 = torch.randint(-127, 128, (9, 100), generator=g, dtype=torch.int8), torch.rand(9, 1)
y8 = kernels.qmm(x, c8, s8, None, 8, 100).double()
torch.testing.assert_close(y8, x.double() @ (c8.double() * s8.double()).t(), rtol=1e-5, atol=1e-4)
"""


@pytest.mark.slow
def test_portable_build_gives_the_same_products(tmp_path):
    """The path without AVX2, forced through torch's ATEN_CPU_CAPABILITY, compiled into a fresh cache."""
    env = {**os.environ, "DECODERKIT_CACHE_DIR": str(tmp_path), "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", _PORTABLE_CHECK], check=True, env=env, timeout=600)
    assert list((tmp_path / "kernels").glob("qmatmul-*.so"))


def _vector_bits() -> int:
    import ctypes

    return ctypes.CDLL(str(kernels.library_path(kernels._compiler()))).decoderkit_qmm_vector_bits()


def test_the_build_takes_the_widest_vectors_torch_reports():
    want = {"AVX512": 512, "AVX2": 256}.get(torch.backends.cpu.get_cpu_capability(), 0)
    assert _vector_bits() == want


@pytest.mark.slow
def test_the_avx2_build_passes_the_bound_tests_where_avx512_is_the_default(tmp_path):
    """On an AVX-512 CPU the default build runs the 16-lane path; this forces the 8-lane AVX2 one (ATEN_CPU_CAPABILITY)
    into a fresh cache and runs this file's bound tests on it. On an AVX2 CPU that is the default build again."""
    if not torch.cpu._is_avx2_supported():
        pytest.skip("no AVX2 on this CPU: the portable build is tested above")
    env = {**os.environ, "DECODERKIT_CACHE_DIR": str(tmp_path), "ATEN_CPU_CAPABILITY": "avx2"}
    tests = ["test_gguf_blocks_multiply", "test_many_rows", "test_int8_per_channel", "test_prefill_sized",
             "test_the_build_takes"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           " or ".join(tests)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
    assert list((tmp_path / "kernels").glob("qmatmul-*.so"))

