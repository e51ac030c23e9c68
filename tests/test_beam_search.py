"""BeamSearchState against transformers 5.23's beam search.

Oracle: a tiny random transformers Llama. transformers' ``generate`` runs it without a cache (a full forward per step);
our state drives the same model the same way, so both see bit-identical log-probs and must pick identical tokens.
"""

from __future__ import annotations

import pytest
import torch

from decoderkit.generation import BeamSearchState, GenerationConfig, build_logits_processors

transformers = pytest.importorskip("transformers")

VOCAB = 50
PAD = 0


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Perturb away from the init so norms are not 1 and the next-token distributions are peaky enough to loop/stop
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def left_padded_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of length 6, the second left-padded by 2."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 6), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = PAD, 0
    return ids, mask


@torch.no_grad()
def next_log_probs(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # Same inputs as transformers' generate without cache: position ids from the mask, padded positions set to 0
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()
    return logits.log_softmax(dim=-1)


def eos_candidates(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """Tokens ranked 2nd and 4th for the first prompt: beam search meets them as EOS at the very first step."""
    ranked = next_log_probs(model, ids, mask)[0].argsort(descending=True).tolist()
    return [ranked[1], ranked[3]]


def run_transformers(model, ids, mask, **kwargs):
    out = model.generate(
        ids, attention_mask=mask, use_cache=False, return_dict_in_generate=True, output_scores=True, **kwargs
    )
    return out.sequences, out.sequences_scores


def run_decoderkit(model, ids, mask, config: GenerationConfig, generator=None):
    prompt_len = ids.shape[1]
    state = BeamSearchState.from_config(ids, config, max_length=config.max_length_for(prompt_len))
    beam_mask = mask.repeat_interleave(config.num_beams, dim=0)
    processors = build_logits_processors(config, prompt_len, beam_mask)
    steps = 0
    while not state.is_done():
        seqs = state.sequences
        full_mask = torch.cat([beam_mask, beam_mask.new_ones(seqs.shape[0], seqs.shape[1] - prompt_len)], dim=1)
        log_probs = processors(seqs, next_log_probs(model, seqs, full_mask))
        next_tokens, beam_idx = state.step(log_probs)
        # The documented contract: new rows are old rows reordered by beam_idx, plus next_tokens
        assert torch.equal(state.sequences, torch.cat([seqs[beam_idx], next_tokens[:, None]], dim=1))
        steps += 1
    out = state.finalize()
    return out.sequences, out.sequences_scores, steps


GRID = [
    (num_beams, nrs, length_penalty, early_stopping)
    for num_beams in (2, 3, 4)
    for nrs in range(1, num_beams + 1)
    for length_penalty in (0.5, 1.0, 2.0)
    for early_stopping in (True, False, "never")
]
CASES = [(seed, *case) for seed, case in enumerate(GRID)]  # the index seeds the prompts: deterministic, varied


@pytest.mark.parametrize(("seed", "num_beams", "num_return_sequences", "length_penalty", "early_stopping"), CASES)
def test_matches_transformers_beam_search(model, seed, num_beams, num_return_sequences, length_penalty, early_stopping):
    ids, mask = left_padded_batch(seed)
    eos = eos_candidates(model, ids, mask)
    eos = eos if seed % 2 else eos[0]  # both the list and the int form
    kwargs = dict(
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=eos,
        pad_token_id=PAD,
        max_new_tokens=5 + seed % 9,
    )
    expected_ids, expected_scores = run_transformers(model, ids, mask, do_sample=False, **kwargs)
    ids_out, scores, _ = run_decoderkit(model, ids, mask, GenerationConfig(**kwargs))
    assert torch.equal(ids_out, expected_ids)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)


def test_cases_exercise_eos_and_padding(model):
    """Guard on the oracle comparison above: its inputs must really produce EOS-terminated, padded hypotheses."""
    ids, mask = left_padded_batch(3)
    eos = eos_candidates(model, ids, mask)
    config = GenerationConfig(num_beams=3, num_return_sequences=3, eos_token_id=eos, pad_token_id=7, max_new_tokens=6)
    out, _, _ = run_decoderkit(model, ids, mask, config)
    generated = out[:, ids.shape[1] :]
    ends_with_eos = torch.isin(generated, torch.tensor(eos)).any(dim=1)
    assert ends_with_eos.any()
    assert (generated == 7).any(), "a hypothesis shorter than the longest one is padded with pad_token_id"


@pytest.mark.parametrize("num_beams", [2, 3])
def test_matches_transformers_with_processors(model, num_beams):
    ids, mask = left_padded_batch(11)
    # Repeated tokens in the prompt make the repetition penalty and n-gram ban bite
    ids[:, -3:] = ids[:, -4:-1].clone()
    eos = eos_candidates(model, ids, mask)
    kwargs = dict(
        num_beams=num_beams,
        num_return_sequences=num_beams,
        eos_token_id=eos,
        pad_token_id=PAD,
        max_new_tokens=8,
        repetition_penalty=1.5,
        no_repeat_ngram_size=2,
        min_new_tokens=3,
    )
    expected_ids, expected_scores = run_transformers(model, ids, mask, do_sample=False, **kwargs)
    ids_out, scores, _ = run_decoderkit(model, ids, mask, GenerationConfig(**kwargs))
    assert torch.equal(ids_out, expected_ids)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_transformers_beam_sampling(model, seed):
    ids, mask = left_padded_batch(seed)
    eos = eos_candidates(model, ids, mask)
    kwargs = dict(
        num_beams=3,
        num_return_sequences=2,
        eos_token_id=eos,
        pad_token_id=PAD,
        max_new_tokens=6,
        do_sample=True,
        temperature=0.8,
        top_k=10,
        top_p=0.9,
    )
    torch.manual_seed(100 + seed)
    expected_ids, expected_scores = run_transformers(model, ids, mask, **kwargs)
    torch.manual_seed(100 + seed)
    ids_out, scores, _ = run_decoderkit(model, ids, mask, GenerationConfig(**kwargs))
    assert torch.equal(ids_out, expected_ids)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)


class TableLM(transformers.LlamaForCausalLM):
    """Logits at position t depend only on (token at t, t), from a fixed table: a controllable stand-in model."""

    def __init__(self, config, table: torch.Tensor):
        super().__init__(config)
        self.table = table

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        positions = torch.arange(input_ids.shape[1])
        return transformers.modeling_outputs.CausalLMOutputWithPast(logits=self.table[input_ids, positions])


def table_model(seed: int, vocab: int = 12, eos: tuple[int, ...] = (2, 3)) -> TableLM:
    table = torch.randn(vocab, 64, vocab, generator=torch.Generator().manual_seed(seed)) * 2
    table[..., list(eos)] += 1.5  # EOS likely at every step, so hypotheses end at many different lengths
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1
    )
    return TableLM(config, table).eval()


@pytest.mark.parametrize(("seed", "num_beams", "num_return_sequences", "length_penalty", "early_stopping"), CASES)
def test_matches_transformers_on_table_model(seed, num_beams, num_return_sequences, length_penalty, early_stopping):
    """Same grid on a table model whose EOS-heavy distributions trigger every early-stopping rule."""
    model = table_model(seed)
    ids = torch.randint(4, 12, (2, 3), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    kwargs = dict(
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        eos_token_id=[2, 3] if seed % 2 else 2,
        pad_token_id=PAD,
        max_new_tokens=10,
    )
    expected_ids, expected_scores = run_transformers(model, ids, mask, do_sample=False, **kwargs)
    ids_out, scores, steps = run_decoderkit(model, ids, mask, GenerationConfig(**kwargs))
    assert torch.equal(ids_out, expected_ids)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-5)


def test_table_cases_exercise_early_stopping():
    """Guard on the grid above: each early_stopping mode must end some searches before max_length."""
    stopped_early = {True: 0, False: 0, "never": 0}
    for seed, num_beams, nrs, length_penalty, early_stopping in CASES:
        config = GenerationConfig(
            num_beams=num_beams,
            num_return_sequences=nrs,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            eos_token_id=[2, 3] if seed % 2 else 2,
            max_new_tokens=10,
        )
        ids = torch.randint(4, 12, (2, 3), generator=torch.Generator().manual_seed(seed))
        *_, steps = run_decoderkit(table_model(seed), ids, torch.ones_like(ids), config)
        stopped_early[early_stopping] += steps < 10
    assert all(count >= 3 for count in stopped_early.values()), stopped_early


def fake_log_probs(sequences: torch.Tensor, vocab: int = 7) -> torch.Tensor:
    """A deterministic stand-in for a model: log-probs from a fixed table indexed by (last token, position)."""
    table = torch.randn(vocab, 64, vocab, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    return table[sequences[:, -1], sequences.shape[1]]


def test_stops_at_max_length_and_returns_sorted_scores():
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    state = BeamSearchState(prompts, num_beams=3, max_length=8, num_return_sequences=3, early_stopping="never")
    steps = 0
    while not state.is_done():
        state.step(fake_log_probs(state.sequences))
        steps += 1
    assert steps == 5
    out = state.finalize()
    assert out.sequences.shape == (6, 8)
    assert torch.equal(out.sequences[:, :3], prompts.repeat_interleave(3, dim=0))
    scores = out.sequences_scores.view(2, 3)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    assert out.beam_indices.shape == (6, 5)
    with pytest.raises(RuntimeError, match="done"):
        state.step(fake_log_probs(state.sequences))


def test_early_stopping_true_stops_when_all_beams_finished():
    # Token 0 is EOS and overwhelmingly likely: every beam finishes at the first step
    log_probs = torch.full((2, 5), -10.0)
    log_probs[:, 0] = -0.01
    log_probs[:, 1] = -5.0
    state = BeamSearchState(
        torch.tensor([[3, 4]]), num_beams=2, max_length=10, eos_token_id=0, pad_token_id=9, early_stopping=True
    )
    state.step(log_probs)
    assert not state.is_done()  # only one finished hypothesis (beam 0 alone is live at the first step)
    state.step(log_probs)
    assert state.is_done()
    out = state.finalize()
    assert out.sequences[0, 2].item() == 0


def test_rejects_bad_arguments():
    prompts = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="num_return_sequences"):
        BeamSearchState(prompts, num_beams=2, max_length=5, num_return_sequences=3)
    with pytest.raises(ValueError, match="max_length"):
        BeamSearchState(prompts, num_beams=2, max_length=2)
    with pytest.raises(ValueError, match="early_stopping"):
        BeamSearchState(prompts, num_beams=2, max_length=5, early_stopping="sometimes")
    state = BeamSearchState(prompts, num_beams=2, max_length=5)
    with pytest.raises(ValueError, match="rows"):
        state.step(torch.zeros(3, 5))
