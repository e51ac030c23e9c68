"""MPT (MosaicML): `model_type: mpt`. Bias-free LayerNorm blocks, ALiBi positions, a fused [q; k; v] projection."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from decoderkit.config import PRETRAINED_DEFAULTS, DecoderConfig
from decoderkit.families.base import Family, NameMap, common_fields, common_to_hf, layer_groups, split_rows

if TYPE_CHECKING:
    from decoderkit.gguf_model import GGUFMetadata

logger = logging.getLogger(__name__)

NAMES = NameMap([
    ("wte.", "embed_tokens."),
    ("norm_f.", "norm."),
    ("blocks.{i}.norm_1.", "layers.{i}.input_layernorm."),
    ("blocks.{i}.norm_2.", "layers.{i}.post_attention_layernorm."),
    ("blocks.{i}.attn.out_proj.", "layers.{i}.self_attn.o_proj."),
    ("blocks.{i}.ffn.up_proj.", "layers.{i}.mlp.up_proj."),
    ("blocks.{i}.ffn.down_proj.", "layers.{i}.mlp.down_proj."),
])

# attn_config options that transformers' MPT accepts but does not implement; we follow transformers (same numbers).
_IGNORED_ATTN_OPTIONS = {"qk_ln": False, "prefix_lm": False, "attn_uses_sequence_id": False, "alibi": True}


class MptFamily(Family):
    model_type = "mpt"
    class_prefix = "Mpt"
    hf_base_prefix = "transformer"
    hf_head_names = {"classifier": "classifier"}
    hf_defaults: dict[str, Any] = dict(
        d_model=2048, n_heads=16, n_layers=24, expansion_ratio=4, max_seq_len=2048, vocab_size=50368, resid_pdrop=0.0,
        layer_norm_epsilon=1e-5, emb_pdrop=0.0, learned_pos_emb=True, attn_config=None, init_device="cpu",
        logit_scale=None, no_bias=True, embedding_fraction=1.0, norm_type="low_precision_layernorm", use_cache=False,
        initializer_range=0.02, tie_word_embeddings=True, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    hf_attribute_map = {"num_attention_heads": "n_heads", "hidden_size": "d_model", "num_hidden_layers": "n_layers"}
    # transformers' MptAttentionConfig, a sub-config with PreTrainedConfig's fields of its own
    hf_sub_configs = {"attn_config": {
        **{k: v for k, v in PRETRAINED_DEFAULTS.items() if k not in ("_name_or_path", "output_attentions")},
        "attn_type": "multihead_attention", "attn_pdrop": 0, "attn_impl": "torch", "clip_qkv": None,
        "softmax_scale": None, "prefix_lm": False, "qk_ln": False, "attn_uses_sequence_id": False, "alibi": True,
        "alibi_bias_max": 8, "_name_or_path": "", "model_type": "", "output_attentions": False,
    }}

    def config_from_hf(self, hf: dict[str, Any]) -> DecoderConfig:
        attn = dict(hf.get("attn_config") or {})
        for key, neutral in _IGNORED_ATTN_OPTIONS.items():
            if attn.get(key, neutral) != neutral:
                logger.warning("mpt config: attn_config.%s=%r is ignored, as transformers does", key, attn[key])
        hidden = hf.get("d_model", hf.get("hidden_size", 2048))
        heads = hf.get("n_heads", hf.get("num_attention_heads", 16))
        if hidden % heads != 0:
            raise ValueError(f"mpt config: d_model ({hidden}) is not a multiple of n_heads ({heads})")
        head_dim = hidden // heads
        with_bias = not hf.get("no_bias", True)
        dropout = float(attn.get("attn_pdrop", 0.0) or 0.0)
        return DecoderConfig(
            model_type=self.model_type,
            vocab_size=hf.get("vocab_size", 50368),
            hidden_size=hidden,
            num_hidden_layers=hf.get("n_layers", hf.get("num_hidden_layers", 24)),
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=head_dim,
            intermediate_size=int(hf.get("expansion_ratio", 4) * hidden),
            max_position_embeddings=hf.get("max_seq_len", hf.get("max_position_embeddings", 2048)),
            norm_type="layer",
            norm_bias=with_bias,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            position_embedding="alibi",
            rope_parameters={},
            hard_max_positions=True,
            alibi_bias_max=attn.get("alibi_bias_max", 8),
            attention_bias=with_bias,
            attention_out_bias=with_bias,
            attention_scale=attn.get("softmax_scale"),  # None: 1/sqrt(head_dim), as MPT's default
            clip_qkv=attn.get("clip_qkv"),
            attention_dropout=dropout,
            mlp_type="plain",
            hidden_act="gelu",
            mlp_bias=with_bias,
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            # transformers' MPT reuses attn_pdrop after the attention and the MLP and has no embedding dropout.
            residual_dropout=dropout,
            initializer_range=hf.get("initializer_range", 0.02),
            use_cache=hf.get("use_cache", False),
            **common_fields(hf),
        )

    # GGUF: llama.cpp's "mpt" architecture.
    gguf_architecture = "mpt"
    gguf_layers_key = "n_layers"

    def config_from_gguf(self, meta: GGUFMetadata) -> dict[str, Any]:
        from gguf import Keys

        hidden = meta.get(Keys.LLM.EMBEDDING_LENGTH, int)
        heads = meta.get(Keys.Attention.HEAD_COUNT, int)
        if (kv_heads := meta.get(Keys.Attention.HEAD_COUNT_KV, int, heads)) != heads:
            raise ValueError(
                f"{meta.path}: MPT with {kv_heads} kv heads for {heads} heads is not supported by transformers"
            )
        alibi_bias_max = meta.get(Keys.Attention.MAX_ALIBI_BIAS, float, 8.0)
        if alibi_bias_max == 0.0 or "position_embd.weight" in meta.tensors:
            raise ValueError(f"{meta.path}: MPT without ALiBi (learned positions) is not supported by transformers")
        # feed_forward_length is written as 4 * d_model regardless of the model; ffn_up's shape is the truth
        ffn_rows = (meta.shape("blk.0.ffn_up.weight") or (meta.get(Keys.LLM.FEED_FORWARD_LENGTH, int),))[0]
        ratio = ffn_rows // hidden if ffn_rows % hidden == 0 else ffn_rows / hidden
        return {
            "model_type": "mpt",
            "architectures": ["MptForCausalLM"],
            "d_model": hidden,
            "n_heads": heads,
            "n_layers": meta.get(Keys.LLM.BLOCK_COUNT, int),
            "expansion_ratio": ratio,
            "max_seq_len": meta.get(Keys.LLM.CONTEXT_LENGTH, int),
            "layer_norm_epsilon": meta.get(Keys.Attention.LAYERNORM_EPS, float),
            "no_bias": True,
            "attn_config": {
                "alibi": True,
                "alibi_bias_max": int(alibi_bias_max) if alibi_bias_max.is_integer() else alibi_bias_max,
                "clip_qkv": meta.get(Keys.Attention.CLAMP_KQV, float, None),
            },
        }

    def gguf_parameters(self) -> tuple[str, ...]:
        from decoderkit.gguf_model import hf_parameter_names

        block = "transformer.blocks.{bid}"
        return hf_parameter_names(
            "transformer.wte",
            "transformer.norm_f",
            "lm_head",
            *(f"{block}.{m}" for m in ("norm_1", "attn.Wqkv", "attn.out_proj", "norm_2")),
            *(f"{block}.ffn.{m}" for m in ("up_proj", "down_proj")),
            bias=False,
        )

    def config_to_gguf(self, hf: dict[str, Any]) -> dict[str, Any]:
        from gguf import Keys

        attn = dict(hf.get("attn_config") or {})
        if not hf.get("no_bias", True):
            raise ValueError("mpt: no_bias=false cannot be written: decoderkit reads MPT GGUF files without biases, "
                             "as llama.cpp's converter writes them")
        if not attn.get("alibi", True):
            raise ValueError("mpt: attn_config.alibi=false cannot be written: transformers' MPT has ALiBi only")
        if attn.get("softmax_scale") is not None:
            raise ValueError("mpt: attn_config.softmax_scale cannot be written: llama.cpp scales by 1/sqrt(head_dim)")
        hidden = hf.get("d_model", 2048)
        metadata = {
            Keys.LLM.CONTEXT_LENGTH: hf.get("max_seq_len", 2048),
            Keys.LLM.EMBEDDING_LENGTH: hidden,
            Keys.LLM.BLOCK_COUNT: hf.get("n_layers", 24),
            # the converter writes 4 * d_model whatever the model has; llama.cpp sizes ffn_up from this key
            Keys.LLM.FEED_FORWARD_LENGTH: int(hf.get("expansion_ratio", 4) * hidden),
            Keys.Attention.HEAD_COUNT: hf.get("n_heads", 16),
            Keys.Attention.LAYERNORM_EPS: float(hf.get("layer_norm_epsilon", 1e-5)),
            Keys.Attention.MAX_ALIBI_BIAS: float(attn.get("alibi_bias_max", 8)),
        }
        if attn.get("clip_qkv") is not None:
            metadata[Keys.Attention.CLAMP_KQV] = float(attn["clip_qkv"])
        return metadata

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        out = common_to_hf(config)
        for alias in ("hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings"):
            out.pop(alias, None)
        attn = dict(out.get("attn_config") or {})
        dropout = config.attention_dropout
        attn.update(
            # transformers' MptAttentionConfig types attn_pdrop as int and rejects 0.0.
            attn_pdrop=int(dropout) if float(dropout).is_integer() else dropout,
            clip_qkv=config.clip_qkv,
            softmax_scale=config.attention_scale,
            alibi=True,
            alibi_bias_max=config.alibi_bias_max,
        )
        out.update(
            d_model=config.hidden_size,
            n_heads=config.num_attention_heads,
            n_layers=config.num_hidden_layers,
            expansion_ratio=config.intermediate_size // config.hidden_size,
            max_seq_len=config.max_position_embeddings,
            vocab_size=config.vocab_size,
            layer_norm_epsilon=config.norm_eps,
            no_bias=not config.attention_bias,
            attn_config=attn,
            initializer_range=config.initializer_range,
        )
        return out

    def base_hf_to_ours(self, name: str, tensor: torch.Tensor, config: DecoderConfig) -> list[tuple[str, torch.Tensor]]:
        new = NAMES.to_ours(name)
        if new is not None:
            return [(new, tensor)]
        parts = name.split(".")
        if len(parts) == 5 and parts[0] == "blocks" and parts[3] == "Wqkv":
            q, k, v = split_rows(tensor, [config.hidden_size] * 3)
            return [(f"layers.{parts[1]}.self_attn.{p}_proj.{parts[4]}", t) for p, t in zip("qkv", (q, k, v))]
        return [(name, tensor)]

    def base_ours_to_hf(self, state: dict[str, torch.Tensor], config: DecoderConfig) -> dict[str, torch.Tensor]:
        out = {new: v for k, v in state.items() if (new := NAMES.to_hf(k)) is not None}
        for prefix, tensors in layer_groups(state):
            for kind in ("weight", "bias"):
                if f"self_attn.q_proj.{kind}" in tensors:
                    qkv = [tensors[f"self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"blocks.{prefix.split('.')[1]}.attn.Wqkv.{kind}"] = torch.cat(qkv, 0)
        return out
