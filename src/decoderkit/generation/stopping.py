"""Stopping criteria: callables ``(input_ids) -> (batch,) bool`` telling which sequences are complete.

``input_ids`` is ``(batch, seq_len)`` and includes the token just generated. A generation loop ORs the criteria
(:class:`StoppingCriteriaList`) after appending each token, and pads the sequences that already finished.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from decoderkit.generation.config import GenerationConfig

__all__ = [
    "StoppingCriteria",
    "StoppingCriteriaList",
    "MaxLengthCriteria",
    "EosTokenCriteria",
    "StopStringCriteria",
    "SupportsDecode",
    "build_stopping_criteria",
]


class SupportsDecode(Protocol):
    """Anything with ``decode(ids) -> str``, e.g. decoderkit's or transformers' tokenizers."""

    def decode(self, token_ids: list[int]) -> str: ...


class StoppingCriteria:
    """Base class: ``__call__(input_ids, scores=None) -> BoolTensor`` of shape ``(batch,)``."""

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


class StoppingCriteriaList(list):
    """A list of criteria; a sequence is done when any criterion says so."""

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self:
            done = done | criterion(input_ids, scores, **kwargs)
        return done

    @property
    def max_length(self) -> int | None:
        """The ``max_length`` of the first :class:`MaxLengthCriteria`, if any."""
        return next((c.max_length for c in self if isinstance(c, MaxLengthCriteria)), None)


class MaxLengthCriteria(StoppingCriteria):
    """Done once the sequence (prompt included) reaches ``max_length`` tokens."""

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        done = input_ids.shape[-1] >= self.max_length
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class EosTokenCriteria(StoppingCriteria):
    """Done when the last token is any of ``eos_token_id``."""

    def __init__(self, eos_token_id: int | Sequence[int] | torch.Tensor):
        ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        self.eos_token_id = torch.as_tensor(ids, dtype=torch.long).flatten()

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.eos_token_id.device != input_ids.device:
            self.eos_token_id = self.eos_token_id.to(input_ids.device)
        return torch.isin(input_ids[:, -1], self.eos_token_id)


class StopStringCriteria(StoppingCriteria):
    """Done at the step whose token completes one of ``stop_strings`` in the decoded text.

    The stop string may begin in earlier tokens (including the prompt) but must end inside the newest token, possibly
    followed by more text of that token. This is the rule transformers' ``StopStringCriteria`` implements with its
    precomputed token tables, so both stop at the same step on ordinary tokenizers. Here it is checked on text: the
    tail of each row is decoded with and without the newest token, and the newest token's text starts where the two
    decodings first differ (robust to byte pieces that only become a character with the next token, and to decoders
    that rewrite a token's leading space). The tail grows until, past its possibly mis-decoded first token and any
    broken leading bytes, it holds enough characters before the newest token to contain the longest stop string; that
    costs a few short ``decode`` calls per row and step.

    Stop strings are compared as text, so a stop string containing U+FFFD (a broken byte sequence) is not supported.
    """

    def __init__(self, tokenizer: SupportsDecode, stop_strings: str | Sequence[str]):
        self.stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
        if not self.stop_strings or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        self.tokenizer = tokenizer
        self._context_chars = max(len(s) for s in self.stop_strings) - 1

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        done = [self._completes_stop_string(row) for row in input_ids.tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _completes_stop_string(self, ids: list[int]) -> bool:
        decode = self.tokenizer.decode
        # Start with one token per needed character plus slack: tokens almost always decode to >= 1 character
        window = min(len(ids), self._context_chars + 2)
        while True:
            tail = ids[-window:]
            before, text = decode(tail[:-1]), decode(tail)
            new_start = len(os.path.commonprefix([before, text]))
            if window == len(ids):
                break
            # A tail can decode differently at its start than the full sequence does: the first token may lose its
            # leading space, and bytes continuing a character begun before the tail show as U+FFFD. Only the text
            # after those is trusted as context for a stop string ending in the newest token.
            broken = max(len(decode(tail[:1])), len(before) - len(before.lstrip("\ufffd")))
            if new_start - broken >= self._context_chars:
                break
            window = min(len(ids), 2 * window)
        return any(text.find(s, max(0, new_start - len(s) + 1)) != -1 for s in self.stop_strings)


def build_stopping_criteria(
    config: GenerationConfig, max_length: int, tokenizer: SupportsDecode | None = None
) -> StoppingCriteriaList:
    """Max length, stop strings and EOS criteria for ``config``, as transformers' ``_get_stopping_criteria``.

    Args:
        config: the generation config (``stop_strings``, ``eos_token_id``).
        max_length: total length including the prompt, e.g. ``config.max_length_for(prompt_length)``.
        tokenizer: needed only when ``config.stop_strings`` is set.
    """
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length)])
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings is set, so generation needs the tokenizer to decode the generated text")
        criteria.append(StopStringCriteria(tokenizer, config.stop_strings))
    if config.eos_token_ids:
        criteria.append(EosTokenCriteria(config.eos_token_ids))
    return criteria
