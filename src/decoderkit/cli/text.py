"""`decoderkit generate`, and the stdin reading that `chat` shares."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from decoderkit.cli.common import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    CLIError,
    TokenStreamer,
    UsageError,
    _describe,
    _note,
    _round,
    build_step_in_background,
    eos_token_ids,
    fit_new_tokens,
    generation_kwargs,
    load_model,
    resolve_compile,
    run_generate,
    speculative_kwargs,
)

if TYPE_CHECKING:
    from decoderkit.tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------- generate
def read_prompt(args: argparse.Namespace) -> str:
    """The prompt argument, or all of stdin when it is absent or '-'."""
    if args.prompt is not None and args.prompt != "-":
        return args.prompt
    stdin = sys.stdin
    if stdin is None:
        raise UsageError("no PROMPT given and stdin is closed")
    if args.prompt is None and stdin.isatty():
        raise UsageError("no PROMPT given; pass it as an argument or pipe it on stdin")
    try:
        return _decode_stdin(_raw(stdin).read(), "utf-8-sig")
    except OSError as err:
        raise CLIError(f"cannot read the prompt from stdin: {_describe(err)}") from None


def _raw(stdin: TextIO) -> Any:
    # Bytes, decoded here: Python's own stdin decoding depends on the locale (and in the C locale lets invalid bytes
    # through as surrogates that fail later, deep inside the tokenizer).
    return getattr(stdin, "buffer", stdin)


def _decode_stdin(data: str | bytes, encoding: str = "utf-8") -> str:
    if isinstance(data, str):
        return data
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise CLIError(f"stdin is not valid UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r})") from None


def cmd_generate(args: argparse.Namespace) -> int:
    """`decoderkit generate`: complete a prompt, streaming text or printing one JSON record."""
    prompt = read_prompt(args)
    kwargs = generation_kwargs(args)
    start = time.perf_counter()
    model, tok, path = load_model(args)
    kwargs.update(speculative_kwargs(args, model))
    load_s = time.perf_counter() - start
    kwargs["compile"] = resolve_compile(args)
    prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        raise CLIError("the prompt is empty and the tokenizer adds no start token; give some text")
    kwargs["max_new_tokens"] = fit_new_tokens(args, model, len(prompt_ids), kwargs["max_new_tokens"])
    n = args.num_return_sequences
    stream = not args.json and n == 1
    streamer = TokenStreamer(tok, prompt_ids, eos_token_ids(model), out=sys.stdout if stream else None)

    begin = time.perf_counter()
    completed = run_generate(model, prompt_ids, kwargs, streamer)
    total_s = time.perf_counter() - begin
    build_step_in_background(args, model, path, n, len(prompt_ids) + kwargs["max_new_tokens"])
    rows = streamer.rows or [[] for _ in range(n)]
    texts = [completion_text(tok, prompt_ids, row) for row in rows]
    completion_tokens = sum(len(row) for row in rows)
    ttft = streamer.first_token_at - begin if streamer.first_token_at is not None else None

    if args.json:
        record = {
            "model": str(path), "prompt": prompt, "completions": texts, "prompt_tokens": len(prompt_ids),
            "completion_tokens": completion_tokens,
            "timings": {"load_s": round(load_s, 4), "time_to_first_token_s": _round(ttft), "total_s": round(total_s, 4),
                        "tokens_per_s": _round(completion_tokens / total_s if total_s > 0 else None, 2)},
            "interrupted": not completed,
        }
        print(json.dumps(record, ensure_ascii=False))
    elif stream:
        print(flush=True)
    else:
        for i, text in enumerate(texts):
            print(f"--- completion {i + 1} ---\n{text}", flush=True)
    if not args.json:
        rate = completion_tokens / total_s if total_s > 0 else 0.0
        _note(args, f"[{len(prompt_ids)} prompt + {completion_tokens} new tokens in {total_s:.2f} s, {rate:.1f} "
                    f"tokens/s; load {load_s:.2f} s]")
    if not completed:
        _note(args, f"{PROG} generate: interrupted")
        return EXIT_INTERRUPTED
    return EXIT_OK


def completion_text(tok: Tokenizer, prompt_ids: Sequence[int], ids: Sequence[int]) -> str:
    """The text `ids` add after the prompt, exactly as streamed.

    Decoding the new ids on their own can differ at the start: a SentencePiece decoder drops the first token's
    leading space, which after a prompt is a real space.
    """
    decoder = tok.stream_decoder(skip_special_tokens=True, prefix_ids=prompt_ids)
    return "".join(decoder.push(i) for i in ids) + decoder.flush()
