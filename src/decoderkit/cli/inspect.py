"""`decoderkit bench` and `decoderkit info`: measure a model, describe a checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from decoderkit.cli.common import (
    EXIT_OK,
    CLIError,
    TokenStreamer,
    UsageError,
    _describe,
    _round,
    build_step_in_background,
    load_model,
    locate_model,
    resolve_compile,
    speculative_kwargs,
)

if TYPE_CHECKING:
    import torch


# ---------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    """`decoderkit bench`: prefill and decode throughput, time to first token and peak memory."""
    import resource

    import torch

    start = time.perf_counter()
    model, _, path = load_model(args, tokenizer=False)
    load_s = time.perf_counter() - start
    config = model.decoder_config
    if args.prompt_tokens + args.new_tokens > config.max_position_embeddings:
        raise UsageError(f"--prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens} exceeds the "
                         f"model's context window of {config.max_position_embeddings}")
    device = model.device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (args.batch_size, args.prompt_tokens), generator=generator)
    prompt = prompt.to(device)
    # Every sequence runs to exactly `--new-tokens`: the end-of-sequence token is never allowed to stop it early.
    kwargs: dict[str, Any] = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    speculative = speculative_kwargs(args, model)
    if speculative and args.batch_size > 1:
        raise UsageError(f"--speculative supports --batch-size 1, got {args.batch_size}")
    # The output then counts the proposed and accepted tokens
    kwargs.update(speculative, return_dict_in_generate=bool(speculative))
    compiled = resolve_compile(args)
    if compiled:
        kwargs["compile"] = compiled
    step = "torch.compile" if compiled is True else "eager"
    if compiled == "auto":
        from decoderkit.generation.aot_step import packages_cached
        from decoderkit.generation.decode_step import compile_slots

        if packages_cached(model, args.batch_size, compile_slots(args.prompt_tokens + args.new_tokens),
                           bool(speculative)):
            step = "aot"
    acceptance: list[float | None] = [None]

    def timed_run(ids: torch.Tensor, new_tokens: int) -> tuple[float, float | None, int]:
        streamer = TokenStreamer(None, ids[0].tolist(), [])
        begin = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                 **{**kwargs, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total = time.perf_counter() - begin
        first = streamer.first_token_at - begin if streamer.first_token_at is not None else None
        if speculative:
            acceptance[0] = out.num_accepted_tokens / out.num_proposed_tokens if out.num_proposed_tokens else None
            out = out.sequences
        return total, first, out.shape[-1] - ids.shape[-1] if isinstance(out, torch.Tensor) else new_tokens

    # A warm-up run takes one-off costs (allocator growth, kernel selection) out of the measurement. Compiled code is
    # specialised to the static cache's shapes, so then the warm-up must be the measured run itself.
    if compiled is True:
        timed_run(prompt, args.new_tokens)
    else:
        timed_run(prompt[:, : min(8, args.prompt_tokens)], min(2, args.new_tokens))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total_s, ttft, generated = timed_run(prompt, args.new_tokens)
    b = args.batch_size
    decode_s = total_s - ttft if ttft is not None else None
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    decode_tps = b * (generated - 1) / decode_s if decode_s and generated > 1 else None
    if step == "eager":
        build_step_in_background(args, model, path, b, args.prompt_tokens + args.new_tokens)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
    record = {
        "model": str(path), "device": str(device), "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": model.num_parameters(), "batch_size": b, "prompt_tokens": args.prompt_tokens,
        "new_tokens": generated, "load_s": round(load_s, 4),
        "time_to_first_token_s": _round(ttft), "prefill_tokens_per_s": _round(b * args.prompt_tokens / ttft, 2)
        if ttft else None, "decode_tokens_per_s": _round(decode_tps, 2), "total_s": round(total_s, 4),
        # Each decode step reads every weight once: this is the bandwidth the decode rate implies (roofline check).
        "decode_weight_read_gb_per_s": _round(weights_bytes * decode_tps / b / 1e9, 3) if decode_tps else None,
        "weights_bytes": weights_bytes, "peak_rss_bytes": rss_bytes,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "speculative": args.speculative, "acceptance_rate": _round(acceptance[0]),
        "compiled": compiled is True or step == "aot", "decode_step": step, "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "torch_version": torch.__version__,
    }
    if args.json:
        print(json.dumps(record))
    else:
        _print_table(f"bench: {path.name}", {
            "device / dtype": f"{record['device']} / {record['dtype']}",
            "threads": str(record["torch_threads"]),
            "decode step": step,
            "batch x prompt + new": f"{b} x {args.prompt_tokens} + {generated}",
            "load": f"{load_s:.2f} s",
            "time to first token": _fmt(ttft, "{:.4f} s"),
            "prefill": _fmt(record["prefill_tokens_per_s"], "{:,.1f} tokens/s"),
            "decode": _fmt(decode_tps, "{:,.1f} tokens/s"),
            "decode weight reads": _fmt(record["decode_weight_read_gb_per_s"], "{:.2f} GB/s"),
            **({"speculative": f"{args.speculative}, {_fmt(record['acceptance_rate'], '{:.0%}')} of proposals "
                "accepted"} if speculative else {}),
            "peak RSS": _size(rss_bytes),
            "CUDA max allocated": _size(record["cuda_max_allocated_bytes"]),
        })
    return EXIT_OK


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _print_table(title: str, rows: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # paths must stay whole, not end in an ellipsis
    for key, value in rows.items():
        table.add_row(key, str(value))
    Console(soft_wrap=True).print(table)


# ---------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    """`decoderkit info`: what a checkpoint is, from its config and file headers only."""
    path = locate_model(args.model)
    record = gguf_info(path) if path.is_file() else directory_info(path)
    if args.json:
        print(json.dumps(record))
        return EXIT_OK
    rows = {k: v for k, v in record.items() if k != "files"}
    rows["parameters"] = f"{record['parameters']:,} ({record['parameters_source']})" if record["parameters"] else "-"
    rows.pop("parameters_source")
    rows["total_size"] = _size(record["total_size_bytes"])
    rows.pop("total_size_bytes")
    rows["files"] = ", ".join(f"{f['name']} ({_size(f['size_bytes'])})" for f in record["files"])
    _print_table(f"info: {path}", rows)
    return EXIT_OK


def _config_summary(hf: dict[str, Any]) -> dict[str, Any]:
    from decoderkit.config import DecoderConfig

    config = DecoderConfig.from_hf_dict(hf)
    return {
        "family": config.model_type,
        "architectures": hf.get("architectures") or [],
        "context_length": config.max_position_embeddings,
        "position_embedding": config.position_embedding,
        "rope_type": config.rope_type if config.position_embedding == "rope" else None,
        "rope_theta": config.rope_parameters.get("rope_theta") if config.position_embedding == "rope" else None,
        "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
        "attention_heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_word_embeddings,
        "_config": config,
    }


def _count_from_config(config: Any) -> int:
    """Parameters of the causal LM the config describes, built on the meta device (no memory, no init)."""
    import torch

    from decoderkit.model import DecoderForCausalLM

    with torch.device("meta"):
        model = DecoderForCausalLM(config)
    return model.num_parameters()


def directory_info(path: Path) -> dict[str, Any]:
    """`info` for a Hugging Face model directory: config.json plus safetensors headers (no tensor data read)."""
    from decoderkit.checkpoint import weight_files
    from decoderkit.config import read_config_json

    hf = read_config_json(path)
    summary = _config_summary(hf)
    config = summary.pop("_config")
    files, fmt = weight_files(path)[:2]  # (files, format, weight map) in newer versions
    parameters, dtypes = None, {}
    if fmt == "safetensors":
        from safetensors import safe_open

        parameters = 0
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        tensor = f.get_slice(name)  # header only: shape and dtype without reading data
                        count = 1
                        for dim in tensor.get_shape():
                            count *= dim
                        parameters += count
                        dtype = str(tensor.get_dtype())
                        dtypes[dtype] = dtypes.get(dtype, 0) + count
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise CLIError(f"{file}: unreadable safetensors header ({_describe(err)})") from None
        source = "safetensors headers"
    if parameters is None:
        parameters, source = _count_from_config(config), "config shapes"
    dtype = max(dtypes, key=dtypes.get) if dtypes else hf.get("dtype", hf.get("torch_dtype"))
    listing = sorted(p for p in path.iterdir() if p.is_file())
    tokenizer = (path / "tokenizer.json").is_file()
    chat_template = tokenizer and _has_chat_template(path)
    return {
        "path": str(path), "format": f"huggingface ({fmt})", **summary, "parameters": parameters,
        "parameters_source": source, "dtype": _short_dtype(dtype), "tokenizer": tokenizer,
        "chat_template": chat_template, "total_size_bytes": sum(p.stat().st_size for p in listing),
        "files": [{"name": p.name, "size_bytes": p.stat().st_size} for p in listing],
    }


def _short_dtype(dtype: Any) -> str | None:
    if dtype is None:
        return None
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "I64": "int64",
             "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip
    return names.get(str(dtype), str(dtype).removeprefix("torch."))


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def gguf_info(path: Path) -> dict[str, Any]:
    """`info` for a .gguf file: metadata and tensor headers (memory-mapped; nothing is dequantized)."""
    from decoderkit.gguf_model import gguf_config, open_gguf

    reader = open_gguf(path)
    hf = gguf_config(reader)
    summary = _config_summary(hf)
    summary.pop("_config")
    types: dict[str, int] = {}
    parameters = 0
    for tensor in reader.tensors:
        count = int(tensor.n_elements)
        parameters += count
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + count
    field = reader.get_field("tokenizer.chat_template")
    size = path.stat().st_size
    return {
        "path": str(path), "format": "gguf", **summary, "parameters": parameters, "parameters_source": "gguf tensors",
        # GGUF mixes types (e.g. Q4_K with F32 norms): name the one holding most weights, then the rest.
        "dtype": max(types, key=types.get) if types else None,
        "tensor_types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
        "tokenizer": reader.get_field("tokenizer.ggml.tokens") is not None, "chat_template": field is not None,
        "total_size_bytes": size, "files": [{"name": path.name, "size_bytes": size}],
    }
