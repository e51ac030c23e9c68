"""Checks of what a generate call resumes from: prompt embeddings (`inputs_embeds`) and a cache (`past_key_values`).

Each raises a ValueError naming the argument before the model runs.
"""

from __future__ import annotations

from typing import Any

import torch

from decoderkit.cache import Cache
from decoderkit.generation.config import GenerationConfig


def check_embeds(inputs_embeds: Any, input_ids: torch.Tensor | None, hidden_size: int) -> None:
    """ValueError unless `inputs_embeds` is a (batch, length, hidden_size) float prompt, matching input_ids."""
    if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.dtype.is_floating_point:
        raise ValueError(f"inputs_embeds must be a float tensor (batch, length, {hidden_size}), got "
                         f"{type(inputs_embeds).__name__}")
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size or 0 in inputs_embeds.shape[:2]:
        raise ValueError(f"inputs_embeds must have shape (batch, length, {hidden_size}) with length >= 1, got "
                         f"{tuple(inputs_embeds.shape)}")
    if input_ids is not None and tuple(input_ids.shape) != tuple(inputs_embeds.shape[:2]):
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}, inputs_embeds "
                         f"{tuple(inputs_embeds.shape)}: with both, they describe the same prompt")


def check_past(cache: Any, config: GenerationConfig, rows: int, L: int, max_length: int) -> int:
    """The number of prompt tokens a caller's past_key_values already holds, after checking it can continue."""
    if not isinstance(cache, Cache):
        raise ValueError(f"past_key_values must be a decoderkit cache (DynamicCache, StaticCache, or the one an "
                         f"earlier generate returned), got {type(cache).__name__}")
    if not config.use_cache:
        raise ValueError("past_key_values was given with use_cache=False")
    past = cache.get_seq_length()
    if past >= L:
        raise ValueError(f"past_key_values holds {past} tokens; input_ids ({L} tokens: the cached ones, then the "
                         "new ones) must extend it by at least one token")
    keys = getattr(cache, "keys", None)
    if past and keys and keys[0].shape[0] != rows:
        raise ValueError(f"past_key_values holds {keys[0].shape[0]} rows; this call runs {rows} (batch x "
                         "max(num_beams, num_return_sequences))")
    if cache.is_static and max_length > cache.max_cache_len:
        raise ValueError(f"past_key_values is a StaticCache of {cache.max_cache_len} slots; this call needs "
                         f"{max_length}")
    return past
