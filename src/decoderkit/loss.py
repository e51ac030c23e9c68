"""The causal-LM loss, whole or in chunks of positions.

Full-vocabulary logits dominate a small model's training memory: 512 positions x 49152 entries x 4 bytes is 100 MB
per sequence, held three times over (logits, log-softmax saved for backward, its gradient). The chunked loss makes
the logits of a few hundred positions at a time, reduces them to a loss sum and drops them; the backward pass
remakes each chunk (torch.utils.checkpoint), so at most one chunk's logits is ever alive. Value and gradients are
those of the whole loss, up to the order of fp32 summation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# fp32 logits per chunk: 8M entries is 32 MB, large enough that each chunk is still one efficient matmul.
CHUNK_ELEMENTS = 1 << 23


def shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Flat next-token targets: position t predicts labels[t + 1]; the last position predicts nothing."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None,
                   ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross entropy in fp32: labels shift left inside, -100 is ignored."""
    shift = shifted_labels(labels, ignore_index).to(logits.device)
    flat = logits.float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, shift, ignore_index=ignore_index)
    return F.cross_entropy(flat, shift, ignore_index=ignore_index, reduction="sum") / num_items_in_batch


def _chunk_loss_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                           vocab_size: int, num_items_in_batch: int | torch.Tensor | None = None,
                           ignore_index: int = -100, chunk_elements: int | None = None) -> torch.Tensor:
    """`causal_lm_loss(head(hidden), labels, ...)` without ever holding the logits of every position.

    `hidden` is (B, T, E) and `head` maps it to (.., vocab_size) logits. Only positions with a target are projected,
    `chunk_elements` (default `CHUNK_ELEMENTS`) logits at a time.
    With no target at all the loss is 0 (a sum) or NaN (a mean), as the whole loss gives, and still has a graph.
    """
    shift = shifted_labels(labels, ignore_index).to(hidden.device)
    keep = (shift != ignore_index).nonzero().squeeze(1)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = shift.index_select(0, keep)
    total = hidden.sum().float() * 0.0
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab_size)
    for start in range(0, flat.shape[0], rows):
        part, wanted = flat[start:start + rows], targets[start:start + rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, head, part, wanted, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, part, wanted)
    denominator = keep.numel() if num_items_in_batch is None else num_items_in_batch
    return total / denominator
