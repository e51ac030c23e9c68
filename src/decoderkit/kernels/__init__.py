"""decoderkit's own CPU kernels: C++ compiled at first use with the system compiler, the way inductor builds its own.

`qmm` is a weight-only quantized matmul for decode-sized batches (see qmatmul.cpp for the formats), with float32
activations (exact) or activations rounded to int8 per run of 32 inputs (``activations="int8"``, llama.cpp's way).
The source is compiled once per (source, torch version, CPU capability) into a shared library under the cache
directory (``$DECODERKIT_CACHE_DIR/kernels``, default ``~/.cache/decoderkit/kernels``), written under a temporary
name and renamed, so concurrent first uses never see half a file and later processes load it without compiling. The
AVX2 / FMA / F16C path is built where torch reports an AVX2 CPU, AVX-512 where it reports AVX512 (qmatmul.cpp's
few-row path on 16 lanes), a portable C++ path elsewhere. Without
a C++ compiler (or with ``DECODERKIT_KERNELS=0``) `available` is False, a warning says so once, and the quantized
layers use torch's own int8 / int4 kernels instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

from decoderkit.fileio import atomic_path, cache_root

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("qmatmul.cpp")
_NAMESPACE = "decoderkit_kernels"


def cache_dir() -> Path:
    """Where compiled kernels live: ``cache_root()/kernels`` (``$DECODERKIT_CACHE_DIR/kernels``, default
    ``~/.cache/decoderkit/kernels``)."""
    return cache_root() / "kernels"


def _simd_flags() -> list[str]:
    # torch's own dispatch capability: honours ATEN_CPU_CAPABILITY, so the AVX2 and portable paths can be forced for
    # tests. AVX512 there means F, BW, VL and DQ (torch's own check).
    capability = torch.backends.cpu.get_cpu_capability()
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if capability == "AVX512":
        avx512 = [*avx2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        return [*avx512, "-mavx512bf16"] if _cpu_has("avx512_bf16") else avx512
    return avx2 if capability == "AVX2" else []


@functools.cache
def _cpu_has(flag: str) -> bool:
    # torch reports no AVX512-BF16 capability of its own; the kernel's VDPBF16PS path needs the CPU's flag (Linux)
    try:
        return any(flag in line.split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("flags"))
    except OSError:
        return False


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _command(compiler: str, out: Path, source: Path = _SOURCE) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    lib = library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [compiler, "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", *_simd_flags(),
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include_paths()), str(source), "-o", str(out),
            f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]


def library_path(compiler: str, source: Path = _SOURCE) -> Path:
    """The shared library `source` (with the headers beside it), torch, compiler and CPU capability compile to
    (existing or not)."""
    key = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]
    for part in (source.read_bytes(), *headers, torch.__version__.encode(), compiler.encode(),
                 " ".join(_simd_flags()).encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path, source: Path = _SOURCE) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        proc = subprocess.run(_command(compiler, tmp, source), capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"{compiler} failed on {source.name}: {proc.stderr.strip()[-2000:]}")


def available() -> bool:
    """Whether the compiled kernels are loaded (compiling them first if no cached build exists); False where
    ``DECODERKIT_KERNELS=0`` turns them off."""
    return enabled() and _load()


def enabled() -> bool:
    """False where ``DECODERKIT_KERNELS`` (0, false, no or off) turns decoderkit's kernels off."""
    return os.environ.get("DECODERKIT_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def build_and_load(source: Path, fallback: str | None) -> bool:
    """Compile `source` (once per cache key, see `library_path`) and load its ops into torch; False where there is
    no compiler or the build or load fails. `fallback` says what callers do instead: it is the text of one
    RuntimeWarning, or with None the failure is only logged (for kernels whose fallback gives the same values)."""
    compiler = _compiler()
    if compiler is None:
        problem = "no C++ compiler found (c++, g++, clang++ or $CXX)"
    else:
        target = library_path(compiler, source)
        try:
            if not target.is_file():
                logger.info("compiling %s into %s", source.name, target)
                _build(compiler, target, source)
            torch.ops.load_library(str(target))
            return True
        except (OSError, RuntimeError) as err:
            problem = f"{source.name} could not be built or loaded ({err})"
    if fallback is None:
        logger.warning("decoderkit: %s; using torch's kernels", problem)
    else:
        warnings.warn(f"decoderkit: {problem}: {fallback}", RuntimeWarning, stacklevel=3)
    return False


@functools.cache
def _load() -> bool:
    loaded = build_and_load(_SOURCE, "quantized layers use torch's int8 / int4 kernels, which are several times "
                                     "slower at batch 1")
    if loaded:
        _register_fake()
    return loaded


def _register_fake() -> None:
    def shape(x, codes, scales, offsets, bits, group):  # noqa: ANN001, ANN202 - the op's schema types them
        return x.new_empty(x.shape[0], codes.shape[0])

    for op in ("qmm", "qmm_q8", "qmm_bf16"):
        torch.library.register_fake(f"{_NAMESPACE}::{op}", shape)


ACTIVATIONS = ("float", "int8", "bfloat16")


def qmm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int,
        group: int, activations: str = "float") -> torch.Tensor:
    """y (M, N) float32 = x (M, K) float32 @ W^T, W (N, K) held as `bits`-bit codes with per-`group` scales (and
    offsets): ``w = scale * q + offset`` (see qmatmul.cpp for the layouts). `available()` must be True.

    `activations` "float" multiplies x as given; "int8" first rounds each run of 32 inputs of a row to int8 against
    its largest magnitude and takes integer dot products (qmatmul.cpp's ``qmm_q8`` says exactly how); "bfloat16"
    rounds x and the dequantized weight to bfloat16 and sums their exact products in float32, as a bfloat16 matmul
    does (``qmm_bf16``: groups of runs of 32 inputs, and a build where `bf16_products()` is not None)."""
    if activations == "int8":
        return torch.ops.decoderkit_kernels.qmm_q8(x, codes, scales, offsets, bits, group)
    if activations == "bfloat16":
        return torch.ops.decoderkit_kernels.qmm_bf16(x, codes, scales, offsets, bits, group)
    if activations != "float":
        raise ValueError(f"activations={activations!r} is not one of {list(ACTIVATIONS)}")
    return torch.ops.decoderkit_kernels.qmm(x, codes, scales, offsets, bits, group)


def loaded_library(source: Path = _SOURCE) -> ctypes.CDLL:
    """The built library of `source`, for the plain C functions a build exports to say what it
    was compiled with. `source` must have been loaded (`build_and_load`)."""
    return ctypes.CDLL(str(library_path(_compiler() or "", source)))


def bf16_products() -> str | None:
    """How ``activations="bfloat16"`` multiplies in the loaded build: "vdpbf16ps" (AVX512-BF16), "fma" (float32 FMAs
    of the rounded operands: the same products, summed in another order), or None where the build has no AVX2 path
    and ``qmm_bf16`` cannot run. `available()` must be True."""
    library = loaded_library()
    if not library.decoderkit_qmm_simd():
        return None
    return "vdpbf16ps" if library.decoderkit_qmm_bf16_native() else "fma"


_DECODE_SOURCE = Path(__file__).with_name("gemv.cpp")


def decode_linear_available() -> bool:
    """Whether `decode_linear` can run: the kernels are on (``DECODERKIT_KERNELS``) and gemv.cpp is built and
    loaded (compiled at first use, like qmatmul.cpp; with ``DECODERKIT_KERNELS=cached`` only if a build is there
    already). False, with no warning, where it cannot: callers then use ``torch.nn.functional.linear``, which gives
    the same values up to float rounding, at a lower speed."""
    if not enabled():
        return False
    if os.environ.get("DECODERKIT_KERNELS", "1").strip().lower() == "cached":
        compiler = _compiler()
        if compiler is None or not library_path(compiler, _DECODE_SOURCE).is_file():
            return False
    return _load_decode()


@functools.cache
def _load_decode() -> bool:
    if not build_and_load(_DECODE_SOURCE, None):
        return False

    @torch.library.register_fake("decoderkit_decode::linear")
    def _(x, weight, bias):  # noqa: ANN001, ANN202 - the op's schema types them
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    return True


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows of `x` on CPU, float32 or bfloat16 (any mix), with float32
    products and sums and the result in `x`'s dtype (see gemv.cpp). `decode_linear_available()` must be True."""
    return torch.ops.decoderkit_decode.linear(x, weight, bias)
