"""Generation speed: decoderkit against transformers' default ``generate``, same random weights, same process.

A Llama-shaped ~125M model (hidden 768, 12 layers, 12 heads, 4 KV heads, intermediate 2048, vocab 32000) is built by
transformers with random weights, saved once, and loaded by both libraries. For fp32 and bf16 it prints:

- decode tokens/s at batch 1 and batch 8 (32-token prompt, ``--new-tokens`` new tokens), measured as
  (time for N new tokens - time for 1 new token), so the prefill is not counted;
- prefill tokens/s for a 512-token prompt (``generate`` with one new token);
- each decoderkit variant's ratio to transformers, and the fraction of the memory-bandwidth roofline: a decode step
  reads every weight once (the embedding table excepted: only B rows), so tokens/s cannot exceed
  ``B * bandwidth / weight_bytes``, with the bandwidth measured by copying a 1 GiB tensor ((read + write) / time).

decoderkit variants: ``dynamic`` (default cache), ``static`` (``cache_implementation="static"``) and, with
``--compile``, ``compiled`` (``compile=True``; compilation happens in a warm-up call and is not timed).
Timings are the best of ``--repeats`` runs, alternating libraries so that a noisy machine affects both alike.

    python benchmarks/generate.py --quick            # short run
    python benchmarks/generate.py --compile --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

import torch
import transformers

import decoderkit

CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
              intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)


def copy_bandwidth(gib: float = 1.0, repeats: int = 3) -> float:
    """Bytes/s moved by a large tensor copy, counting the read and the write."""
    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def weight_bytes(model: torch.nn.Module, batch: int) -> int:
    """Bytes of weights one decode step reads: everything once, the input embedding only for `batch` rows."""
    total = 0
    embedding = model.get_input_embeddings().weight
    for p in {id(p): p for p in model.parameters()}.values():
        if p is embedding and not any(p is q for q in model.get_output_embeddings().parameters()):
            total += batch * p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def timed(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time compile=True (compiles per shape)")
    parser.add_argument("--quick", action="store_true", help="a short run: 32 new tokens, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = min(args.new_tokens, 32), 2
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    bandwidth = copy_bandwidth()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    with tempfile.TemporaryDirectory(prefix="decoderkit-bench-") as directory:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).save_pretrained(directory)
        run_all(directory, bandwidth, args)


def run_all(directory: str, bandwidth: float, args: argparse.Namespace) -> None:
    variants: dict[str, dict] = {"dynamic": {}, "static": {"cache_implementation": "static"}}
    if args.compile:
        variants["compiled"] = {"compile": True}
    rows = []
    for dtype_name in args.dtypes.split(","):
        rows += bench_dtype(directory, dtype_name, variants, bandwidth, args)
    print()
    print("decoderkit cells: tokens/s, ratio to transformers, % of the bandwidth roofline (decode only)")
    print(f"{'dtype':9} {'measure':16} {'transformers':>13} " + " ".join(f"{v:>18}" for v in variants))
    print("\n".join(rows))


def best_times(runners: dict[str, Callable[[int], torch.Tensor]], new: int, repeats: int) -> dict[str, float]:
    """Seconds per runner: decode time of `new` tokens (minus the 1-token run) or, for new == 1, the whole call."""
    for run in runners.values():  # warm-up, and compilation for the shapes timed below
        run(new)
    best = {k: float("inf") for k in runners}
    for _ in range(repeats):
        for k, run in runners.items():
            elapsed = timed(lambda run=run: run(new))
            if new > 1:
                elapsed -= timed(lambda run=run: run(1))
            best[k] = min(best[k], elapsed)
    return best


def bench_dtype(directory: str, dtype_name: str, variants: dict[str, dict], bandwidth: float,
                args: argparse.Namespace) -> list[str]:
    dtype = getattr(torch, dtype_name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    dk = decoderkit.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(0)
    common = dict(eos_token_id=None, pad_token_id=0)  # random weights: never stop early
    measures = [(f"decode b={b}", b, args.prompt, args.new_tokens) for b in map(int, args.batches.split(","))]
    measures.append((f"prefill {args.prefill}", 1, args.prefill, 1))
    rows = []
    for name, batch, length, new in measures:
        ids = torch.randint(3, CONFIG["vocab_size"], (batch, length), generator=gen)
        runners = {"transformers": lambda n, ids=ids: hf.generate(ids, max_new_tokens=n, do_sample=False, **common)}
        for v, extra in variants.items():
            runners[v] = lambda n, ids=ids, extra=extra: dk.generate(ids, max_new_tokens=n, **common, **extra)
        best = best_times(runners, new, args.repeats)
        tokens = batch * (new - 1) if new > 1 else batch * length
        speed = {k: tokens / max(t, 1e-9) for k, t in best.items()}
        roofline = batch * bandwidth / weight_bytes(hf, batch)
        cells = []
        for v in variants:
            cell = f"{speed[v]:8.1f} x{speed[v] / speed['transformers']:4.2f}"
            if new > 1:
                cell += f" {100 * speed[v] / roofline:3.0f}%"
            cells.append(f"{cell:>18}")
        note = f"  (transformers {100 * speed['transformers'] / roofline:.0f}%, roofline {roofline:.1f} tok/s)" \
            if new > 1 else ""
        rows.append(f"{dtype_name:9} {name:16} {speed['transformers']:7.1f} tok/s " + " ".join(cells) + note)
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
