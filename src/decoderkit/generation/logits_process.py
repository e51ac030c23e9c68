"""Logits processors and warpers: functions ``(input_ids, scores) -> scores`` applied before choosing a token.

Every processor here gives the same numbers as the transformers class of the same name on the same inputs (the tests
check this against transformers 5.23). Processors never modify ``scores`` in place, so a caller may keep the raw logits.

``input_ids`` is ``(batch, seq_len)``: prompt plus tokens generated so far. ``scores`` is ``(batch, vocab)``: logits for
greedy/sampling, log-probabilities for beam search. Filtered entries are set to ``filter_value`` (``-inf``).

:func:`build_logits_processors` assembles the list for a :class:`~decoderkit.generation.config.GenerationConfig` in the
order transformers applies them (see its docstring); order matters, e.g. top-p after temperature sees a flatter
distribution than top-p before it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from decoderkit.generation.config import GenerationConfig

__all__ = [
    "LogitsProcessor",
    "LogitsProcessorList",
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "MinPLogitsWarper",
    "TypicalLogitsWarper",
    "RepetitionPenaltyLogitsProcessor",
    "PresenceFrequencyPenaltyLogitsProcessor",
    "NoRepeatNGramLogitsProcessor",
    "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
    "build_logits_processors",
]

_NEG_INF = -math.inf


class LogitsProcessor:
    """Base class: subclasses implement ``__call__(input_ids, scores) -> scores`` without mutating ``scores``."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LogitsProcessorList(list):
    """A list of processors that is itself a processor: applies its members in order."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for processor in self:
            scores = processor(input_ids, scores)
        return scores


def _check_min_tokens_to_keep(min_tokens_to_keep: int) -> None:
    if not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be a positive integer, got {min_tokens_to_keep!r}")


class _EosMask:
    """EOS ids as an index tensor, cached per (vocab size, device) so the decode loop allocates nothing for it."""

    def __init__(self, eos_token_id: int | Sequence[int] | torch.Tensor):
        if isinstance(eos_token_id, torch.Tensor):
            ids = eos_token_id.flatten().tolist()
        elif isinstance(eos_token_id, int):
            ids = [eos_token_id]
        else:
            ids = list(eos_token_id)
        if not ids or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"eos_token_id must be an int or a non-empty list of ints, got {eos_token_id!r}")
        self.ids = ids
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def index(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        key = (vocab_size, device)
        if key not in self._cache:
            # ids outside the vocab cannot be produced by the head, so there is nothing to suppress for them
            valid = [i for i in self.ids if 0 <= i < vocab_size]
            self._cache[key] = torch.tensor(valid, dtype=torch.long, device=device)
        return self._cache[key]

    def suppress(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.index_fill(-1, self.index(scores.shape[-1], scores.device), _NEG_INF)


class TemperatureLogitsWarper(LogitsProcessor):
    """Divides the logits by ``temperature`` (> 0): below 1 sharpens the distribution, above 1 flattens it."""

    def __init__(self, temperature: float):
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a strictly positive float, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopKLogitsWarper(LogitsProcessor):
    """Keeps the ``max(top_k, min_tokens_to_keep)`` highest scores; ties with the k-th score are all kept."""

    def __init__(self, top_k: int, filter_value: float = _NEG_INF, min_tokens_to_keep: int = 1):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise ValueError(f"top_k must be a strictly positive integer, got {top_k!r}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.top_k = max(top_k, min_tokens_to_keep)
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth_best = torch.topk(scores, k).values[..., -1:]
        return scores.masked_fill(scores < kth_best, self.filter_value)


class TopPLogitsWarper(LogitsProcessor):
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probability mass is >= ``top_p``."""

    def __init__(self, top_p: float, filter_value: float = _NEG_INF, min_tokens_to_keep: int = 1):
        top_p = float(top_p)
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.top_p = top_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Ascending sort: a token is dropped when the mass of it and everything less likely stays within 1 - top_p.
        # This comparison (rather than `cumsum > top_p` on a descending sort) rounds exactly as transformers does.
        sorted_scores, sorted_idx = torch.sort(scores, descending=False)
        cum_probs = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        sorted_remove = cum_probs <= (1 - self.top_p)
        sorted_remove[..., -self.min_tokens_to_keep :] = False
        remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
        return scores.masked_fill(remove, self.filter_value)


class MinPLogitsWarper(LogitsProcessor):
    """Keeps tokens whose probability is at least ``min_p`` times the top token's probability."""

    def __init__(self, min_p: float, filter_value: float = _NEG_INF, min_tokens_to_keep: int = 1):
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.min_p = min_p
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = scores.softmax(dim=-1)
        remove = probs < self.min_p * probs.amax(dim=-1, keepdim=True)
        k = min(self.min_tokens_to_keep, probs.shape[-1])
        remove.scatter_(-1, torch.topk(probs, k, dim=-1).indices, False)
        return scores.masked_fill(remove, self.filter_value)


class TypicalLogitsWarper(LogitsProcessor):
    """Locally typical sampling: keeps the tokens whose surprisal is closest to the entropy, up to mass ``mass``."""

    def __init__(self, mass: float = 0.9, filter_value: float = _NEG_INF, min_tokens_to_keep: int = 1):
        mass = float(mass)
        if not 0.0 < mass < 1.0:
            raise ValueError(f"typical_p must be in (0, 1), got {mass}")
        _check_min_tokens_to_keep(min_tokens_to_keep)
        self.mass = mass
        self.filter_value = filter_value
        self.min_tokens_to_keep = min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        log_p = scores.log_softmax(dim=-1)
        # nansum: filtered tokens give -inf * 0 = nan, and contribute nothing to the entropy
        entropy = -(log_p * log_p.exp()).nansum(-1, keepdim=True)
        distance = (-log_p - entropy).abs()
        sorted_distance, sorted_idx = torch.sort(distance, descending=False)
        cum_probs = scores.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
        # The cut is the first position where the mass reaches `mass`; everything strictly farther is dropped
        last = (cum_probs < self.mass).sum(dim=-1, keepdim=True).clamp_(max=sorted_distance.shape[-1] - 1)
        sorted_remove = sorted_distance > sorted_distance.gather(-1, last)
        sorted_remove[..., : self.min_tokens_to_keep] = False
        remove = sorted_remove.scatter(-1, sorted_idx, sorted_remove)
        return scores.masked_fill(remove, self.filter_value)


class RepetitionPenaltyLogitsProcessor(LogitsProcessor):
    """CTRL repetition penalty: every token already in ``input_ids`` has its score divided by ``penalty`` if positive,
    multiplied if negative (so ``penalty > 1`` discourages repeats).

    ``prompt_ignore_length`` (an int, or a ``(batch,)`` tensor) excludes that many leading positions of each row;
    transformers' ``generate`` passes the left-padding length of each row so that pad tokens are not penalised.
    """

    def __init__(self, penalty: float, prompt_ignore_length: int | torch.Tensor | None = None):
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0:
            raise ValueError(f"repetition_penalty must be a strictly positive float, got {penalty!r}")
        if isinstance(prompt_ignore_length, int) and prompt_ignore_length < 0:
            raise ValueError(f"prompt_ignore_length must be >= 0, got {prompt_ignore_length}")
        if isinstance(prompt_ignore_length, torch.Tensor) and prompt_ignore_length.dim() != 1:
            raise ValueError("prompt_ignore_length must be an int or a 1-D tensor with one entry per row")
        self.penalty = float(penalty)
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        vocab_size = scores.shape[-1]
        ignore = self.prompt_ignore_length
        if isinstance(ignore, int):
            input_ids = input_ids[:, ignore:]
        elif isinstance(ignore, torch.Tensor):
            if ignore.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"prompt_ignore_length has {ignore.shape[0]} rows but input_ids has {input_ids.shape[0]}"
                )
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            input_ids = input_ids.masked_fill(positions < ignore.to(input_ids.device)[:, None], vocab_size)
        # Ignored positions and out-of-vocab ids point at a spare column that is dropped afterwards
        ids = input_ids.clamp(max=vocab_size)
        padded = torch.nn.functional.pad(scores, (0, 1))
        seen = padded.gather(-1, ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return padded.scatter(-1, ids, seen)[..., :vocab_size]


class PresenceFrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """OpenAI-style penalties over the generated tokens (decoderkit extension; transformers has no equivalent).

    With ``c[j]`` the number of times token ``j`` appears in ``input_ids[:, prompt_length:]``::

        scores[j] -= frequency_penalty * c[j] + presence_penalty * (c[j] > 0)

    As in the OpenAI API and vLLM, only generated tokens count, not the prompt. Both penalties are additive on the
    logits, so (unlike :class:`RepetitionPenaltyLogitsProcessor`) their effect does not depend on the logit's sign.
    """

    def __init__(self, presence_penalty: float = 0.0, frequency_penalty: float = 0.0, prompt_length: int = 0):
        for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        self.presence_penalty = float(presence_penalty)
        self.frequency_penalty = float(frequency_penalty)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        vocab_size = scores.shape[-1]
        counts = scores.new_zeros(scores.shape[0], vocab_size + 1)
        counts.scatter_add_(-1, generated.clamp(max=vocab_size), torch.ones_like(generated, dtype=scores.dtype))
        counts = counts[:, :vocab_size]
        return scores - self.frequency_penalty * counts - self.presence_penalty * (counts > 0).to(scores.dtype)


class NoRepeatNGramLogitsProcessor(LogitsProcessor):
    """Forbids any token that would repeat an n-gram (of size ``ngram_size``) already present in ``input_ids``."""

    def __init__(self, ngram_size: int):
        if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size <= 0:
            raise ValueError(f"no_repeat_ngram_size must be a strictly positive integer, got {ngram_size!r}")
        self.ngram_size = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = self.ngram_size
        seq_len = input_ids.shape[-1]
        if seq_len < n:
            return scores
        # The next token completes an n-gram whose first n-1 tokens are the current suffix. Any earlier window that
        # starts with that suffix bans its last token. Windows end at most at the last token, so the suffix itself
        # (which has no successor yet) never matches as a window start.
        suffix = input_ids[:, seq_len - n + 1 :]  # (B, n-1)
        windows = input_ids.unfold(1, n, 1)  # (B, W, n)
        matches = (windows[..., :-1] == suffix[:, None, :]).all(dim=-1)  # (B, W)
        vocab_size = scores.shape[-1]
        # Non-matching windows (and ids past the head's vocab) scatter into a spare column that is dropped
        targets = torch.where(matches, windows[..., -1].clamp(max=vocab_size), vocab_size)
        banned = torch.zeros(scores.shape[0], vocab_size + 1, dtype=torch.bool, device=scores.device)
        banned.scatter_(1, targets, True)
        return scores.masked_fill(banned[:, :vocab_size], _NEG_INF)


class MinLengthLogitsProcessor(LogitsProcessor):
    """Sets EOS scores to ``-inf`` while ``input_ids`` (prompt included) is shorter than ``min_length``."""

    def __init__(self, min_length: int, eos_token_id: int | Sequence[int] | torch.Tensor):
        if isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0:
            raise ValueError(f"min_length must be a non-negative integer, got {min_length!r}")
        self.min_length = min_length
        self._eos = _EosMask(eos_token_id)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self._eos.suppress(scores) if input_ids.shape[-1] < self.min_length else scores


class MinNewTokensLengthLogitsProcessor(LogitsProcessor):
    """Sets EOS scores to ``-inf`` until ``min_new_tokens`` tokens have been generated after the prompt."""

    def __init__(
        self, prompt_length_to_skip: int, min_new_tokens: int, eos_token_id: int | Sequence[int] | torch.Tensor
    ):
        for name, value in (("prompt_length_to_skip", prompt_length_to_skip), ("min_new_tokens", min_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        self.prompt_length_to_skip = prompt_length_to_skip
        self.min_new_tokens = min_new_tokens
        self._eos = _EosMask(eos_token_id)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.prompt_length_to_skip < self.min_new_tokens:
            return self._eos.suppress(scores)
        return scores


def build_logits_processors(
    config: GenerationConfig,
    prompt_length: int,
    attention_mask: torch.Tensor | None = None,
) -> LogitsProcessorList:
    """The processors ``config`` asks for, in the order transformers 5.23's ``_get_logits_processor`` applies them.

    Order (each only when active):

    1. ``RepetitionPenaltyLogitsProcessor`` (``repetition_penalty != 1``; left padding, read from ``attention_mask``
       of shape ``(rows, prompt_length)``, is excluded from the penalty as transformers does)
    2. ``PresenceFrequencyPenaltyLogitsProcessor`` (decoderkit only: either penalty != 0)
    3. ``NoRepeatNGramLogitsProcessor`` (``no_repeat_ngram_size > 0``)
    4. ``MinLengthLogitsProcessor`` (``min_length > 0`` and an EOS id)
    5. ``MinNewTokensLengthLogitsProcessor`` (``min_new_tokens > 0`` and an EOS id)

    then, only when ``do_sample`` (greedy and beam search ignore the warpers, as in transformers):

    6. ``TemperatureLogitsWarper`` (``!= 1``), 7. ``TopKLogitsWarper`` (``!= 0``), 8. ``TopPLogitsWarper`` (``< 1``),
    9. ``MinPLogitsWarper`` (set), 10. ``TypicalLogitsWarper`` (``< 1``).

    With beam sampling the warpers keep at least ``len(eos) + 1`` tokens so a non-EOS continuation always survives.

    Args:
        config: the generation config.
        prompt_length: length of the (padded) prompt, used by ``min_new_tokens`` and the OpenAI penalties.
        attention_mask: the prompt's attention mask, one row per sequence the processors will see (expanded to
            ``batch * num_beams`` rows for beam search).
    """
    processors = LogitsProcessorList()
    eos_ids = config.eos_token_ids

    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        # argmax finds the first non-pad position, i.e. the length of the left padding
        pad_lengths = (attention_mask != 0).int().argmax(dim=1) if attention_mask is not None else None
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty, pad_lengths))
    if config.presence_penalty or config.frequency_penalty:
        processors.append(
            PresenceFrequencyPenaltyLogitsProcessor(config.presence_penalty, config.frequency_penalty, prompt_length)
        )
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if eos_ids and config.min_length:
        processors.append(MinLengthLogitsProcessor(config.min_length, eos_ids))
    if eos_ids and config.min_new_tokens:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos_ids))

    if config.do_sample:
        keep = len(eos_ids) + 1 if config.num_beams > 1 and eos_ids else (2 if config.num_beams > 1 else 1)
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k, min_tokens_to_keep=keep))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p, min_tokens_to_keep=keep))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(config.min_p, min_tokens_to_keep=keep))
        if config.typical_p is not None and config.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(config.typical_p, min_tokens_to_keep=keep))
    return processors
