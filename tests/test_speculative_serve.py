"""`decoderkit serve --speculative lookup`: the engine returns the same greedy text with and without speculation,
counts proposed and accepted tokens in /metrics, and gives every block back.

Oracle: the same engine without speculation, itself checked against full forwards of the model in test_serve.py.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")

from test_serve import build_tiny_model, generate_concurrently, reference_greedy  # noqa: E402  (a sibling test module)

import decoderkit  # noqa: E402
from decoderkit.serve.app import build_parser, render_metrics  # noqa: E402
from decoderkit.serve.engine import Engine, SamplingParams  # noqa: E402
from decoderkit.tokenizer import AutoTokenizer  # noqa: E402

# Prompts that repeat themselves, so that the text the tiny model continues them with is partly copied
PROMPTS = ["To be, or not to be, to be, or not to be, to be, or", "The slings and arrows, the slings and arrows, the",
           "Or to take arms", "Whether tis nobler in the mind to suffer, whether tis nobler in the mind"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    directory = build_tiny_model(tmp_path_factory.mktemp("spec-serve"))
    return decoderkit.AutoModelForCausalLM.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def test_speculative_engine_gives_the_plain_greedy_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    requests = [SamplingParams(max_tokens=32, temperature=0),
                SamplingParams(max_tokens=32, temperature=0, frequency_penalty=0.3, stop=["arrows"])]
    outputs = {}
    for speculative in (None, "lookup"):
        engine = Engine(model, tokenizer, block_size=4, max_prefill_tokens=16, speculative=speculative,
                        num_speculative_tokens=4).start()
        try:
            # Greedy with and without penalties and stop strings, and a sampled request (which does not speculate)
            batch = [p for p in prompts for _ in requests] + [prompts[0]]
            params = [r for _ in prompts for r in requests] + [SamplingParams(max_tokens=16, temperature=0.8, seed=3)]
            results = [engine.generate(p, r, timeout=120) for p, r in zip(batch, params)]
            # and four greedy requests sharing the steps
            results += generate_concurrently(engine, prompts, requests[0], timeout=120)
            outputs[speculative] = [(r.token_ids, r.text, r.finish_reason) for r in results]
            stats = engine.stats()
            assert stats.free_blocks == engine.pool.num_blocks  # every block back, the rolled-back ones too
            metrics = render_metrics(engine)
        finally:
            engine.stop()
        counts = {name: int(re.search(rf"^decoderkit_speculative_{name}_tokens_total (\d+)$", metrics, re.M)[1])
                  for name in ("proposed", "accepted")}
        if speculative is None:
            assert counts == {"proposed": 0, "accepted": 0}
        else:
            assert counts["proposed"] == stats.speculative_proposed_tokens
            assert 0 < counts["accepted"] < counts["proposed"], counts
    assert outputs["lookup"] == outputs[None]
    # The plain engine's greedy ids are the model's own greedy decoding
    assert outputs[None][0][0] == reference_greedy(model, prompts[0], 32)[: len(outputs[None][0][0])]


def test_serve_flags_and_bad_settings(model_and_tokenizer):
    args = build_parser().parse_args(["--speculative", "lookup", "--num-speculative-tokens", "3"])
    assert (args.speculative, args.num_speculative_tokens) == ("lookup", 3)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--speculative", "draft"])
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="supports None or 'lookup'"):
        Engine(model, tokenizer, speculative="draft")
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 1, got 0"):
        Engine(model, tokenizer, speculative="lookup", num_speculative_tokens=0)
