"""The family-neutral model configuration.

`DecoderConfig` describes every architecture decoderkit runs with a handful of orthogonal choices (norm kind, position
kind, MLP kind, biases, ...). The per-family modules in `decoderkit.families` translate a Hugging Face `config.json`
into it and back; nothing outside `families/` knows that a family exists.
"""

from __future__ import annotations

import copy
import dataclasses
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
