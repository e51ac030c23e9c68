"""What keeping the compiled CPU decode step in step with the weights costs, and what freezing the weights gains.

``generate(compile=True)`` on CPU freezes the weights into the compiled graph and checks, at every call, a content
hash of every parameter and buffer (``decode_step.weights_fingerprint``). This script prints, for one model and dtype:

- the time of that check, in milliseconds and in decode tokens of the compiled step;
- the compiled decode step's time per token at batch 1 with inductor's freezing (as shipped) and without it (the
  weights then stay graph inputs, read from the module at every step), and the ratio.

Decode time per token is (time for N new tokens - time for 1 new token) / (N - 1), best of ``--repeats``.

    python benchmarks/compiled_weights.py                          # the 125M Llama shape of benchmarks/generate.py
    python benchmarks/compiled_weights.py --model path/to/model.gguf --dtype bfloat16
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import decoderkit
from decoderkit.generation import decode_step

LLAMA_125M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=32000, max_position_embeddings=2048, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def decode_seconds_per_token(model, ids: torch.Tensor, new: int, repeats: int) -> float:
    def run(n: int) -> None:
        model.generate(ids, max_new_tokens=n, compile=True, eos_token_id=None, pad_token_id=0)

    run(new)  # compilation
    return min(best_of(lambda: run(new), 1) - best_of(lambda: run(1), 1) for _ in range(repeats)) / (new - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory or .gguf file (default: random 125M Llama)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frozen-only", action="store_true", help="skip the step without freezing (one compile)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="decoderkit-bench-") as directory:
        path = args.model
        if path is None:
            import transformers

            torch.manual_seed(0)
            transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_125M)).save_pretrained(directory)
            path = directory
        model = decoderkit.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model or '125M Llama'} in "
          f"{args.dtype}: {nbytes / 1e6:.0f} MB of parameters and buffers")

    check = best_of(lambda: decode_step.weights_fingerprint(model), args.repeats)
    frozen = decode_seconds_per_token(model, ids, args.new_tokens, args.repeats)
    print(f"weights check per generate call: {check * 1e3:7.1f} ms ({nbytes / check / 1e9:.1f} GB/s) "
          f"= {check / frozen:.2f} decode tokens of the frozen step ({frozen * 1e3:.1f} ms/token)", flush=True)
    if args.frozen_only:
        return
    decode_step._COMPILED.pop(model, None)
    options = dict(decode_step._CPU_INDUCTOR_OPTIONS)
    # Without freezing, concat_linear (a freezing pass) does nothing either
    decode_step._CPU_INDUCTOR_OPTIONS = {k: v for k, v in options.items() if k == "cpp_wrapper"}
    try:
        unfrozen = decode_seconds_per_token(model, ids, args.new_tokens, args.repeats)
    finally:
        decode_step._CPU_INDUCTOR_OPTIONS = options
    print(f"compiled decode, batch 1:   frozen {frozen * 1e3:7.1f} ms/token   not frozen {unfrozen * 1e3:7.1f} "
          f"ms/token   freezing gains x{unfrozen / frozen:.2f}")


if __name__ == "__main__":
    main()
