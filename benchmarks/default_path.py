"""The shipped model at batch 1 through the command line's default path and through ``generate()``, this tree against
another checkout (say main) in the same run.

For each source tree (``src/`` of this checkout, and ``--baseline DIR``, another checkout's ``src``), in fresh
processes with ``PYTHONPATH`` pointing at it and a cache directory of their own (``DECODERKIT_CACHE_DIR`` and
``DECODERKIT_CACHE``, so compiled kernels and packages count as cold):

- cold: ``decoderkit generate`` (the README's first command, ``--max-new-tokens 8 --seed 0``) with the cache empty:
  time to the first token and of the whole process. This tree's default then starts the background build of the
  packaged decode step; the script waits for it and prints how long it took;
- warm: the same command again, the cache kept;
- ``decoderkit bench -p 16 -n 128``: the CLI's decode tokens/s and which decode step it ran;
- ``generate()`` in Python, greedy, 128 new tokens, as the Python API's default runs it and with ``compile="auto"``
  where the tree has it: tokens/s by wall time and by this thread's CPU time (new tokens minus one, over the time
  for N tokens minus the time for 1), best of three.

The load average and CPU model are printed first: on a shared machine the wall figures count the time other
processes hold the cores, the CPU figures do not (their cache misses they still do).

    python benchmarks/default_path.py --baseline /work/main/src
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

PROMPT = "To be, or not to be"
HERE = Path(__file__).resolve().parent.parent / "src"

GENERATE_RATE = r"""
import json, sys, time, torch
import decoderkit
from decoderkit.cli.common import default_model_path
torch.set_num_threads(1)
model = decoderkit.AutoModelForCausalLM.from_pretrained(str(default_model_path()), progress=False).eval()
ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
new = int(sys.argv[1])
out = {}
modes = {"default": {}}
try:
    from decoderkit.generation import aot_step  # noqa: F401
    modes["auto"] = {"compile": "auto"}
except ImportError:
    pass
for name, extra in modes.items():
    def run(n):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **extra)
    run(new)
    run(1)
    wall = cpu = float("inf")
    for _ in range(3):
        w, c = time.perf_counter(), time.thread_time()
        run(new)
        w_n, c_n = time.perf_counter() - w, time.thread_time() - c
        w, c = time.perf_counter(), time.thread_time()
        run(1)
        wall = min(wall, w_n - (time.perf_counter() - w))
        cpu = min(cpu, c_n - (time.thread_time() - c))
    out[name] = ((new - 1) / max(wall, 1e-9), (new - 1) / max(cpu, 1e-9))
print(json.dumps(out))
"""


def environment(src: str, cache: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCHINDUCTOR_CACHE_DIR", "DECODERKIT_COMPILE", "DECODERKIT_KERNELS")}
    return {**env, "PYTHONPATH": src, "DECODERKIT_CACHE_DIR": cache, "DECODERKIT_CACHE": cache,
            "DECODERKIT_THREADS": "1"}


def run_json(command: list[str], env: dict[str, str]) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    whole = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), whole


def wait_for_background_build(cache: str, limit: float) -> float | None:
    """Seconds until the background build's marker is gone and a package is there; None if none was started."""
    root = Path(cache) / "aoti"
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        building = list(root.glob("*.building")) if root.is_dir() else []
        if not building:
            return time.perf_counter() - start if root.is_dir() and list(root.glob("*.pt2")) else None
        time.sleep(2)
    return None


def measure(label: str, src: str, args: argparse.Namespace) -> None:
    python = [sys.executable, "-m", "decoderkit"]
    generate = [*python, "generate", "--json", "--max-new-tokens", "8", "--seed", "0", PROMPT]
    with tempfile.TemporaryDirectory(prefix="decoderkit-default-") as cache:
        env = environment(src, cache)
        for phase in ("cold", "warm"):
            record, whole = run_json(generate, env)
            print(f"{label:9} {phase} start: time to first token {record['timings']['time_to_first_token_s']:7.3f} s, "
                  f"whole process {whole:6.2f} s", flush=True)
            if phase == "cold":
                built = wait_for_background_build(cache, args.build_limit)
                if built is not None:
                    print(f"{label:9} background build of the packaged step done {built:.0f} s after the cold "
                          "start ended", flush=True)
        bench, _ = run_json([*python, "bench", "--json", "-p", "16", "-n", str(args.new_tokens), "-t", "1"], env)
        print(f"{label:9} CLI bench (default path: {bench.get('decode_step', 'eager')}): "
              f"{bench['decode_tokens_per_s']:8.1f} tok/s wall", flush=True)
        rates, _ = run_json([sys.executable, "-c", GENERATE_RATE, str(args.new_tokens)], env)
        for mode, (wall, cpu) in rates.items():
            print(f"{label:9} generate() {mode:8}: {wall:8.1f} tok/s wall {cpu:8.1f} tok/s cpu", flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", help="another checkout's src directory (e.g. main's), measured the same way")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--build-limit", type=float, default=1200, help="seconds to wait for the background build")
    args = parser.parse_args()
    print(f"CPU {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    trees = [("this", str(HERE))] + ([("baseline", args.baseline)] if args.baseline else [])
    for label, src in trees:
        measure(label, src, args)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
