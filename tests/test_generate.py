"""generate() against transformers 5.23's generate on the same weights, for every family.

Oracle: tiny perturbed transformers models (tests/oracle.py) saved to disk and loaded by decoderkit. Greedy and beam
search must give identical token ids; sampling is checked for reproducibility, top-k and its step-1 distribution.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

import decoderkit
from decoderkit.generation import GenerationConfig
from decoderkit.generation.streamer import GenerationStream, TextIteratorStreamer, TextStreamer

oracle = pytest.importorskip("oracle")
transformers = pytest.importorskip("transformers")

FAMILIES = ["llama", "gemma", "gpt_bigcode", "mpt"]
VOCAB = 97
LENGTHS = [7, 4, 6]  # a left-padded batch of three prompts
NEW = 10


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(transformers model, decoderkit model) with the same weights."""
    hf = oracle.build(request.param)  # eager: MPT has no sdpa path in transformers
    directory = oracle.save(hf, tmp_path_factory.mktemp(request.param))
    return hf, decoderkit.AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = oracle.build("llama")
    directory = oracle.save(hf, tmp_path_factory.mktemp("llama_single"))
    return hf, decoderkit.AutoModelForCausalLM.from_pretrained(directory).eval()


@pytest.fixture(scope="module")
def batch():
    ids, mask, _ = oracle.left_padded_batch(VOCAB, LENGTHS)
    return ids, mask


def early_eos(hf, ids, mask) -> list[int]:
    """Two ids greedy decoding produces early in rows 0 and 1: used as EOS, they finish those rows mid-generation."""
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[:, ids.shape[1]:]
    return [int(out[0, 2]), int(out[1, 4])]


def both(hf, dk, ids, mask, **kwargs):
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, **kwargs)
    got = dk.generate(ids, attention_mask=mask, max_new_tokens=NEW, **kwargs)
    return expected, got


def assert_same(expected: torch.Tensor, got: torch.Tensor) -> None:
    assert got.dtype == torch.long
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.equal(got, expected), f"\nexpected {expected.tolist()}\ngot      {got.tolist()}"


# ---------------------------------------------------------------------------------------------- greedy / beams


@pytest.mark.parametrize("cache", [None, "static"])
def test_greedy_matches_transformers(pair, batch, cache):
    hf, dk = pair
    ids, mask = batch
    eos = early_eos(hf, ids, mask)
    expected, got = both(hf, dk, ids, mask, eos_token_id=eos, cache_implementation=cache, use_cache=True)
    assert_same(expected, got)
    # The EOS list really finished rows 0 and 1 early, and they were padded afterwards
    new = got[:, ids.shape[1]:]
    for row in (0, 1):
        first = int(torch.isin(new[row], torch.tensor(eos)).nonzero()[0])
        assert first <= 4 and (new[row, first + 1:] == 0).all()


@pytest.mark.parametrize("cache", [None, "static"])
def test_beam_search_matches_transformers(pair, batch, cache):
    hf, dk = pair
    ids, mask = batch
    eos = early_eos(hf, ids, mask)
    kwargs = dict(num_beams=3, num_return_sequences=2, length_penalty=0.7, early_stopping=True, eos_token_id=eos,
                  cache_implementation=cache, use_cache=True, return_dict_in_generate=True, output_scores=True)
    expected, got = both(hf, dk, ids, mask, **kwargs)
    assert_same(expected.sequences, got.sequences)
    torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-5)
    assert got.sequences.shape[0] == len(LENGTHS) * 2


def test_beam_search_never_and_negative_length_penalty(pair, batch):
    hf, dk = pair
    ids, mask = batch
    eos = early_eos(hf, ids, mask)
    expected, got = both(hf, dk, ids, mask, num_beams=3, early_stopping="never", length_penalty=-0.5, eos_token_id=eos)
    assert_same(expected, got)


def test_no_cache_matches_transformers(pair, batch):
    hf, dk = pair
    ids, mask = batch
    expected, got = both(hf, dk, ids, mask, use_cache=False, num_beams=2)
    assert_same(expected, got)


def test_min_new_tokens(pair, batch):
    hf, dk = pair
    ids, mask = batch
    eos = early_eos(hf, ids, mask)
    expected, got = both(hf, dk, ids, mask, eos_token_id=eos, min_new_tokens=6)
    assert_same(expected, got)
    new = got[:, ids.shape[1]:]
    assert not torch.isin(new[:, :6], torch.tensor(eos)).any()


def test_penalties_match_transformers(pair, batch):
    hf, dk = pair
    ids, mask = batch
    expected, got = both(hf, dk, ids, mask, repetition_penalty=1.5, no_repeat_ngram_size=2)
    assert_same(expected, got)
    plain = dk.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert not torch.equal(plain, got)  # the penalties changed something, so the comparison above means something


def test_scores_and_logits_match_transformers(llama, batch):
    hf, dk = llama
    ids, mask = batch
    kwargs = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, repetition_penalty=1.2)
    expected, got = both(hf, dk, ids, mask, **kwargs)
    assert_same(expected.sequences, got.sequences)
    assert len(got.scores) == len(expected.scores) == NEW
    for ours, theirs in zip(got.scores + got.logits, expected.scores + expected.logits):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert isinstance(got.past_key_values, decoderkit.DynamicCache)


def test_inferred_mask_and_default_length(llama, batch):
    hf, dk = llama
    ids, _ = batch
    # No attention_mask: both infer it from pad_token_id; no length: 20 new tokens, capped at max_position_embeddings
    assert_same(hf.generate(ids, do_sample=False), dk.generate(ids))
    long_prompt = torch.randint(3, VOCAB, (1, 50), generator=torch.Generator().manual_seed(3))
    expected, got = hf.generate(long_prompt, do_sample=False), dk.generate(long_prompt)
    assert_same(expected, got)
    assert got.shape[1] == 64


def test_max_new_tokens_zero_returns_prompt(llama, batch):
    _, dk = llama
    ids, mask = batch
    assert torch.equal(dk.generate(ids, attention_mask=mask, max_new_tokens=0), ids)


@pytest.mark.slow
def test_compiled_static_decode_matches_eager(tmp_path):
    dk = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(oracle.build("llama"), tmp_path)).eval()
    ids, mask, _ = oracle.left_padded_batch(VOCAB, LENGTHS)
    eager = dk.generate(ids, attention_mask=mask, max_new_tokens=6, cache_implementation="static")
    compiled = dk.generate(ids, attention_mask=mask, max_new_tokens=6, compile=True)
    assert_same(eager, compiled)
    # The CPU graph holds its own (frozen) copy of the weights: changing them must not reuse it
    with torch.no_grad():
        dk.lm_head.weight.mul_(-1)
    eager = dk.generate(ids, attention_mask=mask, max_new_tokens=6, cache_implementation="static")
    assert not torch.equal(eager, compiled)
    assert_same(eager, dk.generate(ids, attention_mask=mask, max_new_tokens=6, compile=True))


# ---------------------------------------------------------------------------------------------- sampling


def test_the_cycle_collector_is_paused_during_decoding_and_restored(llama, batch):
    _, dk = llama
    ids, mask = batch
    seen = []

    class Watch(decoderkit.generation.streamer.BaseStreamer):
        def put(self, value):
            seen.append(gc.isenabled())

        def end(self):
            pass

    assert gc.isenabled()
    dk.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=3, streamer=Watch())
    assert seen and not any(seen) and gc.isenabled()

    class Fail(Watch):
        def put(self, value):
            if len(seen) == 2:
                raise KeyboardInterrupt  # a failure inside the loop, after a step
            super().put(value)

    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        dk.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=5, streamer=Fail())
    assert len(seen) == 2 and gc.isenabled()
    gc.disable()
    try:  # a caller's own setting is left as it was
        dk.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_sampling_is_reproducible_with_a_generator(llama, batch):
    _, dk = llama
    ids, mask = batch

    def run(seed):
        return dk.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=1.5,
                           num_return_sequences=2, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == (len(LENGTHS) * 2, ids.shape[1] + NEW)
    assert torch.equal(first[:, : ids.shape[1]], ids.repeat_interleave(2, dim=0))


@pytest.mark.parametrize("top_k", [3, 0])
def test_sampling_respects_top_k(llama, batch, top_k):
    _, dk = llama
    ids, mask = batch
    out = dk.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, temperature=4.0, top_k=top_k,
                      num_return_sequences=8, return_dict_in_generate=True, output_scores=True, output_logits=True,
                      eos_token_id=None, generator=torch.Generator().manual_seed(0))  # no EOS: no padded rows
    L = ids.shape[1]
    outside = 0
    for step, (logits, scores) in enumerate(zip(out.logits, out.scores)):
        chosen = out.sequences[:, L + step]
        assert torch.isfinite(scores.gather(1, chosen[:, None])).all()
        top3 = logits.topk(3, dim=-1).indices
        outside += int((top3 != chosen[:, None]).all(dim=1).sum())
    if top_k:
        assert outside == 0
    else:
        assert outside > 0  # the flat distribution does leave the top 3 when nothing restricts it


def test_sampling_distribution_at_step_one(llama):
    hf, dk = llama
    prompt = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    n = 6000
    kwargs = dict(temperature=1.7, top_k=40, top_p=0.95)
    out = dk.generate(prompt, max_new_tokens=1, do_sample=True, num_return_sequences=n,
                      generator=torch.Generator().manual_seed(0), **kwargs)
    counts = torch.bincount(out[:, -1], minlength=VOCAB).double()
    with torch.no_grad():
        logits = hf(prompt).logits[:, -1].float()
    warpers = transformers.LogitsProcessorList([
        transformers.TemperatureLogitsWarper(kwargs["temperature"]),
        transformers.TopKLogitsWarper(kwargs["top_k"]),
        transformers.TopPLogitsWarper(kwargs["top_p"]),
    ])
    probs = warpers(prompt, logits).softmax(-1)[0].double()
    assert counts[probs == 0].sum() == 0  # nothing filtered out is ever drawn
    expected = probs * n
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    bins = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = bins > 0
    chi2 = float(((observed[keep] - bins[keep]) ** 2 / bins[keep]).sum())
    dof = int(keep.sum()) - 1
    # Far in the tail of chi-square(dof) (p << 1e-4); a wrong distribution (e.g. no temperature) lands far above it
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)
    untempered = logits.softmax(-1)[0].double() * n
    wrong = float(((counts - untempered) ** 2 / untempered.clamp(min=1e-9)).sum())
    assert wrong > dof + 6 * math.sqrt(2 * dof)


# ---------------------------------------------------------------------------------------------- streaming


class Recorder:
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(("put", value.clone()))

    def end(self):
        self.calls.append(("end", None))


class CharTokenizer:
    """decode() maps ids to letters; enough for the streamers' word-by-word path and for stop strings."""

    def decode(self, ids, **kwargs):
        return "".join(" " if i % 5 == 0 else chr(ord("a") + i % 26) for i in ids)


def test_streamer_and_stream_iterator(llama):
    _, dk = llama
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    expected = dk.generate(prompt, max_new_tokens=NEW)
    recorder = Recorder()
    assert torch.equal(dk.generate(prompt, max_new_tokens=NEW, streamer=recorder), expected)
    assert recorder.calls[0][0] == "put" and torch.equal(recorder.calls[0][1], prompt)
    assert recorder.calls[-1] == ("end", None)
    streamed = torch.cat([v for kind, v in recorder.calls[1:-1]])
    assert torch.equal(streamed, expected[0, 5:])

    stream = dk.generate(prompt, max_new_tokens=NEW, stream=True)
    assert isinstance(stream, GenerationStream)
    tokens = list(stream)
    assert len(tokens) == NEW and all(t.shape == (1,) for t in tokens)
    assert torch.equal(torch.cat(tokens), expected[0, 5:])
    assert torch.equal(stream.result, expected)

    text = TextIteratorStreamer(CharTokenizer(), skip_prompt=True)
    dk.generate(prompt, max_new_tokens=NEW, streamer=text)
    assert "".join(text) == CharTokenizer().decode(expected[0, 5:].tolist())


def test_text_streamer_never_splits_a_character(capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from decoderkit.tokenizer import Tokenizer

    byte_chars = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={c: i for i, c in enumerate(sorted(byte_chars))},
                                                         merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    tok = Tokenizer(backend)
    ids = tok.encode("hé 世界!", add_special_tokens=False)
    assert len(ids) > len("hé 世界!")  # multi-byte characters span several tokens
    streamer = TextIteratorStreamer(tok)
    streamer.put(torch.tensor([ids[:1]]))
    for i in ids[1:]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    pieces = list(streamer)
    assert "".join(pieces) == "hé 世界!"
    assert not any("\ufffd" in p for p in pieces)
    printer = TextStreamer(tok, skip_prompt=True)
    printer.put(torch.tensor([ids[:1]]))
    for i in ids[1:]:
        printer.put(torch.tensor([i]))
    printer.end()
    assert capsys.readouterr().out == "é 世界!\n"


def test_stop_strings(llama):
    _, dk = llama
    tok = CharTokenizer()
    prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    full = dk.generate(prompt, max_new_tokens=NEW)
    stop = tok.decode(full[0, 5 + 3 : 5 + 5].tolist())  # the text of new tokens 4 and 5
    got = dk.generate(prompt, max_new_tokens=NEW, stop_strings=stop, tokenizer=tok)
    assert stop in tok.decode(got[0, 5:].tolist())
    assert got.shape[1] <= 5 + 5 and torch.equal(got, full[:, : got.shape[1]])


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bigcode(tmp_path_factory):
    hf = oracle.build("gpt_bigcode")  # learned positions: a hard 64-token context
    return decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(hf, tmp_path_factory.mktemp("bigcode"))).eval()


BAD = [
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.ones(3, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.ones(1, 3)), "input_ids"),
    (dict(input_ids=torch.full((1, 3), VOCAB)), "input_ids"),
    (dict(input_ids=torch.ones(1, 65, dtype=torch.long), max_new_tokens=1), "input_ids"),
    (dict(max_new_tokens=60), "max_new_tokens"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(max_length=3), "max_length"),
    (dict(max_new_tokens=2, temprature=0.5), "temprature"),
    (dict(max_new_tokens=2, stop_strings="x"), "stop_strings"),
    (dict(attention_mask=torch.ones(1, 4, dtype=torch.long)), "attention_mask"),
    (dict(attention_mask=torch.tensor([[0, 0, 0, 0, 0]])), "attention_mask"),
    (dict(num_beams=2, streamer=Recorder()), "streamer"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(max_new_tokens=2, cache_implementation="quantized"), "cache_implementation"),
    (dict(max_new_tokens=2, inputs_embeds=torch.zeros(1, 4, 32)), "inputs_embeds"),
    (dict(max_new_tokens=2, inputs_embeds=torch.zeros(1, 5, 31)), "inputs_embeds"),
    (dict(max_new_tokens=2, past_key_values=((torch.zeros(1),),)), "past_key_values"),
    (dict(max_new_tokens=2, past_key_values=decoderkit.DynamicCache(), use_cache=False), "past_key_values"),
]


@pytest.mark.parametrize("kwargs, name", BAD, ids=[f"{name}-{i}" for i, (_, name) in enumerate(BAD)])
def test_bad_input_raises_before_computing(bigcode, kwargs, name):
    calls = []
    hook = bigcode.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        kwargs = {"input_ids": torch.tensor([[5, 6, 7, 8, 9]]), **kwargs}
        with pytest.raises(ValueError, match=name):
            bigcode.generate(**kwargs)
    finally:
        hook.remove()
    assert not calls


def test_generation_config_argument(llama, batch):
    hf, dk = llama
    ids, mask = batch
    config = GenerationConfig(max_new_tokens=4, num_beams=2)  # eos / pad come from the model's config
    got = dk.generate(ids, attention_mask=mask, generation_config=config)
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, do_sample=False)
    assert_same(expected, got)
