"""Log-probabilities in the two wire shapes OpenAI uses: chat's per-token entries and the legacy completions lists."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from decoderkit.serve.engine import TokenLogprob
from decoderkit.serve.protocol import ChoiceLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob


class LogprobFormatter:
    """Renders engine `TokenLogprob`s with each token's text as the tokenizer decodes it alone."""

    def __init__(self, tokenizer: Any) -> None:
        self.token_text = lru_cache(maxsize=1 << 16)(lambda token_id: tokenizer.decode([token_id]))

    def chat(self, logprobs: Sequence[TokenLogprob] | None) -> ChoiceLogprobs:
        entries = []
        for lp in logprobs or []:
            text = self.token_text(lp.token_id)
            tops = [TopLogprob(token=self.token_text(t), logprob=v, bytes=list(self.token_text(t).encode()))
                    for t, v in lp.top]
            entries.append(TokenLogprobEntry(token=text, logprob=lp.logprob, bytes=list(text.encode()),
                                             top_logprobs=tops))
        return ChoiceLogprobs(content=entries)

    def completion(self, logprobs: Sequence[TokenLogprob] | None, offset: int = 0,
                   unscored_first: int | None = None) -> CompletionLogprobs:
        """Legacy lists; `unscored_first` is the prompt's first token under echo, which nothing predicts (null)."""
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []

        def add(token_id: int, value: float | None, top: dict[str, float] | None) -> None:
            nonlocal offset
            text = self.token_text(token_id)
            tokens.append(text)
            values.append(value)
            tops.append(top)
            offsets.append(offset)
            offset += len(text)

        if unscored_first is not None:
            add(unscored_first, None, None)
        for lp in logprobs or []:
            top: dict[str, float] = {}
            for t, v in lp.top:  # ids that decode alike share a key: it keeps the likelier one's value
                top.setdefault(self.token_text(t), v)
            add(lp.token_id, lp.logprob, top)
        return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
