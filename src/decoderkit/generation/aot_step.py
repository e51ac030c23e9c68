"""The CPU decode step compiled ahead of time with AOTInductor and kept on disk as a package.

`torch.compile` leaves Python on every step: dynamo's guards over the model's modules and parameters, and the AOT
autograd wrappers around the compiled code; for the shipped 2.6M-parameter model they cost about as much as the step's
own arithmetic. An AOTInductor package is the same inductor code behind a C++ runner: one call per token, no guards.
A package for a small float model (`AOT_MAX_WEIGHT_BYTES`) embeds its weights (frozen, as torch.compile's step has
them), so it is keyed by everything it was built from (torch version, the model's config, the weights' content hash,
dtype, rows and cache length). A package for a quantized model (GGUF files, ``quantization=``), or a larger float
one, takes the weights as inputs instead: its matmuls are decoderkit's kernels on the packed codes or the float
weights as they are, which freezing would not change, so the package holds only code, is keyed by the weights'
names, dtypes and shapes (not their contents: any checkpoint of the same shape shares it), reads the model's own
tensors at every call (no copy, in-place changes seen) and has no size limit. Packages live
under ``cache_root()/aoti``, written under a temporary name and renamed; a later process with the same model loads
one in a fraction of a second instead of compiling.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decoderkit.fileio import cache_root

logger = logging.getLogger(__name__)

_LOADED: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def package_dir() -> Path:
    """Where AOTInductor packages live: ``$DECODERKIT_CACHE_DIR/aoti`` (default ``~/.cache/decoderkit/aoti``)."""
    return cache_root() / "aoti"


class _StepModule(nn.Module):
    """`_forward_one_static` as a module with tensor-only inputs, which is what `torch.export` takes."""

    def __init__(self, model: Any, forward: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, tokens, position_ids, cache_position, mask, alibi, keys, values):  # noqa: ANN001, ANN201
        return self._forward(self.model, tokens, position_ids, cache_position, mask, None, alibi, keys, values)


class WeightsAsInputs(nn.Module):
    """`step` (a module whose attribute ``model`` is the model) with the model's weights as its first input (a list,
    in `weight_inputs`' order), substituted for the module's own tensors by `torch.func.functional_call` while the
    step is traced: the decode and verify steps here, the server's paged step (`serve.paged_step`). Its dynamic
    shapes for `torch.export` are ``([None] * len(weights), (the step's own, ...))``."""

    def __init__(self, step: nn.Module) -> None:
        super().__init__()
        self.step = step
        self.names = ["model." + name for name, _ in _weight_items(step.model)]

    def forward(self, weights, *inputs):  # noqa: ANN001, ANN002, ANN201
        return torch.func.functional_call(self.step, dict(zip(self.names, weights, strict=True)), inputs,
                                          tie_weights=True, strict=False)


def _weight_items(model: Any) -> list[tuple[str, torch.Tensor]]:
    # Each tensor once (a tied head and embedding share theirs), parameters then buffers
    return [*model.named_parameters(), *model.named_buffers()]


def _quantized(model: Any) -> bool:
    from decoderkit.layers.quantized import QuantizedLinear

    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def takes_weights(model: Any) -> bool:
    """Whether a package for `model` takes its weights as inputs rather than embedding them: models with quantized
    layers (see the module's docstring), and float models over `AOT_MAX_WEIGHT_BYTES`, for which an embedded copy
    and its content hash at every call stop being cheap (their matmuls at decode sizes are decoderkit's GEMV on the
    weights as they are, which freezing would not speed up)."""
    if _quantized(model):
        return True
    return sum(p.numel() * p.element_size() for p in model.parameters()) > AOT_MAX_WEIGHT_BYTES


def weight_inputs(model: Any, as_inputs: bool | None = None) -> list[torch.Tensor]:
    """The tensors a package is called with before the step's own inputs: the weights where the package takes them
    as inputs (`as_inputs`, by default `takes_weights`), none where it embeds them."""
    inputs = takes_weights(model) if as_inputs is None else as_inputs
    return [t.detach() for _, t in _weight_items(model)] if inputs else []


def step_identity(model: Any, as_inputs: bool | None = None) -> tuple:
    """What a package for `model` is keyed by: the weights' content (`weights_fingerprint`) for a package that
    embeds them; for one that takes them as inputs (`as_inputs`, by default `takes_weights`), each tensor's name,
    dtype and shape and the module tree as printed (layer classes, layouts, activation modes: the kernels the graph
    calls)."""
    from decoderkit.generation.decode_step import weights_fingerprint

    if not (takes_weights(model) if as_inputs is None else as_inputs):
        return weights_fingerprint(model)
    return ("inputs", repr(model), *((name, t.dtype, tuple(t.shape)) for name, t in _weight_items(model)))


# Float weights up to this are embedded in the package (frozen: prepacked for the GEMM libraries); above it the
# package and the content hash checked at every call stop being cheap, and the package takes the weights as inputs
AOT_MAX_WEIGHT_BYTES = 64 * 2**20
_LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def aot_unsupported(model: Any) -> str | None:
    """Why `model` cannot run a packaged step (None when it can): CPU weights, float32 / bfloat16 weights or quantized
    layers, no tensor-parallel layers, rope that does not depend on the length. There is no size limit: a package
    for a large model takes its weights as inputs (`takes_weights`)."""
    params = list(model.parameters())
    if any(t.device.type != "cpu" for t in (*params, *model.buffers())):
        return "the packaged step runs on CPU"
    if getattr(model, "tp", None) is not None:
        return "a tensor-parallel model cannot be packaged"
    rotary = model.model.rotary
    if rotary is not None and rotary.rope_type in _LENGTH_DEPENDENT_ROPE:
        return f"rope_type={rotary.rope_type!r} depends on the length, which a package cannot follow"
    if _quantized(model):
        return None
    if any(p.dtype not in (torch.float32, torch.bfloat16) for p in params):
        return "the packaged step takes float32 or bfloat16 weights, or quantized layers"
    return None


# decoderkit's code that a step is never traced through: the loops around the step, the tokenizer, the command line,
# the server, training, the OpenMP runtime's settings. Everything else (layers, families, caches, kernels' Python side,
# the steps themselves) keys the packages
_UNTRACED = ("cli/", "serve/", "training/", "parallel/", "tokenizer.py", "chat_template.py", "gguf_vocab.py",
             "gguf_vocab_writer.py", "gguf_writer.py", "saving.py", "generation/", "_openmp.py")
_TRACED_GENERATION = ("generation/decode_step.py", "generation/verify_step.py", "generation/aot_step.py",
                      "serve/paged.py", "serve/paged_step.py")


@functools.cache
def _source_digest() -> str:
    """A hash of the decoderkit Python source a step is traced from (all but `_UNTRACED`), and of whether its kernels
    are turned on: a new version of a layer, or the attention kernel turned off, must not reuse an old package; a
    change to the server or to speculative decoding's loop need not rebuild one. `kernels.enabled()`, not a build:
    looking a package up must not compile the attention kernel (a float model's first start would wait for it), and
    where packages can be built at all a C++ compiler exists for the kernel."""
    from decoderkit import kernels

    return _digest_of(Path(__file__).resolve().parents[1], kernels.enabled())


def _digest_of(root: Path, kernels_on: bool) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if name.startswith(_UNTRACED) and name not in _TRACED_GENERATION:
            continue
        digest.update(name.encode())
        digest.update(path.read_bytes())
    digest.update(b"kernels" if kernels_on else b"no kernels")
    return digest.hexdigest()


def package_path(model: Any, fingerprint: tuple, rows: int, slots: int, queries: int | tuple[int, int] = 1,
                 kind: str | None = None) -> Path:
    """Where the package compiled from `model` (of weights `fingerprint`) for `rows` rows, a static cache of `slots`
    slots and `queries` tokens per row lives (whether or not it exists): 1 for the decode step (``step-*.pt2``), a
    range (lo, hi) for a verify step of any number of tokens in it (``verify-*.pt2``). Another `kind` of step (the
    server's ``paged``) names its own files and says what `rows` and `slots` stand for."""
    key = hashlib.sha256()
    # The module classes say which kernels the graph calls (DecodeLinear or torch's linear)
    classes = sorted({type(m).__qualname__ for m in model.modules()})
    parts = [torch.__version__, _source_digest(), repr(model.decoder_config), repr(fingerprint), rows, slots,
             repr(classes)]
    if queries != 1:
        parts.append(repr(queries))
    kind = kind or ("step" if queries == 1 else "verify")
    if kind not in ("step", "verify"):
        parts.append(kind)
    for part in parts:
        key.update(str(part).encode())
        key.update(b"\0")
    return package_dir() / f"{kind}-{key.hexdigest()[:24]}.pt2"


def aot_step(model: Any, fingerprint: tuple, forward: Callable[..., torch.Tensor], example: tuple,
             queries: int | tuple[int, int] = 1, as_inputs: bool | None = None) -> Any:
    """The packaged step for `model` (of `step_identity` `fingerprint`) on inputs shaped like `example` (tokens,
    position ids, cache slot, mask, alibi, keys, values): loaded from disk when a package for the same model and
    shapes exists, else compiled (minutes on a small CPU) and stored first. Its ``boxed_run(tensors)`` takes
    `weight_inputs(model, as_inputs)` then the example's tensors in order (None left out) and returns ``[logits]``.

    `queries` is the number of tokens per row (the example's), or a range (lo, hi) for a package that takes any
    number in it (the verify step of speculative decoding; `example` then has one of them): the tokens' and
    position ids' second axis, the cache slots' only one and the mask's third are then dynamic. `as_inputs`
    (default `takes_weights`): the package takes the weights as inputs rather than embedding them."""
    path = package_path(model, fingerprint, example[0].shape[0], example[3].shape[-1], queries)
    key = path.name
    loaded = _LOADED.setdefault(model, {})
    if key in loaded:
        return loaded[key]
    inputs = takes_weights(model) if as_inputs is None else as_inputs
    if not path.is_file():
        logger.info("compiling the decode step with AOTInductor into %s", path)
        dynamic = None
        if isinstance(queries, tuple):
            tokens = torch.export.Dim("queries", min=queries[0], max=queries[1])
            layers = len(example[5])
            dynamic = ({1: tokens}, {1: tokens}, {0: tokens}, {2: tokens}, None, [None] * layers, [None] * layers)
        if inputs:
            weights = weight_inputs(model, True)
            compile_package(WeightsAsInputs(_StepModule(model, forward)), (weights, *example),
                            None if dynamic is None else ([None] * len(weights), dynamic), path)
        else:
            compile_package(_StepModule(model, forward), example, dynamic, path)
    runner = load_package(path)
    # A package of the same kind for older weights (or other shapes) is not kept: one decode step and one verify
    # step per model
    kind = key.split("-", 1)[0]
    for name in [name for name in loaded if name.split("-", 1)[0] == kind]:
        del loaded[name]
    loaded[key] = runner
    return runner


def compile_package(module: nn.Module, example: tuple, dynamic: tuple | None, path: Path) -> None:
    """Export `module` on `example` (with `dynamic` shapes, torch.export's form) and store its AOTInductor package
    at `path`, atomically (a reader sees no package or a whole one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        exported = torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
        # The packager wants a name ending in .pt2: built in a private directory beside the target, then renamed
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
            built = torch._inductor.aoti_compile_and_package(exported, package_path=str(Path(tmp) / path.name))
            os.replace(built, path)


def load_package(path: Path) -> Any:
    """The runner of the package at `path`; its ``boxed_run(tensors)`` takes the inputs flattened in order."""
    # The C++ loader itself: torch._inductor.aoti_load_package would first import inductor's Python side, seconds
    # of a warm start's time to the first token. (path, model name, single-threaded, runners, device index)
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1)


def auto_compile(model: Any, config: Any, input_ids: Any, speculative: bool = False) -> bool | str:
    """``generate(compile="auto")``: "aot" where a package for these weights and shapes is on disk (with
    `speculative` decoding, of one sequence, also the verify step's), else False."""
    from decoderkit.generation.decode_step import compile_slots

    if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.shape[1] > 0):
        return False
    if model.decoder_config.attn_implementation == "flash_attention_2":
        return False
    rows = input_ids.shape[0] * max(config.num_beams, config.num_return_sequences)
    if speculative and rows > 1:
        return False  # a batch speculates eagerly (speculative_batch)
    max_length = config.max_length_for(input_ids.shape[1], model.decoder_config.max_position_embeddings)
    return "aot" if packages_cached(model, rows, compile_slots(max_length), speculative) else False


def packages_cached(model: Any, rows: int, slots: int, speculative: bool = False) -> bool:
    """Whether the packages a run of `rows` rows over `slots` cache slots would use are on disk: the decode step's
    (`cached_step`), and with `speculative` decoding (of one row) the verify step's too."""
    if not cached_step(model, rows, slots):
        return False
    if not speculative:
        return True
    from decoderkit.generation.verify_step import verify_package_path

    return rows == 1 and verify_package_path(model, slots).is_file()


def cached_step(model: Any, rows: int, slots: int) -> bool:
    """Whether a package for `model`'s current weights, `rows` rows and `slots` cache slots is on disk (what
    ``generate(compile="auto")`` asks before choosing the packaged step)."""
    from decoderkit.layers.linear import use_decode_linear

    if aot_unsupported(model) is not None:
        return False
    use_decode_linear(model)  # the classes the decode step will run with are part of the key
    return package_path(model, step_identity(model), rows, slots).is_file()


def build_package(model: Any, rows: int, slots: int) -> Path:
    """Compile and store the package for `model`, `rows` rows and `slots` slots (as the decode step would)."""
    from decoderkit.cache import StaticCache
    from decoderkit.generation.decode_step import _forward_one_static, alibi_over
    from decoderkit.layers.linear import use_decode_linear

    use_decode_linear(model)
    cache = StaticCache(model.decoder_config, rows, slots, dtype=model.dtype)
    allowed = torch.zeros(rows, 1, 1, slots, dtype=torch.bool)
    allowed[..., 0] = True
    alibi = alibi_over(model, slots)
    example = (torch.zeros(rows, 1, dtype=torch.long), torch.zeros(rows, 1, dtype=torch.long),
               torch.zeros(1, dtype=torch.long), allowed, alibi, cache.keys, cache.values)
    fingerprint = step_identity(model)
    aot_step(model, fingerprint, _forward_one_static, example)
    return package_path(model, fingerprint, rows, slots)


def _weights_id(fingerprint: tuple) -> str:
    return hashlib.sha256(repr(fingerprint).encode()).hexdigest()[:24]


def _marker(fingerprint: tuple, rows: int, slots: int) -> Path:
    """The file that says a build for these weights and shapes is under way (whichever kernels it will use)."""
    return package_dir() / f"{_weights_id(fingerprint)}-{rows}x{slots}.building"


def build_in_background(model: Any, model_path: str, dtype: str, rows: int, slots: int,
                        quantization: str | None = None, verify: bool = False) -> bool:
    """Start a detached process (lowest priority) that builds the package this `model`, loaded from `model_path` in
    `dtype` (and with `quantization`), would use (and with `verify`, for one row, speculative decoding's verify
    package), unless they are there or being built; True if one was started. The process loads the model itself and
    gives up if it differs from `model` (an adapter merged after loading, say)."""
    from decoderkit.generation.verify_step import verify_package_path

    if aot_unsupported(model) is not None:
        return False
    fingerprint = step_identity(model)
    package = package_path(model, fingerprint, rows, slots)
    marker = _marker(fingerprint, rows, slots)
    verify = verify and rows == 1
    missing = not package.is_file() or (verify and not verify_package_path(model, slots).is_file())
    if not missing:
        return False
    arguments = [model_path, "--dtype", dtype, "--rows", str(rows), "--slots", str(slots), "--expect",
                 _weights_id(fingerprint)]
    if quantization is not None:
        arguments += ["--quantize", quantization]
    if verify:
        arguments.append("--verify")
    return start_builder("decoderkit.generation.aot_step", arguments, package, marker)


def start_builder(module: str, arguments: list[str], package: Path, marker: Path) -> bool:
    """Start ``python -m module *arguments --marker marker`` as a detached process that builds `package` (its output
    in the package's ``.log``), unless `marker` says a build started less than an hour ago; True if one started. The
    builder removes the marker when it ends."""
    import subprocess
    import sys
    import time

    if marker.is_file() and time.time() - marker.stat().st_mtime < 3600:
        return False
    package.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()  # now, so that a start right after this one does not start a second build
    command = [sys.executable, "-m", module, *arguments, "--marker", str(marker)]
    env = {**os.environ, "DECODERKIT_KERNELS": os.environ.get("DECODERKIT_KERNELS", "1").replace("cached", "1")}
    with open(package.with_suffix(".log"), "w") as log:
        subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True)
    return True


def builder_parser(prog: str, description: str | None) -> Any:
    """The arguments every background builder takes (more are added by each)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("model")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantize", default=None, help="quantization= for from_pretrained")
    parser.add_argument("--expect", default=None, help="build only if the loaded weights have this id")
    parser.add_argument("--marker", default=None, help="a file the caller made, removed when this process ends")
    return parser


def run_builder(args: Any, identity: Callable[[Any], tuple], build: Callable[[Any], list[Path]]) -> int:
    """A background builder's work on its parsed `args` (`builder_parser`): load the model at the lowest priority
    on one thread, check that it is the caller's (its `identity` has the id `--expect` names), `build` its packages;
    the marker is removed however that ends."""
    os.nice(19)
    torch.set_num_threads(1)
    from decoderkit import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, device="cpu", progress=False,
                                                     quantization=args.quantize).eval()
        if args.expect is not None and _weights_id(identity(model)) != args.expect:
            print(f"not built: {args.model} loads to another model than the caller's")
            return 0
        for path in build(model):
            print(f"built {path}")
    finally:
        if args.marker is not None:
            Path(args.marker).unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The background builder: ``python -m decoderkit.generation.aot_step MODEL --dtype D --rows R --slots S``."""
    from decoderkit.layers.linear import use_decode_linear

    parser = builder_parser("python -m decoderkit.generation.aot_step", main.__doc__)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--verify", action="store_true", help="also build speculative decoding's verify step")
    args = parser.parse_args(argv)

    def identity(model: Any) -> tuple:
        use_decode_linear(model)  # the layers the decode step runs with
        return step_identity(model)

    def build(model: Any) -> list[Path]:
        built = [build_package(model, args.rows, args.slots)]
        if args.verify:
            from decoderkit.generation.verify_step import build_verify_package

            built.append(build_verify_package(model, args.slots))
        return built

    return run_builder(args, identity, build)


if __name__ == "__main__":
    raise SystemExit(main())
