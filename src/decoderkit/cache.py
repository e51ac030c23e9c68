"""Key/value caches for incremental decoding.

`DynamicCache` grows by concatenation and suits one-off calls. `StaticCache` preallocates (B, H_kv, L_max, D) buffers
and writes new entries in place at `cache_position`, so every decode step has the same shapes: what torch.compile and
CUDA graphs need, and no per-token allocation.
"""

from __future__ import annotations

import torch

from decoderkit.config import DecoderConfig, FamilyConfig, as_decoder_config


class Cache:
    """Common interface the model and the generation loop rely on."""

    is_static = False

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, cache_position: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new key/value (B, H_kv, T, D) for a layer; return everything the layer attends to."""
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already stored."""
        raise NotImplementedError

    def key_length(self, total_tokens: int) -> int:
        """Length of the key axis attention sees once `total_tokens` are stored."""
        return total_tokens

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch axis in place (beam search picks parents)."""
        raise NotImplementedError

    def crop(self, length: int) -> None:
        """Roll back to the first `length` tokens, as if the later ones had never been stored (speculative decoding
        drops the rejected proposals this way)."""
        raise NotImplementedError

    def _check_crop(self, length: int) -> None:
        stored = self.get_seq_length()
        if not 0 <= length <= stored:
            raise ValueError(f"{type(self).__name__}.crop: cannot roll back to {length} tokens; {stored} are stored")

    def __len__(self) -> int:
        return self.get_seq_length()


class DynamicCache(Cache):
    """A cache that grows with the sequence."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key, value, layer_idx, cache_position=None):
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[-2] if layer_idx < len(self.keys) else 0

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i].index_select(0, beam_idx.to(self.keys[i].device))
            self.values[i] = self.values[i].index_select(0, beam_idx.to(self.values[i].device))

    def crop(self, length: int) -> None:
        self._check_crop(length)
        for i in range(len(self.keys)):
            # Views: the next update concatenates into new tensors, so the dropped tail is never read again
            self.keys[i] = self.keys[i][..., :length, :]
            self.values[i] = self.values[i][..., :length, :]


class StaticCache(Cache):
    """Fixed-size buffers for `max_batch_size` sequences of up to `max_cache_len` tokens."""

    is_static = True

    def __init__(
        self,
        config: DecoderConfig | FamilyConfig,
        max_batch_size: int,
        max_cache_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_batch_size < 1 or max_cache_len < 1:
            raise ValueError(
                f"StaticCache needs max_batch_size >= 1 and max_cache_len >= 1, got {max_batch_size}, {max_cache_len}"
            )
        config = as_decoder_config(config)  # a model's `config` (transformers' view) or its `decoder_config`
        shape = (max_batch_size, config.num_key_value_heads, max_cache_len, config.head_dim)
        self.max_batch_size = max_batch_size
        self.max_cache_len = max_cache_len
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self._seen = 0

    def update(self, key, value, layer_idx, cache_position=None):
        n = key.shape[-2]
        if cache_position is None:
            cache_position = torch.arange(self._seen, self._seen + n, device=key.device)
        if layer_idx == 0:
            if self._seen + n > self.max_cache_len:
                raise ValueError(
                    f"StaticCache holds {self.max_cache_len} tokens; {self._seen} stored + {n} new do not fit"
                )
            self._seen += n
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        k_buf.index_copy_(2, cache_position, key.to(k_buf.dtype))
        v_buf.index_copy_(2, cache_position, value.to(v_buf.dtype))
        return k_buf, v_buf

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen

    def key_length(self, total_tokens: int) -> int:
        return self.max_cache_len

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for buf in (*self.keys, *self.values):
            buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))

    def crop(self, length: int) -> None:
        self._check_crop(length)
        # Zeroed, the dropped slots are exactly what an unwritten slot holds: the buffers equal those of a cache that
        # never saw the rejected tokens (attention never reads them anyway: a query sees only slots up to its position)
        for buf in (*self.keys, *self.values):
            buf[:, :, length:self._seen].zero_()
        self._seen = length

    def mark_filled(self, length: int) -> None:
        """Declare the first `length` slots filled, for callers that write the buffers directly (a prefill copied in,
        a compiled step whose in-place writes bypass `update`)."""
        if not 0 <= length <= self.max_cache_len:
            raise ValueError(f"StaticCache holds {self.max_cache_len} tokens; cannot mark {length} as filled")
        self._seen = length

    def reset(self) -> None:
        """Forget the stored tokens (the buffers are reused, not freed)."""
        self._seen = 0
        for buf in (*self.keys, *self.values):
            buf.zero_()
