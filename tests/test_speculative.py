"""Speculative decoding (generation/speculative.py): same ids as plain greedy decoding, the target's distribution when
sampling, caches rolled back to exactly what plain decoding builds, clear errors for what cannot speculate.

Oracle: plain greedy decoding, itself checked against transformers in test_generate.py (and once here directly); for
sampling, the target's exact distribution computed from full forwards, compared with a chi-square test.
"""

from __future__ import annotations

import copy

import pytest
import torch

import decoderkit
from decoderkit.cache import DynamicCache, StaticCache
from decoderkit.generation import speculative
from decoderkit.generation.logits_process import LogitsProcessor, LogitsProcessorList
from decoderkit.generation.speculative import (
    PromptLookupProposer,
    ProposalSchedule,
    greedy_accept,
    sampled_accept,
)
from decoderkit.generation.stopping import StoppingCriteria, StoppingCriteriaList

oracle = pytest.importorskip("oracle")

FAMILIES = ["llama", "gemma", "gpt_bigcode", "mpt"]
NEW = 24
# The schedule from the acceptance alone, not the clock (see conftest.untimed_schedule)
pytestmark = pytest.mark.usefixtures("untimed_schedule")
# chi2.ppf(0.999, df) for df = 1..7: a correct sampler fails a test at this level once in a thousand seeds
CHI2_999 = [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322]


def noisy_copy(model, scale: float, seed: int):
    """The model with every weight moved a little: a draft that agrees with it often but not always."""
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return draft


@pytest.fixture(scope="module", params=FAMILIES)
def trio(request, tmp_path_factory):
    """(transformers model, decoderkit model, a draft: the decoderkit model with perturbed weights)."""
    hf = oracle.build(request.param)
    dk = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(hf, tmp_path_factory.mktemp(request.param)))
    return hf, dk.eval(), noisy_copy(dk, 0.02, seed=7).eval()


def repetitive_prompt(vocab: int, seed: int = 0) -> torch.Tensor:
    """A prompt that repeats itself, so prompt lookup finds n-grams to copy."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(3, vocab, (6,), generator=gen)
    return torch.cat([base, base, base[:4]])[None]


_SCHEDULE_INIT = ProposalSchedule.__init__


def unwatched_init(self, *args, **kwargs):
    """ProposalSchedule.__init__ with watching off, as the schedule of a proposer too costly to ask at every step."""
    _SCHEDULE_INIT(self, *args, **{**kwargs, "watch": False})


# ---------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("proposer", ["lookup", "draft"])
def test_greedy_speculation_gives_plain_greedy_ids(trio, cache, proposer, monkeypatch):
    hf, dk, draft = trio
    # Every family must run both verify paths (proposals kept and rejected): watching would skip the proposals that
    # one family's text rejects from its first token
    monkeypatch.setattr(speculative.ProposalSchedule, "__init__", unwatched_init)
    prompt = repetitive_prompt(dk.config.vocab_size)
    kwargs = dict(max_new_tokens=NEW, eos_token_id=None, cache_implementation=cache)
    plain = dk.generate(prompt, **kwargs)
    spec = dict(prompt_lookup_num_tokens=3) if proposer == "lookup" else dict(assistant_model=draft,
                                                                                num_assistant_tokens=3)
    got = dk.generate(prompt, return_dict_in_generate=True, **kwargs, **spec)
    assert torch.equal(got.sequences, plain), f"\nplain {plain.tolist()}\nspec  {got.sequences.tolist()}"
    # Proposals were both kept and rejected, so both paths of the verify step ran
    assert 0 < got.num_accepted_tokens < got.num_proposed_tokens, (got.num_accepted_tokens, got.num_proposed_tokens)
    if cache == "dynamic" and proposer == "draft":
        expected = hf.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(got.sequences, expected)


@pytest.mark.parametrize("proposer", ["lookup", "draft"])
def test_greedy_speculation_stops_exactly(trio, proposer):
    hf, dk, draft = trio
    prompt = repetitive_prompt(dk.config.vocab_size)
    plain = dk.generate(prompt, max_new_tokens=NEW, eos_token_id=None)[0, prompt.shape[1]:]
    spec = dict(prompt_lookup_num_tokens=4) if proposer == "lookup" else dict(assistant_model=draft,
                                                                                num_assistant_tokens=4)
    # EOS: a token greedy decoding emits mid-way, so speculation must not emit what follows it
    eos = int(plain[NEW // 2])
    expected = dk.generate(prompt, max_new_tokens=NEW, eos_token_id=eos)
    got = dk.generate(prompt, max_new_tokens=NEW, eos_token_id=eos, **spec)
    assert torch.equal(got, expected) and got.shape[1] < prompt.shape[1] + NEW
    # A caller's stopping criterion, and max_new_tokens inside a run of accepted proposals
    stop_at = int(plain[NEW // 3])

    class StopOn(StoppingCriteria):
        def __call__(self, input_ids, scores=None, **kwargs):
            return input_ids[:, -1] == stop_at

    criteria = StoppingCriteriaList([StopOn()])
    expected = dk.generate(prompt, max_new_tokens=NEW, eos_token_id=None, stopping_criteria=criteria)
    got = dk.generate(prompt, max_new_tokens=NEW, eos_token_id=None, stopping_criteria=criteria, **spec)
    assert torch.equal(got, expected)
    for n in (1, 2, 5):
        assert torch.equal(dk.generate(prompt, max_new_tokens=n, eos_token_id=None, **spec),
                           dk.generate(prompt, max_new_tokens=n, eos_token_id=None))


def test_greedy_speculation_scores_and_processors(trio):
    _, dk, draft = trio
    prompt = repetitive_prompt(dk.config.vocab_size)
    kwargs = dict(max_new_tokens=NEW, eos_token_id=None, repetition_penalty=1.3, return_dict_in_generate=True,
                  output_scores=True, output_logits=True)
    plain = dk.generate(prompt, **kwargs)
    got = dk.generate(prompt, assistant_model=draft, num_assistant_tokens=3, **kwargs)
    assert torch.equal(got.sequences, plain.sequences)
    assert len(got.scores) == len(got.logits) == NEW
    for ours, theirs in zip(got.scores + got.logits, plain.scores + plain.logits):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_prompt_lookup_proposes_the_continuation_of_the_first_match():
    ids = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 4, 5, 6]])
    tokens, probs = PromptLookupProposer(num_tokens=3, max_matching_ngram_size=2).propose(ids, limit=3)
    assert tokens.tolist() == [7, 8, 9] and probs is None
    assert PromptLookupProposer(3, 2).propose(ids, limit=2)[0].tolist() == [7, 8]
    assert PromptLookupProposer(3, 2).propose(torch.tensor([[1, 2, 3, 4]]), limit=5)[0].numel() == 0


def scan_lookup(seq: torch.Tensor, max_ngram: int, limit: int) -> list[int]:
    """Prompt lookup by a scan of the whole sequence (transformers' way): the reference for the indexed proposer."""
    n_ids = seq.shape[0]
    for n in range(min(max_ngram, n_ids - 1), 0, -1):
        windows = seq[: n_ids - 1].unfold(0, n, 1)
        starts = (windows == seq[n_ids - n:]).all(dim=1).nonzero().flatten()
        if starts.numel():
            begin = int(starts[0]) + n
            return seq[begin: begin + limit].tolist()
    return []


@pytest.mark.parametrize("max_ngram", [1, 2, 3])
def test_indexed_prompt_lookup_equals_a_scan_as_the_sequence_grows(max_ngram):
    gen = torch.Generator().manual_seed(max_ngram)
    seq = torch.randint(0, 6, (60,), generator=gen)  # a small vocabulary: many repeated n-grams
    proposer = PromptLookupProposer(4, max_ngram)
    found = 0
    for n in [1, 2, 3, *range(5, 61, 3)]:  # grown by one or several tokens per call
        got = proposer.propose(seq[None, :n], 4)[0].tolist()
        assert got == scan_lookup(seq[:n], max_ngram, 4), n
        found += bool(got)
    assert found > 10
    other = torch.randint(0, 6, (30,), generator=gen)  # another sequence without start(): the index is rebuilt
    assert proposer.propose(other[None], 3)[0].tolist() == scan_lookup(other, max_ngram, 3)


def test_greedy_accept_keeps_the_agreeing_prefix():
    scores = torch.eye(5)[[1, 2, 3, 4]]  # argmax per row: 1, 2, 3, 4
    assert greedy_accept(scores, torch.tensor([1, 2, 0])).tolist() == [1, 2, 3]
    assert greedy_accept(scores, torch.tensor([1, 2, 3])).tolist() == [1, 2, 3, 4]
    assert greedy_accept(scores, torch.tensor([0, 2, 3])).tolist() == [1]


# ---------------------------------------------------------------------------------------------- cost


def test_schedule_backs_off_pauses_and_probes():
    schedule = ProposalSchedule(8, patience=2, pause=2, max_pause=4)
    assert schedule.next(room=100) == 8 and schedule.next(room=3) == 3
    schedule.update(8, 3)
    assert schedule.next(100) == 4  # one more than were kept
    schedule.update(4, 4)
    assert schedule.next(100) == 6  # all kept: grows by 2
    schedule.update(6, 0)
    assert schedule.next(100) == 1  # a miss: one token
    schedule.update(1, 0)  # a second miss in a row: pause for 2 plain steps, then probe with one token
    assert [schedule.next(100) for _ in range(3)] == [0, 0, 1]
    schedule.update(1, 0)  # the probe missed: the pause doubles, up to max_pause
    assert [schedule.next(100) for _ in range(5)] == [0, 0, 0, 0, 1]
    schedule.update(1, 1)  # a kept token ends the pausing and resets the pause
    assert schedule.next(100) == 3
    schedule.update(3, 0)
    assert schedule.next(100) == 1  # one miss after a hit does not pause
    # With the steps' cost known (a step's time over a plain step's), steps that keep too few to pay for themselves
    # miss too, judged by the moving average of tokens per cost
    timed = ProposalSchedule(8, patience=1, pause=2)
    timed.update(8, 3, cost=2.0)  # 4 tokens in the time of 2 plain steps: paid (2 per plain step's time)
    assert timed.next(100) == 4
    timed.update(4, 1, cost=2.5)  # 2 tokens in the time of 2.5: the average, 0.7 * 2 + 0.3 * 0.8, still pays
    assert timed.next(100) == 2
    timed.update(2, 1, cost=4.0)  # 2 in the time of 4: the average falls to 1.3
    timed.update(2, 1, cost=4.0)  # ... to 1.06
    assert timed.next(100) == 2
    timed.update(2, 1, cost=4.0)  # ... to 0.89: slower than plain decoding, a miss
    assert [timed.next(100) for _ in range(3)] == [0, 0, 2]
    fixed = ProposalSchedule(5, adaptive=False)
    for accepted in (0, 0, 0, 2):
        fixed.update(5, accepted)
        assert fixed.next(100) == 5


def test_schedule_watches_guesses_and_times_plain_steps(monkeypatch):
    watch = ProposalSchedule(6, patience=2, pause=2, watch=True)
    assert watch.next(100) == 0 and watch.watching  # a run starts watching
    watch.watched(False)
    assert [watch.next(100) for _ in range(5)] == [0] * 5 and watch.watching  # wrong guesses: no countdown
    watch.watched(True)
    watch.watched(False)
    watch.watched(True)
    assert watch.next(100) == 0 and watch.watching  # right guesses, but not two in a row
    watch.watched(True)
    assert watch.next(100) == 6 and not watch.watching  # two in a row: propose at the next step
    watch.update(6, 0)
    watch.update(1, 0)  # two misses, nothing kept: watching again
    assert watch.next(100) == 0 and watch.watching
    watch.watched(True)
    watch.watched(True)
    assert watch.next(100) == 1
    watch.update(1, 1)  # kept: the misses and the pause start afresh
    watch.update(3, 1, cost=3.0)
    watch.update(2, 1, cost=3.0)  # kept tokens, too few for the cost: a counted pause, not watched
    assert [watch.next(100) for _ in range(3)] == [0, 0, 2] and not watch.watching
    # The clock: a plain step's time is the unit; verify steps before any plain one are unpriced, and after
    # calibrate_after of them one plain step is taken to time one
    monkeypatch.setattr(ProposalSchedule, "timed", True)
    timed = ProposalSchedule(4, calibrate_after=2)
    assert timed.record(3, 0.5) is None and timed.record(3, 0.5) is None
    assert timed.next(100) == 0
    assert timed.record(0, 0.25) is None and timed.next(100) == 4
    assert timed.record(4, 0.5) == 2.0
    timed.record(0, 0.5)  # a moving average of the plain steps
    assert timed.record(4, 0.6) == pytest.approx(0.6 / 0.3)
    monkeypatch.setattr(ProposalSchedule, "timed", False)
    untimed = ProposalSchedule(4, calibrate_after=0)
    assert untimed.record(0, 1.0) is None and untimed.next(100) == 4


class Forbid(LogitsProcessor):
    """Never lets the model choose `token`, so a proposal of it is always rejected."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        return scores.index_fill(-1, torch.tensor([self.token]), float("-inf"))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_rejected_proposals_stop_costing_verify_forwards(trio, cache, monkeypatch):
    """Open-ended text: when nothing proposed is kept, speculation must fall back to plain steps (no verify forward).
    Prompt lookup is watched: its guesses are compared with the plain steps' tokens, and as none is right it never
    verifies at all. Unwatched (a draft model, too costly to ask at every step), it falls back after a couple of
    misses and probes only now and then. With nothing to propose it never verifies either way."""
    _, dk, _ = trio
    prompt = repetitive_prompt(dk.config.vocab_size)
    verifies = []
    real_verify = speculative._verify_forward
    monkeypatch.setattr(speculative, "_verify_forward",
                        lambda model, c, tokens, start: verifies.append(tokens.shape[1]) or real_verify(
                            model, c, tokens, start))
    kwargs = dict(max_new_tokens=40, eos_token_id=None, cache_implementation=cache,
                  logits_processor=LogitsProcessorList([Forbid(5)]))
    plain = dk.generate(prompt, **kwargs)
    asked = []
    monkeypatch.setattr(PromptLookupProposer, "propose",
                        lambda self, ids, limit: asked.append(limit) or (torch.full((limit,), 5), None))
    got = dk.generate(prompt, prompt_lookup_num_tokens=4, return_dict_in_generate=True, **kwargs)
    assert torch.equal(got.sequences, plain)
    assert verifies == [] and got.num_proposed_tokens == 0
    assert asked == [1] * 39  # one guess at each plain step after the first token (chosen by the prefill)
    monkeypatch.setattr(speculative.ProposalSchedule, "__init__", unwatched_init)
    got = dk.generate(prompt, prompt_lookup_num_tokens=4, return_dict_in_generate=True, **kwargs)
    assert torch.equal(got.sequences, plain)
    # 4 then 1 proposed and missed, then probes after pauses of 4, 8, 16 steps
    assert verifies == [5, 2, 2, 2, 2], verifies
    assert got.num_accepted_tokens == 0 and got.num_proposed_tokens == 8
    verifies.clear()
    monkeypatch.setattr(PromptLookupProposer, "propose", lambda self, ids, limit: (ids[0, :0], None))
    assert torch.equal(dk.generate(prompt, prompt_lookup_num_tokens=4, **kwargs), plain)
    assert verifies == []


def test_right_guesses_start_speculation_at_once(trio, monkeypatch):
    """Watched prompt lookup: the first step is plain, and the step after two right guesses in a row proposes."""
    _, dk, _ = trio
    prompt = repetitive_prompt(dk.config.vocab_size)
    kwargs = dict(max_new_tokens=12, eos_token_id=None)
    plain = dk.generate(prompt, **kwargs)[0, prompt.shape[1]:]
    right_from = 5  # guesses are wrong until the model's 5th new token, then always the model's own next tokens
    events = []

    def propose(self, ids, limit):
        n = ids.shape[1] - prompt.shape[1]  # new tokens so far
        events.append((n, limit))
        if n < right_from - 1:
            return torch.full((limit,), (int(plain[n]) + 1) % dk.config.vocab_size), None
        return plain[n: n + limit], None

    monkeypatch.setattr(PromptLookupProposer, "propose", propose)
    got = dk.generate(prompt, prompt_lookup_num_tokens=3, return_dict_in_generate=True, **kwargs)
    assert torch.equal(got.sequences[0, prompt.shape[1]:], plain)
    # Guesses (limit 1) at new tokens 1 .. 5; those at 4 and 5 are right, so the step after proposes 3, all kept
    assert events[:6] == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 3)], events
    assert got.num_accepted_tokens == got.num_proposed_tokens > 0


def test_verify_steps_slower_than_their_tokens_are_paused(trio, monkeypatch):
    """The tiny-model case: every proposal is partly kept, but a verify step costs more plain steps than it emits
    tokens. The schedule times a plain step (taking one when speculation never pauses by itself) and then pauses."""
    _, dk, _ = trio
    prompt = repetitive_prompt(dk.config.vocab_size)
    kwargs = dict(max_new_tokens=40, eos_token_id=None, cache_implementation="static")
    plain = dk.generate(prompt, **kwargs)[0, prompt.shape[1]:]

    def propose(self, ids, limit):  # the model's next token, then a wrong one: one of every two kept
        n = ids.shape[1] - prompt.shape[1]
        return torch.cat([plain[n: n + 1], (plain[n: n + 1] + 1) % dk.config.vocab_size])[:limit], None

    clock = [0.0]  # every reading advances it by 0.5 s: a plain step takes 0.5 s, a verify forward 10 s more
    real_verify = speculative._verify_forward

    def slow_verify(*args):
        clock[0] += 10.0
        return real_verify(*args)

    monkeypatch.setattr(PromptLookupProposer, "propose", propose)
    monkeypatch.setattr(speculative, "_verify_forward", slow_verify)
    monkeypatch.setattr(speculative, "_clock", lambda: clock.__setitem__(0, clock[0] + 0.5) or clock[0])

    def proposed(timed: bool, watch: bool) -> int:
        monkeypatch.setattr(speculative.ProposalSchedule, "timed", timed)
        if not watch:
            monkeypatch.setattr(speculative.ProposalSchedule, "__init__", unwatched_init)
        got = dk.generate(prompt, prompt_lookup_num_tokens=2, return_dict_in_generate=True, **kwargs)
        assert torch.equal(got.sequences[0, prompt.shape[1]:], plain)
        return got.num_proposed_tokens

    # Untimed, one kept of two pays by the count: after the first two (watched, plain) steps every step proposes
    # 2 and emits 2, until no room is left for the 40th token
    assert proposed(timed=False, watch=True) == 36
    # Timed: the watched plain steps are timed, so the first two verify steps already miss; then probes after
    # pauses of 4, 8, 16 plain steps (2 + 2 + 2 + 2 proposed)
    assert proposed(timed=True, watch=True) == 8
    # Unwatched: 4 verify steps go unpriced, then one plain step is taken to time it; then as above
    assert proposed(timed=True, watch=False) == 16


# ---------------------------------------------------------------------------------------------- cache rollback


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_crop_leaves_the_cache_plain_decoding_builds(trio, kind):
    _, dk, _ = trio
    prompt = repetitive_prompt(dk.config.vocab_size)
    L = prompt.shape[1]
    proposals = torch.tensor([[11, 12, 13, 14]])

    def make():
        return StaticCache(dk.config, 1, L + 8) if kind == "static" else DynamicCache()

    def feed(cache, tokens):
        start = cache.get_seq_length()
        positions = torch.arange(start, start + tokens.shape[1])[None]
        out = dk.model(input_ids=tokens, position_ids=positions, past_key_values=cache, use_cache=True)
        return dk.lm_head(out.last_hidden_state[:, -1])

    with torch.no_grad():
        speculated, plain = make(), make()
        feed(speculated, prompt)
        feed(speculated, proposals)  # four proposals in one forward, two of them rejected
        speculated.crop(L + 2)
        feed(plain, prompt)
        for i in range(2):
            feed(plain, proposals[:, i:i + 1])  # token by token, as plain decoding does
        assert speculated.get_seq_length() == plain.get_seq_length() == L + 2
        for layer in range(dk.config.num_hidden_layers):
            for ours, theirs in ((speculated.keys[layer], plain.keys[layer]),
                                 (speculated.values[layer], plain.values[layer])):
                assert ours.shape == theirs.shape  # static: the dropped slots are cleared too
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        # Decoding on from the rolled-back cache: the rejected entries are neither seen nor kept
        nxt = torch.tensor([[20]])
        torch.testing.assert_close(feed(speculated, nxt), feed(plain, nxt), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot roll back to 99 tokens; 19 are stored"):
        speculated.crop(99)


# ---------------------------------------------------------------------------------------------- sampling


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """(statistic, critical value at 0.999) of observed `counts` against `probs`; cells of probability 0 are left out
    of the degrees of freedom, and a draw in one makes the statistic infinite."""
    live = probs > 0
    if counts[~live].sum() > 0:
        return float("inf"), CHI2_999[int(live.sum()) - 2]
    expected = probs[live] * counts.sum()
    stat = float(((counts[live] - expected) ** 2 / expected).sum())
    return stat, CHI2_999[int(live.sum()) - 2]


def always_accept(probs, draft_probs, proposed, generator=None):
    """A wrong rule: keep every proposal (outputs the draft's distribution)."""
    return torch.cat([proposed, torch.multinomial(probs[-1], 1, generator=generator)])


def resample_from_target(probs, draft_probs, proposed, generator=None):
    """A wrong rule: the right acceptance test, but a rejection draws from p instead of the residual."""
    out = sampled_accept(probs, draft_probs, proposed, generator)
    n = out.shape[0] - 1
    if n < proposed.shape[0]:
        out[n] = torch.multinomial(probs[n], 1, generator=generator)[0]
    return out


def simulate(rule, p: torch.Tensor, q: torch.Tensor | None, draws: int, k: int = 2, seed: int = 0) -> torch.Tensor:
    """Counts (2, V) of the first two tokens a speculative decoder emits when the target's distribution at position
    j is p[j] whatever came before, and the draft's q[j] (None: prompt lookup always proposes tokens 1, 2, ...)."""
    gen = torch.Generator().manual_seed(seed)
    V = p.shape[1]
    counts = torch.zeros(2, V)
    for _ in range(draws):
        out: list[int] = []
        while len(out) < 2:
            j = len(out)
            if q is None:
                proposed, draft = torch.arange(1, k + 1), None
            else:
                draft = q[j:j + k]
                proposed = torch.multinomial(draft, 1, generator=gen)[:, 0]
            out += rule(p[j:j + k + 1], draft, proposed, gen).tolist()
        counts[0, out[0]] += 1
        counts[1, out[1]] += 1
    return counts


def fixed_distributions(V: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(4, V, generator=gen) * 1.5, dim=-1)
    p[:, 0] = 0.0  # a token the target never emits (as after top-k): speculation must not emit it either
    p = p / p.sum(-1, keepdim=True)
    q = torch.softmax(torch.randn(4, V, generator=gen) * 1.5, dim=-1)
    return p, q


@pytest.mark.parametrize("draft", ["distribution", "point_mass"])
def test_sampled_accept_gives_the_target_distribution(draft):
    p, q = fixed_distributions()
    counts = simulate(sampled_accept, p, q if draft == "distribution" else None, draws=2000)
    for j in range(2):
        stat, critical = chi_square(counts[j], p[j])
        assert stat < critical, (j, stat, critical)


@pytest.mark.parametrize("rule", [always_accept, resample_from_target])
def test_chi_square_detects_a_wrong_acceptance_rule(rule):
    p, q = fixed_distributions()
    counts = simulate(rule, p, q, draws=2000)
    stats = [chi_square(counts[j], p[j]) for j in range(2)]
    assert any(stat > critical for stat, critical in stats), stats


@pytest.mark.slow
def test_sampled_speculation_matches_the_target_end_to_end(tmp_path):
    """A vocabulary of 8, three new tokens with temperature, top-k and a repetition penalty: the draws' marginals of
    tokens 2 and 3 (the speculated ones) against the exact distribution from full forwards."""
    hf = oracle.build("llama", vocab_size=8)
    dk = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(hf, tmp_path)).eval()
    draft = noisy_copy(dk, 0.5, seed=1).eval()
    prompt = torch.tensor([[3, 4, 5, 3, 4]])
    settings = dict(do_sample=True, temperature=0.8, top_k=6, repetition_penalty=1.3, eos_token_id=None)
    processors = decoderkit.generation.logits_process.build_logits_processors(
        decoderkit.generation.GenerationConfig(**settings), prompt.shape[1])
    with torch.no_grad():
        # Exact joint over (t1, t2, t3): one batched forward per prefix length
        joint = torch.ones(1)
        prefixes = prompt
        for _ in range(3):
            logits = dk(prefixes).logits[:, -1].float()
            probs = processors(prefixes, logits).softmax(-1)  # (8^j, 8)
            joint = (joint[:, None] * probs).flatten()
            prefixes = torch.cat([prefixes.repeat_interleave(8, 0), torch.arange(8).repeat(prefixes.shape[0])[:, None]],
                                 dim=1)
    joint = joint.view(8, 8, 8)
    marginals = [joint.sum((0, 2)), joint.sum((0, 1))]
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(2, 8)
    for _ in range(600):
        out = dk.generate(prompt, max_new_tokens=3, assistant_model=draft, num_assistant_tokens=2, generator=gen,
                          **settings)[0, -2:]
        counts[0, out[0]] += 1
        counts[1, out[1]] += 1
    for j in range(2):
        stat, critical = chi_square(counts[j], marginals[j])
        assert stat < critical, (j, stat, critical)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_speculative_input(trio, tmp_path):
    _, dk, draft = trio
    prompt = repetitive_prompt(dk.config.vocab_size)
    other = oracle.build("llama", vocab_size=50)
    small = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(other, tmp_path)).eval()
    with pytest.raises(ValueError, match="vocabulary of 50 tokens, the model 97"):
        dk.generate(prompt, assistant_model=small)
    with pytest.raises(ValueError, match="not beam search"):
        dk.generate(prompt, assistant_model=draft, num_beams=2)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens` must be an integer >= 1"):
        dk.generate(prompt, prompt_lookup_num_tokens=0)
    with pytest.raises(ValueError, match="not both"):
        dk.generate(prompt, assistant_model=draft, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="assistant_model is on meta, the model on cpu"):
        dk.generate(prompt, assistant_model=copy.deepcopy(draft).to("meta"))
    with pytest.raises(ValueError, match="needs left padding"):
        dk.generate(torch.cat([prompt, prompt]), attention_mask=torch.tensor([[1] * 15 + [0]] * 2),
                    prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="use_cache=False"):
        dk.generate(prompt, prompt_lookup_num_tokens=3, use_cache=False)
    with pytest.raises(ValueError, match="must be a decoderkit causal LM"):
        dk.generate(prompt, assistant_model="path/to/draft")
    with pytest.raises(ValueError, match="num_assistant_tokens` must be an integer >= 1"):
        dk.generate(prompt, assistant_model=draft, num_assistant_tokens=0)
    with pytest.raises(ValueError, match="streams one sequence"):
        dk.generate(torch.cat([prompt, prompt]), prompt_lookup_num_tokens=3, stream=True)
