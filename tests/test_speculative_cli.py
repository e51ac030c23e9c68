"""`--speculative lookup|draft:PATH` and `--num-speculative-tokens` on generate, chat and bench: the same greedy text
as without them, the acceptance rate in bench's record, one-line errors for what cannot speculate.

Oracle: the same command without `--speculative` (plain greedy decoding, itself checked against transformers).
"""

from __future__ import annotations

import json
import sys

import pytest
from test_cli import TEXT, run_cli, run_main, save_tiny_model  # a sibling test module

import decoderkit
from decoderkit.cli import common as cli_common

PROMPT = TEXT[:120]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("spec-cli") / "tiny")


def completion(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["completions"][0]


def test_generate_with_speculation_gives_the_plain_greedy_text(tiny):
    base = ("generate", "--model", str(tiny), "--greedy", "--max-new-tokens", "24", "--json", "--dtype", "float32")
    plain = completion(run_cli(*base, PROMPT))
    assert plain
    assert completion(run_cli(*base, "--speculative", "lookup", "--num-speculative-tokens", "4", PROMPT)) == plain
    # The model as its own draft: every proposal is kept, so the verify path runs on every step
    assert completion(run_cli(*base, "--speculative", f"draft:{tiny}", PROMPT)) == plain


def test_several_sequences_speculate_as_a_batch(tiny):
    """-n 3 decodes the rows as one speculative batch (nothing streams). Sampling at a temperature so low that it
    always draws the most likely token, each row is plain greedy decoding's text."""
    base = ("generate", "--model", str(tiny), "--max-new-tokens", "16", "--json", "--dtype", "float32")
    plain = completion(run_cli(*base, "--greedy", PROMPT))
    proc = run_cli(*base, "--temperature", "1e-6", "--seed", "3", "-n", "3", "--speculative", "lookup", PROMPT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["completions"] == [plain] * 3


def test_chat_and_bench_take_the_flags(capsys, monkeypatch, tiny):
    import io

    args = ["--model", str(tiny), "--greedy", "--max-new-tokens", "8", "--dtype", "float32", "--quiet"]
    replies = []
    for extra in ([], ["--speculative", "lookup"]):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(PROMPT.encode() + b"\n")))
        code, out, err = run_main(capsys, "chat", *args, *extra)
        assert code == 0, err
        replies.append(out)
    assert replies[0].strip() and replies[0] == replies[1]
    code, out, err = run_main(capsys, "bench", "--model", str(tiny), "--json", "--prompt-tokens", "8",
                              "--new-tokens", "6", "--speculative", f"draft:{tiny}", "--num-speculative-tokens", "3")
    assert code == 0, err
    record = json.loads(out)
    assert record["speculative"] == f"draft:{tiny}"
    assert record["acceptance_rate"] == 1.0  # the model drafting for itself
    code, out, err = run_main(capsys, "bench", "--model", str(tiny), "--prompt-tokens", "8", "--new-tokens", "6",
                              "--speculative", "lookup")
    assert code == 0 and "of proposals accepted" in out, (out, err)


@pytest.mark.parametrize("args, code, message", [
    (["generate", "--speculative", "ngram", "hi"], 2, "expected 'lookup' or 'draft:PATH'"),
    (["generate", "--speculative", "draft:", "hi"], 2, "expected 'lookup' or 'draft:PATH'"),
    (["generate", "--num-speculative-tokens", "3", "hi"], 2, "--num-speculative-tokens needs --speculative"),
    (["generate", "--speculative", "lookup", "--num-speculative-tokens", "0", "hi"], 2, "must be a positive integer"),
    (["bench", "--speculative", "lookup", "--batch-size", "2", "-p", "8", "-t", "4"], 2,
     "--speculative supports --batch-size 1, got 2"),
    (["generate", "--speculative", "draft:OTHER", "hi"], 1, "vocabulary of 50 tokens, the model 320"),
    (["generate", "--speculative", "draft:MISSING", "hi"], 1, "MISSING"),
])
def test_bad_speculative_flags(capsys, tmp_path, tiny, args, code, message):
    other = decoderkit.AutoModelForCausalLM.from_config({
        "model_type": "llama", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128})
    other.save_pretrained(tmp_path / "other")
    names = {"draft:OTHER": f"draft:{tmp_path / 'other'}", "draft:MISSING": f"draft:{tmp_path / 'MISSING'}"}
    args = [names.get(a, a) for a in args]
    args[1:1] = ["--model", str(tiny)]
    got, out, err = run_main(capsys, *args)
    assert got == code, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_speculative_kwargs_without_the_flags_are_empty():
    class Args:
        speculative = None
        num_speculative_tokens = None

    assert cli_common.speculative_kwargs(Args(), model=None) == {}
