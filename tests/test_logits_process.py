"""Logits processors and stopping criteria against transformers 5.23, plus the properties each filter promises."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from decoderkit.generation import (
    EosTokenCriteria,
    GenerationConfig,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    PresenceFrequencyPenaltyLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
    build_logits_processors,
    build_stopping_criteria,
)

transformers = pytest.importorskip("transformers")
hf_lp = transformers.generation.logits_process
hf_sc = transformers.generation.stopping_criteria

FAST = settings(max_examples=50, deadline=None, database=None)  # no example database in the repo


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise equality (-inf == -inf), with a readable diff."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@st.composite
def scores_and_ids(draw, max_vocab: int = 64, id_range: int | None = None):
    """Random (input_ids, scores): varied scale, optional ties and already-filtered (-inf) entries."""
    batch, vocab, seq = draw(st.integers(1, 4)), draw(st.integers(2, max_vocab)), draw(st.integers(1, 12))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.randn(batch, vocab, generator=gen) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    if draw(st.booleans()):
        scores = (scores * 2).round() / 2
    if draw(st.booleans()):
        filtered = torch.rand(batch, vocab, generator=gen) < 0.3
        filtered[:, 0] = False  # at least one finite entry per row, as after any real filter
        scores = scores.masked_fill(filtered, -math.inf)
    high = min(vocab, id_range) if id_range else vocab
    ids = torch.randint(0, high, (batch, seq), generator=gen)
    return ids, scores


def distinct_scores(seed: int, batch: int, vocab: int) -> torch.Tensor:
    """Scores without ties, so that "the k best" is well defined."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab, generator=gen).float() * 0.37 for _ in range(batch)])


# ---------------------------------------------------------------- parity with transformers' classes


@FAST
@given(data=scores_and_ids(), temperature=st.floats(0.05, 5.0))
def test_temperature_matches_transformers(data, temperature):
    ids, scores = data
    expected = hf_lp.TemperatureLogitsWarper(temperature)(ids, scores)
    assert_same(TemperatureLogitsWarper(temperature)(ids, scores), expected)


@FAST
@given(data=scores_and_ids(), top_k=st.integers(1, 70), keep=st.integers(1, 5))
def test_top_k_matches_transformers(data, top_k, keep):
    ids, scores = data
    expected = hf_lp.TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(ids, scores)
    assert_same(TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(ids, scores), expected)


@FAST
@given(data=scores_and_ids(), top_p=st.floats(0.01, 1.0), keep=st.integers(1, 5))
def test_top_p_matches_transformers(data, top_p, keep):
    ids, scores = data
    expected = hf_lp.TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(ids, scores)
    assert_same(TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(ids, scores), expected)


@FAST
@given(data=scores_and_ids(), min_p=st.floats(0.0, 1.0), keep=st.integers(1, 5))
def test_min_p_matches_transformers(data, min_p, keep):
    ids, scores = data
    expected = hf_lp.MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(ids, scores)
    assert_same(MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(ids, scores), expected)


@FAST
@given(data=scores_and_ids(), mass=st.floats(0.01, 0.99), keep=st.integers(1, 5))
def test_typical_matches_transformers(data, mass, keep):
    ids, scores = data
    expected = hf_lp.TypicalLogitsWarper(mass, min_tokens_to_keep=keep)(ids, scores)
    assert_same(TypicalLogitsWarper(mass, min_tokens_to_keep=keep)(ids, scores), expected)


@FAST
@given(data=scores_and_ids(id_range=8), penalty=st.floats(0.1, 5.0), ignore=st.sampled_from(["none", "int", "rows"]))
def test_repetition_penalty_matches_transformers(data, penalty, ignore):
    ids, scores = data
    if ignore == "int":
        prompt_ignore = ids.shape[1] // 2
    elif ignore == "rows":
        prompt_ignore = torch.arange(ids.shape[0]) % (ids.shape[1] + 1)
    else:
        prompt_ignore = None
    expected = hf_lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore)(ids, scores)
    assert_same(RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore)(ids, scores), expected)


@FAST
@given(data=scores_and_ids(id_range=3), n=st.integers(1, 4))
def test_no_repeat_ngram_matches_transformers(data, n):
    ids, scores = data
    expected = hf_lp.NoRepeatNGramLogitsProcessor(n)(ids, scores)
    assert_same(NoRepeatNGramLogitsProcessor(n)(ids, scores), expected)


@FAST
@given(
    data=scores_and_ids(),
    min_length=st.integers(0, 15),
    prompt=st.integers(0, 8),
    eos=st.one_of(st.integers(0, 70), st.lists(st.integers(0, 70), min_size=1, max_size=3)),
)
def test_min_length_processors_match_transformers(data, min_length, prompt, eos):
    ids, scores = data
    expected = hf_lp.MinLengthLogitsProcessor(min_length, eos)(ids, scores)
    assert_same(MinLengthLogitsProcessor(min_length, eos)(ids, scores), expected)
    expected = hf_lp.MinNewTokensLengthLogitsProcessor(prompt, min_length, eos)(ids, scores)
    assert_same(MinNewTokensLengthLogitsProcessor(prompt, min_length, eos)(ids, scores), expected)


# ---------------------------------------------------------------- properties


@FAST
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 50), top_k=st.integers(1, 60), keep=st.integers(1, 4))
def test_top_k_keeps_exactly_the_k_best(seed, vocab, top_k, keep):
    scores = distinct_scores(seed, 3, vocab)
    out = TopKLogitsWarper(top_k, min_tokens_to_keep=keep)(None, scores)
    k = min(max(top_k, keep), vocab)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == k).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, scores.topk(k).indices, True))
    assert torch.equal(out[kept], scores[kept]) and (out[~kept] == -math.inf).all()


@FAST
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 50), top_p=st.floats(0.01, 1.0), keep=st.integers(1, 4))
def test_top_p_keeps_smallest_set_with_enough_mass(seed, vocab, top_p, keep):
    scores = distinct_scores(seed, 3, vocab) / 4
    out = TopPLogitsWarper(top_p, min_tokens_to_keep=keep)(None, scores)
    probs_desc, order = scores.softmax(-1).sort(descending=True)
    mass_before = probs_desc.cumsum(-1) - probs_desc  # mass of strictly more likely tokens
    assume(((mass_before - top_p).abs() > 1e-5).all())  # stay off float boundaries
    # A token belongs to the smallest sufficient set iff the tokens above it hold less than top_p
    in_set = (mass_before < top_p) | (torch.arange(vocab) < keep)
    expected_kept = torch.zeros_like(in_set).scatter(-1, order, in_set)
    assert torch.equal(torch.isfinite(out), expected_kept)
    assert torch.equal(out[expected_kept], scores[expected_kept]) and (out[~expected_kept] == -math.inf).all()
    assert ((scores.softmax(-1) * expected_kept).sum(-1) >= top_p - 1e-5).all()


@FAST
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 50), min_p=st.floats(0.0, 1.0), keep=st.integers(1, 4))
def test_min_p_keeps_tokens_above_scaled_max(seed, vocab, min_p, keep):
    scores = distinct_scores(seed, 3, vocab) / 8
    probs = scores.softmax(-1)
    threshold = min_p * probs.amax(-1, keepdim=True)
    assume(((probs - threshold).abs() > 1e-6).all())
    out = MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(None, scores)
    top = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, probs.topk(min(keep, vocab)).indices, True)
    assert torch.equal(torch.isfinite(out), (probs >= threshold) | top)
    assert (out[~torch.isfinite(out)] == -math.inf).all()


def test_filters_on_exact_boundaries():
    """Uniform probabilities sit exactly on the thresholds: the definitions' >= must hold there."""
    uniform = torch.zeros(2, 4)  # each token has probability exactly 0.25
    # top-p 0.5: two tokens already hold mass 0.5 >= p, so exactly two are kept
    assert (torch.isfinite(TopPLogitsWarper(0.5)(None, uniform)).sum(-1) == 2).all()
    # min-p 1.0: every token has p == min_p * p_max, so all are kept
    assert torch.isfinite(MinPLogitsWarper(1.0)(None, uniform)).all()
    # top-k with ties at the k-th value keeps all of them
    assert torch.isfinite(TopKLogitsWarper(2)(None, uniform)).all()


@FAST
@given(data=scores_and_ids(id_range=10), penalty=st.floats(1.01, 4.0))
def test_repetition_penalty_only_touches_seen_tokens(data, penalty):
    ids, scores = data
    out = RepetitionPenaltyLogitsProcessor(penalty)(ids, scores)
    for row in range(ids.shape[0]):
        seen = set(ids[row].tolist())
        for token in range(scores.shape[1]):
            s = scores[row, token].item()
            want = (s * penalty if s < 0 else s / penalty) if token in seen else s
            assert out[row, token].item() == pytest.approx(want)


@FAST
@given(
    data=scores_and_ids(id_range=6),
    prompt=st.integers(0, 12),
    presence=st.floats(-2.0, 2.0),
    frequency=st.floats(-2.0, 2.0),
)
def test_presence_frequency_penalty_formula(data, prompt, presence, frequency):
    ids, scores = data
    out = PresenceFrequencyPenaltyLogitsProcessor(presence, frequency, prompt)(ids, scores)
    for row in range(ids.shape[0]):
        generated = ids[row, prompt:].tolist()
        for token in range(scores.shape[1]):
            count = generated.count(token)
            want = scores[row, token].item() - frequency * count - presence * (count > 0)
            assert out[row, token].item() == pytest.approx(want, abs=1e-5) or math.isinf(want)


def test_no_repeat_ngram_bans_exactly_the_repeating_tokens():
    ids = torch.tensor([[1, 2, 3, 1, 2, 4, 1, 2]])
    out = NoRepeatNGramLogitsProcessor(3)(ids, torch.zeros(1, 6))
    assert torch.isinf(out[0]).nonzero().flatten().tolist() == [3, 4]  # "1 2" was followed by 3 and by 4
    assert torch.equal(NoRepeatNGramLogitsProcessor(3)(ids[:, :2], torch.zeros(1, 6)), torch.zeros(1, 6))


def test_min_new_tokens_suppresses_every_eos_until_reached():
    scores = torch.zeros(1, 6)
    processor = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=3, min_new_tokens=2, eos_token_id=[1, 4])
    assert torch.isinf(processor(torch.zeros(1, 4, dtype=torch.long), scores)[0]).nonzero().flatten().tolist() == [1, 4]
    assert torch.equal(processor(torch.zeros(1, 5, dtype=torch.long), scores), scores)


def test_processors_do_not_modify_their_input():
    ids = torch.tensor([[1, 2, 1, 2, 1]])
    scores = torch.randn(1, 5)
    before = scores.clone()
    config = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=3, top_p=0.9, min_p=0.1, typical_p=0.9,
        repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3, eos_token_id=4,
        presence_penalty=0.5, frequency_penalty=0.5,
    )  # fmt: skip
    build_logits_processors(config, prompt_length=2)(ids, scores)
    assert torch.equal(scores, before)


def test_constructor_validation():
    for make in (
        lambda: TemperatureLogitsWarper(0.0),
        lambda: TopKLogitsWarper(0),
        lambda: TopPLogitsWarper(1.5),
        lambda: TopPLogitsWarper(0.5, min_tokens_to_keep=0),
        lambda: MinPLogitsWarper(-0.1),
        lambda: TypicalLogitsWarper(1.0),
        lambda: RepetitionPenaltyLogitsProcessor(0.0),
        lambda: NoRepeatNGramLogitsProcessor(0),
        lambda: MinLengthLogitsProcessor(-1, 2),
        lambda: MinLengthLogitsProcessor(3, []),
        lambda: PresenceFrequencyPenaltyLogitsProcessor(math.nan, 0.0),
    ):
        with pytest.raises(ValueError):
            make()


# ---------------------------------------------------------------- order: build_logits_processors vs transformers


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


def transformers_processors(model, ids, mask, **kwargs):
    config, _ = model._prepare_generation_config(transformers.GenerationConfig(**kwargs))
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device="cpu")
    return model._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=ids.shape[1],
        encoder_input_ids=ids,
        logits_processor=transformers.LogitsProcessorList(),
        device="cpu",
        model_kwargs={"attention_mask": mask},
    )


ORDER_CASES = {
    "greedy ignores warpers": dict(
        temperature=0.5, top_k=5, top_p=0.8, repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=3,
        eos_token_id=[2, 5],
    ),
    "all warpers": dict(
        do_sample=True, temperature=0.7, top_k=10, top_p=0.9, min_p=0.05, typical_p=0.95, repetition_penalty=1.2,
        no_repeat_ngram_size=3, min_length=9, eos_token_id=2,
    ),
    "beam sampling keeps len(eos)+1": dict(
        do_sample=True, num_beams=3, top_k=1, top_p=0.1, min_p=0.9, typical_p=0.2, eos_token_id=[2, 5],
    ),
    "beam sampling without eos keeps 2": dict(do_sample=True, num_beams=2, top_k=1, top_p=0.1),
    "defaults when sampling": dict(do_sample=True),
}  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", ORDER_CASES)
def test_processor_order_matches_transformers(tiny_llama, case):
    kwargs = ORDER_CASES[case]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 12, (4, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :4] = 0
    ids = ids.masked_fill(mask == 0, 0)
    expected = transformers_processors(tiny_llama, ids, mask, **kwargs)
    ours = build_logits_processors(GenerationConfig(**kwargs), prompt_length=ids.shape[1], attention_mask=mask)
    assert [type(p).__name__ for p in ours] == [type(p).__name__ for p in expected]
    for a, b in zip(ours, expected):
        assert getattr(a, "min_tokens_to_keep", None) == getattr(b, "min_tokens_to_keep", None)
    for step in range(4):
        seq = torch.cat([ids, torch.randint(3, 12, (4, step), generator=gen)], dim=1)
        scores = torch.randn(4, 40, generator=gen) * 3
        assert_same(ours(seq, scores), expected(seq, scores))


# ---------------------------------------------------------------- greedy / sampling end to end vs generate


@torch.no_grad()
def decode_loop(model, ids, mask, config: GenerationConfig):
    """A minimal greedy/sampling loop over decoderkit's processors and criteria (full forward, no cache)."""
    prompt_len = ids.shape[1]
    processors = build_logits_processors(config, prompt_len, mask)
    criteria = build_stopping_criteria(config, config.max_length_for(prompt_len))
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_ids[0]
    unfinished = torch.ones(ids.shape[0], dtype=torch.long)
    while True:
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1].float()
        scores = processors(ids, logits)
        if config.do_sample:
            next_tokens = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
        else:
            next_tokens = scores.argmax(-1)
        next_tokens = next_tokens * unfinished + pad * (1 - unfinished)
        ids = torch.cat([ids, next_tokens[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        unfinished = unfinished & ~criteria(ids)
        if unfinished.max() == 0:
            return ids


GENERATE_CASES = {
    "greedy": dict(repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=4),
    "sample": dict(do_sample=True, temperature=0.8, top_k=12, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
    "typical": dict(do_sample=True, typical_p=0.8, no_repeat_ngram_size=3, min_length=10),
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generation_loop_matches_transformers_generate(tiny_llama, case):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 40, (3, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        first = tiny_llama(input_ids=ids, attention_mask=mask).logits[:, -1].argsort(-1, descending=True)
    # EOS ids the model actually produces, so min_length and early finishing both matter
    kwargs = dict(GENERATE_CASES[case], eos_token_id=[first[0, 0].item(), first[2, 1].item()], pad_token_id=0)
    kwargs["max_new_tokens"] = 12
    torch.manual_seed(7)
    expected = tiny_llama.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(decode_loop(tiny_llama, ids, mask, GenerationConfig(**kwargs)), expected)


# ---------------------------------------------------------------- stopping criteria


def test_max_length_and_eos_criteria():
    ids = torch.tensor([[5, 6, 2], [5, 6, 7]])
    assert MaxLengthCriteria(3)(ids).tolist() == [True, True]
    assert MaxLengthCriteria(4)(ids).tolist() == [False, False]
    assert EosTokenCriteria([9, 2])(ids).tolist() == [True, False]
    assert EosTokenCriteria(7)(ids).tolist() == [False, True]
    criteria = StoppingCriteriaList([MaxLengthCriteria(10), EosTokenCriteria(2)])
    assert criteria(ids).tolist() == [True, False] and criteria.max_length == 10


class Decoder:
    """The tokenizer-like object decoderkit's criteria need: ``decode(ids) -> str``, special tokens included."""

    def __init__(self, hf_tokenizer):
        self.hf_tokenizer = hf_tokenizer

    def decode(self, token_ids: list[int]) -> str:
        return self.hf_tokenizer.decode(token_ids, skip_special_tokens=False)


def byte_level_tokenizer():
    import tokenizers

    corpus = [
        "the cat sat on the mat.\nThe dog, naïve, ate 日本 food!",
        "stop here; END of text\n\n",
        "héllo wörld ###",
    ]
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 10, vocab_size=320, min_frequency=1, show_progress=False)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)


def byte_fallback_tokenizer():
    """Llama-style: Metaspace pieces, <0xNN> byte fallback, leading space stripped when decoding."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "▁the", "the", "▁cat", "at", "▁a", "a", "b", "c", "d", "e", "f", "t", "h", "s", "é", "END", "."]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("make_tokenizer", [byte_level_tokenizer, byte_fallback_tokenizer])
def test_stop_strings_stop_at_the_same_step_as_transformers(make_tokenizer):
    tokenizer = make_tokenizer()
    vocab_ids = sorted(i for i in tokenizer.get_vocab().values() if i > 2)
    gen = torch.Generator().manual_seed(0)
    stops = 0
    for trial in range(16):
        # Mostly the pieces learned from the corpus (real words), some single bytes/characters
        pool = vocab_ids if trial % 4 == 0 else vocab_ids[-60:]
        ids = torch.tensor(pool)[torch.randint(len(pool), (3, 14), generator=gen)]
        # Stop strings cut from the decoded text of row 0 (so they occur), plus fixed ones spanning tokens
        text = tokenizer.decode(ids[0, 4:].tolist())
        start = int(torch.randint(max(len(text) - 3, 1), (1,), generator=gen))
        # (a cut through an invalid byte sequence decodes to U+FFFD, which no real stop string contains)
        cut = text[start : start + 1 + trial % 3]
        stop_strings = [s for s in (cut, "the", "é", "\n\n", " c") if "\ufffd" not in s]
        expected_criterion = hf_sc.StopStringCriteria(tokenizer, stop_strings)
        ours = StopStringCriteria(Decoder(tokenizer), stop_strings)
        for length in range(1, ids.shape[1] + 1):
            expected = expected_criterion(ids[:, :length], None)
            assert ours(ids[:, :length]).tolist() == expected.tolist(), (stop_strings, ids[:, :length].tolist())
            stops += int(expected.sum())
    assert stops >= 40  # the comparison saw many stops, not only "keep going"


def test_stop_string_may_start_in_the_prompt_and_end_inside_a_token():
    tokenizer = byte_fallback_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["▁the", "▁cat", "."])
    criterion = StopStringCriteria(Decoder(tokenizer), ["e c"])
    completes = [criterion(torch.tensor([ids[:n]])).item() for n in range(1, len(ids) + 1)]
    assert completes == [False, True, False], "'e c' ends inside '▁cat', the token after '▁the'"
    assert not StopStringCriteria(Decoder(tokenizer), ["the"])(torch.tensor([ids])).item(), "only the newest token"


@pytest.mark.parametrize("make_tokenizer", [byte_level_tokenizer, byte_fallback_tokenizer])
def test_stop_string_after_a_character_split_across_tokens(make_tokenizer):
    """A multi-byte character split over several tokens, right before the token that completes the stop string."""
    tokenizer = make_tokenizer()
    if make_tokenizer is byte_fallback_tokenizer:
        byte_tokens = [f"<0x{b:02X}>" for b in "日".encode()]
        tokens = ["▁cat"] * 4 + byte_tokens + ["a"]
    else:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        byte_to_char = bytes_to_unicode()
        tokens = ["the", "cat", "sat", "Ġon"] + [byte_to_char[b] for b in "日".encode()] + ["a"]
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(tokens)])
    assert tokenizer.decode(ids[0, -4:]) == "日a" and tokenizer.decode(ids[0, -2:]) == "\ufffda"
    for stop_strings in (["日a"], ["a"], ["本a"], [tokenizer.decode(ids[0, -5:])]):
        expected = hf_sc.StopStringCriteria(tokenizer, stop_strings)
        ours = StopStringCriteria(Decoder(tokenizer), stop_strings)
        for length in range(1, ids.shape[1] + 1):
            assert ours(ids[:, :length]).tolist() == expected(ids[:, :length], None).tolist(), (stop_strings, length)


def test_build_stopping_criteria():
    config = GenerationConfig(eos_token_id=[2, 3], stop_strings=["x"])
    with pytest.raises(ValueError, match="tokenizer"):
        build_stopping_criteria(config, 10)
    criteria = build_stopping_criteria(config, 10, tokenizer=Decoder(byte_level_tokenizer()))
    assert [type(c).__name__ for c in criteria] == ["MaxLengthCriteria", "StopStringCriteria", "EosTokenCriteria"]
    assert criteria.max_length == 10
