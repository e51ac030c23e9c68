"""Speculative decoding of a batch: every row proposes and keeps its own number of tokens per step.

Each step feeds every row its last token and its proposals, padded to the longest row's (`(B, 1 + k_max)`, the padding
masked out), at the row's own positions. Rows then keep different numbers of tokens, so the cache is re-laid out
after the step: each row's kept entries are moved to the right end of the key axis and the room on their left is
masked, exactly as a left-padded prompt is. The layout stays a left-padded one, which every position scheme reads
correctly (rotary and learned positions come from the position ids, ALiBi from key distances, which left padding
does not change), so each row's numbers are those of decoding it alone, up to the rounding of batched matmuls.

Logits processors and stopping criteria are applied one row at a time to the ids plain decoding would show them for
that row (the padded prompt and its own tokens so far).
"""

from __future__ import annotations

import copy
from collections.abc import Generator
from typing import Any

import torch

from decoderkit.cache import DynamicCache
from decoderkit.generation.acceptance import greedy_accept, sampled_accept

__all__ = ["batched_speculative_steps", "check_batch"]


def check_batch(plan: Any) -> None:
    """Raise ValueError for what batched speculation does not support."""
    if plan.streamer is not None:
        raise ValueError("speculative decoding streams one sequence: pass a single prompt with a streamer or "
                         "stream=True, or drop the streamer")
    mask = plan.padding
    if mask is not None and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise ValueError("speculative decoding of a batch needs left padding: the attention_mask has padding after "
                         "a token (pad on the left, as generate expects for decoder-only models)")
    if plan.config.return_dict_in_generate and (plan.config.output_scores or plan.config.output_logits):
        raise ValueError("speculative decoding of a batch does not return output_scores / output_logits; pass a "
                         "single prompt for them")
    if plan.config.repetition_penalty not in (None, 1.0) and mask is not None:
        raise ValueError("speculative decoding of a padded batch does not support repetition_penalty (its per-row "
                         "padding lengths follow the batch); decode the rows one by one or without speculation")


def batched_speculative_steps(plan: Any, proposer: Any) -> Generator[torch.Tensor, None, Any]:
    """Greedy or sampled speculative decoding of a batch (`plan.ids` has more than one row); each row gets its own
    copy of `proposer` (its own schedule, its own draft cache). Yields each step's emitted tokens per row (a list of
    (n_b,) tensors) and returns generate's output."""
    check_batch(plan)
    rows = plan.ids.shape[0]
    proposers = []
    for _ in range(rows):
        clone = copy.copy(proposer)
        clone.schedule = copy.deepcopy(proposer.schedule)
        proposers.append(clone)
    return _run(plan, proposers)


def _run(plan: Any, proposers: list) -> Generator[list[torch.Tensor], None, Any]:
    config, ids, processors, first = plan.config, plan.ids, plan.processors, plan.first
    B, L = ids.shape[0], plan.prompt.shape[1]
    device = ids.device
    valid = plan.padding.clone() if plan.padding is not None else torch.ones(B, L, dtype=torch.bool, device=device)
    pads = (~valid).sum(1).tolist()  # left padding of each row's prompt
    cur = [L] * B
    done = [plan.max_length == L] * B
    n_proposed = n_accepted = 0
    if all(done):
        return _output(plan, ids[:, first:L], 0, 0)
    cache = DynamicCache()
    for b, p in enumerate(proposers):
        p.start(ids[b:b + 1, pads[b]:L], processors, config.do_sample, plan.generator)
    with torch.no_grad():
        logits = plan._feed_prompt(cache)[:, None]  # (B, 1, V)
    proposed = [ids.new_empty(0) for _ in range(B)]
    draft_probs: list[torch.Tensor | None] = [None] * B
    guesses: list[int | None] = [None] * B  # a watching row's proposer's token for its plain step
    while True:
        emitted_now: list[torch.Tensor] = []
        kept = torch.zeros(B, logits.shape[1], dtype=torch.bool, device=device)  # fed slots that stay in the cache
        with torch.no_grad():
            for b in range(B):
                if done[b]:
                    emitted_now.append(ids.new_empty(0))
                    continue
                k = proposed[b].shape[0]
                row = logits[b, : k + 1]
                if processors:
                    prefix = torch.cat([ids[b, first:cur[b]], proposed[b]])[None]
                    n = cur[b] - first
                    row = torch.cat([processors(prefix[:, : n + i], row[i:i + 1]) for i in range(k + 1)])
                if config.do_sample:
                    emitted = sampled_accept(row.softmax(-1), draft_probs[b], proposed[b], plan.generator)
                else:
                    emitted = greedy_accept(row, proposed[b])
                if guesses[b] is not None:
                    proposers[b].schedule.watched(guesses[b] == int(emitted[0]))
                taken = 0
                for token in emitted.tolist():
                    ids[b, cur[b]] = token
                    cur[b] += 1
                    taken += 1
                    stop = plan.eos is not None and bool((plan.eos == token).any())
                    if not stop and plan.criteria:
                        stop = bool(plan.criteria(ids[b:b + 1, first:cur[b]], None).any())
                    if stop or cur[b] == plan.max_length:
                        done[b] = True
                        break
                kept[b, :taken] = True  # the last fed token and the proposals emitted after it
                emitted_now.append(emitted[:taken])
                if k:
                    accepted = emitted.shape[0] - 1
                    proposers[b].schedule.update(k, accepted)
                    proposers[b].feedback(k, accepted)
                    n_proposed += k
                    n_accepted += accepted
        yield emitted_now
        if all(done):
            break
        if cache.get_seq_length() > valid.shape[1]:
            valid = _relayout(cache, torch.cat([valid, kept], dim=1))
        with torch.no_grad():
            for b in range(B):
                proposed[b], draft_probs[b], guesses[b] = ids.new_empty(0), None, None
                if not done[b]:
                    schedule = proposers[b].schedule
                    want = schedule.next(plan.max_length - cur[b] - 1)
                    if want:
                        proposed[b], draft_probs[b] = proposers[b].propose(ids[b:b + 1, pads[b]:cur[b]], want)
                    elif schedule.watching:
                        guesses[b] = proposers[b].guess(ids[b:b + 1, pads[b]:cur[b]])
            width = 1 + max(p.shape[0] for p in proposed)
            feed = torch.full((B, width), plan.pad_token_id or 0, dtype=torch.long, device=device)
            fed = torch.zeros(B, width, dtype=torch.bool, device=device)
            for b in range(B):
                if not done[b]:
                    k = proposed[b].shape[0]
                    feed[b, 0] = ids[b, cur[b] - 1]
                    feed[b, 1:1 + k] = proposed[b]
                    fed[b, : 1 + k] = True
            positions = valid.sum(1, keepdim=True) + torch.arange(width, device=device)
            out = plan.model.model(input_ids=feed, attention_mask=torch.cat([valid, fed], dim=1).long(),
                                   position_ids=positions, past_key_values=cache, use_cache=True, validate=False)
            logits = plan.model.lm_head(out.last_hidden_state).float()  # (B, width, V)
    length = max(cur)
    return _output(plan, ids[:, first:length], n_proposed, n_accepted)


def _relayout(cache: DynamicCache, keep: torch.Tensor) -> torch.Tensor:
    """Move each row's kept cache entries (`keep` (B, T) bool) to the right end of a key axis as long as the longest
    row's, in order; returns the new (B, T') mask (False on the left of shorter rows)."""
    counts = keep.sum(1)
    width = int(counts.max())
    T = keep.shape[1]
    # Sorted by (kept, position): each row's dropped slots first, then its kept ones in order, right-aligned
    order = torch.argsort(keep.long() * T + torch.arange(T, device=keep.device), dim=1)
    index = order[:, T - width:]  # (B, width)
    new_mask = torch.arange(width, device=keep.device)[None] >= (width - counts)[:, None]
    for i in range(len(cache.keys)):
        k, v = cache.keys[i], cache.values[i]
        gather = index[:, None, :, None].expand(k.shape[0], k.shape[1], width, k.shape[3])
        cache.keys[i], cache.values[i] = k.gather(2, gather), v.gather(2, gather)
    return new_mask


def _output(plan: Any, sequences: torch.Tensor, proposed: int, accepted: int) -> Any:
    out = plan.output(sequences, (), ())
    if plan.config.return_dict_in_generate:
        out.num_proposed_tokens, out.num_accepted_tokens = proposed, accepted
    return out
