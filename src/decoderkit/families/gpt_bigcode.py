"""GPTBigCode (StarCoder, SantaCoder): `model_type: gpt_bigcode`.

Pre-LayerNorm blocks with learned absolute positions, a plain GELU MLP and a fused `c_attn` projection whose layout
depends on the attention kind: multi-query stores rows as [q (E) | k (D) | v (D)], multi-head interleaves them per head
as [q_h | k_h | v_h] for each head h.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from decoderkit.config import DecoderConfig

if TYPE_CHECKING:
    from decoderkit.gguf_model import GGUFMetadata

from decoderkit.families.base import Family, NameMap, common_fields, common_to_hf, layer_groups, split_rows

NAMES = NameMap([
    ("wte.", "embed_tokens."),
    ("wpe.", "embed_positions."),
    ("ln_f.", "norm."),
    ("h.{i}.ln_1.", "layers.{i}.input_layernorm."),
    ("h.{i}.ln_2.", "layers.{i}.post_attention_layernorm."),
    ("h.{i}.ln_cross_attn.", "layers.{i}.cross_attn_layernorm."),
    ("h.{i}.attn.c_proj.", "layers.{i}.self_attn.o_proj."),
    ("h.{i}.crossattention.c_proj.", "layers.{i}.cross_attn.o_proj."),
    ("h.{i}.crossattention.q_attn.", "layers.{i}.cross_attn.q_proj."),
    ("h.{i}.mlp.c_fc.", "layers.{i}.mlp.up_proj."),
    ("h.{i}.mlp.c_proj.", "layers.{i}.mlp.down_proj."),
])


class GPTBigCodeFamily(Family):
    model_type = "gpt_bigcode"
    class_prefix = "GPTBigCode"
    hf_base_prefix = "transformer"
    hf_head_names = {"classifier": "classifier"}
    hf_heads = ("base", "causal_lm", "sequence_classification", "token_classification")
    hf_defaults: dict[str, Any] = dict(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
        activation_function="gelu_pytorch_tanh", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True, use_cache=True, bos_token_id=50256,
        eos_token_id=50256, pad_token_id=None, attention_softmax_in_fp32=True, scale_attention_softmax_in_fp32=True,
        multi_query=True, add_cross_attention=False, tie_word_embeddings=True, num_key_value_heads=None,
    )
    hf_attribute_map = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                        "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

    def complete_hf_config(self, hf: dict[str, Any]) -> None:
        hf["num_key_value_heads"] = 1 if hf["multi_query"] else hf["n_head"]

    def config_from_hf(self, hf: dict[str, Any]) -> DecoderConfig:
        hidden = hf.get("n_embd", hf.get("hidden_size", 768))
        heads = hf.get("n_head", hf.get("num_attention_heads", 12))
        if hidden % heads != 0:
            raise ValueError(f"gpt_bigcode config: n_embd ({hidden}) is not a multiple of n_head ({heads})")
        multi_query = hf.get("multi_query", True)
        if hf.get("add_cross_attention") and multi_query:
            raise ValueError("gpt_bigcode config: add_cross_attention is not supported with multi_query=true")
        n_positions = hf.get("n_positions", hf.get("max_position_embeddings", 1024))
        return DecoderConfig(
            model_type=self.model_type,
            vocab_size=hf.get("vocab_size", 50257),
            hidden_size=hidden,
            num_hidden_layers=hf.get("n_layer", hf.get("num_hidden_layers", 12)),
            num_attention_heads=heads,
            num_key_value_heads=1 if multi_query else heads,
            head_dim=hidden // heads,
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            max_position_embeddings=n_positions,
            norm_type="layer",
            norm_bias=True,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            position_embedding="learned",
            rope_parameters={},
            hard_max_positions=True,
            attention_bias=True,
            attention_out_bias=True,
            attention_scale=None if hf.get("scale_attn_weights", True) else 1.0,
            attention_dropout=float(hf.get("attn_pdrop", 0.1)),
            add_cross_attention=bool(hf.get("add_cross_attention", False)),
            mlp_type="plain",
            hidden_act=hf.get("activation_function", "gelu_pytorch_tanh"),
            mlp_bias=True,
            token_type_embeddings=True,
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            embedding_dropout=float(hf.get("embd_pdrop", 0.1)),
            residual_dropout=float(hf.get("resid_pdrop", 0.1)),
            initializer_range=hf.get("initializer_range", 0.02),
            scaled_output_init=True,
            use_cache=hf.get("use_cache", True),
            **common_fields({"bos_token_id": 50256, "eos_token_id": 50256, **hf}),
        )

    # GGUF: llama.cpp's "starcoder" architecture.
    gguf_architecture = "starcoder"
    gguf_layers_key = "n_layer"

    def config_from_gguf(self, meta: GGUFMetadata) -> dict[str, Any]:
        from gguf import Keys

        hidden = meta.get(Keys.LLM.EMBEDDING_LENGTH, int)
        heads = meta.get(Keys.Attention.HEAD_COUNT, int)
        # The converter writes head_count_kv=1 and feed_forward_length=4*n_embd whatever the model has, so the fused
        # qkv and ffn_up shapes are the reliable source: qkv rows = hidden + 2 * kv_heads * head_dim.
        qkv_rows = (meta.shape("blk.0.attn_qkv.weight") or (hidden + 2 * hidden // heads,))[0]
        ffn_rows = (meta.shape("blk.0.ffn_up.weight") or (meta.get(Keys.LLM.FEED_FORWARD_LENGTH, int),))[0]
        return {
            "model_type": "gpt_bigcode",
            "architectures": ["GPTBigCodeForCausalLM"],
            "n_embd": hidden,
            "n_inner": ffn_rows,
            "n_layer": meta.get(Keys.LLM.BLOCK_COUNT, int),
            "n_head": heads,
            "n_positions": meta.get(Keys.LLM.CONTEXT_LENGTH, int),
            "layer_norm_epsilon": meta.get(Keys.Attention.LAYERNORM_EPS, float),
            "multi_query": qkv_rows == hidden + 2 * hidden // heads,
            "activation_function": "gelu_pytorch_tanh",
        }

    def gguf_parameters(self) -> tuple[str, ...]:
        from decoderkit.gguf_model import hf_parameter_names as names

        layer = "transformer.h.{bid}"
        return (
            *names("transformer.wte", "transformer.wpe", "lm_head", bias=False),
            *names("transformer.ln_f", f"{layer}.ln_1", f"{layer}.ln_2"),
            *names(*(f"{layer}.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))),
        )

    def config_to_gguf(self, hf: dict[str, Any]) -> dict[str, Any]:
        from gguf import Keys

        hidden = hf.get("n_embd", 768)
        if not hf.get("multi_query", True):
            # llama.cpp splits attn_qkv as [q | k | v] with one kv head; transformers' multi-head layout interleaves
            # them per head, so llama.cpp (and its own converter's output) would attend wrongly.
            raise ValueError("gpt_bigcode: multi_query=false cannot be written: llama.cpp's starcoder architecture "
                             "supports multi-query attention only")
        if hf.get("add_cross_attention"):
            raise ValueError("gpt_bigcode: add_cross_attention=true cannot be written: llama.cpp has no "
                             "cross-attention")
        if not hf.get("scale_attn_weights", True):
            raise ValueError("gpt_bigcode: scale_attn_weights=false cannot be written: llama.cpp always scales by "
                             "1/sqrt(head_dim)")
        act = hf.get("activation_function", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ValueError(f"gpt_bigcode: activation_function {act!r} cannot be written: llama.cpp's starcoder "
                             "computes the tanh GELU (gelu_pytorch_tanh, gelu_new)")
        return {
            Keys.LLM.CONTEXT_LENGTH: hf.get("n_positions", 1024),
            Keys.LLM.EMBEDDING_LENGTH: hidden,
            # the converter writes 4 * n_embd whatever the model has; llama.cpp sizes ffn_up from this key
            Keys.LLM.FEED_FORWARD_LENGTH: hf.get("n_inner") or 4 * hidden,
            Keys.LLM.BLOCK_COUNT: hf.get("n_layer", 12),
            Keys.Attention.HEAD_COUNT: hf.get("n_head", 12),
            Keys.Attention.HEAD_COUNT_KV: 1,
            Keys.Attention.LAYERNORM_EPS: float(hf.get("layer_norm_epsilon", 1e-5)),
        }

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        out = common_to_hf(config)
        for alias in ("hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings",
                      "num_key_value_heads"):
            out.pop(alias, None)
        out.update(
            vocab_size=config.vocab_size,
            n_embd=config.hidden_size,
            n_head=config.num_attention_heads,
            n_layer=config.num_hidden_layers,
            n_positions=config.max_position_embeddings,
            n_inner=config.intermediate_size,
            activation_function=config.hidden_act,
            layer_norm_epsilon=config.norm_eps,
            scale_attn_weights=config.attention_scale is None,
            multi_query=config.num_key_value_heads == 1 and not self._is_mha(config),
            attn_pdrop=config.attention_dropout,
            resid_pdrop=config.residual_dropout,
            embd_pdrop=config.embedding_dropout,
            add_cross_attention=config.add_cross_attention,
            initializer_range=config.initializer_range,
        )
        return out

    def base_hf_to_ours(self, name: str, tensor: torch.Tensor, config: DecoderConfig) -> list[tuple[str, torch.Tensor]]:
        new = NAMES.to_ours(name)
        if new is not None:
            return [(new, tensor)]
        parts = name.split(".")
        if len(parts) == 5 and parts[0] == "h" and parts[3] == "c_attn":
            layer, module, kind = parts[1], parts[2], parts[4]
            if module == "attn":
                q, k, v = self._split_qkv(tensor, config)
                target = f"layers.{layer}.self_attn"
            else:
                q = None
                k, v = split_rows(tensor, [config.hidden_size, config.hidden_size])
                target = f"layers.{layer}.cross_attn"
            pieces = [("k_proj", k), ("v_proj", v)] + ([("q_proj", q)] if q is not None else [])
            return [(f"{target}.{proj}.{kind}", t) for proj, t in pieces]
        return [(name, tensor)]

    def _split_qkv(self, fused: torch.Tensor, config: DecoderConfig) -> list[torch.Tensor]:
        e, d, h = config.hidden_size, config.head_dim, config.num_attention_heads
        if config.num_key_value_heads == 1 and not self._is_mha(config):
            return split_rows(fused, [e, d, d])
        per_head = fused.reshape(h, 3, d, *fused.shape[1:])
        return [per_head[:, i].reshape(e, *fused.shape[1:]).contiguous() for i in range(3)]

    @staticmethod
    def _is_mha(config: DecoderConfig) -> bool:
        # With a single head, MQA and MHA coincide in shape; the config's own flag decides the layout.
        return not config.hf_config.get("multi_query", True)

    def base_ours_to_hf(self, state: dict[str, torch.Tensor], config: DecoderConfig) -> dict[str, torch.Tensor]:
        out = {new: v for k, v in state.items() if (new := NAMES.to_hf(k)) is not None}
        e, d, h = config.hidden_size, config.head_dim, config.num_attention_heads
        for prefix, tensors in layer_groups(state):
            layer = prefix.split(".")[1]
            for kind in ("weight", "bias"):
                q, k, v = (tensors.get(f"self_attn.{p}_proj.{kind}") for p in "qkv")
                if q is not None:
                    if config.num_key_value_heads == 1 and not self._is_mha(config):
                        fused = torch.cat([q, k, v], 0)
                    else:
                        fused = torch.stack([t.reshape(h, d, *t.shape[1:]) for t in (q, k, v)], 1)
                        fused = fused.reshape(3 * e, *q.shape[1:])
                    out[f"h.{layer}.attn.c_attn.{kind}"] = fused
                ck, cv = tensors.get(f"cross_attn.k_proj.{kind}"), tensors.get(f"cross_attn.v_proj.{kind}")
                if ck is not None:
                    out[f"h.{layer}.crossattention.c_attn.{kind}"] = torch.cat([ck, cv], 0)
        return out
