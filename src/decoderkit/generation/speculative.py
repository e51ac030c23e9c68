"""Speculative decoding: propose several tokens cheaply, check them all in one forward pass of the model.

At batch 1 a decode step is bound by reading the weights; a forward over k + 1 tokens reads them once for all of them.
A *proposer* guesses the next tokens: :class:`PromptLookupProposer` copies what followed the latest n-gram where it
last occurred in the prompt or the text so far (transformers' ``prompt_lookup_num_tokens``), and
:class:`DraftModelProposer` runs a smaller model with the same vocabulary (transformers' ``assistant_model``). The
*verify step* feeds the last chosen token and the k proposals through the model over its cache, keeps the longest
prefix the model agrees with plus one token of the model's own, and rolls the cache back past the rest
(:meth:`~decoderkit.cache.Cache.crop`).

The output does not change:

- greedy decoding accepts a proposal only when it is the model's argmax, so the ids equal plain greedy decoding (up to
  the rounding of a k-row matmul against a 1-row one, which in fp32 never flips an argmax in practice);
- sampling uses the speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): accept proposal ``d`` with
  probability ``min(1, p(d) / q(d))``, else draw from ``normalise(max(0, p - q))``, where ``p`` and ``q`` are the
  model's and the proposer's distributions after the same logits processors and warpers. Prompt lookup proposes
  without a distribution: ``q`` is a point mass, so ``d`` is kept with probability ``p(d)``, else a token is drawn
  from ``p`` without ``d``. Either way each emitted token is distributed exactly as plain sampling would draw it;
- EOS, ``max_new_tokens`` and stop strings are checked token by token as in plain decoding, so nothing past them is
  emitted; ``output_scores`` / ``output_logits`` hold one entry per emitted token. With
  ``return_dict_in_generate=True`` the output also counts ``num_proposed_tokens`` and ``num_accepted_tokens``.

Cost: a step with nothing proposed (no lookup match, or the :class:`ProposalSchedule` pausing after repeated
misses) is a plain decoding step through the same decode step plain decoding uses, so open-ended text, where proposals
are rarely kept, decodes at about the plain rate. Prompt lookup is *watched* while paused (and at the start): its guess
for each plain step is compared with the token the model chooses, and proposing resumes only after two right ones in
a row, so where the text copies nothing almost no verify forward is spent. On CPU every step is timed, and steps whose
kept tokens do not pay for their forward (a model so small that a step is mostly per-call overhead) pause speculation
too.

Compiled: with ``compile="aot"`` the plain steps are the packaged decode step, with ``compile=True`` the
``torch.compile``'d one; the verify forwards are then the packaged verify step
(:mod:`decoderkit.generation.verify_step`: any number of proposals up to ``MAX_VERIFY_TOKENS - 1``, to which the
proposals are capped) where the model can have one (CPU, no tensor parallelism, rope that does not depend on the
length), else the model's eager forward.

Batches: a batch, or a padded prompt, decodes through :mod:`decoderkit.generation.speculative_batch`, where rows
keep different numbers of tokens per step (no streaming, no ``output_scores`` / ``output_logits``, no
``repetition_penalty`` with padding there; eager, whatever ``compile`` says). Greedy or sampling (beam search with
speculation is not defined).

bf16: greedy speculation verifies k + 1 tokens in one forward, whose matmuls round differently from the one-token
forwards of plain decoding, so a near-tie between the two best tokens can flip and the ids then diverge from plain
greedy decoding (each is still the model's argmax for the numbers it computed); in fp32 the rounding difference is
far below any gap between logits that occurs in practice.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import torch

from decoderkit.cache import DynamicCache
from decoderkit.generation.acceptance import greedy_accept, sampled_accept
from decoderkit.generation.aot_step import aot_unsupported
from decoderkit.generation.config import GenerationConfig
from decoderkit.generation.decode_step import forward_full
from decoderkit.generation.logits_process import LogitsProcessorList
from decoderkit.generation.speculative_batch import batched_speculative_steps
from decoderkit.generation.verify_step import MAX_VERIFY_TOKENS, VerifyStep

# What the schedule's timings read (process-wide wall time; a test replaces it with a clock it drives)
_clock = time.perf_counter

__all__ = ["ProposalSchedule", "Proposer", "PromptLookupProposer", "DraftModelProposer", "build_proposer",
           "check_draft", "greedy_accept", "sampled_accept", "speculative_steps"]


class ProposalSchedule:
    """How many tokens to propose at the next step, from how many the model kept at the last ones.

    Verifying k proposals costs one forward over k + 1 tokens: more than a plain step (on a CPU, a GEMM over two
    rows already costs much more than the GEMV of one), and wasted when they are rejected. So the number follows
    the acceptance: after a step that kept all k proposals, k + 2 (at most ``max_tokens``); after one that kept
    some, one more than were kept; after one that kept none, 1. A step *misses* when it kept nothing or, when the
    steps' ``cost`` is known (a step's time over a plain step's), when the recent verify steps emitted fewer tokens
    than they cost (a moving average of tokens per cost, over the steps that kept any, below 1: they were slower
    than plain decoding; one slow step among fast ones is not a miss, since how many are kept varies). After
    ``patience`` misses in a row nothing is proposed for ``pause`` steps: plain decoding steps, which cost exactly
    what plain decoding costs. Then one probe; a probe that misses doubles the pause (up to ``max_pause``), a step
    that pays resets it. With ``adaptive=False`` it is always ``max_tokens``.

    Watching (``watch=True``, for a proposer that is cheap to ask, such as prompt lookup's n-gram index): while
    paused, the caller asks the proposer for one token at each plain step (`watching`; `Proposer.guess`) and
    reports whether it was the token the model then chose (`watched`), which is whether a verify step there would
    have kept anything. A
    run starts so paused, and a pause after rejected proposals lasts until `WATCH_STREAK` guesses in a row are right
    rather than a number of steps, so text that does not copy (open-ended writing) spends almost no verify steps on
    proposals that would all be rejected. A pause after steps that kept tokens, but too few to pay for them, counts
    down as without watching: right guesses say nothing about the cost.

    Cost: the caller times every step (`record`); a plain step's time is the unit. When no plain step has been
    timed after ``calibrate_after`` verify steps (proposals always partly kept, so the schedule never pauses), one
    plain step is taken to time one. ``timed = False`` (a class attribute) ignores the clock: the schedule then
    depends on the acceptance alone, as tests need to pin it.
    """

    timed = True

    def __init__(self, max_tokens: int, adaptive: bool = True, patience: int = 2, pause: int = 4,
                 max_pause: int = 64, watch: bool = False, calibrate_after: int = 4) -> None:
        self.max_tokens, self.adaptive, self.watch = max_tokens, adaptive, watch and adaptive
        self.patience, self.first_pause, self.max_pause = patience, pause, max_pause
        self.calibrate_after = calibrate_after
        self.reset()

    def reset(self) -> None:
        """Start afresh (a new ``generate`` call): ``max_tokens`` at the first proposal, which is the first step
        unless watching (then the step after `WATCH_STREAK` right guesses in a row)."""
        self.tokens, self.misses, self.pause = self.max_tokens, 0, self.first_pause
        self.waiting, self.priced_out, self.watching, self.streak = (1 if self.watch else 0), False, False, 0
        self.plain_time: float | None = None
        self.unpriced = 0  # verify steps since the start with no plain step timed
        self.gain: float | None = None  # moving average of the verify steps' tokens per plain step's time

    def next(self, room: int) -> int:
        """Tokens to propose now (0: take a plain step), at most ``room``; called once per step. After a 0,
        `watching` says whether to report the proposer's guess for this step (`watched`)."""
        self.watching = False
        if self.waiting:
            if self.watch and not self.priced_out:
                self.watching = True  # until a guess is right
            else:
                self.waiting -= 1
            return 0
        if self.timed and self.adaptive and self.plain_time is None and self.unpriced >= self.calibrate_after:
            return 0
        return max(0, min(self.tokens, room))

    # Right guesses in a row that end a watched pause. One is not enough: a guess is right by chance now and then
    # (a common word after another), and the proposals after it, for the tokens that follow, are then rejected
    WATCH_STREAK = 2

    def watched(self, right: bool) -> None:
        """Whether the proposer's guess at a watched plain step was the model's token: `WATCH_STREAK` right ones in
        a row end the pause."""
        self.streak = self.streak + 1 if right else 0
        if self.streak >= self.WATCH_STREAK and not self.priced_out:
            self.waiting, self.streak = 0, 0

    def record(self, proposed: int, seconds: float) -> float | None:
        """A step that verified ``proposed`` tokens (0: a plain step) took ``seconds``; returns a verify step's
        cost in plain steps (None: no plain step timed yet, or ``timed`` is off)."""
        if not self.timed:
            return None
        if not proposed:
            self.plain_time = seconds if self.plain_time is None else 0.8 * self.plain_time + 0.2 * seconds
            return None
        if self.plain_time is None:
            self.unpriced += 1
            return None
        return seconds / self.plain_time

    def update(self, proposed: int, accepted: int, cost: float | None = None) -> None:
        """The model kept ``accepted`` of the ``proposed`` (>= 1) tokens, in a step that took ``cost`` plain steps'
        time (None: unknown)."""
        if not self.adaptive:
            return
        if accepted == proposed:
            self.tokens = min(self.max_tokens, self.tokens + 2)
        else:
            self.tokens = accepted + 1
        if cost is not None and accepted:
            # Tokens emitted per plain step's time, over the recent steps that kept any (the rejected ones are
            # misses anyway): whether keeping tokens pays for the forward that checks them
            gain = (1 + accepted) / cost
            self.gain = gain if self.gain is None else 0.7 * self.gain + 0.3 * gain
        if accepted and (self.gain is None or self.gain >= 1):
            self.misses, self.pause = 0, self.first_pause
            return
        self.misses += 1
        if self.misses >= self.patience:
            self.waiting, self.priced_out = self.pause, accepted > 0
            self.pause = min(2 * self.pause, self.max_pause)


class Proposer:
    """Guesses the next tokens of one sequence. Subclasses implement :meth:`propose`; :meth:`start` and
    :meth:`feedback` let a stateful proposer (a draft model and its cache) follow the generation. ``schedule``
    decides how many tokens are asked for at each step."""

    schedule: ProposalSchedule

    def start(self, prompt: torch.Tensor, processors: LogitsProcessorList, do_sample: bool,
              generator: torch.Generator | None) -> None:
        """Called once per ``generate`` call with the ``(1, L)`` prompt and the processors the target uses."""

    def propose(self, ids: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to ``limit`` (>= 1) tokens to follow ``ids`` (1, n): a ``(k,)`` LongTensor (k may be 0) and, when the
        tokens were drawn from a distribution, its ``(k, vocab)`` probabilities (None: each token is a certainty)."""
        raise NotImplementedError

    def feedback(self, proposed: int, accepted: int) -> None:
        """How many of the last proposals the model kept."""

    def guess(self, ids: torch.Tensor) -> int | None:
        """The one token this proposer would propose after ``ids`` (1, n), for a watched plain step (None: none)."""
        first = self.propose(ids, 1)[0]
        return int(first[0]) if first.numel() else None


class PromptLookupProposer(Proposer):
    """Prompt lookup decoding: find the latest ``n`` tokens (``n = max_matching_ngram_size`` down to 1) earlier in the
    sequence and propose up to ``num_tokens`` that followed the first such occurrence, as transformers'
    ``PromptLookupCandidateGenerator`` does; where nothing matches the step is a plain decoding step. Unlike
    transformers, the number proposed follows the acceptance (:class:`ProposalSchedule`): where the text stops
    copying its source, verifying doomed proposals costs more than it saves.

    The first occurrence of every n-gram is kept in an index that grows with the sequence, so a proposal costs a
    few dictionary lookups rather than a scan of the whole sequence: it is asked at every plain step the schedule
    watches, where a scan would cost a tenth of a small model's step."""

    def __init__(self, num_tokens: int = 10, max_matching_ngram_size: int = 2) -> None:
        for name, value in (("prompt_lookup_num_tokens", num_tokens),
                            ("max_matching_ngram_size", max_matching_ngram_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.num_tokens = num_tokens
        self.max_matching_ngram_size = max_matching_ngram_size
        # Cheap to ask beside a model step: the schedule can watch its guesses
        self.schedule = ProposalSchedule(num_tokens, watch=True)
        self._forget()

    def _forget(self) -> None:
        self._tokens: list[int] = []  # the sequence as far as it is indexed
        self._first: list[dict[tuple[int, ...], int]] = [{} for _ in range(self.max_matching_ngram_size)]
        self._indexed = 0  # n-grams ending before this position are in _first (by length - 1)

    def start(self, prompt, processors, do_sample, generator) -> None:
        self.schedule.reset()
        self._forget()

    def propose(self, ids: torch.Tensor, limit: int) -> tuple[torch.Tensor, None]:
        seq = ids[0]
        n_ids = seq.shape[0]
        tokens = self._tokens
        if len(tokens) > n_ids or (tokens and int(seq[len(tokens) - 1]) != tokens[-1]):
            self._forget()  # not a continuation of the indexed sequence (a caller that did not call start)
            tokens = self._tokens
        tokens.extend(seq[len(tokens):].tolist())
        # Windows that start before the final n-gram itself: those ending at positions up to n_ids - 2
        for end in range(self._indexed, n_ids - 1):
            for n in range(1, min(self.max_matching_ngram_size, end + 1) + 1):
                self._first[n - 1].setdefault(tuple(tokens[end - n + 1: end + 1]), end - n + 1)
        self._indexed = max(self._indexed, n_ids - 1)
        for n in range(min(self.max_matching_ngram_size, n_ids - 1), 0, -1):
            start = self._first[n - 1].get(tuple(tokens[n_ids - n:]))
            if start is not None:  # the first match; it has a continuation, as it ends before the last token
                begin = start + n
                return seq[begin: min(begin + limit, n_ids)], None
        return seq[:0], None


class DraftModelProposer(Proposer):
    """A smaller model with the target's vocabulary drafts the next tokens, one forward each, through its own cache.

    At most ``num_tokens`` proposals per step. With ``schedule="heuristic"`` or ``"heuristic_transient"`` the
    number follows the acceptance (:class:`ProposalSchedule`, which also stops drafting for a while after repeated
    misses), starting from ``num_tokens`` at each ``generate`` call (transformers' ``"heuristic"`` carries the
    number across calls); ``"constant"`` always drafts ``num_tokens``. Greedy decoding drafts the draft's argmax;
    sampling draws from the draft's distribution after the same processors and warpers as the target. Steps
    without proposals leave the draft's cache behind: the next proposal feeds it the missed tokens in one forward.
    """

    def __init__(self, assistant_model: Any, num_tokens: int = 20, schedule: str = "heuristic") -> None:
        if not hasattr(assistant_model, "lm_head") or not hasattr(assistant_model, "model"):
            raise ValueError(f"assistant_model must be a decoderkit causal LM, got {type(assistant_model).__name__}")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_assistant_tokens must be an integer >= 1, got {num_tokens!r}")
        if schedule not in ("heuristic", "heuristic_transient", "constant"):
            raise ValueError(f"num_assistant_tokens_schedule must be 'heuristic', 'heuristic_transient' or "
                             f"'constant', got {schedule!r}")
        self.model = assistant_model
        self.schedule = ProposalSchedule(num_tokens, adaptive=schedule != "constant")
        self.cache = DynamicCache()
        self.processors = LogitsProcessorList()
        self.do_sample = False
        self.generator: torch.Generator | None = None
        self._proposed_at = 0  # length of the sequence the last proposals continue

    def start(self, prompt, processors, do_sample, generator) -> None:
        self.cache = DynamicCache()
        self.processors, self.do_sample, self.generator = processors, do_sample, generator
        self.schedule.reset()

    @torch.no_grad()
    def propose(self, ids: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        k = limit
        n = ids.shape[1]
        seq = torch.empty(1, n + k, dtype=torch.long, device=ids.device)
        seq[:, :n] = ids
        fed = self.cache.get_seq_length()
        if fed >= n:
            # The whole sequence is cached (a caller rolled unverified proposals back to it): the last token is fed
            # again, its logits choose the first proposal
            self.cache.crop(n - 1)
            fed = n - 1
        probs: list[torch.Tensor] = []
        for i in range(k):
            end = n + i
            positions = torch.arange(fed, end, device=ids.device)[None]
            logits = forward_full(self.model, seq[:, fed:end], None, positions, self.cache)
            fed = end
            scores = self.processors(seq[:, :end], logits) if self.processors else logits
            if self.do_sample:
                p = scores.softmax(dim=-1)
                seq[:, end] = torch.multinomial(p, 1, generator=self.generator)[:, 0]
                probs.append(p[0])
            else:
                seq[:, end] = scores.argmax(dim=-1)
        self._proposed_at = n
        return seq[0, n:], (torch.stack(probs) if probs else None)

    def feedback(self, proposed: int, accepted: int) -> None:
        # The draft cache holds the sequence and all proposals but the last: keep what the target accepted
        self.cache.crop(min(self.cache.get_seq_length(), self._proposed_at + accepted))


def build_proposer(model: Any, config: GenerationConfig, assistant_model: Any, compile: bool) -> Proposer | None:
    """The proposer ``generate``'s arguments ask for (None: plain decoding), after checking they can speculate.

    Raises:
        ValueError: both proposers at once, beam search, or a draft model with another vocabulary or on another
            device than the model.
    """
    lookup = config.prompt_lookup_num_tokens
    if assistant_model is None and lookup is None:
        return None
    if assistant_model is not None and lookup is not None:
        raise ValueError("pass either assistant_model= (a draft model) or prompt_lookup_num_tokens= (prompt "
                         "lookup), not both")
    if config.num_beams > 1:
        raise ValueError(f"speculative decoding (assistant_model / prompt_lookup_num_tokens) is defined for greedy "
                         f"decoding and sampling, not beam search (num_beams={config.num_beams}); set num_beams=1")
    if lookup is not None:
        return PromptLookupProposer(lookup, config.max_matching_ngram_size or 2)
    proposer = DraftModelProposer(assistant_model, config.num_assistant_tokens, config.num_assistant_tokens_schedule)
    check_draft(model, assistant_model)
    return proposer


def check_draft(model: Any, assistant_model: Any) -> None:
    """Raise ValueError unless ``assistant_model`` can draft for ``model``: the same vocabulary size, the same
    device."""
    ours, theirs = model.config.vocab_size, assistant_model.config.vocab_size
    if ours != theirs:
        raise ValueError(f"assistant_model has a vocabulary of {theirs} tokens, the model {ours}: a draft model must "
                         "share the model's tokenizer and vocabulary size")
    if assistant_model.device != model.device:
        raise ValueError(f"assistant_model is on {assistant_model.device}, the model on {model.device}: move the "
                         "draft model to the model's device")


def _verify_forward(model: Any, cache: Any, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Logits (T, V) in fp32 at every position of ``tokens`` (1, T), fed over ``cache`` at positions start..."""
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
    out = model.model(input_ids=tokens, position_ids=positions, past_key_values=cache, use_cache=True,
                      validate=False)
    return model.lm_head(out.last_hidden_state[0]).float()


def speculative_steps(plan: Any, proposer: Proposer) -> Generator[torch.Tensor, None, Any]:
    """Greedy or sampled decoding of ``plan`` (generate's checked inputs) with ``proposer``: a generator of the
    emitted tokens, one ``(1,)`` tensor at a time, returning generate's output. The checks run now, not lazily.

    A batch (or a padded prompt) goes through
    :func:`~decoderkit.generation.speculative_batch.batched_speculative_steps`, where rows keep different numbers of
    tokens per step.
    """
    if plan.cache is None and plan.max_length > plan.prompt.shape[1]:
        raise ValueError("speculative decoding verifies proposals through the KV cache: it cannot run with "
                         "use_cache=False")
    draft = getattr(proposer, "model", None)
    if draft is not None and draft.decoder_config.hard_max_positions and (
            plan.max_length > draft.decoder_config.max_position_embeddings):
        raise ValueError(f"prompt + new tokens = {plan.max_length} tokens, longer than the assistant_model's context "
                         f"(max_position_embeddings={draft.decoder_config.max_position_embeddings})")
    if plan.ids.shape[0] > 1 or plan.padding is not None:
        return batched_speculative_steps(plan, proposer)
    return _run(plan, proposer)


def _run(plan: Any, proposer: Proposer) -> Generator[torch.Tensor, None, Any]:
    config, ids, streamer, cache = plan.config, plan.ids, plan.streamer, plan.cache
    processors, generator, schedule = plan.processors, plan.generator, proposer.schedule
    L = plan.prompt.shape[1]
    keep_scores = config.return_dict_in_generate and config.output_scores
    keep_logits = config.return_dict_in_generate and config.output_logits
    scores_out: tuple = ()
    raw_out: tuple = ()
    if streamer is not None:
        streamer.put(ids[:, :L].cpu())
    cur = L
    n_proposed = n_accepted = 0
    try:
        if plan.max_length == L:
            return _output(plan, ids[:, :cur], scores_out, raw_out, 0, 0)
        proposer.start(ids[:, :L], processors, config.do_sample, generator)
        with torch.no_grad():
            logits = plan.prefill()  # (1, V): the first token is chosen with nothing proposed
        # Steps with nothing proposed go through the plain decode step, so they cost what plain decoding costs
        plain_step = plan.stepper()
        # Compiled plain steps have a packaged verify step beside them (any k up to its limit) where the model can
        # have one (it takes the weights as inputs: any size); otherwise the model's own forward verifies
        verify = VerifyStep(plan.model, cache) if plan.compile and aot_unsupported(plan.model) is None else None
        most = MAX_VERIFY_TOKENS - 1 if verify is not None else plan.max_length
        proposed = ids.new_empty(0)
        draft_probs: torch.Tensor | None = None
        # What a verify forward costs against a plain step, timed where the work is done when the call returns (an
        # asynchronous device would time the launch); the schedule pauses speculation that does not pay for itself
        synchronous = ids.device.type == "cpu"
        cost: float | None = None  # of the last step, in plain steps, proposing included
        guess: int | None = None  # the proposer's token for a watched plain step
        while True:
            with torch.no_grad():
                k = proposed.shape[0]
                if processors:
                    # Row i continues the sequence plus the first i proposals, as plain decoding would see it
                    prefix = torch.cat([ids[0, :cur], proposed])[None]
                    scores = torch.cat([processors(prefix[:, : cur + i], logits[i:i + 1]) for i in range(k + 1)])
                else:
                    scores = logits
                if config.do_sample:
                    emitted = sampled_accept(scores.softmax(dim=-1), draft_probs, proposed, generator)
                else:
                    emitted = greedy_accept(scores, proposed)
            accepted = emitted.shape[0] - 1
            if guess is not None:
                schedule.watched(guess == int(emitted[0]))
            done = False
            for i, token in enumerate(emitted.tolist()):
                ids[0, cur] = token
                cur += 1
                if keep_scores:
                    scores_out += (scores[i:i + 1],)
                if keep_logits:
                    raw_out += (logits[i:i + 1].clone(),)
                done = plan.eos is not None and bool((plan.eos == token).any())
                if not done and plan.criteria:
                    done = bool(plan.criteria(ids[:, :cur], scores_out or None).any())
                step = ids[:, cur - 1]
                if streamer is not None:
                    streamer.put(step.cpu())
                yield step
                if done or cur == plan.max_length:
                    done = True
                    break
            # The cache holds every token but the last emitted: drop the rejected proposals (or, once stopped,
            # whatever followed the last emitted token)
            if cache.get_seq_length() > cur - 1:
                cache.crop(cur - 1)
            if k:
                schedule.update(k, accepted, cost)
                proposer.feedback(k, accepted)
                n_proposed += k
                n_accepted += accepted
            if done:
                break
            with torch.no_grad():
                # The model's own token is emitted with every step, so at most (room - 1) proposals can be used
                began, cost, guess = _clock(), None, None
                want = schedule.next(min(plan.max_length - cur - 1, most))
                proposed, draft_probs = proposer.propose(ids[:, :cur], want) if want else (ids.new_empty(0), None)
                if schedule.watching:
                    guess = proposer.guess(ids[:, :cur])
                if proposed.numel():
                    tokens = torch.cat([ids[0, cur - 1: cur], proposed])[None]
                    if verify is not None:
                        logits = verify(tokens, cur - 1)
                    else:
                        logits = _verify_forward(plan.model, cache, tokens, cur - 1)
                else:
                    if plain_step.filled != cur - 1:
                        plain_step.seek(cur - 1)
                    logits = plain_step(ids[:, cur - 1])
                if synchronous:
                    cost = schedule.record(proposed.numel(), _clock() - began)
    finally:
        if streamer is not None:
            streamer.end()
    return _output(plan, ids[:, :cur], scores_out, raw_out, n_proposed, n_accepted)


def _output(plan: Any, sequences: torch.Tensor, scores: tuple, raw: tuple, proposed: int, accepted: int) -> Any:
    out = plan.output(sequences, scores, raw)
    if plan.config.return_dict_in_generate:
        out.num_proposed_tokens, out.num_accepted_tokens = proposed, accepted
    return out
