"""Write a tokenizer into GGUF metadata (`tokenizer.ggml.*`): the inverse of `decoderkit.gguf_vocab`.

llama.cpp knows two BPE flavours, and a tokenizer.json holds one of them:

* **byte-level BPE** (GPT-2, Llama 3, StarCoder, MPT, SmolLM2): `tokenizer.ggml.model = "gpt2"`, the vocabulary's
  strings as they are (`Ġ` for a space), the merges, and a pre-tokenizer *name* (`tokenizer.ggml.pre`) that stands for
  the regexes llama.cpp splits text with. llama.cpp's converter finds the name by hashing the tokenization of a test
  string against a table of known models; here the candidates are the names `gguf_vocab.PRE_TOKENIZER_SPLITS`
  knows, and the first whose splits pre-tokenize a test text exactly as the tokenizer does is written, so llama.cpp
  and `gguf_vocab` rebuild the same splitting.
* **SentencePiece BPE** (Llama 1/2, Gemma; `byte_fallback` in tokenizer.json): `tokenizer.ggml.model = "llama"`, the
  pieces (`▁` for a space), token types (byte pieces `<0xNN>`, control, unknown) and scores. llama.cpp merges the
  adjacent pair whose concatenation has the highest score, so each piece is scored by minus the rank of the merge
  that makes it: the highest-scored pair is the lowest-ranked merge, as in BPE. The merges are written too, which
  `gguf_vocab` prefers over scores.

Token types follow the converter: added tokens are CONTROL when special and USER_DEFINED otherwise; ids the
tokenizer does not cover up to the model's vocabulary size become `[PAD<id>]` UNUSED entries.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

import gguf
from tokenizers import Regex, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from decoderkit.gguf_vocab import (
    _IGNORE_MERGES,
    _NFC_PRE_TYPES,
    BYTE,
    CONTROL,
    NORMAL,
    PRE_TOKENIZER_SPLITS,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
)

if TYPE_CHECKING:
    from decoderkit.tokenizer import Tokenizer

__all__ = ["add_tokenizer", "pre_tokenizer_name"]

# One name per distinct set of splits, most common first; "mpt" differs from "gpt-2" only by NFC normalisation.
_PRE_CANDIDATES = ("gpt-2", "llama-bpe", "qwen2", "starcoder", "falcon", "default")
# Text that tells the split sets apart: contractions, digit runs, punctuation runs, newlines, spaces, scripts, emoji.
_CHECK_TEXT = (
    "Hello world! I've been 'told he's there, 'RE you sure? We'Ve a'lL\n\n \t  x\r\n 3 33 333 3333 33333 3.14 "
    "$5+6=11 <a>|b^c~d ``` -----===== ......!!!!??? нещо на Български 我想在apple工作1314151天 🦙🦙 ✅\n   end  "
)
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab_size: int,
                  config: dict[str, Any] | None = None) -> None:
    """Add `tokenizer`'s vocabulary, merges, special ids, BOS/EOS flags and chat template to `writer`.

    Args:
        writer: the GGUF writer (before its header is written).
        tokenizer: a decoderkit tokenizer loaded from a tokenizer.json.
        vocab_size: the model's embedding rows; the token list is padded to it.
        config: the model's config.json dict; its bos/eos/pad ids fill ids the tokenizer does not name.

    Raises:
        ValueError: a tokenizer llama.cpp has no form for (not BPE; a byte-level pre-tokenizer none of llama.cpp's
            names reproduces), or one with more ids than the model has embedding rows.
    """
    backend = tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer.json model {model.get('type')!r} cannot be written to GGUF; supported: byte-level "
                         "BPE (tokenizer.ggml.model gpt2) and SentencePiece BPE with byte_fallback (llama)")
    vocab = backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(vocab.values())}, but the model has only {vocab_size} "
                         "embedding rows (config vocab_size)")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    for text, index in vocab.items():
        tokens[index], types[index] = text, NORMAL
    for index, token in backend.get_added_tokens_decoder().items():
        types[index] = CONTROL if token.special else USER_DEFINED
    merges = [_merge_text(m) for m in model.get("merges") or []]

    if model.get("byte_fallback"):
        unk = model.get("unk_token")
        for index, text in enumerate(tokens):
            if types[index] == NORMAL and _BYTE_PIECE.fullmatch(text):
                types[index] = BYTE
        if unk in vocab:
            types[vocab[unk]] = UNKNOWN
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(_merge_scores(tokens, types, model.get("merges") or []))
        writer.add_add_space_prefix(_prepends_space(spec))
    elif _is_byte_level(spec):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(backend, bool(model.get("ignore_merges"))))
    else:
        raise ValueError("tokenizer.json is a BPE that is neither byte-level nor SentencePiece (byte_fallback); "
                         "llama.cpp has no form for it")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)

    config = config or {}
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is None:
            token_id = config.get(f"{name}_token_id")
        if isinstance(token_id, list):  # generation configs list several eos ids; llama.cpp stores one
            token_id = token_id[0] if token_id else None
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            add(token_id)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    writer.add_add_eos_token(tokenizer.add_eos_token)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        writer.add_chat_template([{"name": k, "template": v} for k, v in template.items()])
    elif template:
        writer.add_chat_template(template)


def pre_tokenizer_name(backend: BackendTokenizer, ignore_merges: bool = False) -> str:
    """The `tokenizer.ggml.pre` name whose splits pre-tokenize like `backend` (a byte-level BPE tokenizer).

    ``ignore_merges`` (tokenizer.json's BPE flag) must match too: llama.cpp implies it for the llama3 names.

    Raises:
        ValueError: none of the names llama.cpp and `decoderkit.gguf_vocab` share reproduces its splitting.
    """
    if backend.pre_tokenizer is None:
        raise ValueError("the byte-level tokenizer has no pre-tokenizer; llama.cpp has no name for that")
    text = _CHECK_TEXT
    nfc = backend.normalizer is not None and "NFC" in backend.normalizer.__getstate__().decode()
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    expected = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    candidates = ("mpt",) if nfc else _PRE_CANDIDATES
    for name in candidates:
        if (name in _IGNORE_MERGES) != ignore_merges:
            continue
        splits = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[name]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        if [piece for piece, _ in splits.pre_tokenize_str(text)] == expected:
            return name
    known = sorted({*_PRE_CANDIDATES, *_NFC_PRE_TYPES})
    raise ValueError(f"the tokenizer's pre-tokenizer splits text unlike every llama.cpp pre-tokenizer decoderkit "
                     f"knows ({', '.join(known)}); llama.cpp would tokenize differently")


def _merge_text(merge: str | list[str]) -> str:
    if isinstance(merge, str):
        return merge
    # GGUF stores "left right"; a space inside a part is written as the converter does (U+0120, byte-level's space)
    return " ".join(part.replace(" ", chr(ord(" ") + 256)) for part in merge)


def _merge_scores(tokens: list[str], types: list[int], merges: list[str | list[str]]) -> list[float]:
    rank: dict[str, int] = {}
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, index)
    # Pieces no merge makes (single characters) can only be split points, never merge results: rank them last.
    last = len(merges)
    return [
        0.0 if kind not in (NORMAL, USER_DEFINED) else -float(rank.get(text, last + index))
        for index, (text, kind) in enumerate(zip(tokens, types, strict=True))
    ]


def _prepends_space(spec: dict[str, Any]) -> bool:
    """Whether the SentencePiece pipeline puts "▁" before the text (llama.cpp's add_space_prefix)."""
    normalizer, pre = json.dumps(spec.get("normalizer")), spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    metaspace = any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps)
    return metaspace or '"Prepend"' in normalizer


def _is_byte_level(spec: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
