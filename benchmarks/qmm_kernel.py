"""Per-call time of decoderkit's quantized matmul kernel, float32 activations (``qmm``) against int8 activations
(``qmm_q8``), in one process, on SmolLM2-135M's layer shapes.

Both paths run alternately on the same random codes and inputs, so load from other processes hits them alike; the
times are process CPU seconds per call (all threads together), which time slices taken by other processes do not
inflate (``--wall`` for wall-clock time instead).
Formats: GGUF Q4_1 and Q4_0 (int4 group 32, float16 scale and offset), Q8_0 (int8, float16 scale per 32), int8 per
output channel (float32 scale, ``quantization="int8"``) and int4 group 32 from ``quantization="int4"``.

    python benchmarks/qmm_kernel.py --threads 1,2 --rows 1,16
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from decoderkit import kernels

# (name, N, K, calls per token) for SmolLM2-135M: 30 layers of q, k, v, o, gate, up, down, and the tied head
SHAPES = (("q/o 576x576", 576, 576, 60), ("k/v 192x576", 192, 576, 60), ("gate/up 1536x576", 1536, 576, 60),
          ("down 576x1536", 576, 1536, 30), ("head 49152x576", 49152, 576, 1))
FORMATS = {"Q4_1": (4, 32, True, torch.float16), "Q8_0": (8, 32, False, torch.float16),
           "int8/channel": (8, 0, False, torch.float32)}


def operands(fmt: str, n: int, k: int, gen: torch.Generator) -> tuple:
    bits, group, offset, dtype = FORMATS[fmt]
    group = group or k
    if bits == 4:
        codes = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    else:
        codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.rand(n, k // group, generator=gen) / 64).to(dtype)
    offsets = (-8 * scales.float()).to(dtype) if offset else None
    return codes, scales, offsets, bits, group


def per_call(fn, min_time: float, clock) -> float:
    fn()
    calls, start = 0, clock()
    while (elapsed := clock() - start) < min_time:
        fn()
        calls += 1
    return elapsed / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    parser.add_argument("--wall", action="store_true", help="wall-clock time per call instead of CPU time")
    args = parser.parse_args()
    if not kernels.available():
        raise SystemExit("decoderkit's kernel is not available here (no compiler, or DECODERKIT_KERNELS=0)")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    print(f"CPU {cpu}, load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    clock = time.perf_counter if args.wall else time.process_time
    gen = torch.Generator().manual_seed(0)
    print(f"{'wall' if args.wall else 'CPU'} time per call")
    print(f"{'format':13} {'shape':17} {'thr':>3} {'M':>3} {'float us':>9} {'int8 us':>9} {'speed-up':>8}")
    for fmt in args.formats.split(","):
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for rows in map(int, args.rows.split(",")):
                totals = [0.0, 0.0]
                for name, n, k, count in SHAPES:
                    codes, scales, offsets, bits, group = operands(fmt, n, k, gen)
                    x = torch.randn(rows, k, generator=gen)
                    shape_rounds = args.rounds
                    best = [float("inf"), float("inf")]
                    for _ in range(shape_rounds):
                        for i, mode in enumerate(kernels.ACTIVATIONS):
                            args_ = (x, codes, scales, offsets, bits, group, mode)
                            t = per_call(lambda a=args_: kernels.qmm(*a), args.min_time / args.rounds, clock)
                            best[i] = min(best[i], t)
                    totals = [a + b * count for a, b in zip(totals, best)]
                    print(f"{fmt:13} {name:17} {threads:3} {rows:3} {best[0] * 1e6:9.1f} {best[1] * 1e6:9.1f} "
                          f"{best[0] / best[1]:8.2f}")
                print(f"{fmt:13} {'per token':17} {threads:3} {rows:3} {totals[0] * 1e6:9.0f} {totals[1] * 1e6:9.0f} "
                      f"{totals[0] / totals[1]:8.2f}")
    print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
