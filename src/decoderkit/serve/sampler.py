"""One sampling call per engine step for every request in it.

Each request's parameters become a row of a tensor (temperature, top-k, top-p, penalties, logit bias, an allowed-token
mask), so the step costs a handful of batched operations and one transfer to the host, whatever the mix. Rows are
processed in the order the per-request logits processors use (`generation.logits_process`): penalties, logit bias,
the constraint mask, temperature, top-k, top-p. A sampled row draws with the exponential race (the argmax of p / E,
E ~ Exp(1), is a draw from p), its noise coming from the request's own generator: a seeded request gets the same
tokens whatever shares its step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

_NEG_INF = float("-inf")


class TokenConstraint(Protocol):
    """A per-request restriction of the next token (a grammar, a tool-call schema)."""

    def fill_mask(self, allowed: torch.Tensor) -> None:
        """Set `allowed` (a (V,) bool row, all True on entry) to False for every token that may not come next."""

    def accept(self, token_id: int) -> None:
        """Advance past the token the sampler chose."""

    def is_terminated(self) -> bool:
        """Whether nothing more may follow (the request then finishes with "stop")."""


@dataclass
class SampleRow:
    """What the sampler needs of one request for one step."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    counts: torch.Tensor | None = None  # (V,) times each token was generated so far; needed with penalties
    logit_bias: dict[int, float] | None = None
    generator: torch.Generator | None = None
    constraint: TokenConstraint | None = None
    top_logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k best


@dataclass
class Sampled:
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]


def processed_scores(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """The scores each row samples from (B, V) fp32: -inf where a token is ruled out; greedy rows pick their argmax."""
    scores = logits.float()
    b, v = scores.shape
    dev = scores.device
    penalised = [i for i, r in enumerate(rows) if r.presence_penalty or r.frequency_penalty]
    if penalised:
        counts = torch.stack([rows[i].counts[:v] for i in penalised]).to(dev)  # type: ignore[index]
        freq = torch.tensor([rows[i].frequency_penalty for i in penalised], device=dev)[:, None]
        pres = torch.tensor([rows[i].presence_penalty for i in penalised], device=dev)[:, None]
        index = torch.tensor(penalised, device=dev)
        scores = scores.index_put((index,), scores[index] - freq * counts - pres * (counts > 0).float())
    biased = [(i, t, bias) for i, r in enumerate(rows) if r.logit_bias for t, bias in r.logit_bias.items()]
    if biased:
        at, tokens, bias = zip(*biased)
        scores = scores.index_put((torch.tensor(at, device=dev), torch.tensor(tokens, device=dev)),
                                  torch.tensor(bias, device=dev), accumulate=True)
    constrained = [i for i, r in enumerate(rows) if r.constraint is not None]
    if constrained:
        allowed = torch.ones(len(constrained), v, dtype=torch.bool)
        for row, i in enumerate(constrained):
            rows[i].constraint.fill_mask(allowed[row])  # type: ignore[union-attr]
        index = torch.tensor(constrained, device=dev)
        scores = scores.index_put((index,), scores[index].masked_fill(~allowed.to(dev), _NEG_INF))
    sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
    if not sampled:
        return scores
    index = torch.tensor(sampled, device=dev)
    s = scores[index] / torch.tensor([rows[i].temperature for i in sampled], device=dev)[:, None]
    top_k = [rows[i].top_k if 0 < rows[i].top_k < v else v for i in sampled]
    if min(top_k) < v:
        # Ties with the k-th score are all kept, as TopKLogitsWarper keeps them.
        kth = s.topk(max(top_k), dim=-1).values.gather(1, torch.tensor(top_k, device=dev)[:, None] - 1)
        s = s.masked_fill(s < kth, _NEG_INF)
    top_p = torch.tensor([rows[i].top_p for i in sampled], device=dev)
    if bool((top_p < 1).any()):
        # Ascending sort and `cum <= 1 - p`, rounding exactly as TopPLogitsWarper does; the best token always stays.
        ordered, order = s.sort(dim=-1)
        remove = ordered.softmax(-1).cumsum(-1) <= (1 - top_p)[:, None]
        remove[:, -1] = False
        s = s.masked_fill(remove.scatter(1, order, remove), _NEG_INF)
    return scores.index_put((index,), s)


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[Sampled]:
    """Choose a token for every row of logits (B, V) with its row's parameters; one host transfer in all."""
    scores = processed_scores(logits, rows)
    dev = scores.device
    choice = scores.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
    if sampled:
        noise = torch.stack([torch.empty(scores.shape[1], device=dev).exponential_(generator=rows[i].generator)
                             for i in sampled])
        # exponential_ returns 0 for a uniform draw of exactly 0 (about once in 2**24 entries: every few hundred
        # steps over a large vocabulary); 0 / 0 would be NaN, which argmax picks, even for a ruled-out token.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        index = torch.tensor(sampled, device=dev)
        choice = choice.index_put((index,), (scores[index].softmax(-1) / noise).argmax(-1))
    want = [i for i, r in enumerate(rows) if r.top_logprobs is not None]
    parts = [choice.double()]
    k = 0
    if want:
        # Log-probabilities of the model's own distribution (before penalties and temperature), as OpenAI reports.
        index = torch.tensor(want, device=dev)
        logprobs = logits[index].float().log_softmax(-1)
        parts.append(logprobs.gather(1, choice[index][:, None])[:, 0].double())
        k = max(rows[i].top_logprobs or 0 for i in want)
        if k:
            top = logprobs.topk(k, dim=-1)
            parts += [top.indices.double().flatten(), top.values.double().flatten()]
    flat = torch.cat(parts).tolist()  # the step's one host sync
    b, n = len(rows), len(want)
    tokens = [int(t) for t in flat[:b]]
    out = [Sampled(t, None, []) for t in tokens]
    chosen = flat[b: b + n]
    ids, values = flat[b + n: b + n + n * k], flat[b + n + n * k:]
    for j, i in enumerate(want):
        kk = rows[i].top_logprobs or 0
        top = [(int(ids[j * k + m]), values[j * k + m]) for m in range(kk)]
        out[i] = Sampled(tokens[i], chosen[j], top)
    for i, r in enumerate(rows):
        if r.constraint is not None:
            r.constraint.accept(tokens[i])
    return out

