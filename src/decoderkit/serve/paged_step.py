"""The server's short steps compiled ahead of time: `paged.step_forward` as an AOTInductor package.

An eager step over the paged pool pays Python for every module of every layer (about 15 calls a layer); on a small CPU
model that is as much as its arithmetic, so the server decoded one request at a fraction of `generate`'s packaged rate.
This package is the same step behind AOTInductor's C++ runner (as `generation.aot_step` builds generate's), over the
pool as it is: the number of sequences, of tokens, of logit rows, the block tables' width and the pool's size are
dynamic, so one package serves every step of up to `max_rows` sequences and `max_tokens` tokens whose segments are
all shorter than `paged.PREFILL_MIN_TOKENS`: decode tokens, the server's speculative checks (logits after each
proposed token), short prompts and the last short chunk of a longer one. Those are the segments the eager runner
attends with the same paged kernel; longer segments (flash attention, and fp32 upcasting for half-precision models
on some CPUs) and prompt scoring stay eager (`PagedRunner`), and both write and read the same pool.

The package takes the weights as inputs (no copy, as the quantized decode step does) and is keyed by their names,
dtypes and shapes, the block size and `max_rows`: a server with a LoRA adapter merged into a copy of the weights uses
the base model's package. Each layer's keys and values are passed as their own tensors (views of the pool): the
package then writes the step's rows in place, where a view taken inside the graph made it copy the whole pool back.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decoderkit.serve.paged import (
    PREFILL_MIN_TOKENS,
    PagedRunner,
    Segment,
    _eager_math,
    block_tables,
    logit_rows,
    step_forward,
)

__all__ = ["PackageWatch", "PagedDecodeStep", "attach", "build_paged_in_background", "build_paged_package", "max_rows",
           "max_tokens", "paged_package_path", "paged_unsupported"]
logger = logging.getLogger(__name__)


def paged_unsupported(runner: PagedRunner) -> str | None:
    """Why `runner`'s decode steps cannot be packaged (None when they can): the paged kernel in use, the attention the
    kernel computes (not the eager math the model asks for), and what `aot_unsupported` asks of the model."""
    from decoderkit.generation.aot_step import aot_unsupported

    config = runner.stack.config
    if not runner.paged_kernel:
        return "the packaged decode step reads the pool with the paged-attention kernel, which is not in use"
    if _eager_math(config.attn_implementation, config.position_embedding == "alibi", runner.model.dtype):
        return "the model's attention takes the eager math here, which the paged kernel does not reproduce"
    return aot_unsupported(runner.model)


def max_rows(model: Any, max_batch_size: int) -> int:
    """The most sequences a package takes: `max_batch_size`, but no more than the rows up to which every quantized
    layer runs its kernel (past them it dequantizes: a branch the package cannot follow), and at least 2 (the
    package is traced with 2)."""
    from decoderkit.layers.quantized import QuantizedLinear

    limits = [m.kernel_rows() for m in model.modules() if isinstance(m, QuantizedLinear)]
    return max(2, min([max_batch_size, *limits]))


def max_tokens(rows: int) -> int:
    """The most tokens a package of `rows` sequences takes in one step: room for one short prompt beside them
    (`PREFILL_MIN_TOKENS`), within every quantized layer's kernel rows (never fewer than `KERNEL_ROWS`, 16)."""
    return max(rows, PREFILL_MIN_TOKENS)


class _Step(nn.Module):
    def __init__(self, model: Any, block_size: int) -> None:
        super().__init__()
        self.model = model
        self.block_size = block_size

    def forward(self, ids, positions, write_slots, tables, row_starts, starts, rows, keys, values):  # noqa: ANN001, ANN201
        return step_forward(self.model, ids, positions, write_slots, tables, row_starts, starts, rows, keys, values,
                            self.block_size)


def paged_package_path(model: Any, block_size: int, rows: int) -> Path:
    """Where the package of `model`'s paged decode step for blocks of `block_size` and up to `rows` sequences lives
    (whether or not it exists)."""
    from decoderkit.generation.aot_step import package_path, step_identity
    from decoderkit.generation.verify_step import _torch_linears

    with _torch_linears(model):  # as the package is keyed when it is built
        return package_path(model, step_identity(model, as_inputs=True), rows, block_size, kind="paged")


def build_paged_package(model: Any, block_size: int, rows: int) -> Path:
    """Compile and store the paged decode step's package for `model` (minutes on a small CPU); its path."""
    from decoderkit.generation.aot_step import WeightsAsInputs, compile_package, weight_inputs
    from decoderkit.generation.verify_step import _torch_linears
    from decoderkit.kernels import attention as paged_kernel
    from decoderkit.serve.blocks import BlockPool

    path = paged_package_path(model, block_size, rows)
    if path.is_file():
        return path
    if not paged_kernel.available():
        raise RuntimeError("the paged decode step needs the paged-attention kernel (a C++ compiler)")
    config = model.decoder_config
    # Example sizes that differ from each other and from every static size, so that tracing does not tie them: 2
    # sequences (3 row starts) of 6 and 1 tokens, logits after 5 of the 7 tokens, tables 4 blocks wide, 7 blocks
    pool = BlockPool(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, 7, block_size,
                     model.dtype, model.device)
    pool.keys.zero_()
    pool.values.zero_()
    tables = torch.tensor([[1, 2, 3, 6], [4, 5, 0, 0]])
    starts, lengths = [2 * block_size, block_size], [6, 1]
    positions = [p for start, n in zip(starts, lengths) for p in range(start, start + n)]
    owners = [s for s, n in enumerate(lengths) for _ in range(n)]
    write_slots = [int(tables[s, p // block_size]) * block_size + p % block_size for s, p in zip(owners, positions)]
    example = (torch.zeros(len(positions), dtype=torch.long), torch.tensor(positions), torch.tensor(write_slots),
               tables, torch.tensor([0, 6, 7]), torch.tensor(starts), torch.tensor([1, 2, 3, 5, 6]), list(pool.keys),
               list(pool.values))
    n = torch.export.Dim("sequences", min=1, max=rows)
    t = torch.export.Dim("tokens", min=1, max=max_tokens(rows))
    o = torch.export.Dim("logit_rows", min=1, max=max_tokens(rows))
    b = torch.export.Dim("blocks", min=1)
    r = torch.export.Dim("pool_rows", min=2)
    layers = config.num_hidden_layers
    dynamic = ({0: t}, {0: t}, {0: t}, {0: n, 1: b}, {0: n + 1}, {0: n}, {0: o}, [{0: r}] * layers, [{0: r}] * layers)
    weights = weight_inputs(model, True)
    logger.info("compiling the server's decode step with AOTInductor into %s", path)
    # GEMV layers (`DecodeLinear`, where generate ran the model) choose their kernel by the number of rows, which is
    # dynamic here: traced as torch's linear
    with _torch_linears(model):
        compile_package(WeightsAsInputs(_Step(model, block_size)), (weights, *example),
                        ([None] * len(weights), dynamic), path)
    return path


def build_paged_in_background(watch: PackageWatch, model_path: str, dtype: str, quantization: str | None) -> bool:
    """Start a detached process (lowest priority) that builds the package `watch` waits for, loading the model from
    `model_path` in `dtype` (and with `quantization`), unless it is there or being built; True if one was started.
    The process gives up if its model's weights differ in names, dtypes or shapes from the watched runner's."""
    from decoderkit.generation.aot_step import _weights_id, start_builder, step_identity

    if watch.path.is_file():
        return False
    model = watch.runner.model
    arguments = [model_path, "--dtype", dtype, "--block-size", str(watch.runner.pool.block_size), "--rows",
                 str(watch.rows), "--expect", _weights_id(step_identity(model, as_inputs=True))]
    if quantization is not None:
        arguments += ["--quantize", quantization]
    return start_builder("decoderkit.serve.paged_step", arguments, watch.path, watch.path.with_suffix(".building"))


class PagedDecodeStep:
    """Runs a `PagedRunner`'s short steps through the package: 1 .. `rows` sequences, each with fewer than
    `PREFILL_MIN_TOKENS` new tokens, `max_tokens(rows)` tokens in all.

    Args:
        runner: the runner whose pool and model the package reads and writes.
        path: the package (`paged_package_path`).
        rows: the most sequences it takes.
    """

    def __init__(self, runner: PagedRunner, path: Path, rows: int) -> None:
        from decoderkit.generation.aot_step import load_package, weight_inputs

        self.runner = runner
        self.rows = rows
        self.tokens = max_tokens(rows)
        self.package = load_package(path)
        self.head = weight_inputs(runner.model, True)
        pool = runner.pool
        self.tail = [*pool.keys, *pool.values]  # each layer's buffers, as the package was traced with them

    def takes(self, segments: Sequence[Segment], tails: Sequence[int] | None = None) -> bool:
        """Whether the step can run `segments` (with logits after each one's last `tails[i]` tokens, or its last)."""
        lengths = [len(s.ids) for s in segments]
        return (0 < len(segments) <= self.rows and sum(lengths) <= self.tokens
                and all(0 < n < PREFILL_MIN_TOKENS for n in lengths)
                and (tails is None or all(0 < tail <= n for tail, n in zip(tails, lengths))))

    @torch.inference_mode()
    def __call__(self, segments: Sequence[Segment], tails: Sequence[int] | None = None) -> torch.Tensor:
        """The logits after each segment's last token (S, V), or after its last `tails[i]` tokens (sum(tails), V),
        its keys and values written to the pool: `PagedRunner.forward`'s result."""
        pool = self.runner.pool
        ids = torch.tensor([t for s in segments for t in s.ids], dtype=torch.long)
        positions = torch.tensor([p for s in segments for p in range(s.start, s.end)], dtype=torch.long)
        write_slots = torch.tensor([pool.slot(s.block_table, p) for s in segments for p in range(s.start, s.end)],
                                   dtype=torch.long)
        row_starts = torch.tensor([0, *itertools.accumulate(len(s.ids) for s in segments)], dtype=torch.long)
        starts = torch.tensor([s.start for s in segments], dtype=torch.long)
        inputs = [ids, positions, write_slots, block_tables(pool, segments), row_starts, starts,
                  torch.tensor(logit_rows(segments, tails), dtype=torch.long)]
        return self.package.boxed_run([*self.head, *inputs, *self.tail])[0]


def attach(runner: PagedRunner, max_batch_size: int, build: bool) -> PackageWatch | None:
    """Give `runner` its packaged decode step where the model can have one: loaded from disk, or with `build`
    compiled first. Where the runner could use a package that is not there yet, a `PackageWatch` for it."""
    reason = paged_unsupported(runner)
    if reason is not None:
        if build:
            logger.warning("decoderkit serve: the decode step runs eagerly: %s", reason)
        return None
    rows = max_rows(runner.model, max_batch_size)
    path = paged_package_path(runner.model, runner.pool.block_size, rows)
    if build and not path.is_file():
        build_paged_package(runner.model, runner.pool.block_size, rows)
    if not path.is_file():
        return PackageWatch(runner, path, rows)
    runner.decode_step = PagedDecodeStep(runner, path, rows)
    return None


class PackageWatch:
    """Loads a package into the runner once it appears on disk (built by another process), looking at most every
    `interval` seconds."""

    def __init__(self, runner: PagedRunner, path: Path, rows: int, interval: float = 5.0) -> None:
        self.runner, self.path, self.rows, self.interval = runner, path, rows, interval
        self._looked = time.monotonic()

    def poll(self) -> bool:
        """Load the package if it is there now; True once loaded (the watch is then done)."""
        now = time.monotonic()
        if now - self._looked < self.interval:
            return False
        self._looked = now
        if not self.path.is_file():
            return False
        try:
            self.runner.decode_step = PagedDecodeStep(self.runner, self.path, self.rows)
        except (OSError, RuntimeError) as err:  # a broken package: keep decoding eagerly, say so once
            logger.warning("decoderkit serve: could not load %s (%s); decoding eagerly", self.path, err)
        else:
            logger.info("decoderkit serve: the packaged decode step is in use (%s)", self.path)
        return True


def main(argv: list[str] | None = None) -> int:
    """The background builder: ``python -m decoderkit.serve.paged_step MODEL --dtype D --block-size B --rows R``."""
    from decoderkit.generation.aot_step import builder_parser, run_builder, step_identity

    parser = builder_parser("python -m decoderkit.serve.paged_step", main.__doc__)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rows", type=int, default=32)
    args = parser.parse_args(argv)
    return run_builder(args, lambda model: step_identity(model, as_inputs=True),
                       lambda model: [build_paged_package(model, args.block_size, args.rows)])


if __name__ == "__main__":
    raise SystemExit(main())
