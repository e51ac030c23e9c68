"""Checkpoint loading: decoderkit against transformers, time and peak memory, measured in the same run.

A Llama-shaped checkpoint (random weights, >= 500 MB) is written by transformers into a temporary directory. Each load
then runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own: the subprocess imports what it needs,
records its RSS as the baseline, loads, and reports the growth over the baseline. A second figure reads every weight
once after loading ("+use": load time plus that first read; "after use": peak RSS after it), so a loader that leaves
weights memory-mapped and untouched, paying for them on first use instead, cannot look smaller or faster than it is.

    python benchmarks/load.py                 # bf16 checkpoint, loaded as bf16 ("auto") and as float32
    python benchmarks/load.py --repeats 3 --layers 24
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1024 * 1024


def _peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(loader: str, directory: str, dtype: str) -> None:
    """Load once and print one JSON line of measurements."""
    import torch

    if loader == "decoderkit":
        import huggingface_hub  # noqa: F401 - imports the loader pulls in lazily count as baseline, not as loading
        import safetensors.torch  # noqa: F401
        import tqdm.auto  # noqa: F401

        import decoderkit.checkpoint  # noqa: F401
        from decoderkit import AutoModelForCausalLM
    else:
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 - resolves the lazy module
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    base = _peak_rss()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype)
    seconds = time.perf_counter() - start
    loaded = _peak_rss()
    params = list({id(p): p for p in model.parameters()}.values())
    start = time.perf_counter()
    with torch.no_grad():
        # Every 1024th element touches every page of the weights, without a converted copy of any whole tensor.
        checksum = sum(float(p.detach().reshape(-1)[::1024].double().sum()) for p in params)
    touch_seconds = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in params)
    print(json.dumps({
        "seconds": seconds, "touch_seconds": touch_seconds, "base": base, "load_peak": loaded - base,
        "touched_peak": _peak_rss() - base,
        "weights": weights, "dtype": str(next(iter(params)).dtype), "checksum": checksum,
    }))


def make_checkpoint(directory: Path, layers: int, hidden: int, intermediate: int, vocab: int) -> int:
    """A random Llama saved by transformers in bfloat16; returns its size on disk in bytes."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _subprocess(*args: str) -> str:
    # Linux carries ru_maxrss across fork and exec, so this parent stays small (it imports neither torch nor
    # transformers) and everything heavy, writing the checkpoint included, runs in children.
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def measure(loader: str, directory: Path, dtype: str) -> dict:
    return json.loads(_subprocess("--child", loader, str(directory), dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2, help="loads per loader and dtype (median time reported)")
    parser.add_argument("--dtypes", nargs="+", default=["auto", "float32"])
    parser.add_argument("--child", nargs=3, metavar=("LOADER", "DIR", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.make:
        print(make_checkpoint(Path(args.make), args.layers, args.hidden, args.intermediate, args.vocab))
        return

    with tempfile.TemporaryDirectory(prefix="decoderkit-load-bench-") as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        size = int(_subprocess("--make", str(directory), "--layers", str(args.layers), "--hidden", str(args.hidden),
                               "--intermediate", str(args.intermediate), "--vocab", str(args.vocab)))
        print(f"checkpoint: Llama, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, bf16 safetensors "
              f"{size / MB:.0f} MiB (written by transformers in {time.perf_counter() - start:.1f} s)")
        for file in directory.glob("*.safetensors"):  # both loaders then start from a warm page cache
            with open(file, "rb") as fh:
                while fh.read(MB):  # in pieces: a whole-file read would raise the peak RSS the children inherit
                    pass
        print(f"{'dtype':8} {'loader':12} {'load s':>7} {'+use s':>7} {'weights MiB':>12} {'peak MiB':>9} "
              f"{'peak/weights':>13} {'after use MiB':>14} {'after use/weights':>18}")
        for dtype in args.dtypes:
            results: dict[str, list[dict]] = {"decoderkit": [], "transformers": []}
            for _ in range(args.repeats):
                for loader in results:  # interleaved, so drifting machine load hits both alike
                    results[loader].append(measure(loader, directory, dtype))
            summary = {}
            for loader, runs in results.items():
                seconds = statistics.median(r["seconds"] for r in runs)
                used = statistics.median(r["seconds"] + r["touch_seconds"] for r in runs)
                peak = max(r["load_peak"] for r in runs)
                touched = max(r["touched_peak"] for r in runs)
                weights = runs[0]["weights"]
                summary[loader] = seconds, used, peak, touched
                print(f"{dtype:8} {loader:12} {seconds:7.2f} {used:7.2f} {weights / MB:12.0f} {peak / MB:9.0f} "
                      f"{peak / weights:13.2f} {touched / MB:14.0f} {touched / weights:18.2f}")
            if abs(results["decoderkit"][0]["checksum"] - results["transformers"][0]["checksum"]) > 1e-6:
                print("  WARNING: the two loaders produced different weights")
            (dk_t, dk_s, dk_p, dk_u), (hf_t, hf_s, hf_p, hf_u) = summary["decoderkit"], summary["transformers"]
            print(f"{dtype:8} {'ratio dk/hf':12} {dk_t / hf_t:7.2f} {dk_s / hf_s:7.2f} {'':>12} {dk_p / hf_p:9.2f} "
                  f"{'':>13} {dk_u / hf_u:14.2f}")


if __name__ == "__main__":
    main()
