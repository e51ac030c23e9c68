"""Llama (and Llama-architecture models such as SmolLM2, Mistral-style GQA checkpoints): `model_type: llama`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from decoderkit.config import DecoderConfig
from decoderkit.families.base import Family, common_fields, common_to_hf, standardize_rope

if TYPE_CHECKING:
    from decoderkit.gguf_model import GGUFMetadata


class LlamaFamily(Family):
    model_type = "llama"
    class_prefix = "Llama"
    # The seed's `pretraining_tp` slices the projections for a tensor-parallel pretraining quirk; the sliced sum is the
    # same product, so it is accepted and has no code path of its own.
    defaults: dict[str, Any] = dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0,
        mlp_bias=False,
    )
    hidden_act_aliases: dict[str, str] = {}
    hf_defaults: dict[str, Any] = dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
        rms_norm_eps=1e-6, use_cache=True, pad_token_id=None, bos_token_id=1, eos_token_id=2, pretraining_tp=1,
        tie_word_embeddings=False, rope_parameters=None, attention_bias=False, attention_dropout=0.0, mlp_bias=False,
        head_dim=None,
    )

    def complete_hf_config(self, hf: dict[str, Any]) -> None:
        if hf.get("head_dim") is None:
            hf["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
        if hf.get("num_key_value_heads") is None:
            hf["num_key_value_heads"] = hf["num_attention_heads"]
        hf["hidden_act"] = self.hidden_act_aliases.get(hf["hidden_act"], hf["hidden_act"])
        # transformers 5 folds the older rope_scaling / rope_theta keys into rope_parameters (rope_scaling first)
        rope = dict(hf.pop("rope_scaling", None) or hf.get("rope_parameters") or {})
        rope.setdefault("rope_theta", hf.pop("rope_theta", 10000.0))
        if (partial := hf.pop("partial_rotary_factor", None)) is not None:
            rope.setdefault("partial_rotary_factor", partial)
        rope.setdefault("rope_type", rope.get("type", "default"))
        if rope["rope_type"] in ("llama3", "yarn", "longrope"):
            if "original_max_position_embeddings" in hf:
                rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
            rope.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
        hf["rope_parameters"] = rope

    def hf_prefix(self, head: str) -> str:
        # transformers' LlamaForQuestionAnswering keeps the old `transformer` attribute name.
        return "transformer" if head == "question_answering" else "model"

    def config_from_hf(self, hf: dict[str, Any]) -> DecoderConfig:
        hf = {**self.defaults, **hf}
        heads = hf["num_attention_heads"]
        if hf["hidden_size"] % heads != 0 and self.model_type == "llama":
            raise ValueError(
                f"llama config: hidden_size ({hf['hidden_size']}) is not a multiple of num_attention_heads ({heads})"
            )
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        act = self.hidden_act_aliases.get(hf["hidden_act"], hf["hidden_act"])
        fields = dict(
            model_type=self.model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            norm_type="rms",
            norm_eps=hf["rms_norm_eps"],
            rope_parameters=standardize_rope(hf, hf["max_position_embeddings"]),
            attention_bias=hf["attention_bias"],
            attention_out_bias=hf["attention_bias"],
            attention_dropout=float(hf["attention_dropout"] or 0.0),
            mlp_type="gated",
            hidden_act=act,
            mlp_bias=hf.get("mlp_bias", False),
            embedding_padding_idx=hf.get("pad_token_id"),
            tie_word_embeddings=hf["tie_word_embeddings"],
            initializer_range=hf["initializer_range"],
            use_cache=hf["use_cache"],
            token_classifier_bias=hf.get("token_classification_bias", True),
            **common_fields(hf),
        )
        fields.update(self.extra_fields(hf))
        return DecoderConfig(**fields)

    def extra_fields(self, hf: dict[str, Any]) -> dict[str, Any]:
        return {}

    # GGUF: llama.cpp's "llama" architecture.
    gguf_architecture = "llama"
    gguf_hidden_act = "silu"

    def config_from_gguf(self, meta: GGUFMetadata) -> dict[str, Any]:
        from decoderkit.gguf_model import rotary_decoder_config

        config = rotary_decoder_config(meta, self.model_type, self.architecture("causal_lm"), self.gguf_hidden_act)
        config["mlp_bias"] = "blk.0.ffn_up.bias" in meta.tensors
        return config

    def gguf_parameters(self) -> tuple[str, ...]:
        from decoderkit.gguf_model import hf_parameter_names

        return (
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.{bid}.input_layernorm.weight",
            "model.layers.{bid}.post_attention_layernorm.weight",
            *hf_parameter_names(*(f"model.layers.{{bid}}.self_attn.{p}_proj" for p in "qkvo")),
            *hf_parameter_names(*(f"model.layers.{{bid}}.mlp.{p}_proj" for p in ("gate", "up", "down"))),
        )

    def fix_gguf_tensor(self, gguf_name: str, weight: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        # llama.cpp's convert script permutes q/k rows for its rope layout (see decoderkit.gguf_model).
        from decoderkit.gguf_model import unpermute_rope_rows

        if ".attn_q." in gguf_name:
            return unpermute_rope_rows(weight, config["num_attention_heads"])
        if ".attn_k." in gguf_name:
            return unpermute_rope_rows(weight, config["num_key_value_heads"])
        return weight

    def config_to_gguf(self, hf: dict[str, Any]) -> dict[str, Any]:
        from decoderkit.gguf_writer import rotary_gguf_metadata

        act = self.hidden_act_aliases.get(hf.get("hidden_act", "silu"), hf.get("hidden_act", "silu"))
        if act != self.gguf_hidden_act:
            raise ValueError(f"{self.model_type}: hidden_act {act!r} cannot be written: llama.cpp's "
                             f"{self.gguf_architecture} architecture computes {self.gguf_hidden_act} only")
        return rotary_gguf_metadata(hf)

    def gguf_extra_tensors(self, hf: dict[str, Any]) -> dict[str, torch.Tensor]:
        from decoderkit.gguf_writer import llama3_rope_freqs

        return llama3_rope_freqs(hf)

    def fix_tensor_for_gguf(self, gguf_name: str, weight: torch.Tensor, hf: dict[str, Any]) -> torch.Tensor:
        # llama.cpp's llama kernels rotate adjacent pairs: its converter permutes q/k rows (see decoderkit.gguf_model)
        from decoderkit.gguf_writer import permute_rope_rows

        heads = hf["num_attention_heads"]
        if ".attn_q." in gguf_name:
            return permute_rope_rows(weight, heads)
        if ".attn_k." in gguf_name:
            return permute_rope_rows(weight, hf.get("num_key_value_heads") or heads)
        return weight

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        out = common_to_hf(config)
        out.pop("rope_scaling", None)
        out.pop("rope_theta", None)
        out.update(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            hidden_act=config.hidden_act,
            max_position_embeddings=config.max_position_embeddings,
            rms_norm_eps=config.norm_eps,
            rope_parameters=dict(config.rope_parameters),
            attention_bias=config.attention_bias,
            attention_dropout=config.attention_dropout,
            initializer_range=config.initializer_range,
        )
        if self.model_type == "llama":
            out["mlp_bias"] = config.mlp_bias
        return out
