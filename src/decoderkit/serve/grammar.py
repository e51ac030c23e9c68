"""Constrained decoding: grammars (JSON schemas, regular expressions, choices, Lark) compiled by llguidance, and the
per-request constraint the sampler consults at every step.

The constraint fills a bitmask over the vocabulary (bit t of word t // 32 set: token t may come next), the sampler
sends the disallowed logits to -inf, and the sampled token is fed back with `accept`. llguidance was picked over
xgrammar by `benchmarks/grammar_mask.py`: both fill a 49k-token mask in well under a millisecond, but llguidance
compiles a schema in about a millisecond where xgrammar takes up to seconds, and it refuses the JSON-schema keywords it
cannot enforce (`not`, `if`/`then`, `contains` ...) where xgrammar accepts them and ignores them, so output it
constrains always validates.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import torch

# Compact JSON (no whitespace between tokens) as OpenAI's structured output writes it; flexible whitespace would let a
# model spend its whole budget on newlines inside a valid prefix.
JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}
_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """A grammar that cannot be compiled; the message names what is wrong (e.g. an unsupported schema keyword)."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # an optional dependency: only structured output needs it
        raise GrammarError("structured output needs the llguidance package: pip install 'decoderkit[serve]'") from None
    return llguidance


class Grammar:
    """A validated grammar for one tokenizer; `constraint()` starts a fresh matcher over it (one per sequence)."""

    def __init__(self, compiler: GrammarCompiler, source: str, description: str) -> None:
        self.compiler = compiler
        self.source = source  # llguidance's grammar (its JSON form)
        self.description = description

    def constraint(self) -> Constraint:
        return Constraint(_llguidance().LLMatcher(self.compiler.ll_tokenizer, self.source, log_level=0),
                          self.compiler.vocab_size)

    def __repr__(self) -> str:
        return f"Grammar({self.description})"


class GrammarCompiler:
    """Compiles grammars against one tokenizer and vocabulary width (the model's logits, padding included).

    Args:
        tokenizer: a decoderkit `Tokenizer` (its `tokenizers` JSON is what llguidance reads).
        vocab_size: the width of the logits the mask covers.
        stop_token_ids: the ids that end a sequence; a grammar lets them through once its text is complete.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self) -> Any:
        """llguidance's view of the vocabulary (token bytes), built on first use: about a second for 50k tokens."""
        with self._lock:
            if self._ll_tokenizer is None:
                ll = _llguidance()
                eos = self.stop_token_ids or [self.tokenizer.eos_token_id]
                self._ll_tokenizer = ll.LLTokenizer(self.tokenizer.backend_tokenizer.to_str(),
                                                    n_vocab=self.vocab_size, eos_token=eos)
            return self._ll_tokenizer

    def json_schema(self, schema: dict[str, Any] | None) -> Grammar:
        """JSON text that validates against `schema` (None: any JSON object, as OpenAI's json_object mode)."""
        if schema is not None and not isinstance(schema, dict | bool):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        source = _llguidance().LLMatcher.grammar_from_json_schema(
            {"type": "object"} if schema is None else schema, defaults=JSON_OPTIONS)
        return self._checked(source, "JSON schema" if schema is not None else "JSON object")

    def regex(self, pattern: str) -> Grammar:
        """Text that matches `pattern` whole (Rust `regex` syntax, as llguidance reads it)."""
        return self._checked(_llguidance().LLMatcher.grammar_from_regex(pattern), "regex")

    def choice(self, options: Sequence[str]) -> Grammar:
        """Exactly one of `options`."""
        if not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError("a choice needs a non-empty list of non-empty strings")
        alternatives = " | ".join(json.dumps(o) for o in options)
        return self.lark(f"start: {alternatives}", "choice")

    def lark(self, grammar: str, description: str = "grammar") -> Grammar:
        """A grammar in llguidance's Lark dialect (which embeds JSON schemas as `%json {...}`)."""
        return self._checked(_llguidance().LLMatcher.grammar_from_lark(grammar), description)

    def _checked(self, source: str, description: str) -> Grammar:
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(source, self.ll_tokenizer)
        if is_error:
            raise GrammarError(f"the {description} cannot be enforced: {messages[0]}")
        return Grammar(self, source, description)


class Constraint:
    """One sequence's position in a grammar: which tokens may come next, and the tokens taken so far."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed next tokens into row `row` of an int32 CPU bitmask of shape (B, ceil(V / 32))."""
        words = bitmask[row]
        if bitmask.dtype != torch.int32 or bitmask.device.type != "cpu" or not words.is_contiguous():
            raise ValueError("the bitmask must be a contiguous int32 CPU tensor")
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def fill_mask(self, allowed: torch.Tensor) -> None:
        """The batched sampler's form: clear, in the (V,) bool row `allowed`, every token the grammar rules out."""
        bitmask = allocate_bitmask(1, allowed.shape[-1])
        self.fill_bitmask(bitmask)
        allowed &= bitmask_to_bool(bitmask, allowed.shape[-1]).to(allowed.device)[0]

    def accept(self, token_id: int) -> bool:
        """Take the sampled token; False if the grammar does not allow it (the constraint is then in error)."""
        return self.matcher.consume_token(token_id)

    def is_terminated(self) -> bool:
        """Whether the grammar allows nothing more: the text is complete (or the matcher failed)."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


def allocate_bitmask(batch: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed int32 bitmask for `batch` rows over `vocab_size` tokens."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The (B, V) bool form of an int32 bitmask (B, ceil(V / 32)): True where the token is allowed."""
    bits = (bitmask[:, :, None] >> _BIT_SHIFTS.to(bitmask.device)) & 1  # (B, W, 32)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in place, the logits (B, V) of the tokens whose bit is clear in `bitmask` (B, ceil(V / 32))."""
    allowed = bitmask_to_bool(bitmask.to(logits.device), logits.shape[-1])
    return logits.masked_fill_(~allowed, float("-inf"))
