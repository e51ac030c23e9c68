"""Tokenizers: Hugging Face `tokenizer.json` directories and GGUF vocabularies, behind a transformers-like API.

The encoding itself is done by the `tokenizers` library; this module adds what transformers layers on top of it
(special-token bookkeeping, padding, truncation, tensors, chat templates, saving) and streaming detokenisation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from .chat_template import ChatTemplateError, apply_chat_template
from .fileio import write_atomic
from .gguf_vocab import vocab_from_gguf

__all__ = [
    "AutoTokenizer",
    "BatchEncoding",
    "ChatTemplateError",
    "StreamDecoder",
    "Tokenizer",
    "tokenizer_from_gguf",
]

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
PADDING_VALUES = (False, True, "do_not_pad", "longest", "max_length")
TRUNCATION_VALUES = (None, False, True, "do_not_truncate", "longest_first", "only_first")
# transformers' "no limit" model_max_length; anything this large means "unknown".
VERY_LARGE_INTEGER = int(1e30)
_NO_LIMIT = int(1e29)
# transformers instantiates these classes for SentencePiece tokenizer.json files, and they default to left padding.
_LEFT_PADDING_CLASSES = frozenset({"LlamaTokenizer", "GemmaTokenizer", "CodeLlamaTokenizer", "CohereTokenizer"})
# tokenizer_config.json keys that the Tokenizer owns (rewritten on save); other keys are carried through untouched.
_MANAGED_CONFIG_KEYS = frozenset(
    {*SPECIAL_TOKEN_NAMES, "chat_template", "padding_side", "truncation_side", "model_max_length",
     "clean_up_tokenization_spaces", "added_tokens_decoder", "extra_special_tokens", "additional_special_tokens"}
)  # fmt: skip


class BatchEncoding(dict):
    """The output of a tokenizer call: a dict (`input_ids`, `attention_mask`) that also allows attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        """Move tensor values to `device` (in place) and return self."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


class Tokenizer:
    """A tokenizer over a `tokenizers.Tokenizer`, with the transformers `PreTrainedTokenizerFast` API that matters for
    decoder-only models. Build one with `AutoTokenizer.from_pretrained` or `tokenizer_from_gguf`."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        extra_special_tokens: Sequence[str] = (),
        chat_template: str | Mapping[str, str] | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        clean_up_tokenization_spaces: bool = False,
        config: Mapping[str, Any] | None = None,
        name_or_path: str = "",
    ) -> None:
        self._backend = backend
        # Padding and truncation are per call; settings baked into tokenizer.json must not leak into every encode.
        backend.no_padding()
        backend.no_truncation()
        self._special: dict[str, str | None] = {name: None for name in SPECIAL_TOKEN_NAMES}
        self._special.update(special_tokens or {})
        self.extra_special_tokens = list(extra_special_tokens)
        self.chat_template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = int(model_max_length) if model_max_length else VERY_LARGE_INTEGER
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.name_or_path = name_or_path
        self._config = dict(config or {})
        self._register_special_tokens()

    def _register_special_tokens(self) -> None:
        # As transformers does: a special token that the backend does not know as an added token is added as one,
        # so that its text is matched whole (a fresh id only if the vocabulary lacks it).
        added = {t.content for t in self._backend.get_added_tokens_decoder().values()}
        missing = [t for t in self.all_special_tokens if t not in added]
        if missing:
            self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    # ---------------------------------------------------------------------------------------------- special tokens

    def __getattr__(self, name: str) -> Any:
        # bos_token_id & co. for the model-specific tokens a config may declare (e.g. "image_token")
        special = self.__dict__.get("_special", {})
        if name in special:
            return special[name]
        if name.endswith("_token_id") and name.removesuffix("_id") in special:
            return self._special_id(name.removesuffix("_id"))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _special_id(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self.convert_tokens_to_ids(token)

    def _set_special(self, name: str, value: str | None) -> None:
        self._special[name] = None if value is None else str(value)

    bos_token = property(lambda self: self._special["bos_token"], lambda self, v: self._set_special("bos_token", v))
    eos_token = property(lambda self: self._special["eos_token"], lambda self, v: self._set_special("eos_token", v))
    unk_token = property(lambda self: self._special["unk_token"], lambda self, v: self._set_special("unk_token", v))
    pad_token = property(lambda self: self._special["pad_token"], lambda self, v: self._set_special("pad_token", v))
    bos_token_id = property(lambda self: self._special_id("bos_token"), doc="Id of `bos_token`, or None.")
    eos_token_id = property(lambda self: self._special_id("eos_token"), doc="Id of `eos_token`, or None.")
    unk_token_id = property(lambda self: self._special_id("unk_token"), doc="Id of `unk_token`, or None.")
    pad_token_id = property(lambda self: self._special_id("pad_token"), doc="Id of `pad_token`, or None.")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The named special tokens that are set (these are the variables chat templates see)."""
        return {name: token for name, token in self._special.items() if token is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens, then the extra special tokens, without repeats."""
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.extra_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of `all_special_tokens`."""
        return [i for i in (self.convert_tokens_to_ids(t) for t in self.all_special_tokens) if i is not None]

    @property
    def add_bos_token(self) -> bool:
        """Whether encoding with `add_special_tokens=True` puts `bos_token` first."""
        ids = self._backend.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id

    @property
    def add_eos_token(self) -> bool:
        """Whether encoding with `add_special_tokens=True` puts `eos_token` last."""
        ids = self._backend.encode("", add_special_tokens=True).ids
        return bool(ids) and ids[-1] == self.eos_token_id and not (len(ids) == 1 and self.add_bos_token)

    def add_special_tokens(self, tokens: Mapping[str, str]) -> int:
        """Set named special tokens (e.g. `{"pad_token": "<pad>"}`), adding them to the vocabulary if needed.

        Returns the number of tokens that were new to the vocabulary."""
        before = len(self)
        for name, token in tokens.items():
            if name in ("extra_special_tokens", "additional_special_tokens"):
                self.extra_special_tokens = list(dict.fromkeys([*self.extra_special_tokens, *token]))
            else:
                self._special[name] = str(token)
        self._register_special_tokens()
        return len(self) - before

    def add_tokens(self, tokens: str | Sequence[str], special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (matched whole in text); returns how many were new."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        added = [AddedToken(t, special=special_tokens, normalized=not special_tokens) for t in tokens]
        return self._backend.add_special_tokens(added) if special_tokens else self._backend.add_tokens(added)

    # -------------------------------------------------------------------------------------------------- vocabulary

    @property
    def backend_tokenizer(self) -> BackendTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | None | list[int | None]:
        """Id of a token (the unk id, or None without an unk token, when it is not in the vocabulary)."""
        if isinstance(tokens, str):
            token_id = self._backend.token_to_id(tokens)
            if token_id is None and self._special.get("unk_token") is not None:
                return self._backend.token_to_id(self._special["unk_token"])
            return token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(
        self, ids: int | Iterable[int], skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        """Token string(s) for id(s)."""
        if isinstance(ids, (int, np.integer)) or (isinstance(ids, torch.Tensor) and ids.ndim == 0):
            return self._backend.id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else ()
        return [self._backend.id_to_token(int(i)) for i in _to_list(ids) if int(i) not in skip]

    # ---------------------------------------------------------------------------------------------------- encoding

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        return_token_type_ids: bool | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """Tokenize one text or a batch.

        Args:
            text: a string, or a list of strings (a batch).
            add_special_tokens: add what the checkpoint's post-processor adds (e.g. BOS).
            padding: False / "do_not_pad", True / "longest" (to the longest in the batch), or "max_length".
            truncation: True / "longest_first" / "only_first" to cut to `max_length` (special tokens kept). None
                truncates only when `max_length` is given without padding, as transformers does.
            max_length: length limit for truncation and "max_length" padding (default: `model_max_length`).
            pad_to_multiple_of: round the padded length up to a multiple of this.
            padding_side: "left" or "right" for this call (default: `self.padding_side`).
            return_tensors: None (lists), "pt" (torch.LongTensor) or "np".
            return_attention_mask: include `attention_mask`.
            return_token_type_ids, verbose: accepted for transformers compatibility; decoder-only models take no
                token type ids, so none are returned.

        Returns:
            A `BatchEncoding` with `input_ids` (and `attention_mask`); for a single string the values are flat lists,
            or (1, T) tensors when `return_tensors` is set.
        """
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a list of str (pre-tokenized input is not supported)")
        pad_to, truncate_to = self._lengths(padding, truncation, max_length, pad_to_multiple_of)
        ids = self._encode_batch(texts, add_special_tokens, truncate_to) if texts else []
        masks = [[1] * len(seq) for seq in ids]
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if pad_to is not None:
            target = max((len(seq) for seq in ids), default=0) if pad_to == "longest" else pad_to
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            ids = [_pad(seq, target, self.pad_token_id, side) for seq in ids]
            masks = [_pad(mask, target, 0, side) for mask in masks]
        data = {"input_ids": ids, "attention_mask": masks} if return_attention_mask else {"input_ids": ids}
        if return_tensors is not None:
            return BatchEncoding({k: _as_tensor(v, return_tensors) for k, v in data.items()})
        return BatchEncoding(data if batched else {k: v[0] for k, v in data.items()})

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> list[int] | torch.Tensor | np.ndarray:
        """Token ids of one text (a (1, T) tensor when `return_tensors` is set)."""
        out = self(
            text,
            add_special_tokens=add_special_tokens,
            truncation=truncation,
            max_length=max_length,
            return_tensors=return_tensors,
            return_attention_mask=False,
        )
        return out["input_ids"]

    @property
    def _known_max_length(self) -> int | None:
        return self.model_max_length if self.model_max_length < _NO_LIMIT else None

    def _lengths(
        self, padding: Any, truncation: Any, max_length: int | None, pad_to_multiple_of: int | None
    ) -> tuple[int | str | None, int | None]:
        """(pad target: None, "longest" or a length; truncation length or None), following transformers' rules."""
        if padding not in PADDING_VALUES or not isinstance(padding, (bool, str)):
            raise ValueError(f"padding must be one of {PADDING_VALUES}, got {padding!r}")
        if truncation not in TRUNCATION_VALUES or not isinstance(truncation, (bool, str, type(None))):
            raise ValueError(f"truncation must be one of {TRUNCATION_VALUES}, got {truncation!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # transformers: a bare max_length means "truncate to it"
        truncate = truncation not in (None, False, "do_not_truncate")
        pad_to: int | str | None = None
        if padding in (True, "longest"):
            pad_to = "longest"
        elif padding == "max_length":
            pad_to = max_length if max_length is not None else self._known_max_length
            if pad_to is None:
                raise ValueError("padding='max_length' needs max_length (this tokenizer has no model_max_length)")
        if pad_to is not None and self.pad_token_id is None:
            raise ValueError(
                "Asking to pad but the tokenizer does not have a padding token. Set one, e.g. "
                "`tokenizer.pad_token = tokenizer.eos_token`, or add one with "
                "`tokenizer.add_special_tokens({'pad_token': '<pad>'})`."
            )
        truncate_to = (max_length if max_length is not None else self._known_max_length) if truncate else None
        if truncate_to is not None and pad_to is not None and pad_to_multiple_of and truncate_to % pad_to_multiple_of:
            raise ValueError(
                f"Truncation and padding are both on, but the truncation length ({truncate_to}) is not a multiple "
                f"of pad_to_multiple_of ({pad_to_multiple_of})."
            )
        return pad_to, truncate_to

    def _encode_batch(self, texts: list[str], add_special_tokens: bool, truncate_to: int | None) -> list[list[int]]:
        post = self._backend.post_processor
        if truncate_to is None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        # Truncate the text's tokens first and add the special tokens after, so BOS/EOS survive truncation.
        n_special = post.num_special_tokens_to_add(False) if add_special_tokens and post is not None else 0
        out = []
        for encoding in self._backend.encode_batch(texts, add_special_tokens=False):
            encoding.truncate(max(truncate_to - n_special, 0), direction=self.truncation_side)
            if add_special_tokens:
                encoding = self._backend.post_process(encoding, add_special_tokens=True)
            out.append(encoding.ids)
        return out

    # ---------------------------------------------------------------------------------------------------- decoding

    def decode(
        self,
        token_ids: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | np.ndarray,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str | list[str]:
        """Text of a sequence of ids; a batch (list of lists, 2-D tensor) gives a list of texts."""
        ids = _to_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            return [self.decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in ids]
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        cleanup = clean_up_tokenization_spaces
        if cleanup is None:
            cleanup = self.clean_up_tokenization_spaces
        # transformers never applies this WordPiece-era cleanup to BPE models: it would delete real spaces.
        if cleanup and type(self._backend.model).__name__ != "BPE":
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
                text = text.replace(before, after)
        return text

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor | np.ndarray, skip_special_tokens: bool = False
    ) -> list[str]:
        """Texts of a batch of id sequences."""
        out = self.decode(sequences, skip_special_tokens=skip_special_tokens)
        return [out] if isinstance(out, str) else out

    def stream_decoder(self, skip_special_tokens: bool = False, prefix_ids: Sequence[int] = ()) -> StreamDecoder:
        """A `StreamDecoder` over this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens, prefix_ids=prefix_ids)

    # ---------------------------------------------------------------------------------------------- chat templates

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = False,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: Mapping[str, Any] | None = None,
        **template_kwargs: Any,
    ) -> str | list[str] | list[int] | list[list[int]] | torch.Tensor | np.ndarray | BatchEncoding:
        """Render a conversation (or a batch of them) with the chat template, as transformers does.

        The template sees `messages`, `tools`, `documents`, `add_generation_prompt`, the special tokens
        (`bos_token`, `eos_token`, ...) and `template_kwargs` (e.g. `enable_thinking=False`). With `tokenize=True`
        the text is encoded without adding special tokens (the template writes them).

        Returns:
            The text (`tokenize=False`), the ids, or with `return_dict=True` a `BatchEncoding` (which also holds
            `assistant_masks` when `return_assistant_tokens_mask`, for templates with `{% generation %}` blocks).
            Note: `return_dict` defaults to False here (ids, as in transformers 4.x); transformers 5.x defaults to
            True.

        Raises:
            ChatTemplateError (a ValueError): the template does not compile or raises.
        """
        return apply_chat_template(
            self,
            conversation,
            tools=tools,
            documents=documents,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=tokenize,
            return_dict=return_dict,
            return_assistant_tokens_mask=return_assistant_tokens_mask,
            encode_kwargs={
                "padding": padding, "truncation": truncation, "max_length": max_length,
                "return_tensors": return_tensors, **dict(tokenizer_kwargs or {}),
            },  # fmt: skip
            template_kwargs={**self.special_tokens_map, **template_kwargs},
        )

    # ------------------------------------------------------------------------------------------------------ saving

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json.

        Each file is written under a temporary name in `save_directory` and renamed into place, so a reader never sees
        a half-written file and files already in the directory (a model's weights) are left alone."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in self._config.items() if k not in _MANAGED_CONFIG_KEYS}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.update(self.special_tokens_map)
        config.update(
            padding_side=self.padding_side,
            truncation_side=self.truncation_side,
            clean_up_tokenization_spaces=self.clean_up_tokenization_spaces,
            added_tokens_decoder={
                str(i): {
                    "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                    "single_word": t.single_word, "special": t.special,
                }  # fmt: skip
                for i, t in sorted(self._backend.get_added_tokens_decoder().items())
            },
        )
        config["model_max_length"] = self.model_max_length
        if self.extra_special_tokens:
            config["extra_special_tokens"] = list(self.extra_special_tokens)
        if isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        files = {
            "tokenizer.json": self._backend.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n",
        }
        for name, content in files.items():
            write_atomic(directory / name, content)
        return tuple(str(directory / name) for name in files)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"len={len(self)}, padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})"
        )


def cleanup_flag(value: Any) -> bool:
    """`clean_up_tokenization_spaces` as a bool (configs sometimes hold strings)."""
    return value is True or (isinstance(value, str) and value.lower() == "true")


class StreamDecoder:
    """Incremental detokenisation: push ids one at a time, get back the text they complete.

    Text is only released once it decodes to whole characters (a byte-fallback or byte-level token can carry part of
    a UTF-8 sequence), and it is always a slice of the full decode, so that the concatenation of everything `push`
    and `flush` return equals `tokenizer.decode(all_ids)`; with `prefix_ids` it equals the text that the pushed ids
    add after the prefix. Each step decodes only a short window, starting at the last point where text was released:
    a SentencePiece decoder strips the window's leading space on both sides of the comparison alike.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False, prefix_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A few tokens of context are enough to decode the first pushed token the way it reads after the prefix.
        self._ids: list[int] = [int(i) for i in list(prefix_ids)[-8:]]
        self._start = 0  # window start
        self._released = len(self._ids)  # ids whose text has been returned
        self._released_text = self._decode(self._ids)  # decode(ids[_start:_released])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is still incomplete)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids[self._start :])
        if len(text) <= len(self._released_text) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._released_text) :]
        self._start, self._released = self._released, len(self._ids)
        self._released_text = self._decode(self._ids[self._start : self._released])
        return new

    def flush(self) -> str:
        """Return whatever is still held back, at the end of a stream (an incomplete character comes out as U+FFFD)."""
        text = self._decode(self._ids[self._start :])
        new = text[len(self._released_text) :]
        if new:
            self._start, self._released = self._released, len(self._ids)
            self._released_text = self._decode(self._ids[self._start : self._released])
        return new


# ---------------------------------------------------------------------------------------------------------- loading


class AutoTokenizer:
    """Entry point mirroring `transformers.AutoTokenizer`."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike, gguf_file: str | None = None, **overrides: Any) -> Tokenizer:
        """Load a tokenizer from a Hugging Face model directory (tokenizer.json + tokenizer_config.json) or a GGUF file.

        Args:
            path: a directory, a `.gguf` file, or a hub repo id already in the local Hugging Face cache.
            gguf_file: a GGUF file name inside `path` (as in transformers).
            **overrides: tokenizer_config.json values to override (`padding_side`, `pad_token`, `chat_template`, ...).
        """
        if not Path(path).exists():
            from .checkpoint import resolve_model_path

            path = resolve_model_path(path)
        path = Path(path)
        if gguf_file is not None:
            path = path / gguf_file
        if path.is_file() and path.suffix == ".gguf":
            return tokenizer_from_gguf(path, **overrides)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such directory or .gguf file; expected a model directory with a "
                                    "tokenizer.json, or a .gguf file")  # fmt: skip
        return _from_directory(path, overrides)


def tokenizer_from_gguf(source: str | os.PathLike | Any, **overrides: Any) -> Tokenizer:
    """Build a `Tokenizer` from a GGUF file's vocabulary (a path or a `gguf.GGUFReader`).

    BOS/EOS are added as the file says (`tokenizer.ggml.add_bos_token` / `add_eos_token`, else llama.cpp's default for
    the vocabulary type), and the chat template is taken from `tokenizer.chat_template`."""
    vocab = vocab_from_gguf(source)
    backend = vocab.backend
    backend.post_processor = vocab.post_processor()
    specials = dict(vocab.special_tokens)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "chat_template": vocab.chat_template}
    config.update(overrides)
    name = str(getattr(source, "path", source))
    return _build(backend, config, name_or_path=name, default_padding_side="right")


def _from_directory(directory: Path, overrides: Mapping[str, Any]) -> Tokenizer:
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        found = sorted(p.name for p in directory.iterdir())
        hint = ""
        if "tokenizer.model" in found:
            hint = (" It has a SentencePiece tokenizer.model only: convert it once with transformers "
                    "(AutoTokenizer.from_pretrained(dir).save_pretrained(dir)).")  # fmt: skip
        elif any(name.endswith(".gguf") for name in found):
            hint = " It holds a .gguf file: pass gguf_file=<name> to load that file's vocabulary."
        raise FileNotFoundError(
            f"{directory}: no tokenizer.json (looked for tokenizer.json, tokenizer_config.json, "
            f"special_tokens_map.json, chat_template.jinja; found {found[:20]}).{hint}"
        )
    try:
        backend = BackendTokenizer.from_file(str(tokenizer_file))
    except Exception as err:
        raise ValueError(f"{tokenizer_file}: not a valid tokenizers file ({err})") from err
    config = _read_json(directory / "tokenizer_config.json")
    # The legacy special_tokens_map.json counts only for configs that predate added_tokens_decoder (as in transformers)
    if "added_tokens_decoder" not in config:
        config.update(_read_json(directory / "special_tokens_map.json"))
    templates = _chat_template_files(directory)
    if templates:
        config["chat_template"] = templates["default"] if list(templates) == ["default"] else templates
    config.update(overrides)
    _add_config_tokens(backend, config.get("added_tokens_decoder") or {})
    tokenizer_class = str(config.get("tokenizer_class") or "").removesuffix("Fast")
    byte_level = _is_byte_level(backend) if tokenizer_class in _LEFT_PADDING_CLASSES else True
    if tokenizer_class == "LlamaTokenizer" and not byte_level:
        _use_llama_tokenizer_pipeline(backend, config)
    left = tokenizer_class in _LEFT_PADDING_CLASSES and not byte_level
    return _build(backend, config, name_or_path=str(directory), default_padding_side="left" if left else "right")


def _build(
    backend: BackendTokenizer, config: dict[str, Any], name_or_path: str, default_padding_side: str
) -> Tokenizer:
    specials = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    # Model-specific named tokens (e.g. "image_token") are special tokens and template variables too.
    for key, value in config.items():
        if key.endswith("_token") and key not in specials and isinstance(value, str):
            specials[key] = value
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    if isinstance(extra, Mapping):
        specials.update({k: _token_text(v) for k, v in extra.items()})
        extra = []
    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):
        chat_template = {t["name"]: t["template"] for t in chat_template}
    padding = backend.padding or {}
    if specials["pad_token"] is None and padding.get("pad_token"):
        specials["pad_token"] = padding["pad_token"]
    return Tokenizer(
        backend,
        special_tokens=specials,
        extra_special_tokens=[_token_text(t) for t in extra],
        chat_template=chat_template,
        padding_side=config.get("padding_side") or padding.get("direction") or default_padding_side,
        truncation_side=config.get("truncation_side") or "right",
        model_max_length=config.get("model_max_length"),
        clean_up_tokenization_spaces=cleanup_flag(config.get("clean_up_tokenization_spaces", False)),
        config=config,
        name_or_path=name_or_path,
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


def _chat_template_files(directory: Path) -> dict[str, str]:
    """chat_template.jinja and additional_chat_templates/*.jinja, which take priority over tokenizer_config.json."""
    templates = {}
    if (directory / "chat_template.jinja").is_file():
        templates["default"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    extra = directory / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    return templates


def _add_config_tokens(backend: BackendTokenizer, decoder: Mapping[str, Any]) -> None:
    """Add tokenizer_config.json added tokens the tokenizer.json lacks (hand-edited configs)."""
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    for spec in decoder.values():
        if isinstance(spec, Mapping) and spec.get("content") not in known:
            fields = {k: spec[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in spec}
            token = AddedToken(spec["content"], **fields)
            (backend.add_special_tokens if spec.get("special") else backend.add_tokens)([token])


def _use_llama_tokenizer_pipeline(backend: BackendTokenizer, config: Mapping[str, Any]) -> None:
    """Replace a SentencePiece tokenizer.json's normalizer, pre-tokenizer and decoder by the ones transformers'
    LlamaTokenizer builds, because transformers (the reference we match) ignores the file's for that class.

    The difference shows on text starting with a space and on text right after a special token: a legacy
    tokenizer.json (Prepend("▁") normalizer) writes "<s>[INST]" as <s> ▁[INST], transformers as <s> [INST].
    """
    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)


def _is_byte_level(backend: BackendTokenizer) -> bool:
    # Components pickle to their JSON form, which names nested steps too (a Sequence containing ByteLevel).
    parts = (backend.pre_tokenizer, backend.decoder)
    return any(p is not None and b"ByteLevel" in p.__getstate__() for p in parts)


def _token_text(value: Any) -> str | None:
    """A special token's text from a config value: a string or a serialized AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get("content")
    return str(value)


# ---------------------------------------------------------------------------------------------------------- helpers


def _to_list(ids: Any) -> Any:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return ids.tolist()
    if isinstance(ids, np.integer):
        return int(ids)
    if isinstance(ids, (list, tuple)):
        return [_to_list(i) for i in ids] if ids and isinstance(ids[0], (list, tuple, torch.Tensor, np.ndarray)) else [
            int(i) for i in ids
        ]
    return ids


def _pad(seq: list[int], length: int, value: int, side: str) -> list[int]:
    fill = [value] * (length - len(seq))
    return fill + seq if side == "left" else seq + fill


def _as_tensor(rows: list[list[int]], kind: str) -> torch.Tensor | np.ndarray:
    if len({len(r) for r in rows}) > 1:
        raise ValueError(
            "Unable to create a tensor from sequences of different lengths; pass padding=True (and truncation=True "
            "to respect max_length) to get batched tensors."
        )
    if kind == "pt":
        return torch.tensor(rows, dtype=torch.long)
    if kind == "np":
        return np.array(rows, dtype=np.int64)
    raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {kind!r}")
