"""`decoderkit train`, `serve` and `convert`: the commands that hand off to other parts of decoderkit."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from decoderkit.cli.common import EXIT_ERROR, EXIT_OK, PROG, CLIError, UsageError, _note, copy_tokenizer, locate_model


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    """`decoderkit train ...`: the trainer's own command line (`python -m decoderkit.training`), in this process."""
    try:
        from decoderkit.training.__main__ import main as train_main
    except ImportError as err:
        raise CLIError(f"the trainer (decoderkit.training) is not available in this installation ({err})") from None
    return _exit_status(lambda: train_main(args.trainer_args, prog=f"{PROG} train"))


def _exit_status(run: Callable[[], object]) -> int:
    """Run a program that reports through SystemExit (argparse's --help and errors): its status as an int, a message
    exit printed on stderr as status 1."""
    try:
        result = run()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or EXIT_OK
        print(stop.code, file=sys.stderr)
        return EXIT_ERROR
    return result if isinstance(result, int) else EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """`decoderkit serve ...`: the OpenAI-compatible server (needs the `serve` extra: fastapi, uvicorn)."""
    try:
        from decoderkit.serve.app import main as serve_main
    except ImportError as err:
        raise CLIError(f"the server needs the serve extra ({err}); pip install 'decoderkit[serve]'") from None
    return _exit_status(lambda: serve_main(args.trainer_args))


def check_output_dir(output: Path, allowed: bool, how: str) -> None:
    """OUTPUT of a command that writes a model directory: absent, an empty directory, or `allowed` (the flag)."""
    if output.exists() and not output.is_dir():
        raise CLIError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not allowed:
        raise CLIError(f"{output}: directory is not empty; pass {how}")


def check_shard_size(value: str) -> None:
    from decoderkit.checkpoint import parse_size

    try:
        parse_size(value)
    except ValueError as err:
        raise UsageError(f"--max-shard-size: {err}") from None


def load_float_model(args: argparse.Namespace, source: Path) -> Any:
    """The float model a writing command starts from, on CPU, in `--dtype`. A quantized GGUF tensor has no dtype of
    its own: it is dequantized to float32 unless told otherwise."""
    from decoderkit import AutoModelForCausalLM

    dtype = args.dtype or ("float32" if source.is_file() else "auto")
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device="cpu", quantization="none",
                                                progress=False if getattr(args, "quiet", False) else None)


# ---------------------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    """`decoderkit convert`: a .gguf file or model directory to a (re-typed) Hugging Face directory."""
    source = locate_model(args.source)
    output = Path(args.output)
    if output.suffix == ".gguf":
        return _convert_to_gguf(args, source, output)
    if args.gguf_type is not None:
        raise UsageError("--type applies to a .gguf OUTPUT; a directory takes --dtype")
    if output.exists() and output.resolve() == source.resolve():
        raise UsageError("OUTPUT must differ from SOURCE (the weights are read while the output is written)")
    check_output_dir(output, args.force, "--force to write into it")
    if source.is_dir() and args.dtype is None:
        raise UsageError("converting a model directory needs --dtype (a .gguf source needs no options)")
    check_shard_size(args.max_shard_size)

    start = time.perf_counter()
    model = load_float_model(args, source)
    model.save_pretrained(output, max_shard_size=args.max_shard_size)
    copy_tokenizer(source, output)
    _note(args, f"wrote {output} ({str(model.dtype).removeprefix('torch.')}, {model.num_parameters():,} parameters) "
                f"in {time.perf_counter() - start:.1f} s")
    return EXIT_OK



def _convert_to_gguf(args: argparse.Namespace, source: Path, output: Path) -> int:
    """`decoderkit convert DIR OUT.gguf [--type T]`: write a llama.cpp GGUF file."""
    from decoderkit.gguf_writer import resolve_type, write_gguf

    if not source.is_dir():
        raise UsageError("writing a .gguf needs a model directory as SOURCE; convert the .gguf to a directory first")
    if args.dtype is not None:
        raise UsageError("--dtype applies to a directory OUTPUT; a .gguf OUTPUT takes --type")
    if output.is_dir():
        raise CLIError(f"{output}: is a directory")
    if output.exists() and not args.force:
        raise CLIError(f"{output}: exists; pass --force to replace it")
    if not output.parent.is_dir():
        raise CLIError(f"{output.parent}: no such directory")
    gguf_type = args.gguf_type or "auto"
    try:
        resolve_type(gguf_type, {})
    except ValueError as err:
        raise UsageError(f"--type: {err}") from None
    start = time.perf_counter()
    try:
        result = write_gguf(source, output, gguf_type)
    except ValueError as err:
        raise CLIError(str(err)) from None
    vocab = "with its tokenizer" if result.tokenizer else "without a tokenizer (SOURCE has no tokenizer.json)"
    _note(args, f"wrote {output} ({result.type}, {len(result.tensor_types)} tensors, "
                f"{output.stat().st_size / 2**20:.1f} MiB, {vocab}) in {time.perf_counter() - start:.1f} s")
    return EXIT_OK
