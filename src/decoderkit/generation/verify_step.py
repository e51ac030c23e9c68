"""The verify step of speculative decoding, compiled: the last chosen token and k proposals of one sequence through
the model over a static cache in one call, with the logits at every position.

Eagerly, a verify forward costs what an eager decode step costs in Python (module calls, mask building), which on a
small CPU model is more than its arithmetic: against a compiled decode step (``compile="aot"`` or ``True``),
speculation then gains little. This step is an AOTInductor package like the decode step
(:mod:`decoderkit.generation.aot_step`), built
once for any number of tokens from 2 to `MAX_VERIFY_TOKENS` (the tokens' axis is dynamic), so a proposal of any
length runs the same compiled code. The package always takes the weights as inputs (a float model's decode step
embeds them; a second embedded copy would double the memory) and is keyed by their names, dtypes and shapes.

Each call writes its tokens' keys and values at slots ``filled .. filled + T - 1``; the caller then keeps the slots
of the accepted tokens (:meth:`~decoderkit.cache.Cache.crop`), and a later step overwrites the rest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decoderkit.cache import Cache
from decoderkit.generation.decode_step import _forward_one, _SlotCache, alibi_over
from decoderkit.layers.attention import STATIC_KERNEL_ROWS
from decoderkit.layers.linear import DecodeLinear, use_decode_linear

__all__ = ["MAX_VERIFY_TOKENS", "VERIFY_QUERIES", "VerifyStep", "build_verify_package", "verify_package_path"]

# Tokens per verify call (the chosen token and up to 15 proposals): the static-cache attention kernel's query rows.
# Past them SDPA would read every slot of the cache under a mask.
MAX_VERIFY_TOKENS = STATIC_KERNEL_ROWS
# The range of tokens per call a verify package takes
VERIFY_QUERIES = (2, MAX_VERIFY_TOKENS)


def _forward_all_static(model, tokens, position_ids, cache_position, mask, rope, alibi, keys, values):
    return _forward_one(model, tokens, position_ids, cache_position, mask, None, rope, alibi,
                        _SlotCache(keys, values), last=False)


@contextlib.contextmanager
def _torch_linears(model: nn.Module) -> Iterator[None]:
    """`model`'s `DecodeLinear`s as plain `nn.Linear`s while a verify step is traced: their choice between the GEMV
    kernel and torch's GEMM depends on the number of rows, which is dynamic there (a verify call has at least 2
    rows, where torch's GEMM is the right choice anyway)."""
    swapped = [m for m in model.modules() if type(m) is DecodeLinear]
    for m in swapped:
        m.__class__ = nn.Linear
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = DecodeLinear


def _example(model: Any, cache: Cache, tokens: int) -> tuple:
    slots = cache.max_cache_len
    mask = torch.ones(1, 1, tokens, slots, dtype=torch.bool).tril()
    return (torch.zeros(1, tokens, dtype=torch.long), torch.arange(tokens)[None], torch.arange(tokens), mask,
            alibi_over(model, slots), cache.keys, cache.values)


def verify_package(model: Any, cache: Cache) -> Any:
    """The packaged verify step for `model` over `cache`'s shapes (one row), loaded or built (see `aot_step`)."""
    from decoderkit.generation.aot_step import aot_step, step_identity

    use_decode_linear(model)
    with _torch_linears(model):
        return aot_step(model, step_identity(model, as_inputs=True), _forward_all_static,
                        _example(model, cache, MAX_VERIFY_TOKENS), queries=VERIFY_QUERIES, as_inputs=True)


def build_verify_package(model: Any, slots: int) -> Path:
    """Build (or find) the verify package for `model`, one row and `slots` cache slots; its path."""
    from decoderkit.cache import StaticCache

    verify_package(model, StaticCache(model.decoder_config, 1, slots, dtype=model.dtype))
    return verify_package_path(model, slots)


def verify_package_path(model: Any, slots: int) -> Path:
    """Where the verify package for `model`, one row and a static cache of `slots` slots lives."""
    from decoderkit.generation.aot_step import package_path, step_identity

    use_decode_linear(model)
    with _torch_linears(model):  # as the package is keyed when it is built
        return package_path(model, step_identity(model, as_inputs=True), 1, slots, VERIFY_QUERIES)


class VerifyStep:
    """Feeds ``T`` tokens of one sequence (2 <= T <= `MAX_VERIFY_TOKENS`) to the model at cache slots
    ``filled ..`` through the packaged verify step and returns their fp32 logits (T, V).

    The static `cache` of one row and no padding (what speculative decoding's single-sequence loop runs) has its
    positions equal to its slots. A call marks the cache filled up to its last token."""

    def __init__(self, model: Any, cache: Cache) -> None:
        from decoderkit.generation.aot_step import weight_inputs

        if not cache.is_static or cache.keys[0].shape[0] != 1:
            raise ValueError("VerifyStep runs one sequence over a static cache")
        self.model, self.cache = model, cache
        self.package = verify_package(model, cache)
        self.slots = torch.arange(cache.max_cache_len)
        self.alibi = alibi_over(model, cache.max_cache_len)
        self.head = weight_inputs(model, True)
        self.tail = [*cache.keys, *cache.values]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, filled: int) -> torch.Tensor:
        """Logits (T, V) after each of `tokens` (1, T), fed at slots ``filled .. filled + T - 1``."""
        T = tokens.shape[1]
        if not 2 <= T <= MAX_VERIFY_TOKENS:
            raise ValueError(f"VerifyStep takes 2 to {MAX_VERIFY_TOKENS} tokens, got {T}")
        if filled + T > self.slots.shape[0]:
            raise ValueError(f"VerifyStep: slots {filled}..{filled + T - 1} are past the cache's {self.slots.shape[0]}")
        cache_position = torch.arange(filled, filled + T)
        # Row t sees every slot up to its own: the prompt and tokens before it, none of the unwritten slots after
        mask = (self.slots <= cache_position[:, None])[None, None]
        inputs = [tokens.contiguous(), cache_position[None], cache_position, mask]
        if self.alibi is not None:
            inputs.append(self.alibi)
        logits = self.package.boxed_run([*self.head, *inputs, *self.tail])[0]
        self.cache.mark_filled(filled + T)
        return logits
