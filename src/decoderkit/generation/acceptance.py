"""The acceptance rules of speculative decoding: which proposals a verify step keeps, and what it emits after them.

Shared by ``generate`` (one sequence or a batch) and the server's engine.
"""

from __future__ import annotations

import torch

__all__ = ["greedy_accept", "sampled_accept"]


def greedy_accept(scores: torch.Tensor, proposed: torch.Tensor) -> torch.Tensor:
    """Greedy verification: ``scores`` (k + 1, V) are the model's processed scores after the sequence and after each
    of the ``proposed`` (k,) tokens. Returns the tokens to emit: the proposals up to the first one that is not the
    argmax, then the argmax at that position (1 to k + 1 tokens, each the argmax of its row)."""
    best = scores.argmax(dim=-1)  # (k + 1,)
    k = proposed.shape[0]
    agree = int((best[:k] == proposed).long().cumprod(0).sum()) if k else 0
    return best[: agree + 1]


def sampled_accept(probs: torch.Tensor, draft_probs: torch.Tensor | None, proposed: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The speculative-sampling rule. ``probs`` (k + 1, V): the model's distribution at each position;
    ``draft_probs`` (k, V): the distributions the ``proposed`` (k,) tokens were drawn from (None: point masses).

    Proposal ``d_i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection a token is
    drawn from ``normalise(max(0, p_i - q_i))`` and the step ends; when all are accepted one more is drawn from
    ``p_k``. Returns the tokens to emit (1 to k + 1); each is distributed as a direct draw from ``p``.
    """
    k = proposed.shape[0]
    out = torch.empty(k + 1, dtype=torch.long, device=probs.device)
    if k:
        rows = torch.arange(k, device=probs.device)
        p_d = probs[rows, proposed]
        q_d = draft_probs[rows, proposed] if draft_probs is not None else torch.ones_like(p_d)
        u = torch.rand(k, generator=generator, device=probs.device, dtype=p_d.dtype)
        # q_d > 0 always (d was drawn from q); u < p/q is u * q < p without the division
        accepted = (u * q_d < p_d).long().cumprod(0)
        n = int(accepted.sum())
        out[:n] = proposed[:n]
        if n < k:
            q = draft_probs[n] if draft_probs is not None else torch.nn.functional.one_hot(
                proposed[n], probs.shape[-1]).to(probs.dtype)
            residual = (probs[n] - q).clamp(min=0)
            if not bool(residual.sum() > 0):
                residual = probs[n]  # p == q up to rounding: rejection had probability ~0, any draw from p is exact
            out[n] = torch.multinomial(residual, 1, generator=generator)[0]
            return out[: n + 1]
    out[k] = torch.multinomial(probs[k], 1, generator=generator)[0]
    return out
