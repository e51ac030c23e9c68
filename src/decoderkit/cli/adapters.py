"""LoRA adapters on the command line: `--adapter DIR` (generate, chat, bench, serve) and `decoderkit merge`.

An adapter is a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`), as `decoderkit train --lora`
writes it. Commands merge it into the base weights once, after loading (`W + scaling * B A`), so decoding runs at the
base model's speed; the base must therefore be float: a GGUF file is dequantized for it, and `--quantize int8/int4`
(quantization at load time, before the adapter exists) is refused.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from decoderkit.cli.common import EXIT_OK, CLIError, UsageError, _note, copy_tokenizer, locate_model

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def adapter_dir(text: str, flag: str = "--adapter") -> Path:
    """An existing PEFT adapter directory, or a CLIError saying what is missing."""
    path = Path(text).expanduser()
    if not path.exists():
        raise CLIError(f"{flag} {text}: no such directory")
    if not path.is_dir():
        raise CLIError(f"{flag} {text}: not a directory (an adapter is a directory holding {', '.join(ADAPTER_FILES)})")
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        hint = "; it looks like a full model, pass it as --model" if (path / "config.json").is_file() else ""
        raise CLIError(f"{flag} {text}: not a LoRA adapter directory (no {' or '.join(missing)}){hint}")
    return path


def named_adapter(text: str) -> tuple[str, str]:
    """serve's `--adapter NAME=DIR` (or just DIR, named after the directory)."""
    name, sep, directory = text.partition("=")
    if not sep:
        name, directory = Path(text.rstrip("/")).name, text
    if not name or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, directory


def adapter_load_quantization(quantize: str | None, adapters: list[Any]) -> str | None:
    """The `quantization` to load a base with, given `--quantize` and whether adapters follow."""
    if not adapters:
        return quantize
    if quantize in ("int8", "int4"):
        raise UsageError(f"--adapter merges into float weights; --quantize {quantize} cannot be combined with it "
                         "(merge the adapter with `decoderkit merge`, then quantize the merged model)")
    return "none"


def apply_adapter(model: Any, directory: str | Path, flag: str = "--adapter") -> Any:
    """`model` with the adapter in `directory` merged into its weights; CLIError when it does not fit the model."""
    from decoderkit.layers.quantized import QuantizedLinear
    from decoderkit.training.lora import load_adapter, merge_and_unload

    path = adapter_dir(str(directory), flag)
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise CLIError(f"{flag} {directory}: the base model's weights are quantized; load it with --quantize none")
    try:
        load_adapter(model, path)
    except ValueError as err:
        raise CLIError(f"{flag} {directory}: does not fit this base model: {err}") from None
    merged = merge_and_unload(model)
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged.eval()


def cmd_merge(args: argparse.Namespace) -> int:
    """`decoderkit merge BASE ADAPTER OUT`: a model directory with the adapter folded into the weights."""
    from decoderkit.cli.manage import check_output_dir, check_shard_size, load_float_model

    source = locate_model(args.base)
    adapter = adapter_dir(args.adapter, "ADAPTER")
    output = Path(args.output)
    if output.exists() and output.resolve() in (source.resolve(), adapter.resolve()):
        raise UsageError("OUT must differ from BASE and ADAPTER")
    check_output_dir(output, args.overwrite, "--overwrite to replace it")
    if not output.parent.resolve().is_dir():
        raise CLIError(f"{output.parent}: no such directory")
    check_shard_size(args.max_shard_size)

    start = time.perf_counter()
    model = load_float_model(args, source)
    model = apply_adapter(model, adapter, "ADAPTER")
    # Written beside OUT and renamed into place: a failure or Ctrl-C leaves no half-written model under OUT.
    staging = output.parent / f".{output.name}.merge-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        copy_tokenizer(source, staging)
        if output.exists():
            old = output.parent / f".{output.name}.merge-old"
            shutil.rmtree(old, ignore_errors=True)
            output.rename(old)
            staging.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _note(args, f"wrote {output} ({str(model.dtype).removeprefix('torch.')}, {model.num_parameters():,} parameters, "
                f"{adapter.name} merged into {source.name}) in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


def add_merge_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """The `merge` subcommand."""
    from decoderkit.cli.common import dtype_name
    from decoderkit.cli.threads import add_threads_arg

    merge = sub.add_parser("merge", parents=parents, help="fold a LoRA adapter into its base model",
                           description="Write a Hugging Face model directory whose weights are BASE's with the LoRA "
                           "adapter in ADAPTER (a PEFT directory, as `decoderkit train --lora` writes) merged in.")
    merge.add_argument("base", metavar="BASE", help="the adapter's base: model directory, .gguf file or hub id")
    merge.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter directory")
    merge.add_argument("output", metavar="OUT", help="directory to write")
    merge.add_argument("--dtype", type=dtype_name, default=None,
                       help="dtype of the written weights (default: BASE's; float32 for a quantized GGUF)")
    merge.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    add_threads_arg(merge)
    merge.set_defaults(handler=cmd_merge)

