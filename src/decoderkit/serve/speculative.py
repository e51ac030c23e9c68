"""Speculative decoding in the serving engine: a decoding request's step carries proposed tokens, checked in one pass.

A speculating request feeds, after its last token, up to k tokens its proposer guesses (prompt lookup, or a draft
model with the model's vocabulary: `decoderkit.generation.speculative`), so its segment in the paged step has k + 1
tokens and k + 1 rows of logits come back. The rows are scored as k + 1 plain steps would score them (penalties count
the proposals before each row, logit bias, temperature, top-k, top-p: `sampler.processed_scores`) and the generate
side's acceptance rules decide what is emitted (`greedy_accept`; `sampled_accept`, the speculative-sampling rule, for
temperature > 0): greedy text is the plain engine's, sampled text is distributed as the plain engine's. The engine then
takes the emitted tokens one at a time as plain steps (stop tokens, stop strings, max_tokens) and rewinds the request's
cache past what was rejected: its fill position goes back and blocks past the kept tokens return to the pool.

Requests with a grammar or a token constraint do not speculate (the matcher would have to be advanced through
proposals and rolled back); every other option (logprobs, penalties, logit bias, stop strings) does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from decoderkit.generation.acceptance import greedy_accept, sampled_accept
from decoderkit.generation.speculative import DraftModelProposer, PromptLookupProposer, Proposer, check_draft
from decoderkit.serve.blocks import BlockPool
from decoderkit.serve.metrics import EngineCounters
from decoderkit.serve.requests import Request
from decoderkit.serve.sampler import Sampled, SampleRow, processed_scores

__all__ = ["Speculation", "Speculator"]

METHODS = ("lookup", "draft")


@dataclass
class Speculation:
    """One request's proposer and the proposals of the step it is scheduled in."""

    proposer: Proposer
    proposed: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None  # (k, V) the draft's distributions the proposals were drawn from
    started: bool = False
    guess: tuple[int, int] | None = None  # (length, token): the proposer's guess for a watched plain step


class Speculator:
    """Proposes tokens for the engine's decoding requests and verifies them against the step's logits.

    Args:
        method: "lookup" (prompt lookup over the prompt and the text so far) or "draft" (`draft_model` drafts).
        num_tokens: most tokens proposed per step and request; fewer after rejections (`ProposalSchedule`).
        draft_model: with "draft", a decoderkit causal LM with the model's vocabulary, on its device.
        model: the served model (to check the draft against).
        max_matching_ngram_size: longest n-gram prompt lookup matches.
    """

    def __init__(self, method: str, num_tokens: int = 5, *, draft_model: Any = None, model: Any = None,
                 max_matching_ngram_size: int = 2) -> None:
        if method not in METHODS:
            raise ValueError(f"speculative={method!r}: the server supports 'lookup' (prompt lookup) or 'draft' "
                             "(with draft_model=)")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {num_tokens!r}")
        if (method == "draft") != (draft_model is not None):
            raise ValueError("speculative='draft' needs draft_model= (and draft_model needs speculative='draft')")
        if draft_model is not None and model is not None:
            check_draft(model, draft_model)
        self.method, self.num_tokens, self.ngram = method, num_tokens, max_matching_ngram_size
        self.draft_model = draft_model.eval() if draft_model is not None else None

    def attach(self, req: Request) -> None:
        """Give a new request its proposer, unless its output is constrained (then it decodes plainly)."""
        if req.constraint is not None:
            return
        if self.draft_model is None:
            proposer: Proposer = PromptLookupProposer(self.num_tokens, self.ngram)
        else:
            proposer = DraftModelProposer(self.draft_model, self.num_tokens)
        req.speculation = Speculation(proposer)

    def schedule(self, req: Request, end: int | None, pool: BlockPool, max_context: int) -> None:
        """Set the tokens `req` feeds after its last one this step: none while it prefills (`end` None) or its
        schedule pauses, else what its proposer guesses within its token limits and the pool's free blocks (its
        blocks for tokens up to `end` are reserved already)."""
        spec: Speculation | None = req.speculation
        if spec is None:
            return
        if spec.proposed:  # proposed for a step it was preempted from: a draft's cache forgets them
            spec.proposer.feedback(len(spec.proposed), 0)
        spec.proposed, spec.draft_probs = [], None
        if end is None:
            return
        if not spec.started:
            spec.proposer.start(torch.tensor([req.prompt_ids]), *self._draft_sampling(req))
            spec.started = True
        schedule = spec.proposer.schedule
        if spec.guess is not None:  # the last step was plain and watched: was the guess the token it emitted?
            at, token = spec.guess
            if len(req.tokens) == at + 1:
                schedule.watched(req.tokens[-1] == token)
            spec.guess = None
        # Every step emits the model's own token too: proposals fill the room left after it
        room = min(req.params.max_tokens - req.num_generated, max_context - len(req.tokens)) - 1
        wanted = schedule.next(room)
        if wanted <= 0:
            if schedule.watching:
                token = spec.proposer.guess(torch.tensor([req.tokens], device=self._device()))
                spec.guess = (len(req.tokens), token) if token is not None else None
            return
        proposed, draft_probs = spec.proposer.propose(torch.tensor([req.tokens], device=self._device()), wanted)
        need = pool.blocks_for(end + proposed.shape[0]) - len(req.blocks)
        if need > pool.num_free:  # proposals only take free blocks: they never preempt another request
            spec.proposer.feedback(proposed.shape[0], 0)
            return
        if need > 0:
            req.blocks.extend(pool.allocate(need))
        spec.proposed, spec.draft_probs = proposed.tolist(), draft_probs

    def verify(self, req: Request, logits: torch.Tensor) -> list[Sampled]:
        """The tokens to emit, given `logits` (k + 1, V) after the last token and after each of the k proposals."""
        spec: Speculation = req.speculation
        proposed = torch.tensor(spec.proposed, device=logits.device)
        rows = self._rows(req, spec.proposed)
        scores = processed_scores(logits, rows)
        if rows[0].temperature > 0:
            emitted = sampled_accept(scores.softmax(-1), spec.draft_probs, proposed, req.generator)
        else:
            emitted = greedy_accept(scores, proposed)
        return _sampled(logits, emitted, rows[0].top_logprobs)

    def feedback(self, req: Request, accepted: int, counters: EngineCounters) -> None:
        """How many proposals the model kept: the schedule, a draft's cache and the engine's counters follow it."""
        spec: Speculation = req.speculation
        k = len(spec.proposed)
        spec.proposer.schedule.update(k, accepted)
        spec.proposer.feedback(k, accepted)
        counters.speculated(k, accepted)
        spec.proposed, spec.draft_probs = [], None

    @staticmethod
    def rewind(req: Request, pool: BlockPool) -> None:
        """Roll a verified request's cache back to its kept tokens: every token but the last emitted one is
        cached; the blocks past them go back to the pool (the rejected keys and values in a kept block are
        overwritten by later steps before anything reads them)."""
        req.num_cached = len(req.tokens) - 1
        keep = pool.blocks_for(req.num_cached)
        pool.release(req.blocks[keep:])
        del req.blocks[keep:]

    def _rows(self, req: Request, proposed: list[int]) -> list[SampleRow]:
        """The sample row of each of the k + 1 positions: penalties count the proposals before it, as the plain
        step at that position would count the tokens generated by then."""
        row = req.sample_row()
        if row.counts is None:
            return [row] * (len(proposed) + 1)
        seen = torch.zeros(len(proposed) + 1, row.counts.shape[0], device=row.counts.device)
        if proposed:
            at = torch.tensor(proposed, device=row.counts.device)
            inside = at < row.counts.shape[0]
            seen[1:][torch.arange(len(proposed), device=at.device)[inside], at[inside]] = 1
        counts = row.counts[None] + seen.cumsum(0)
        return [replace(row, counts=c) for c in counts]

    def _draft_sampling(self, req: Request) -> tuple[Any, bool, torch.Generator | None]:
        """What a draft model drafts from: greedy requests its argmax, sampled ones its distribution after the
        request's temperature, top-k and top-p (any distribution keeps the output exact; a closer one is kept more
        often)."""
        p = req.params
        if p.temperature == 0:
            return None, False, None
        row = SampleRow(p.temperature, p.top_p, p.top_k)
        return (lambda ids, logits: processed_scores(logits, [row] * logits.shape[0])), True, req.generator

    def _device(self) -> torch.device:
        return self.draft_model.device if self.draft_model is not None else torch.device("cpu")


def _sampled(logits: torch.Tensor, tokens: torch.Tensor, top_logprobs: int | None) -> list[Sampled]:
    """`tokens` (n,) as the sampler reports them, with the model's own log-probabilities when asked for (before
    penalties and temperature, as OpenAI reports them)."""
    ids = tokens.tolist()
    if top_logprobs is None:
        return [Sampled(t, None, []) for t in ids]
    logprobs = logits[: len(ids)].float().log_softmax(-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    if not top_logprobs:
        return [Sampled(t, c, []) for t, c in zip(ids, chosen)]
    top = logprobs.topk(top_logprobs, dim=-1)
    return [Sampled(t, c, list(zip(i, v))) for t, c, i, v in zip(ids, chosen, top.indices.tolist(),
                                                                   top.values.tolist())]
