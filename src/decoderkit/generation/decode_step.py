"""The decode hot path: one model step per generated token, with preallocated inputs and an optional compiled step.

Kept apart from `generate.py`, which decides what to generate; this module only feeds tokens through the model.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from decoderkit.cache import Cache
from decoderkit.layers.alibi import alibi_bias
from decoderkit.layers.attention import AttentionInputs
from decoderkit.layers.linear import use_decode_linear

if TYPE_CHECKING:
    pass


# Rope rules whose frequencies depend on each row's length so far: evaluated step by step, as the model does
_LENGTH_DEPENDENT_ROPE = frozenset({"dynamic", "longrope"})


def forward_full(model: Any, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                  cache: Cache | None) -> torch.Tensor:
    """Logits (rows, V) in fp32 for the last position of `ids` (and everything before it fed to the cache)."""
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                      use_cache=cache is not None, validate=False)
    return model.lm_head(out.last_hidden_state[:, -1]).float()


_COMPILE_BUCKET = 256


def compile_slots(max_length: int) -> int:
    """The static cache length a compiled step is built for: `max_length` rounded up to a multiple of 256, so that
    other lengths reuse the graph."""
    return -(-max_length // _COMPILE_BUCKET) * _COMPILE_BUCKET


class _SlotCache(Cache):
    """A static cache's buffers written at `cache_position`, with no Python-side state a compiled graph would
    specialise on (StaticCache counts stored tokens in a Python int)."""

    is_static = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values

    def update(self, key, value, layer_idx, cache_position=None):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, cache_position, key.to(k.dtype))
        v.index_copy_(2, cache_position, value.to(v.dtype))
        return k, v


def _forward_one(model: Any, tokens: torch.Tensor, position_ids: torch.Tensor, cache_position: torch.Tensor,
                 mask: torch.Tensor | None, padding_mask: torch.Tensor | None,
                 rope: tuple[torch.Tensor, torch.Tensor] | None, alibi: torch.Tensor | None,
                 cache: Cache, filled: int | None = None, last: bool = True) -> torch.Tensor:
    """One token per row through the stack, given the per-step inputs `DecoderStack.forward` would build: the fp32
    logits (rows, V) of each row's last token, or with ``last=False`` (rows * T, V) of all T tokens of each row (the
    verify step of speculative decoding feeds several).

    `filled` (tokens in the cache, this one included) is left out of the compiled step, which would specialise on it;
    the flash kernels, which take no dense mask, need it to ignore a static cache's unwritten slots.
    """
    stack = model.model
    config = stack.config
    x = stack.embed(tokens)  # (B, 1, D)
    if config.position_embedding == "learned":
        x = x + stack.embed_positions(position_ids).to(x.dtype)
    x = stack.embed_dropout(x)
    if rope is None and stack.rotary is not None:
        rope = stack.rotary(position_ids, x.dtype)
    inputs = AttentionInputs(mask=mask, causal=config.is_causal, rope=rope, alibi=alibi,
                             alibi_slopes=stack.alibi_slopes if alibi is not None else None,
                             cache_position=cache_position, padding_mask=padding_mask, filled=filled)
    for layer in stack.layers:
        x, _ = layer(x, inputs, cache)
    x = stack.norm(x)
    return model.lm_head(x[:, -1] if last else x.reshape(-1, x.shape[-1])).float()


def alibi_over(model: Any, keys: int) -> torch.Tensor | None:
    """`model`'s ALiBi bias over `keys` keys (a static cache's slots, or the tokens so far), None for a model
    without ALiBi."""
    stack = model.model
    return alibi_bias(stack.alibi_slopes, keys) if hasattr(stack, "alibi_slopes") else None


def _forward_one_static(model, tokens, position_ids, cache_position, mask, rope, alibi, keys, values):
    return _forward_one(model, tokens, position_ids, cache_position, mask, None, rope, alibi, _SlotCache(keys, values))


# Measured on a 2-core Sapphire Rapids, 125M Llama (benchmarks/generate.py): freezing prepacks the weights for the
# MKL / oneDNN GEMMs (bf16 batch 1: ~1.5x); concat_linear then merges q/k/v and gate/up into one GEMM each (the fused
# projections, without changing the checkpoint layout); the C++ wrapper removes ~2 ms of Python per step.
# Freezing stays, made safe by keying the graph on a content hash of the weights (weights_fingerprint): the hash
# reads the weights once per generate call, about what one decode step reads, where not freezing would give up the
# gain at every step. (On a 2-core AVX2 EPYC without bf16 instructions, benchmarks/compiled_weights.py measured
# frozen bf16 4x slower than not frozen: a case for choosing freezing per CPU and dtype, left open.)
_CPU_INDUCTOR_OPTIONS = {"freezing": True, "cpp.enable_concat_linear": True, "cpp_wrapper": True}

_COMPILED: weakref.WeakKeyDictionary[Any, tuple[tuple, Callable[..., torch.Tensor]]] = weakref.WeakKeyDictionary()


def weights_fingerprint(model: torch.nn.Module) -> tuple:
    """What a compiled step for `model` depends on: every parameter's and buffer's name, dtype, shape and either its
    contents (CPU) or its storage (elsewhere).

    On CPU the compiled graph holds a frozen copy of the weights, so only their contents say whether it is still
    valid: storage pointers and version counters miss writes through `.data` (`p.data.mul_()`, `p.data.copy_()`), and
    buffers (packed quantized weights, rope tables) are frozen too. The contents are hashed with XXH3-128, which reads
    the weights once at memory speed: about what one decode step reads. On CUDA the graph reads the weights from
    their storage at every replay, so in-place writes are seen and only a new storage needs a new graph.
    """
    import xxhash

    entries = []
    for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            t = t.detach()
            if t.device.type == "cpu":
                raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
                ident: int = xxhash.xxh3_128_intdigest(raw)
            else:
                ident = t.data_ptr()
            entries.append((kind, name, t.dtype, tuple(t.shape), t.device, ident))
    return tuple(entries)


def _compiled_step(model: Any) -> Callable[..., torch.Tensor]:
    """`_forward_one_static` compiled for `model`'s current weights.

    On CPU, inductor's freezing folds the weights into the graph as constants, prepacked for the oneDNN / MKL GEMMs
    (the largest CPU gain: small-batch GEMMs on packed weights run near memory bandwidth). A graph compiled for other
    weights must then never run: the step is keyed on `weights_fingerprint`, checked at every `generate` call.
    """
    import torch._inductor.config as inductor_config

    fingerprint = weights_fingerprint(model)
    entry = _COMPILED.get(model)
    if entry is not None and entry[0] == fingerprint:
        return entry[1]
    # Dropped first, so the old graph's frozen weights are freed before the new graph freezes its own
    entry = None
    _COMPILED.pop(model, None)
    # A fresh code object has its own dynamo cache, so graphs built for the old weights are dropped with it
    fn = types.FunctionType(_forward_one_static.__code__.replace(), globals(), "_forward_one_static")
    # fullgraph: a graph break would leave Python work on the hot path, which defeats the purpose
    if model.device.type == "cuda":
        compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
    else:
        # torch.compile(options=...) does not reach the freezing pass (torch 2.13): the config is patched around the
        # calls that may compile. Patching builds a class per call (~0.1 ms), so `DecodeStep` calls `compiled.warm`
        # (the bare step) once its own first call has compiled or matched a graph for its fixed shapes
        step = torch.compile(fn, fullgraph=True, dynamic=False)
        options = dict(_CPU_INDUCTOR_OPTIONS)
        if getattr(model, "tp", None) is not None:
            # The C++ wrapper cannot call the collectives of a tensor-parallel model (torch 2.13: "arg type Any is not
            # yet supported by custom_op_wrapper"); the Python wrapper can
            options["cpp_wrapper"] = False

        def compiled(*args: Any) -> torch.Tensor:
            with inductor_config.patch(options):
                return step(*args)

        compiled.warm = step  # type: ignore[attr-defined]

    _COMPILED[model] = (fingerprint, compiled)
    return compiled


class DecodeStep:
    """Feeds the tokens just chosen (one per row) to the model and returns the next logits: the decode hot path.

    Per-step inputs live in buffers advanced in place (token ids, position ids, the cache slot, the attention mask),
    so a step allocates nothing outside the model itself and a compiled step sees the same tensors every time.
    """

    def __init__(self, model: Any, cache: Cache, padding: torch.Tensor | None, next_position: torch.Tensor,
                 prompt_len: int, max_length: int, compile: bool | str) -> None:
        stack = model.model
        device = next_position.device
        rows, steps = next_position.shape[0], max_length - prompt_len
        self.model, self.cache = model, cache
        self.aot = compile == "aot"
        use_decode_linear(model)
        if device.type == "cpu" and compile:
            from decoderkit.kernels import attention as attention_kernel

            attention_kernel.available()  # built now: the compiled step cannot build it while being traced
        self.static = cache.is_static
        self.prompt_len = prompt_len
        self.filled = prompt_len  # tokens in the cache; the next one goes to slot `filled`
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position_ids = (next_position - 1)[:, None].clone()  # advanced before each step
        self.cache_position = torch.full((1,), prompt_len - 1, dtype=torch.long, device=device)
        # (rows, max_length) bool: the prompt's padding, then every generated token visible
        self.visible = torch.ones(rows, max_length, dtype=torch.bool, device=device)
        if padding is not None:
            self.visible[:, :prompt_len] = padding
        self.padded = padding is not None
        if self.static:
            # Key axis = cache slots; a slot becomes visible when its token is written
            self.allowed = torch.zeros(rows, 1, 1, cache.max_cache_len, dtype=torch.bool, device=device)
            self.allowed[:, 0, 0, :prompt_len] = self.visible[:, :prompt_len]
        self.rope_table = None
        if stack.rotary is not None and stack.rotary.rope_type not in _LENGTH_DEPENDENT_ROPE:
            # Every future position is known now (the same elementwise cos/sin the model computes per call)
            future = next_position[:, None] + torch.arange(steps, device=device)
            cos, sin = stack.rotary(future, model.dtype)
            self.rope_table = (cos.transpose(0, 1).contiguous(), sin.transpose(0, 1).contiguous())  # (steps, rows, R)
        self.alibi = alibi_over(model, cache.max_cache_len) if self.static else None
        self.compiled = None
        if compile == "aot":
            from decoderkit.generation.aot_step import aot_step, step_identity, weight_inputs

            example = (self.tokens, self.position_ids, self.cache_position, self.allowed, self.alibi, cache.keys,
                       cache.values)
            package = aot_step(model, step_identity(model), _forward_one_static, example)
            # The same tensors at every step, in the package's flat order: its loader runs them without the
            # per-call pytree flattening of the Python wrapper (which parses the call spec anew each time)
            flat = weight_inputs(model) + [t for t in torch.utils._pytree.tree_leaves(example)
                                           if isinstance(t, torch.Tensor)]
            self.compiled = lambda: package.boxed_run(list(flat))[0]
        elif compile:
            self.compiled = _compiled_step(model)
            if device.type == "cuda":
                # CUDA graphs replay fixed addresses: the buffers mutated in place must be marked as such
                for t in (*cache.keys, *cache.values, self.tokens, self.position_ids, self.cache_position,
                          self.allowed):
                    torch._dynamo.mark_static_address(t)

    def seek(self, filled: int) -> None:
        """Continue from `filled` tokens in the cache, which something else has advanced or rolled back (speculative
        decoding stores several tokens in one verify forward, then drops the rejected ones): the next call feeds
        the token for slot `filled`. Generated tokens have no padding, so every slot past the prompt is visible."""
        if not self.prompt_len <= filled < self.visible.shape[1]:
            raise ValueError(f"DecodeStep.seek: {filled} is outside the generated range [{self.prompt_len}, "
                             f"{self.visible.shape[1]})")
        self.position_ids.add_(filled - self.filled)
        self.cache_position.fill_(filled - 1)
        if self.static:
            self.allowed[:, 0, 0, self.prompt_len:filled] = True
            self.allowed[:, 0, 0, filled:] = False
        self.filled = filled

    def _rope(self, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.rope_table is None:
            return None  # length-dependent rope (or none): evaluated by the model on the position ids
        cos, sin = self.rope_table
        return cos[step][:, None], sin[step][:, None]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        slot = self.filled
        self.tokens.copy_(tokens[:, None])
        self.position_ids.add_(1)
        self.cache_position.add_(1)
        stack = self.model.model
        if self.static:
            self.allowed[:, 0, 0, slot] = True
            mask = self.allowed
            if self.compiled is not None:
                rope = None
                if stack.rotary is not None and stack.rotary.rope_type in _LENGTH_DEPENDENT_ROPE:
                    rope = stack.rotary(self.position_ids, self.model.dtype)
                if self.tokens.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                if self.aot:
                    logits = self.compiled()
                else:
                    logits = self.compiled(self.model, self.tokens, self.position_ids, self.cache_position, mask,
                                           rope, self.alibi, self.cache.keys, self.cache.values)
                # Every later step feeds the same buffers, so it runs the graph this call compiled or matched
                self.compiled = getattr(self.compiled, "warm", self.compiled)
                if logits.device.type == "cuda":
                    logits = logits.clone()  # a CUDA graph's output is overwritten by its next replay
                self.cache.mark_filled(slot + 1)
                self.filled += 1
                return logits
            padding_mask = self.visible[:, : slot + 1]
            alibi = self.alibi
        else:
            mask = self.visible[:, None, None, : slot + 1] if self.padded else None
            padding_mask = self.visible[:, : slot + 1] if self.padded else None
            alibi = alibi_over(self.model, slot + 1)
        logits = _forward_one(self.model, self.tokens, self.position_ids, self.cache_position, mask, padding_mask,
                              self._rope(slot - self.prompt_len), alibi, self.cache, filled=slot + 1)
        self.filled += 1
        return logits
