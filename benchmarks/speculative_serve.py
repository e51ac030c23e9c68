"""The server's engine with and without ``--speculative lookup``: same model, same prompts, same run.

Model: SmolLM2-135M-Instruct from the Q4_1 GGUF (``--quantization none``: dequantized to ``--dtype``; ``gguf``: the
file's blocks kept packed). Task: ``benchmarks/speculative.py``'s grounded one (repeat a ~300-token Hamlet passage
given in the prompt), greedy, through ``Engine.generate``; ``--clients`` copies of it at once (their steps batched).
Prints decode tokens/s over all clients (wall time from the first to the last token, prefill left out), the ratio to
the plain engine, the acceptance rate from the engine's counters, and whether the texts equal the plain engine's.

    python benchmarks/speculative_serve.py --threads 1 --dtype float32 --clients 1
    python benchmarks/speculative_serve.py --threads 2 --dtype float32 --clients 4
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch
from speculative import GGUF, passage  # the same model and passage as the generate benchmark

import decoderkit
from decoderkit.serve.engine import Engine, SamplingParams
from decoderkit.serve.speculative import Speculator


def run(engine: Engine, prompt: list[int], clients: int, new_tokens: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s over all clients, and each client's ids."""
    firsts: list[float] = []
    ends: list[float] = []
    outputs: list[list[int]] = [[] for _ in range(clients)]
    done = threading.Semaphore(0)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, stop_token_ids=())

    def collect(i: int):
        def on_output(out) -> None:
            if not outputs[i]:
                firsts.append(time.perf_counter())
            outputs[i].extend(out.token_ids)
            if out.finish_reason is not None:
                ends.append(time.perf_counter())
                done.release()
        return on_output

    for i in range(clients):
        engine.submit(prompt, params, collect(i))
    for _ in range(clients):
        done.acquire()
    tokens = sum(len(o) for o in outputs) - clients
    return tokens / (max(ends) - max(firsts)), outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    parser.add_argument("--quantization", default="none", choices=["none", "gguf", "int4", "int8"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--num-speculative-tokens", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quantization = None if args.quantization == "gguf" else args.quantization
    model = decoderkit.AutoModelForCausalLM.from_pretrained(GGUF, dtype=getattr(torch, args.dtype),
                                                            quantization=quantization).eval()
    tokenizer = decoderkit.AutoTokenizer.from_pretrained(GGUF)
    messages = [{"role": "user", "content": "Repeat the following passage exactly, line by line:\n\n"
                 + passage(tokenizer)}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"SmolLM2-135M-Instruct {args.dtype}, weights {args.quantization}, {torch.get_num_threads()} threads, "
          f"{cpu}, load average {os.getloadavg()[0]:.1f}; grounded prompt of {len(prompt)} tokens, "
          f"{args.clients} client(s), {args.new_tokens} new tokens each")
    print(f"{'engine':8} {'tok/s':>7} {'ratio':>6} {'accept':>7}  text")
    plain_rate, plain_ids = None, None
    for name in ("plain", "lookup"):
        speculative = Speculator("lookup", args.num_speculative_tokens) if name == "lookup" else None
        engine = Engine(model, tokenizer, speculative=speculative, enable_prefix_caching=False).start()
        try:
            rate, ids = run(engine, prompt, args.clients, args.new_tokens)
        finally:
            engine.stop()
        c = engine.counters
        accept = f"{c.spec_accepted / c.spec_draft_tokens:.0%}" if c.spec_draft_tokens else "-"
        if plain_rate is None:
            plain_rate, plain_ids, same = rate, ids, "-"
        else:
            same = "same" if ids == plain_ids else "differs"
        print(f"{name:8} {rate:7.1f} {rate / plain_rate:6.2f} {accept:>7}  {same}")


if __name__ == "__main__":
    main()
