"""Speculative decoding of a batch (generation/speculative_batch.py): rows keep different numbers of tokens per step,
and each row's greedy ids are those of plain greedy decoding of the same (left-padded) batch, for all four families.

Oracle: plain batched greedy decoding, itself checked against transformers in test_generate.py (and here against each
row decoded alone).
"""

from __future__ import annotations

import pytest
import torch
from test_speculative import NEW, repetitive_prompt, trio  # noqa: F401  (the fixture, shared)

from decoderkit.cache import DynamicCache
from decoderkit.generation.speculative_batch import _relayout


def left_padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three repetitive prompts of different lengths, left-padded with 0."""
    prompts = [repetitive_prompt(vocab, seed)[0, : 16 - 3 * seed] for seed in range(3)]
    width = max(p.shape[0] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[0]:] = p
        mask[row, width - p.shape[0]:] = 1
    return ids, mask


@pytest.mark.parametrize("proposer", ["lookup", "draft"])
def test_batched_greedy_speculation_gives_plain_greedy_ids(trio, proposer):  # noqa: F811
    _, dk, draft = trio
    ids, mask = left_padded_batch(dk.config.vocab_size)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    plain = dk.generate(ids, **kwargs)
    spec = dict(prompt_lookup_num_tokens=3) if proposer == "lookup" else dict(assistant_model=draft,
                                                                                num_assistant_tokens=3)
    got = dk.generate(ids, return_dict_in_generate=True, **kwargs, **spec)
    assert torch.equal(got.sequences, plain), f"\nplain {plain.tolist()}\nspec  {got.sequences.tolist()}"
    assert 0 < got.num_accepted_tokens < got.num_proposed_tokens
    # Each row is what decoding it alone gives
    for row in range(ids.shape[0]):
        alone = dk.generate(ids[row: row + 1, mask[row].argmax():], max_new_tokens=NEW, eos_token_id=None)
        assert torch.equal(plain[row, mask[row].argmax():], alone[0])


def test_batched_speculation_stops_rows_on_their_own(trio):  # noqa: F811
    """A row that reaches EOS is padded after it while the others go on, as plain decoding pads it."""
    _, dk, _ = trio
    ids, mask = left_padded_batch(dk.config.vocab_size)
    plain = dk.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None)
    L = ids.shape[1]
    eos = int(plain[0, L + 5])  # row 0's sixth new token ends it
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    expected = dk.generate(ids, **kwargs)
    assert torch.equal(dk.generate(ids, prompt_lookup_num_tokens=4, **kwargs), expected)


def test_relayout_right_aligns_each_rows_kept_entries():
    cache = DynamicCache()
    keys = torch.arange(2 * 5, dtype=torch.float).view(2, 1, 5, 1)
    cache.update(keys, -keys, 0)
    keep = torch.tensor([[True, False, True, True, False], [False, True, False, False, False]])
    mask = _relayout(cache, keep)
    assert mask.tolist() == [[True, True, True], [False, False, True]]
    assert cache.keys[0][0, 0, :, 0].tolist() == [0, 2, 3]
    assert cache.keys[0][1, 0, 2, 0].item() == 6 and cache.values[0][1, 0, 2, 0].item() == -6
