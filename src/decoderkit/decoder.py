"""The decoder itself: embeddings, pre-norm blocks, the final norm, and the attention mask they share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from decoderkit.cache import Cache, DynamicCache
from decoderkit.config import DecoderConfig
from decoderkit.layers.alibi import alibi_bias, alibi_slopes
from decoderkit.layers.attention import Attention, AttentionInputs
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


def scale_embeddings(x: torch.Tensor, scale: float) -> torch.Tensor:
    # The scale is rounded to the weight dtype first, as transformers does (sqrt(3072) becomes 55.5 in bf16).
    return x * torch.tensor(scale, dtype=x.dtype)


class ScaledEmbedding(nn.Embedding):
    """An embedding whose rows come out multiplied by a constant (Gemma's sqrt(hidden_size)), as transformers' scaled
    embedding module does: `get_input_embeddings()(ids)` gives what the first layer sees, `inputs_embeds` are used as
    given."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, scale: float) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.scale = scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return scale_embeddings(super().forward(input), self.scale)


class DecoderStack(nn.Module):
    """Embeddings, the layers and the final norm."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        if config.embedding_scale is not None:
            self.embed_tokens = ScaledEmbedding(config.vocab_size, config.hidden_size, config.embedding_padding_idx,
                                                config.embedding_scale)
        else:
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
        if self.config.embedding_scale is not None and not isinstance(self.embed_tokens, ScaledEmbedding):
            x = scale_embeddings(x, self.config.embedding_scale)  # a quantized table that replaced the scaled one
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
        packed = packed_segments(position_ids, B) if (attention_mask is None and cache is None and T > 1) else None
        mask = build_attention_mask(attention_mask, B, T, k_len, cache_position, config.is_causal, past + T,
                                    packed, x.device)
        inputs = AttentionInputs(mask=mask, causal=config.is_causal, cache_position=cache_position,
                                 padding_mask=attention_mask.bool() if attention_mask is not None else None,
                                 filled=past + T, packed_segments=packed)
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
            encoder_inputs = AttentionInputs(
                mask=enc_mask, causal=False,
                padding_mask=encoder_attention_mask.bool() if encoder_attention_mask is not None else None)

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


def packed_segments(position_ids: torch.Tensor, batch: int) -> torch.Tensor | None:
    """(B, T) document ids where position ids restart (packed sequences), or None when nothing restarts.

    Meant for inputs without a 2-D mask and without a cache: there, as in transformers, each document attends only
    within itself.
    """
    ids = position_ids.expand(batch, -1)
    diff = torch.diff(ids, prepend=ids[:, :1] - 1, dim=-1)
    segments = (diff != 1).cumsum(-1)
    return segments if bool((segments[:, -1] != 0).any()) else None


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    k_len: int,
    cache_position: torch.Tensor,
    causal: bool,
    filled: int,
    packed_segments: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean (B, 1, Q, K) mask, True = may attend; None when plain causal attention needs no mask.

    Query i sits at absolute position cache_position[i]; key j at slot j. Slots past `filled` (a static cache's unused
    tail) are masked; `attention_mask` (B, filled) masks padding; `packed_segments` (B, T) keeps each packed document
    to itself.
    """
    padding = attention_mask is not None and not bool(attention_mask.all())
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
