"""Serving throughput: decoderkit's server (continuous batching) against transformers' generate, same run and weights.

The server runs as `python -m decoderkit.serve` in a subprocess and C client threads stream completions from it over
HTTP, each sending R requests in turn. Every request asks for exactly N new tokens (greedy, `ignore_eos`), so all runs
do the same work. The baseline loads the same directory with transformers and calls `generate` one request at a time.
Reported: aggregate generated tokens/s, p50/p95 time to first token, and the ratio to the baseline's tokens/s. The
baseline runs before and after the server runs and the ratio uses its mean, so that load from other processes on a
shared machine biases neither side.

    python benchmarks/serve.py                         # shipped model if present, else a random Llama
    python benchmarks/serve.py --model DIR --new-tokens 64 --clients 1 4 16
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

PROMPTS = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die: to sleep;",
    "No more; and by a sleep to say we end",
]


def random_model(directory: Path, hidden: int, layers: int) -> Path:
    """A random Llama with a small byte-level BPE tokenizer, for when no model directory is given."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    import decoderkit
    from decoderkit.tokenizer import Tokenizer

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, show_progress=False, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(PROMPTS * 4, trainer)
    Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
              chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}").save_pretrained(directory)
    torch.manual_seed(0)
    config = dict(model_type="llama", vocab_size=backend.get_vocab_size(), hidden_size=hidden,
                  intermediate_size=int(hidden * 8 / 3) // 64 * 64, num_hidden_layers=layers,
                  num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
                  max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    decoderkit.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_baseline(directory: Path, requests: int, new_tokens: int, loaded: dict) -> dict[str, float]:
    """transformers' generate, one request after another (`loaded` keeps the model between calls)."""
    import transformers
    from transformers.generation.streamers import BaseStreamer

    if not loaded:
        loaded["tokenizer"] = transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
        loaded["model"] = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer, model = loaded["tokenizer"], loaded["model"]

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls, self.at = 0, 0.0

        def put(self, value: torch.Tensor) -> None:
            self.calls += 1
            if self.calls == 2:  # the first call carries the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    ttft, tokens = [], 0
    start = time.perf_counter()
    for i in range(requests):
        ids = torch.tensor([tokenizer.encode(PROMPTS[i % len(PROMPTS)])])
        streamer, t0 = FirstToken(), time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, streamer=streamer, pad_token_id=0)
        ttft.append(streamer.at - t0)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    return {"tokens": tokens, "wall": wall, "tok_s": tokens / wall, "p50": percentile(ttft, 0.5),
            "p95": percentile(ttft, 0.95)}


def run_clients(base: str, model_name: str, clients: int, per_client: int, new_tokens: int) -> dict[str, float]:
    ttft: list[float] = []
    tokens = [0]
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        try:
            with httpx.Client(timeout=600) as http:
                for r in range(per_client):
                    # logprobs=0 makes every token its own event even when it completes no character (random
                    # weights emit stray UTF-8 bytes), so the first event marks the first token.
                    body = {"model": model_name, "prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": new_tokens,
                            "temperature": 0, "stream": True, "ignore_eos": True, "logprobs": 0}
                    t0, first, usage = time.perf_counter(), None, 0
                    with http.stream("POST", f"{base}/v1/completions", json=body) as response:
                        response.raise_for_status()
                        for line in response.iter_lines():
                            if not line.startswith("data: {"):
                                continue
                            event = json.loads(line[6:])
                            if first is None and event["choices"]:
                                first = time.perf_counter() - t0
                            if event.get("usage"):
                                usage = event["usage"]["completion_tokens"]
                    with lock:
                        ttft.append(first if first is not None else float("nan"))
                        tokens[0] += usage
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]!r}")
    return {"tokens": tokens[0], "wall": wall, "tok_s": tokens[0] / wall, "p50": percentile(ttft, 0.5),
            "p95": percentile(ttft, 0.95)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="model directory (default: the shipped model, else a random one)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512, help="random model width")
    parser.add_argument("--layers", type=int, default=6, help="random model depth")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    args = parser.parse_args(argv)

    import decoderkit
    from decoderkit.serve.app import default_model_path

    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    directory = args.model or (default_model_path() if (default_model_path() / "config.json").exists() else None)
    if directory is None:
        directory = random_model(Path(tmp.name), args.hidden, args.layers)
    config = decoderkit.DecoderConfig.from_hf_dict(json.loads((Path(directory) / "config.json").read_text()))
    print(f"model: {directory} ({config.model_type}, {config.num_hidden_layers} layers, width {config.hidden_size}; "
          f"fp32, CPU threads={args.threads})")

    hf: dict = {}
    before = run_baseline(Path(directory), args.baseline_requests, args.new_tokens, hf)

    # The server runs in its own process, as in production: client threads here do not compete for its GIL.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "decoderkit.serve", str(directory), "--port", str(port),
                               "--served-model-name", "bench", "--threads", str(args.threads), "--dtype", "float32",
                               "--max-batch-size", str(max(args.clients)), "--log-level", "warning"])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        run_clients(base, "bench", 1, 1, 4)  # warm-up
        rows = [("transformers generate, sequential (before)", 1, before)]
        for clients in args.clients:
            rows.append((f"decoderkit server, {clients} client(s)", clients,
                         run_clients(base, "bench", clients, args.requests_per_client, args.new_tokens)))
    finally:
        server.terminate()
        server.wait(timeout=60)
    after = run_baseline(Path(directory), args.baseline_requests, args.new_tokens, hf)
    rows.append(("transformers generate, sequential (after)", 1, after))
    baseline_tok_s = (before["tok_s"] + after["tok_s"]) / 2

    print(f"{args.new_tokens} new tokens per request, greedy; {args.requests_per_client} requests per client")
    print(f"{'setup':<44} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'p50 TTFT':>9} {'p95 TTFT':>9} {'vs base':>8}")
    for name, _, r in rows:
        print(f"{name:<44} {r['tokens']:>7} {r['wall']:>7.2f} {r['tok_s']:>8.1f} {r['p50'] * 1e3:>7.1f}ms "
              f"{r['p95'] * 1e3:>7.1f}ms {r['tok_s'] / baseline_tok_s:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
