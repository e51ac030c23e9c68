"""Streaming generated tokens as they come: transformers-style streamers and the iterator of ``generate(stream=True)``.

A streamer is any object with ``put(token_ids)`` and ``end()``. ``generate`` calls ``put`` once with the prompt (a
``(1, prompt_len)`` tensor), then once per step with the new tokens (``(batch,)``), then ``end()``, exactly as
transformers' ``generate`` does, so transformers' own streamers work here too.

:class:`TextStreamer` and :class:`TextIteratorStreamer` turn the ids into text. With a decoderkit tokenizer they use its
:class:`~decoderkit.tokenizer.StreamDecoder`, which releases text only once it decodes to whole characters, so a
character split over several byte-level tokens never comes out as U+FFFD halves. With any other tokenizer (anything
with ``decode``) they follow transformers' rule: re-decode the pending ids and release text up to the last space,
holding back a trailing U+FFFD.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from queue import Queue
from typing import Any

import torch

__all__ = ["BaseStreamer", "GenerationStream", "TextIteratorStreamer", "TextStreamer"]


class BaseStreamer:
    """Interface ``generate`` drives: ``put`` for the prompt and then every step's tokens, ``end`` once at the end."""

    def put(self, value: torch.Tensor) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError


def _is_cjk(cp: int) -> bool:
    # The CJK blocks transformers' TextStreamer treats as words of their own (released without waiting for a space)
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


class TextStreamer(BaseStreamer):
    """Prints the text of a single sequence (batch size 1) to stdout as it is generated.

    Args:
        tokenizer: anything with ``decode(ids, **decode_kwargs) -> str``; a decoderkit tokenizer (with
            ``stream_decoder``) gets exact incremental decoding.
        skip_prompt: do not print the prompt ``generate`` passes first.
        decode_kwargs: passed to ``decode`` (``skip_special_tokens`` also to the stream decoder).
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self._expect_prompt = True
        self._decoder: Any = None  # a StreamDecoder, made on the first put once the prompt is known
        self._token_cache: list[int] = []
        self._print_len = 0

    def put(self, value: torch.Tensor) -> None:
        """Receive the prompt or one step's token (a tensor with one row); print what became printable."""
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        ids = [int(i) for i in value.reshape(-1).tolist()]
        is_prompt, self._expect_prompt = self._expect_prompt, False
        if hasattr(self.tokenizer, "stream_decoder"):
            self._put_exact(ids, is_prompt)
        elif not (is_prompt and self.skip_prompt):
            self._put_by_words(ids)

    def _put_exact(self, ids: list[int], is_prompt: bool) -> None:
        skip_special = bool(self.decode_kwargs.get("skip_special_tokens", False))
        if self._decoder is None:
            # A skipped prompt still gives the decoder its context: the first token then decodes with the leading
            # space (or not) it has after the prompt
            prefix = ids if is_prompt and self.skip_prompt else []
            self._decoder = self.tokenizer.stream_decoder(skip_special_tokens=skip_special, prefix_ids=prefix)
            if prefix:
                return
        text = "".join(self._decoder.push(i) for i in ids)
        if text:
            self.on_finalized_text(text)

    def _put_by_words(self, ids: list[int]) -> None:
        self._token_cache.extend(ids)
        text = self.tokenizer.decode(self._token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            printable = text[self._print_len :]
            self._token_cache, self._print_len = [], 0
        elif text.endswith("\ufffd"):
            printable = ""  # an incomplete multi-byte character: wait for the rest of its bytes
        elif text and _is_cjk(ord(text[-1])):
            printable = text[self._print_len :]
            self._print_len += len(printable)
        else:
            printable = text[self._print_len : text.rfind(" ") + 1]
            self._print_len += len(printable)
        if printable:
            self.on_finalized_text(printable)

    def end(self) -> None:
        """Flush whatever is still held back and signal the end of the stream."""
        if self._decoder is not None:
            text = self._decoder.flush()
        elif self._token_cache:
            text = self.tokenizer.decode(self._token_cache, **self.decode_kwargs)[self._print_len :]
        else:
            text = ""
        self._token_cache, self._print_len, self._decoder, self._expect_prompt = [], 0, None, True
        self.on_finalized_text(text, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        """Called with each released piece of text; prints it (override to send it elsewhere)."""
        print(text, flush=True, end="" if not stream_end else None)


class TextIteratorStreamer(TextStreamer):
    """A :class:`TextStreamer` whose text is read by iterating over it, typically while ``generate`` runs in a thread.

    Args:
        tokenizer: as for :class:`TextStreamer`.
        skip_prompt: do not yield the prompt.
        timeout: seconds to wait for the next piece before ``queue.Empty`` is raised (None waits forever).
        decode_kwargs: as for :class:`TextStreamer`.
    """

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None,
                 **decode_kwargs: Any) -> None:
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: Queue[str | None] = Queue()
        self.stop_signal = None
        self.timeout = timeout

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self.stop_signal, timeout=self.timeout)

    def __iter__(self) -> TextIteratorStreamer:
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value == self.stop_signal:
            raise StopIteration
        return value


class GenerationStream(Iterator[torch.Tensor]):
    """What ``generate(..., stream=True)`` returns: iterate to get each step's new token ids, a ``(batch,)`` tensor.

    Nothing is computed until the first ``next``. Rows that already finished get ``pad_token_id``, as in the returned
    sequences. Once exhausted, :attr:`result` holds what ``generate`` would have returned (the sequences, or the
    output object with ``return_dict_in_generate=True``).
    """

    def __init__(self, steps: Generator[torch.Tensor, None, Any]) -> None:
        self._steps = steps
        self._done = False
        self._result: Any = None

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self._done:
            raise StopIteration
        try:
            return next(self._steps)
        except StopIteration as stop:
            self._done, self._result = True, stop.value
            raise

    @property
    def result(self) -> Any:
        """The final output; raises ``RuntimeError`` while the stream is not exhausted."""
        if not self._done:
            raise RuntimeError("the stream is not finished: iterate over it first")
        return self._result

    def close(self) -> None:
        """Stop early (e.g. the consumer went away); the streamer, if any, still gets ``end()``."""
        self._steps.close()
        self._done = True
