"""``GenerationConfig``: how to generate, with transformers' field names and defaults, read from and written to
``generation_config.json``.

Differences from transformers 5.23, all deliberate:

- Fields hold their effective defaults (``top_k=50``, ``do_sample=False``, ...) instead of ``None`` plus a table of
  global defaults applied inside ``generate``. ``max_length`` stays ``None`` when unset, because transformers gives an
  unset ``max_length`` its own meaning: 20 *new* tokens, capped at the model's ``max_position_embeddings`` (see
  :meth:`GenerationConfig.max_length_for`).
- :meth:`GenerationConfig.update` rejects unknown keys (suggesting the closest valid name) instead of returning them.
  Files are read leniently: keys of ``generation_config.json`` that decoderkit does not model are kept in
  ``extra_fields``, written back on save, and do not affect generation (a warning lists them when their value would).
- ``max_new_tokens=0`` is accepted (a prompt-only pass); transformers rejects it.
- ``presence_penalty`` and ``frequency_penalty`` are decoderkit additions (OpenAI semantics, used by the server).
- ``num_assistant_tokens_schedule`` defaults to ``"heuristic"`` (transformers: ``"constant"``), so a draft model that
  keeps being rejected proposes fewer tokens instead of slowing decoding down.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from decoderkit.fileio import write_atomic

__all__ = ["GenerationConfig", "GENERATION_CONFIG_NAME"]

logger = logging.getLogger(__name__)

GENERATION_CONFIG_NAME = "generation_config.json"

# transformers' default when neither max_length nor max_new_tokens is set anywhere: generate this many new tokens
_DEFAULT_NEW_TOKENS = 20

# Bookkeeping keys transformers writes into generation_config.json; they carry no generation setting
_METADATA_KEYS = frozenset({"transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash"})

# transformers 5.23's valid cache implementations (plus "paged"); which ones run is the model loop's business
_CACHE_IMPLEMENTATIONS = frozenset(
    {
        "static",
        "offloaded_static",
        "sliding_window",
        "hybrid",
        "hybrid_chunked",
        "offloaded_hybrid",
        "offloaded_hybrid_chunked",
        "dynamic",
        "offloaded",
        "quantized",
        "paged",
    }
)

# Values transformers treats as "this feature is off" for generation keys decoderkit does not implement: anything
# else in a loaded file would change transformers' output, so it deserves a warning
_INERT_VALUES: tuple[Any, ...] = (None, False, 0, 0.0, 1.0, [], {})

_SAMPLING_ONLY_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenerationConfig:
    """Parameters of ``generate``. Field names, meanings and defaults follow transformers' ``GenerationConfig``.

    Lengths: ``max_new_tokens`` takes precedence over ``max_length`` (which counts the prompt); ``min_new_tokens``
    over ``min_length`` (likewise). Strategy: ``num_beams == 1`` is greedy or, with ``do_sample``, sampling;
    ``num_beams > 1`` is beam search or beam sampling. The warpers (``temperature``, ``top_k``, ``top_p``, ``min_p``,
    ``typical_p``) apply only when ``do_sample`` is true; set without it they are ignored, with a warning.
    ``early_stopping`` is ``True`` (stop a batch item once ``num_beams`` hypotheses finished), ``False`` (stop when a
    heuristic says no better hypothesis is likely) or ``"never"`` (stop only when none can be better).
    """

    # length
    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    early_stopping: bool | Literal["never"] = False
    stop_strings: str | list[str] | None = None
    # strategy
    do_sample: bool = False
    num_beams: int = 1
    # cache
    use_cache: bool = True
    cache_implementation: str | None = None
    # logits processing
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # outputs
    num_return_sequences: int = 1
    output_scores: bool = False
    output_logits: bool = False
    return_dict_in_generate: bool = False
    # special tokens
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # speculative decoding (see generation/speculative.py)
    prompt_lookup_num_tokens: int | None = None
    max_matching_ngram_size: int | None = None
    num_assistant_tokens: int = 20
    num_assistant_tokens_schedule: Literal["heuristic", "heuristic_transient", "constant"] = "heuristic"
    # keys read from a file that decoderkit does not model; kept so that save_pretrained round-trips them
    extra_fields: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()
        self._warn_ignored_sampling_flags(set(_SAMPLING_ONLY_DEFAULTS), stacklevel=4)

    # ------------------------------------------------------------------ derived values

    @property
    def eos_token_ids(self) -> list[int]:
        """``eos_token_id`` as a (possibly empty) list."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @property
    def generation_mode(self) -> Literal["greedy", "sample", "beam_search", "beam_sample"]:
        """Which decoding loop this config asks for."""
        if self.num_beams > 1:
            return "beam_sample" if self.do_sample else "beam_search"
        return "sample" if self.do_sample else "greedy"

    def max_length_for(self, prompt_length: int, max_position_embeddings: int | None = None) -> int:
        """Total length (prompt included) at which generation stops, as transformers resolves it.

        ``max_new_tokens`` wins; else an explicit ``max_length``; else ``prompt_length + 20`` capped at
        ``max_position_embeddings``.
        """
        if self.max_new_tokens is not None:
            return prompt_length + self.max_new_tokens
        if self.max_length is not None:
            return self.max_length
        limit = prompt_length + _DEFAULT_NEW_TOKENS
        return min(limit, max_position_embeddings) if max_position_embeddings is not None else limit

    # ------------------------------------------------------------------ validation and updates

    def validate(self) -> None:
        """Raises ``ValueError`` naming the offending argument when a value or combination is invalid."""

        def fail(name: str, message: str) -> None:
            raise ValueError(f"GenerationConfig: `{name}` {message}, got {getattr(self, name)!r}")

        for name in ("max_new_tokens", "min_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                fail(name, "must be a non-negative integer or None")
        if self.max_length is not None and (not _is_int(self.max_length) or self.max_length < 1):
            fail("max_length", "must be a positive integer or None")
        if not _is_int(self.min_length) or self.min_length < 0:
            fail("min_length", "must be a non-negative integer")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            fail("early_stopping", "must be True, False or 'never'")
        if not isinstance(self.do_sample, bool):
            fail("do_sample", "must be a bool")
        if not _is_int(self.num_beams) or self.num_beams < 1:
            fail("num_beams", "must be an integer >= 1")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            fail("temperature", "must be a non-negative number")
        if self.do_sample and self.temperature <= 0:
            fail("temperature", "must be > 0 when do_sample=True (for greedy decoding set do_sample=False)")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 0):
            fail("top_k", "must be a non-negative integer (0 disables it) or None")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if self.min_p is not None and (not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0):
            fail("min_p", "must be in [0, 1] or None")
        if not _is_number(self.typical_p) or not 0.0 < self.typical_p <= 1.0:
            fail("typical_p", "must be in (0, 1]")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            fail("repetition_penalty", "must be a number > 0 (1.0 disables it)")
        if not _is_number(self.length_penalty) or not math.isfinite(self.length_penalty):
            fail("length_penalty", "must be a finite number")
        if not _is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            fail("no_repeat_ngram_size", "must be a non-negative integer (0 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                fail(name, "must be a finite number")
        if not _is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            fail("num_return_sequences", "must be an integer >= 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            fail("num_return_sequences", f"must be <= num_beams ({self.num_beams}) for beam search")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            fail("num_return_sequences", "must be 1 for greedy decoding (use do_sample=True or num_beams > 1)")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                fail(name, "must be an integer or None")
        eos = self.eos_token_id
        eos_list = isinstance(eos, (list, tuple)) and len(eos) > 0 and all(map(_is_int, eos))
        if eos is not None and not (_is_int(eos) or eos_list):
            fail("eos_token_id", "must be an int, a non-empty list of ints, or None")
        stops = self.stop_strings
        stop_list = isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)
        if stops is not None and not ((isinstance(stops, str) and stops) or stop_list):
            fail("stop_strings", "must be a non-empty string, a list of non-empty strings, or None")
        if self.cache_implementation is not None and self.cache_implementation not in _CACHE_IMPLEMENTATIONS:
            fail("cache_implementation", f"must be one of {sorted(_CACHE_IMPLEMENTATIONS)} or None")
        for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                fail(name, "must be an integer >= 1 or None")
        if not _is_int(self.num_assistant_tokens) or self.num_assistant_tokens < 1:
            fail("num_assistant_tokens", "must be an integer >= 1")
        if self.num_assistant_tokens_schedule not in ("heuristic", "heuristic_transient", "constant"):
            fail("num_assistant_tokens_schedule", "must be 'heuristic', 'heuristic_transient' or 'constant'")
        for name in ("use_cache", "output_scores", "output_logits", "return_dict_in_generate"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be a bool")

    def update(self, **kwargs: Any) -> None:
        """Sets fields from ``kwargs``; all-or-nothing: on an unknown key or an invalid result nothing changes.

        Raises:
            ValueError: for a key that is not a field (naming the closest valid one), or an invalid value.
        """
        names = self._field_names()
        for key in kwargs:
            if key not in names:
                close = difflib.get_close_matches(key, sorted(names), n=1)
                hint = f"; did you mean `{close[0]}`?" if close else ""
                raise ValueError(f"GenerationConfig has no parameter `{key}`{hint}")
        candidate = copy.copy(self)
        for key, value in kwargs.items():
            setattr(candidate, key, value)
        candidate.validate()
        for key, value in kwargs.items():
            setattr(self, key, value)
        self._warn_ignored_sampling_flags({k for k in kwargs if k in _SAMPLING_ONLY_DEFAULTS}, stacklevel=3)

    def _warn_ignored_sampling_flags(self, names: set[str], stacklevel: int) -> None:
        # Mirrors transformers' warning: only for flags the caller set, not ones inherited from a checkpoint's file
        if self.do_sample:
            return
        ignored = [n for n in sorted(names) if getattr(self, n) != _SAMPLING_ONLY_DEFAULTS[n]]
        if ignored:
            warnings.warn(
                f"do_sample=False, so {ignored} will be ignored (they only apply to sampling). "
                "Set do_sample=True to use them.",
                UserWarning,
                stacklevel=stacklevel,
            )

    # ------------------------------------------------------------------ (de)serialisation

    @classmethod
    def _field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.name != "extra_fields"}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> GenerationConfig:
        """Builds a config from a ``generation_config.json`` dict, then applies ``kwargs`` via :meth:`update`.

        Unknown keys go to ``extra_fields`` (metadata such as ``transformers_version`` is dropped); ``null`` values
        leave the default in place.
        """
        names = cls._field_names()
        # null means "unset" in transformers' files: the default applies
        values = {k: v for k, v in config_dict.items() if k in names and v is not None}
        extra = {k: v for k, v in config_dict.items() if k not in names and k not in _METADATA_KEYS}
        if values.get("cache_implementation") == "hybrid":
            # transformers drops this deprecated value at generate time: the model picks its own cache layout
            values["cache_implementation"] = None
        config = cls.__new__(cls)
        # Bypass __init__ so that flags inherited from a file do not trigger the "ignored sampling flag" warning
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(config, f.name, values.get(f.name, default))
        config.extra_fields = extra
        config.validate()
        active = sorted(k for k, v in extra.items() if not any(v == inert for inert in _INERT_VALUES))
        if active:
            logger.warning("generation config: decoderkit ignores these settings: %s", active)
        if kwargs:
            config.update(**kwargs)
        return config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> GenerationConfig:
        """Reads ``generation_config.json`` from a model directory (or the given JSON file), then applies ``kwargs``."""
        path = Path(path)
        file = path / GENERATION_CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {GENERATION_CONFIG_NAME} at {file}")
        try:
            config_dict = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: invalid JSON ({err})") from err
        if not isinstance(config_dict, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(config_dict).__name__}")
        return cls.from_dict(config_dict, **kwargs)

    @classmethod
    def from_model_config(cls, model_config: dict[str, Any]) -> GenerationConfig:
        """Generation defaults found in a model's ``config.json`` dict (special token ids, legacy generation keys).

        Like transformers, values set in a ``text_config`` / ``decoder`` / ``generator`` sub-config fill the fields the
        top level leaves at their defaults. Other keys of the model config are ignored.
        """
        names = cls._field_names()
        values = {k: v for k, v in model_config.items() if k in names and v is not None}
        config = cls.from_dict(values)
        default = cls.from_dict({})
        for sub_name in ("decoder", "generator", "text_config"):
            sub = model_config.get(sub_name)
            if isinstance(sub, dict):
                for key, value in sub.items():
                    if key in names and value is not None and getattr(config, key) == getattr(default, key):
                        setattr(config, key, value)
                break
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """All fields (and ``extra_fields``) as a JSON-able dict."""
        out = {name: copy.deepcopy(getattr(self, name)) for name in sorted(self._field_names())}
        out.update(copy.deepcopy(self.extra_fields))
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the fields that differ from the defaults, plus ``extra_fields``: what ``save_pretrained`` writes."""
        default = GenerationConfig.from_dict({})
        out = {
            name: copy.deepcopy(getattr(self, name))
            for name in sorted(self._field_names())
            if getattr(self, name) != getattr(default, name)
        }
        out.update(copy.deepcopy(self.extra_fields))
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        """JSON text of :meth:`to_diff_dict` (or :meth:`to_dict`), keys sorted as transformers writes them."""
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> Path:
        """Writes ``generation_config.json`` into ``save_directory`` atomically; returns the file's path."""
        self.validate()
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_pretrained expects a directory, but {directory} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / GENERATION_CONFIG_NAME
        write_atomic(target, self.to_json_string())
        return target
