"""Gemma (v1): `model_type: gemma`. Llama's layout with a scaled embedding, (1 + w) RMSNorm and GeGLU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from decoderkit.families.llama import LlamaFamily

if TYPE_CHECKING:
    from decoderkit.gguf_model import GGUFMetadata


class GemmaFamily(LlamaFamily):
    model_type = "gemma"
    class_prefix = "Gemma"
    # transformers implements no GemmaForQuestionAnswering; ours saves under the usual `model.` prefix.
    hf_heads = ("base", "causal_lm", "sequence_classification", "token_classification")
    defaults: dict[str, Any] = dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
        initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0,
    )
    hf_defaults: dict[str, Any] = dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
        initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=True, rope_parameters=None, attention_bias=False, attention_dropout=0.0,
        use_bidirectional_attention=None,
    )
    # Gemma's released configs say "gelu" but were trained with the tanh approximation (transformers #29402).
    hidden_act_aliases = {"gelu": "gelu_pytorch_tanh"}

    def hf_prefix(self, head: str) -> str:
        return "model"

    # GGUF: llama.cpp's "gemma" architecture (rotate-half rope there too, so no q/k permutation; tied output).
    gguf_architecture = "gemma"
    gguf_hidden_act = "gelu_pytorch_tanh"

    def config_from_gguf(self, meta: GGUFMetadata) -> dict[str, Any]:
        config = super().config_from_gguf(meta)
        config.pop("mlp_bias")
        return config

    def gguf_parameters(self) -> tuple[str, ...]:
        return tuple(p for p in super().gguf_parameters() if p != "lm_head.weight" and not p.endswith(".bias"))

    def fix_gguf_tensor(self, gguf_name: str, weight: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        # llama.cpp multiplies by the stored norm weight, so its converter stores 1 + w; we keep w.
        return weight - 1.0 if gguf_name.endswith("norm.weight") else weight

    def gguf_extra_tensors(self, hf: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {}

    def fix_tensor_for_gguf(self, gguf_name: str, weight: torch.Tensor, hf: dict[str, Any]) -> torch.Tensor:
        return weight + 1.0 if gguf_name.endswith("norm.weight") else weight

    def extra_fields(self, hf: dict[str, Any]) -> dict[str, Any]:
        return dict(
            mlp_bias=False,
            norm_weight_offset=1.0,
            norm_init_zero=True,
            embedding_scale=hf["hidden_size"] ** 0.5,
        )
