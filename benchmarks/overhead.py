"""Per-token overhead: batch-1 greedy decoding of a small model, where the weights take almost no time to read.

The shipped default model (2.6M parameters, ~10 MB in fp32) is loaded by transformers and by decoderkit from the same
directory. For each dtype it prints decode tokens/s at batch 1 (``--prompt`` tokens, ``--new-tokens`` new ones,
measured as the time for N new tokens minus the time for 1, so the prefill is not counted) for transformers'
``generate``, decoderkit's dynamic cache, static cache and ``compile=True`` (compiled in a warm-up call, not timed).
Each figure comes twice: from wall time and from this thread's CPU time. On a shared machine the wall figure also
counts the time other processes hold the core; the CPU figure does not (cache misses caused by them it still does).

``--floor`` adds what the weight reads alone cost: the model's GEMVs (MKL, prepacked as the compiled step has them)
run back to back, with nothing else around them. ``--profile`` prints cProfile's top functions for one compiled
``generate`` call. ``--ttft`` runs ``decoderkit generate`` in fresh processes twice with an empty compile cache
directory (cold, then warm) and once with ``--no-compile``, and prints the time to the first token and the time
of the whole process.

    python benchmarks/overhead.py --threads 1
    python benchmarks/overhead.py --threads 1 --floor --profile
    python benchmarks/overhead.py --ttft --model path/to/hf-dir --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import transformers

import decoderkit
from decoderkit.cli.common import default_model_path


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def decode_rates(run: Callable[[int], object], new: int, repeats: int) -> tuple[float, float]:
    """Best decode tokens/s over `repeats`, by wall time and by CPU time."""
    run(new)
    run(1)
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall_n, cpu_n = timed(lambda: run(new))
        wall_1, cpu_1 = timed(lambda: run(1))
        best_wall, best_cpu = min(best_wall, wall_n - wall_1), min(best_cpu, cpu_n - cpu_1)
    return (new - 1) / max(best_wall, 1e-9), (new - 1) / max(best_cpu, 1e-9)


def gemv_floor(model: torch.nn.Module, repeats: int = 200) -> float:
    """CPU seconds per token of the model's linear layers alone (fp32 MKL on packed weights, one row)."""
    weights = [m.weight.detach().float() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, 1) for w in weights]
    inputs = [torch.randn(1, w.shape[1]) for w in weights]

    def run() -> None:
        for x, p, w in zip(inputs, packed, weights):
            torch.ops.mkl._mkl_linear(x, p, w, None, 1)

    for _ in range(10):
        run()
    best = float("inf")
    for _ in range(3):
        start = time.thread_time()
        for _ in range(repeats):
            run()
        best = min(best, (time.thread_time() - start) / repeats)
    return best


def bench_dtype(directory: str, dtype_name: str, args: argparse.Namespace) -> None:
    dtype = getattr(torch, dtype_name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    dk = decoderkit.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    vocab = dk.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    common = dict(do_sample=False, eos_token_id=None, pad_token_id=0)  # never stop early
    runners: dict[str, Callable[[int], object]] = {
        "transformers": lambda n: hf.generate(ids, max_new_tokens=n, **common),
        "dynamic": lambda n: dk.generate(ids, max_new_tokens=n, **common),
        "static": lambda n: dk.generate(ids, max_new_tokens=n, cache_implementation="static", **common),
        "compiled": lambda n: dk.generate(ids, max_new_tokens=n, compile=True, **common),
    }
    with torch.inference_mode():
        for name, run in runners.items():
            wall, cpu = decode_rates(run, args.new_tokens, args.repeats)
            print(f"{dtype_name:9} {name:13} {wall:8.1f} tok/s wall {cpu:8.1f} tok/s cpu", flush=True)
        if args.floor:
            floor = gemv_floor(dk)
            print(f"{dtype_name:9} {'GEMVs alone':13} {1 / floor:8.1f} tok/s cpu (fp32 MKL, no other work)")
        if args.profile:
            run = runners["compiled"]
            profiler = cProfile.Profile()
            profiler.runcall(run, args.new_tokens)
            print(f"cProfile, one compiled generate of {args.new_tokens} tokens ({dtype_name}):")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(15)


def time_to_first_token(model: str | None, dtype: str, cache_dir: str, compile_flag: str) -> tuple[float, float]:
    """(time to first token, whole process) in seconds for one `decoderkit generate` in a fresh process."""
    command = [sys.executable, "-m", "decoderkit", "generate", "--greedy", "--max-new-tokens", "8", "--json",
               "--device", "cpu", "--dtype", dtype, compile_flag, "To be, or not to be"]
    if model:
        command[3:3] = ["--model", model]
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "DECODERKIT_COMPILE")}
    env["DECODERKIT_CACHE_DIR"] = cache_dir
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    whole = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"decoderkit generate failed: {proc.stderr}")
    return json.loads(proc.stdout)["timings"]["time_to_first_token_s"], whole


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory (default: the shipped model)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--floor", action="store_true", help="also time the model's GEMVs alone")
    parser.add_argument("--profile", action="store_true", help="cProfile one compiled generate call")
    parser.add_argument("--ttft", action="store_true", help="only the cold / warm start time to first token")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    directory = args.model or str(default_model_path())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}, model {directory}")
    if args.ttft:
        for dtype in args.dtypes.split(","):
            with tempfile.TemporaryDirectory(prefix="decoderkit-ttft-") as cache:
                for label, flag in (("cold", "--compile"), ("warm", "--compile"), ("eager", "--no-compile")):
                    first, whole = time_to_first_token(args.model, dtype, cache, flag)
                    print(f"{dtype:9} {label:6} time to first token {first:7.2f} s, whole process {whole:7.2f} s",
                          flush=True)
        return
    for dtype in args.dtypes.split(","):
        bench_dtype(directory, dtype, args)


if __name__ == "__main__":
    main()
