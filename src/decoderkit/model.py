"""The decoder stack and its task heads: one definition for every family."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from decoderkit.cache import Cache, DynamicCache
from decoderkit.config import ATTN_IMPLEMENTATIONS, DecoderConfig
from decoderkit.layers.alibi import alibi_bias, alibi_slopes
from decoderkit.layers.attention import Attention, AttentionInputs, flash_attention_available
from decoderkit.layers.mlp import make_mlp
from decoderkit.layers.norm import make_norm
from decoderkit.layers.rope import RotaryEmbedding
from decoderkit.outputs import ModelOutput


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)) [+ cross_attn(norm(x))] + mlp(norm(x))."""

    def __init__(self, config: DecoderConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = Attention(config, layer_idx)
        if config.add_cross_attention:
            self.cross_attn_layernorm = make_norm(config)
            self.cross_attn = Attention(config, layer_idx, cross=True)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = make_mlp(config)
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self,
        x: torch.Tensor,
        inputs: AttentionInputs,
        cache: Cache | None = None,
        encoder_states: torch.Tensor | None = None,
        encoder_inputs: AttentionInputs | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        h, weights = self.self_attn(self.input_layernorm(x), inputs, cache, output_attentions=output_attentions)
        x = x + self.dropout(h)
        if encoder_states is not None:
            h, _ = self.cross_attn(self.cross_attn_layernorm(x), encoder_inputs, encoder_states=encoder_states)
            x = x + self.dropout(h)
        x = x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        return x, weights


class DecoderStack(nn.Module):
    """Embeddings, the layers and the final norm."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.embedding_padding_idx
        )
        if config.position_embedding == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.rotary = (
            RotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings)
            if config.position_embedding == "rope" else None
        )
        if config.position_embedding == "alibi":
            self.register_buffer(
                "alibi_slopes", alibi_slopes(config.num_attention_heads, config.alibi_bias_max), persistent=False
            )
        self.gradient_checkpointing = False

    def rebuild_buffers(self, device: torch.device | str) -> None:
        """Recompute the derived, non-persistent buffers (after building on the meta device)."""
        config = self.config
        with torch.device(device):
            if self.rotary is not None:
                self.rotary = RotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings)
            if config.position_embedding == "alibi":
                self.alibi_slopes = alibi_slopes(config.num_attention_heads, config.alibi_bias_max)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.config.embedding_scale is not None:
            # The scale is rounded to the weight dtype first, as transformers does (sqrt(3072) becomes 55.5 in bf16).
            x = x * torch.tensor(self.config.embedding_scale, dtype=self.embed_tokens.weight.dtype)
        return x

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        cache_position: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        validate: bool = True,
    ) -> ModelOutput:
        config = self.config
        if use_cache is None:
            use_cache = config.use_cache and not self.training
        if validate:
            self._validate(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values,
                           token_type_ids, encoder_hidden_states, encoder_attention_mask)
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        made_cache = use_cache and past_key_values is None
        if made_cache:
            past_key_values = DynamicCache()
        cache = past_key_values if (use_cache or past_key_values is not None) else None
        past = cache.get_seq_length() if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + T, device=x.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if validate and config.hard_max_positions:
            longest = max(past + T, int(position_ids.max()) + 1 if position_ids.numel() else 0)
            if longest > config.max_position_embeddings:
                raise ValueError(
                    f"sequence of {longest} positions is longer than this {config.model_type} model allows "
                    f"(max_position_embeddings={config.max_position_embeddings})"
                )

        if config.position_embedding == "learned":
            x = x + self.embed_positions(position_ids).to(x.dtype)
        if token_type_ids is not None:
            x = x + self.embed_tokens(token_type_ids)
        x = self.embed_dropout(x)

        k_len = cache.key_length(past + T) if cache is not None else T
        packed = position_ids if (attention_mask is None and cache is None and T > 1) else None
        mask = build_attention_mask(attention_mask, B, T, k_len, cache_position, config.is_causal, past + T,
                                    packed, x.device)
        inputs = AttentionInputs(mask=mask, causal=config.is_causal, cache_position=cache_position,
                                 padding_mask=attention_mask.bool() if attention_mask is not None else None)
        if self.rotary is not None:
            inputs.rope = self.rotary(position_ids, x.dtype)
        if config.position_embedding == "alibi":
            inputs.alibi = alibi_bias(self.alibi_slopes, k_len)
            inputs.alibi_slopes = self.alibi_slopes
        encoder_inputs = None
        if encoder_hidden_states is not None:
            enc_mask = None
            if encoder_attention_mask is not None:
                enc_mask = encoder_attention_mask.bool()[:, None, None, :].expand(B, 1, T, -1)
            encoder_inputs = AttentionInputs(mask=enc_mask, causal=False, padding_mask=None)

        hidden_states: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x, weights = checkpoint(layer, x, inputs, None, encoder_hidden_states, encoder_inputs,
                                        output_attentions, use_reentrant=False)
            else:
                x, weights = layer(x, inputs, cache, encoder_hidden_states, encoder_inputs, output_attentions)
            if output_attentions:
                attentions.append(weights)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        return ModelOutput(
            last_hidden_state=x,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    def _validate(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, token_type_ids,
                  encoder_hidden_states, encoder_attention_mask) -> None:
        config = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds (got "
                             f"{'both' if input_ids is not None else 'neither'})")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be 2-D (batch, sequence), got shape {tuple(input_ids.shape)}")
            _check_ids("input_ids", input_ids, config.vocab_size)
            B, T = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
                raise ValueError(f"inputs_embeds must have shape (batch, sequence, {config.hidden_size}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            B, T = inputs_embeds.shape[:2]
        if T == 0:
            raise ValueError("the input sequence is empty (sequence length 0)")
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None and cache.is_static and B != cache.max_batch_size:
            raise ValueError(f"StaticCache was built for batch size {cache.max_batch_size}, got a batch of {B}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected (batch, past + new tokens) = "
                f"({B}, {past + T})"
            )
        if position_ids is not None and (position_ids.shape[-1] != T or position_ids.dim() > 2
                                         or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, B))):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected ({B}, {T}) or (1, {T})")
        if token_type_ids is not None:
            if not config.token_type_embeddings:
                raise ValueError(f"{config.model_type} models take no token_type_ids")
            if tuple(token_type_ids.shape) != (B, T):
                raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}; expected ({B}, {T})")
            _check_ids("token_type_ids", token_type_ids, config.vocab_size)
        if encoder_hidden_states is not None and not config.add_cross_attention:
            raise ValueError("encoder_hidden_states given, but this model has no cross-attention "
                             "(config add_cross_attention=false)")
        if encoder_attention_mask is not None and encoder_hidden_states is not None and tuple(
                encoder_attention_mask.shape) != tuple(encoder_hidden_states.shape[:2]):
            raise ValueError(f"encoder_attention_mask has shape {tuple(encoder_attention_mask.shape)}; expected "
                             f"{tuple(encoder_hidden_states.shape[:2])}")


def _check_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} holds ids in [{int(ids.min())}, {int(ids.max())}]; the vocabulary has "
                         f"{vocab_size} entries, so ids must be in [0, {vocab_size - 1}]")


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    k_len: int,
    cache_position: torch.Tensor,
    causal: bool,
    filled: int,
    packed_position_ids: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B, 1, Q, K) mask, True = may attend; None when plain causal attention needs no mask.

    Query i sits at absolute position cache_position[i]; key j at slot j. Slots past `filled` (a static cache's unused
    tail) are masked; `attention_mask` (B, filled) masks padding. Without a 2-D mask and without a cache, position ids
    that restart mark packed sequences, which attend only within themselves (as transformers does).
    """
    padding = attention_mask is not None and not bool(attention_mask.all())
    packed_segments = None
    if packed_position_ids is not None:
        ids = packed_position_ids.expand(batch, -1)
        diff = torch.diff(ids, prepend=ids[:, :1] - 1, dim=-1)
        segments = (diff != 1).cumsum(-1)
        if bool((segments[:, -1] != 0).any()):
            packed_segments = segments
    if not padding and packed_segments is None and k_len == filled and (q_len == k_len or q_len == 1):
        return None
    k_idx = torch.arange(k_len, device=device)
    allowed = (k_idx[None, :] <= cache_position[:, None]) if causal else (k_idx < filled)[None, :].expand(q_len, -1)
    allowed = allowed[None, None].expand(batch, 1, q_len, k_len)
    if attention_mask is not None:
        pad = attention_mask.bool()
        if pad.shape[-1] < k_len:
            pad = F.pad(pad, (0, k_len - pad.shape[-1]), value=False)
        allowed = allowed & pad[:, None, None, :]
    if packed_segments is not None:
        allowed = allowed & (packed_segments[:, None, :, None] == packed_segments[:, None, None, :])
    return allowed


class PreTrainedDecoder(nn.Module):
    """Shared machinery of every head: loading, saving, initialisation, gradient checkpointing."""

    head: ClassVar[str] = "base"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls, config: DecoderConfig | dict[str, Any], *, dtype: Any = None, torch_dtype: Any = None,
        attn_implementation: str | None = None, device: str | torch.device | None = None, **overrides: Any,
    ) -> PreTrainedDecoder:
        """A randomly initialised model (each family's initialisation) from a DecoderConfig or config.json dict."""
        from decoderkit.checkpoint import resolve_dtype

        config = prepare_config(config, attn_implementation, overrides)
        target = resolve_dtype(dtype if dtype is not None else torch_dtype, config) or torch.float32
        with torch.device(device or "cpu"):
            model = cls(config)
        model.init_weights()
        return model.to(target)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype: Any = None, torch_dtype: Any = None,
        attn_implementation: str | None = None, device: str | torch.device | None = None, **kwargs: Any,
    ) -> PreTrainedDecoder:
        """Load a Hugging Face model directory, a hub id in the local cache, or a `.gguf` file."""
        from decoderkit.checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype if dtype is not None else torch_dtype,
                               attn_implementation=attn_implementation, device=device, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        """Write a directory transformers loads as the same model (config.json, safetensors shards, index)."""
        from decoderkit.checkpoint import save_pretrained

        save_pretrained(self, save_directory, max_shard_size=max_shard_size)

    # ------------------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' initialisation for the family: N(0, initializer_range) for projections and embeddings."""
        cfg = self.config
        std = cfg.initializer_range
        self.tie_weights()
        embedding_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in embedding_weights:
                continue  # a tied output head is initialised as the embedding it shares
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
            elif hasattr(module, "weight_offset"):
                module.weight.fill_(0.0 if cfg.norm_init_zero else 1.0)
        if cfg.scaled_output_init:
            # GPT-2-style: residual projections shrink with depth so the residual stream's variance stays bounded.
            scaled = std / (2 * cfg.num_hidden_layers) ** 0.5
            for layer in self.model.layers:
                layer.self_attn.o_proj.weight.normal_(0.0, scaled)
                layer.mlp.down_proj.weight.normal_(0.0, scaled)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the output projection with the input embedding when the config says so."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer's activations in the backward pass instead of storing them."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    def set_attn_implementation(self, name: str) -> None:
        check_attn_implementation(name)
        self.config.attn_implementation = name
        for module in self.modules():
            if isinstance(module, Attention):
                module.implementation = name

    def _base(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
              output_attentions, output_hidden_states, cache_position, **extra) -> ModelOutput:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                          cache_position=cache_position, **extra)


def check_attn_implementation(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={name!r} is not supported; allowed: {list(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and not flash_attention_available():
        raise ValueError("attn_implementation='flash_attention_2' needs a CUDA device and the flash_attn package; "
                         "use 'sdpa' (default) or 'eager' here")


def prepare_config(config: DecoderConfig | dict[str, Any], attn_implementation: str | None,
                   overrides: dict[str, Any]) -> DecoderConfig:
    """A DecoderConfig from either form, with the attention backend checked and HF-style overrides applied."""
    if isinstance(config, dict):
        config = DecoderConfig.from_hf_dict({**config, **overrides})
    elif overrides:
        config = DecoderConfig.from_hf_dict({**config.to_hf_dict(), **overrides}).replace(
            attn_implementation=config.attn_implementation)
    else:
        config = config.replace()
    if attn_implementation is not None:
        check_attn_implementation(attn_implementation)
        config = config.replace(attn_implementation=attn_implementation)
    else:
        check_attn_implementation(config.attn_implementation)
    return config


class DecoderModel(PreTrainedDecoder):
    """The bare decoder: `last_hidden_state` after the final norm."""

    head = "base"

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, output_attentions: bool = False,
        output_hidden_states: bool = False, cache_position: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True,
    ) -> ModelOutput:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                          cache_position=cache_position, token_type_ids=token_type_ids,
                          encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None,
                   ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross entropy in fp32: labels shift left inside, -100 is ignored."""
    shift = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1).to(logits.device)
    flat = logits.float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, shift, ignore_index=ignore_index)
    return F.cross_entropy(flat, shift, ignore_index=ignore_index, reduction="sum") / num_items_in_batch


class DecoderForCausalLM(PreTrainedDecoder):
    """Decoder with a language-modelling head (tied to the embedding when the config says so)."""

    head = "causal_lm"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None, use_cache: bool | None = None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        cache_position: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
        token_type_ids: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None, num_items_in_batch: int | torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> ModelOutput:
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)}; expected input_ids' {tuple(input_ids.shape)}")
        extra = {}
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids
        if encoder_hidden_states is not None:
            extra.update(encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask)
        out = self._base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache_position, **extra)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return ModelOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states, attentions=out.attentions)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generate continuations with transformers' `generate` arguments (see `decoderkit.generation`)."""
        from decoderkit.generation.generate import generate

        return generate(self, *args, **kwargs)


class DecoderForSequenceClassification(PreTrainedDecoder):
    """Scores each sequence from its last non-padding token."""

    head = "sequence_classification"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None, use_cache: bool | None = None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        cache_position: torch.Tensor | None = None, return_dict: bool = True, **extra: Any,
    ) -> ModelOutput:
        out = self._base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache_position, **extra)
        logits = self.score(out.last_hidden_state)
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("cannot find the last token of each sequence: a batch larger than 1 needs "
                             "config.pad_token_id to be set")
        if pad is None or input_ids is None:
            last = torch.full((batch,), -1, dtype=torch.long, device=logits.device)
        else:
            # The last non-pad index: with left padding that is the final position, with right padding the last token.
            idx = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (idx * (input_ids != pad).to(logits.device, torch.int32)).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = self._loss(pooled, labels) if labels is not None else None
        return ModelOutput(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                           hidden_states=out.hidden_states, attentions=out.attentions)

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = self.config.num_labels
        labels = labels.to(pooled.device)
        problem = self.config.problem_type
        if problem is None:
            if n == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            self.config.problem_type = problem
        if problem == "regression":
            return F.mse_loss(pooled.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(pooled, labels)
        if problem == "single_label_classification":
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n) and int(labels.min()) != -100:
                raise ValueError(f"labels must be in [0, {n - 1}] (num_labels={n}), got values in "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            return F.cross_entropy(pooled.view(-1, n), labels.view(-1))
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))
        raise ValueError(f"problem_type {problem!r} is not supported; allowed: regression, "
                         "single_label_classification, multi_label_classification")


class DecoderForTokenClassification(PreTrainedDecoder):
    """Per-token labels (NER-style)."""

    head = "token_classification"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=config.token_classifier_bias)

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None, use_cache: bool | None = None,
        output_attentions: bool = False, output_hidden_states: bool = False,
        cache_position: torch.Tensor | None = None, return_dict: bool = True, **extra: Any,
    ) -> ModelOutput:
        out = self._base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache_position, **extra)
        logits = self.score(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            n = self.config.num_labels
            valid = labels[labels != -100]
            if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n):
                raise ValueError(f"labels must be in [0, {n - 1}] or -100 (num_labels={n}), got values in "
                                 f"[{int(valid.min())}, {int(valid.max())}]")
            loss = F.cross_entropy(logits.float().view(-1, n), labels.view(-1).to(logits.device))
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class DecoderForQuestionAnswering(PreTrainedDecoder):
    """Extractive QA: start and end logits for each token."""

    head = "question_answering"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None, use_cache: bool | None = False, output_attentions: bool = False,
        output_hidden_states: bool = False, cache_position: torch.Tensor | None = None, return_dict: bool = True,
        **extra: Any,
    ) -> ModelOutput:
        out = self._base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache_position, **extra)
        start, end = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the input are clamped to an ignored index, as transformers does.
            ignored = start.size(1)
            s = start_positions.reshape(-1).clamp(0, ignored).to(start.device)
            e = end_positions.reshape(-1).clamp(0, ignored).to(end.device)
            loss = (F.cross_entropy(start, s, ignore_index=ignored) + F.cross_entropy(end, e, ignore_index=ignored)) / 2
        return ModelOutput(loss=loss, start_logits=start, end_logits=end, hidden_states=out.hidden_states,
                           attentions=out.attentions)


HEAD_CLASSES: dict[str, type[PreTrainedDecoder]] = {
    cls.head: cls
    for cls in (DecoderModel, DecoderForCausalLM, DecoderForSequenceClassification, DecoderForTokenClassification,
                DecoderForQuestionAnswering)
}
