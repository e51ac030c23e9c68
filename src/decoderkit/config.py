"""The family-neutral model configuration.

`DecoderConfig` describes every architecture decoderkit runs with a handful of orthogonal choices (norm kind, position
kind, MLP kind, biases, ...). The per-family modules in `decoderkit.families` translate a Hugging Face `config.json`
into it and back; nothing outside `families/` knows that a family exists.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

NORM_TYPES = ("rms", "layer")
POSITION_TYPES = ("rope", "learned", "alibi")
MLP_TYPES = ("gated", "plain")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


@dataclass
class DecoderConfig:
    """Architecture of one decoder-only model, independent of the family it came from.

    `hf_config` keeps the original `config.json` fields so that saving writes back what was read (plus what changed).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int

    norm_type: str = "rms"
    norm_eps: float = 1e-6
    norm_bias: bool = False
    # Gemma scales by (1 + weight) and multiplies in fp32 before casting back; Llama casts first, then multiplies.
    norm_weight_offset: float = 0.0

    position_embedding: str = "rope"
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    # True when positions beyond `max_position_embeddings` are impossible (learned tables, MPT's ALiBi table).
    hard_max_positions: bool = False
    alibi_bias_max: float = 8.0

    attention_bias: bool = False
    attention_out_bias: bool = False
    attention_scale: float | None = None
    clip_qkv: float | None = None
    attention_dropout: float = 0.0
    is_causal: bool = True
    add_cross_attention: bool = False

    mlp_type: str = "gated"
    hidden_act: str = "silu"
    mlp_bias: bool = False

    embedding_scale: float | None = None
    embedding_padding_idx: int | None = None
    token_type_embeddings: bool = False
    tie_word_embeddings: bool = False
    embedding_dropout: float = 0.0
    residual_dropout: float = 0.0

    initializer_range: float = 0.02
    norm_init_zero: bool = False
    scaled_output_init: bool = False

    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    use_cache: bool = True

    num_labels: int = 2
    problem_type: str | None = None
    classifier_dropout: float = 0.1
    token_classifier_bias: bool = True

    attn_implementation: str = "sdpa"
    dtype: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def rope_type(self) -> str:
        return self.rope_parameters.get("rope_type", "default")

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def validate(self) -> None:
        """Check the choices are known and the sizes fit together; raise a `ValueError` naming the field."""
        for name, value, allowed in (
            ("norm_type", self.norm_type, NORM_TYPES),
            ("position_embedding", self.position_embedding, POSITION_TYPES),
            ("mlp_type", self.mlp_type, MLP_TYPES),
            ("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{self.model_type} config: {name}={value!r} is not supported; allowed: {allowed}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{self.model_type} config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"{self.model_type} config: num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.position_embedding == "rope":
            rope_type = self.rope_type
            if rope_type not in ROPE_TYPES:
                raise ValueError(
                    f"{self.model_type} config: rope_type={rope_type!r} is not supported; allowed: {ROPE_TYPES}"
                )
            required = {
                "linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
                "longrope": ("long_factor", "short_factor"),
            }.get(rope_type, ())
            missing = [k for k in required if self.rope_parameters.get(k) is None]
            if missing:
                raise ValueError(
                    f"{self.model_type} config: rope_type={rope_type!r} needs rope parameters {missing}"
                )
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(
                f"{self.model_type} config: attention_dropout must be in [0, 1), got {self.attention_dropout}"
            )

    # ----------------------------------------------------------------------------------------------- conversions
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> DecoderConfig:
        """Translate a transformers `config.json` dict (any supported `model_type`)."""
        from decoderkit.families import family_for

        return family_for(hf).config_from_hf(copy.deepcopy(hf))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> DecoderConfig:
        """Read `config.json` from a model directory."""
        return cls.from_hf_dict(read_config_json(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers `config.json` dict for this configuration."""
        from decoderkit.families import get_family

        return get_family(self.model_type).config_to_hf(self)

    def replace(self, **changes: Any) -> DecoderConfig:
        return dataclasses.replace(self, **changes)


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """Load `config.json` from a directory (or the file itself) with errors that name the file."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        if os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no config.json found; a Hugging Face model directory needs one")
        raise FileNotFoundError(f"{path}: no such file or directory")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: invalid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


# DecoderConfig fields the model reads at call time: a write to the transformers-view config reaches them. Every other
# field was consumed when the layers were built, so changing it afterwards (hidden_size, num_hidden_layers, ...) only
# changes what `to_dict()` / `save_pretrained` report, as it does in transformers.
LIVE_FIELDS = ("use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "problem_type", "tie_word_embeddings",
               "initializer_range")

# transformers' PreTrainedConfig fields, with their defaults: every family's config holds them.
PRETRAINED_DEFAULTS: dict[str, Any] = {
    "architectures": None, "output_hidden_states": False, "return_dict": True, "dtype": None,
    "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "id2label": {0: "LABEL_0", 1: "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "problem_type": None, "_name_or_path": "", "output_attentions": False,
}


class FamilyConfig:
    """The configuration transformers' own class (LlamaConfig, MptConfig, ...) would hold for a checkpoint.

    `model.config` is one: config.json's fields plus the defaults transformers fills in, read and written under the
    family's own names (`config.n_embd`, `config.attn_config.alibi_bias_max`) and transformers' aliases
    (`config.hidden_size` for GPTBigCode's `n_embd`). `to_dict()`, `to_diff_dict()`, `to_json_string()` and
    `save_pretrained(dir)` give what transformers gives. The decoder itself reads the family-neutral
    `model.decoder_config` (a `DecoderConfig`).

    Writing a field updates this view; when the field is one the model reads at call time (`use_cache`,
    `pad_token_id`, `eos_token_id`, `problem_type`, `tie_word_embeddings`, ...; `LIVE_FIELDS`) the model follows it.
    A size (`hidden_size`, `num_hidden_layers`) is fixed once the layers exist: changing it is recorded (and saved)
    but changes no layer, as in transformers, which does not guard it either.
    """

    def __init__(self, fields: dict[str, Any], attribute_map: dict[str, str] | None = None,
                 neutral: DecoderConfig | None = None) -> None:
        object.__setattr__(self, "_fields", fields)
        object.__setattr__(self, "_aliases", dict(attribute_map or {}))
        object.__setattr__(self, "_neutral", neutral)

    # ------------------------------------------------------------------------------------------------ attributes
    def __getattr__(self, name: str) -> Any:
        state = object.__getattribute__(self, "__dict__")
        if name.startswith("__") or "_fields" not in state:
            raise AttributeError(name)
        key = state["_aliases"].get(name, name)
        if key in state["_fields"]:
            value = state["_fields"][key]
            if key == "dtype" and isinstance(value, str):
                import torch

                return getattr(torch, value)
            return value
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("num_labels", "torch_dtype", "rope_scaling", "name_or_path", "_attn_implementation"):
            object.__setattr__(self, name, value)  # the properties below
            return
        key = self._aliases.get(name, name)
        if key == "dtype" and value is not None and not isinstance(value, str):
            value = str(value).removeprefix("torch.")
        self._fields[key] = value
        self._sync()

    def __delattr__(self, name: str) -> None:
        key = self._aliases.get(name, name)
        if key not in self._fields:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        del self._fields[key]

    def __contains__(self, name: str) -> bool:
        return self._aliases.get(name, name) in self._fields

    def __iter__(self):
        return iter(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FamilyConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    def __deepcopy__(self, memo: dict) -> FamilyConfig:
        # A copy stands alone: it no longer steers the model the original belongs to.
        return type(self)(copy.deepcopy(self._fields, memo), self._aliases)

    def __reduce__(self):
        return _rebuild_family_config, (type(self).__name__, self._fields, self._aliases)

    @property
    def num_labels(self) -> int:
        return len(self._fields.get("id2label") or {}) or 2

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if self._fields.get("id2label") is None or self.num_labels != value:
            self._fields["id2label"] = {i: f"LABEL_{i}" for i in range(value)}
            self._fields["label2id"] = {f"LABEL_{i}": i for i in range(value)}

    @property
    def use_return_dict(self) -> bool:
        """Deprecated in transformers 5 in favour of `return_dict`, which it returns."""
        return bool(self._fields.get("return_dict", True))

    @property
    def torch_dtype(self) -> Any:
        return self.dtype

    @torch_dtype.setter
    def torch_dtype(self, value: Any) -> None:
        self.dtype = value

    @property
    def rope_scaling(self) -> Any:
        """transformers 5 keeps the rope settings in `rope_parameters`; `rope_scaling` is its old name."""
        return self.rope_parameters

    @rope_scaling.setter
    def rope_scaling(self, value: Any) -> None:
        self.rope_parameters = value

    @property
    def name_or_path(self) -> str:
        return self._fields.get("_name_or_path", "")

    @name_or_path.setter
    def name_or_path(self, value: Any) -> None:
        self._fields["_name_or_path"] = str(value)

    @property
    def _attn_implementation(self) -> str | None:
        return self._neutral.attn_implementation if self._neutral is not None else None

    @_attn_implementation.setter
    def _attn_implementation(self, value: str) -> None:
        raise AttributeError("the attention backend is chosen on the model: model.set_attn_implementation(name)")

    def _sync(self) -> None:
        neutral = self._neutral
        if neutral is None:
            return
        try:
            fresh = DecoderConfig.from_hf_dict(self.to_dict())
        except (ValueError, KeyError, TypeError):
            return  # an inconsistent size change: recorded here, and (as in transformers) ignored by the layers
        for name in LIVE_FIELDS:
            setattr(neutral, name, getattr(fresh, name))

    # ------------------------------------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Every field, as transformers' `to_dict()` gives them (sub-configs as dicts)."""
        out = copy.deepcopy(self._fields)
        for key, value in out.items():
            if isinstance(value, FamilyConfig):
                out[key] = value.to_dict()
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """What `save_pretrained` writes: the family's fields, and the shared ones that differ from their default."""
        out = {k: v for k, v in self.to_dict().items()
               if k not in PRETRAINED_DEFAULTS or k == "transformers_version" or v != PRETRAINED_DEFAULTS[k]}
        out.pop("_name_or_path", None)
        return out

    def to_json_string(self, use_diff: bool = True) -> str:
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        with open(json_file_path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json_string(use_diff=use_diff))

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `config.json` into `save_directory` (created if missing)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"{save_directory}: expected a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        from decoderkit.fileio import write_atomic

        write_atomic(os.path.join(save_directory, "config.json"), self.to_json_string())

    def update(self, config_dict: dict[str, Any]) -> None:
        for key, value in config_dict.items():
            setattr(self, key, value)

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> FamilyConfig:
        return self


@functools.cache
def family_config_class(name: str) -> type[FamilyConfig]:
    """A FamilyConfig subclass named like transformers' config class (`LlamaConfig`)."""
    if name == FamilyConfig.__name__:
        return FamilyConfig
    return type(name, (FamilyConfig,), {"__module__": __name__, "__doc__": FamilyConfig.__doc__})


def _rebuild_family_config(name: str, fields: dict[str, Any], aliases: dict[str, str]) -> FamilyConfig:
    return family_config_class(name)(fields, aliases)


def as_decoder_config(config: DecoderConfig | FamilyConfig) -> DecoderConfig:
    """The neutral configuration behind either form (a model's `config` or its `decoder_config`)."""
    if isinstance(config, FamilyConfig):
        neutral = config._neutral
        return neutral if neutral is not None else DecoderConfig.from_hf_dict(config.to_dict())
    return config
