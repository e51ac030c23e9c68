"""``generate``: transformers 5.23's ``GenerationMixin.generate`` for decoderkit causal LMs.

Same arguments, same defaults, same results: greedy search and beam search give the token ids transformers gives on
the same weights (prompt + new tokens, finished rows padded with ``pad_token_id``), including left-padded batches,
EOS lists, ``min_new_tokens``, repetition penalties, stop strings and ``num_return_sequences``. The preparation follows
transformers step by step: an attention mask inferred from ``pad_token_id`` when none is given, position ids
``cumsum(mask) - 1`` (0 on padding), inputs expanded with ``repeat_interleave`` to ``max(num_beams,
num_return_sequences)`` rows, ``pad_token_id`` falling back to the first EOS id, ``max_new_tokens`` taking precedence
over ``max_length``, and an unset length meaning 20 new tokens capped at ``max_position_embeddings``.

Sampling draws from the same distribution as transformers (same processors, same order, ``torch.multinomial``), but
the ids need not equal transformers' for a given seed: pass a seeded ``torch.Generator`` as ``generator=`` to make a
run reproducible; transformers draws from the global RNG and consumes it differently.

Differences, all deliberate:

- bad input raises ``ValueError`` naming the argument before any computation: unknown keyword arguments, an empty or
  out-of-vocabulary prompt, a malformed attention mask, a prompt or total length past the context of a model with a
  hard position limit (learned position tables, MPT's ALiBi table), ``stop_strings`` without ``tokenizer``;
- ``max_new_tokens=0`` returns the (expanded) prompt without running the model;
- ``compile=True`` compiles the decode step (see below); ``stream=True`` returns an iterator of new tokens.

Speed. ``cache_implementation="static"`` preallocates the KV cache for prompt + new tokens, so every decode step has
the same shapes; ``compile=True`` (which implies the static cache) runs each step through ``torch.compile`` (CUDA graphs
via ``mode="reduce-overhead"`` on CUDA, the default mode elsewhere). On CPU the compiled step freezes the weights into
the graph, prepacked for the GEMM libraries (a second copy of the weights while it is alive); it is recompiled when the
contents of a parameter or buffer change (a hash checked at every call), and the first call of each (batch, length
bucket) pays the compilation. Whatever the cache, the decode loop prepares
once what ``DecoderStack.forward`` would rebuild per token (the attention mask, now a buffer updated in place; rotary
cos/sin of every future position; the ALiBi bias; position ids and cache slots, buffers advanced in place), calls the
layers directly without input checks, writes tokens into a preallocated id buffer, and computes logits for the last
position only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import warnings
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import torch

from decoderkit.cache import Cache, DynamicCache, StaticCache
from decoderkit.generation.beam_search import BeamSearchState
from decoderkit.generation.config import GenerationConfig
from decoderkit.generation.decode_step import DecodeStep, compile_slots, forward_full
from decoderkit.generation.inputs import check_embeds, check_past
from decoderkit.generation.logits_process import LogitsProcessorList, build_logits_processors
from decoderkit.generation.speculative import build_proposer, speculative_steps
from decoderkit.generation.stopping import StoppingCriteriaList, StopStringCriteria
from decoderkit.generation.streamer import BaseStreamer, GenerationStream
from decoderkit.outputs import ModelOutput

if TYPE_CHECKING:
    from decoderkit.model import DecoderForCausalLM

__all__ = ["GenerateOutput", "generate"]

# transformers' static-cache variants; none of these families has sliding-window layers, so all are a plain static cache
_STATIC_CACHES = frozenset({"static", "sliding_window", "hybrid", "hybrid_chunked"})
_DYNAMIC_CACHES = frozenset({None, "dynamic"})
# transformers arguments generate accepts but decoderkit does not implement: say so instead of "unknown parameter"
_UNSUPPORTED = ("position_ids", "prefix_allowed_tokens_fn",
                "negative_prompt_ids", "negative_prompt_attention_mask", "custom_generate", "synced_gpus")


class GenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)``: ``sequences`` (prompt + new tokens), and as requested
    ``scores`` (per step, the processed scores), ``logits`` (per step, the raw logits), ``past_key_values``; for beam
    search also ``sequences_scores`` (with ``output_scores``) and ``beam_indices``."""


def generate(
    model: DecoderForCausalLM,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    streamer: BaseStreamer | None = None,
    generator: torch.Generator | None = None,
    stream: bool = False,
    *,
    tokenizer: Any = None,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    compile: bool | str | None = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateOutput | GenerationStream:
    """Continue each prompt of ``input_ids``; returns prompt + new tokens as a ``(rows, length)`` LongTensor.

    Args:
        model: a decoderkit causal LM.
        input_ids: ``(batch, prompt_len)`` prompts, left-padded for batches (``inputs=`` is accepted as an alias);
            None starts from ``bos_token_id``.
        attention_mask: ``(batch, prompt_len)``, 1 for tokens and 0 for padding; inferred from ``pad_token_id``
            when omitted, as transformers does.
        generation_config: the base settings; defaults to ``model.generation_config``, whose values fill the fields
            left unset (None) here. Keyword arguments override both.
        streamer: receives the prompt, then each step's tokens (``put``), then ``end()``; greedy and sampling only.
        generator: the random generator for sampling (seed it for reproducible draws).
        stream: return a :class:`~decoderkit.generation.streamer.GenerationStream` yielding each step's tokens.
        tokenizer: needed for ``stop_strings``.
        logits_processor, stopping_criteria: extra processors / criteria, applied after the built-in ones.
        compile: compile the decode step (implies ``cache_implementation="static"``): True with ``torch.compile``,
            ``"aot"`` (float32 / bfloat16 or quantized CPU models) as an AOTInductor package kept on disk
            (:mod:`decoderkit.generation.aot_step`), built now unless a package for the same weights and shapes
            is there already; ``"auto"`` the package if it is there, else eager. Speculative decoding of one
            sequence with a compiled step on CPU verifies through a packaged verify step
            (:mod:`decoderkit.generation.verify_step`), built likewise (``"auto"``: used once both are there).
        kwargs: any :class:`GenerationConfig` field (``max_new_tokens``, ``do_sample``, ``num_beams``, ...), and
            ``assistant_model`` (a draft model): with it or ``prompt_lookup_num_tokens``, decoding is speculative
            (:mod:`decoderkit.generation.speculative`), with the same output.

    Returns:
        The sequences, a :class:`GenerateOutput` with ``return_dict_in_generate=True``, or a ``GenerationStream``.
        ``num_return_sequences`` rows per prompt, consecutive.

    Raises:
        ValueError: naming the argument, for unknown arguments and invalid inputs, before any computation.
    """
    if "inputs" in kwargs:
        if input_ids is not None:
            raise ValueError("pass the prompt as either `inputs` or `input_ids`, not both")
        input_ids = kwargs.pop("inputs")
    for name in _UNSUPPORTED:
        if name in kwargs:
            raise ValueError(f"generate: `{name}` is not supported by decoderkit")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor, got {type(attention_mask).__name__} (pass "
                         "generation_config by keyword)")
    assistant_model = kwargs.pop("assistant_model", None)
    inputs_embeds = kwargs.pop("inputs_embeds", None)
    past_key_values = kwargs.pop("past_key_values", None)
    config = _resolve_config(model, generation_config, kwargs)
    if compile is None:
        compile = bool(getattr(config, "compile", False))
    if compile not in (True, False, "aot", "auto"):
        raise ValueError(f"compile={compile!r}: expected True, False, 'aot' or 'auto'")
    if compile == "auto":
        from decoderkit.generation.aot_step import auto_compile

        plain = (all(x is None for x in (inputs_embeds, past_key_values))
                 and kwargs.get("use_cache") is not False and config.cache_implementation in _STATIC_CACHES | {None})
        speculative = assistant_model is not None or config.prompt_lookup_num_tokens is not None
        compile = auto_compile(model, config, input_ids, speculative) if plain else False
    if compile == "aot":
        from decoderkit.generation.aot_step import aot_unsupported

        reason = aot_unsupported(model)
        if reason:
            raise ValueError(f"compile='aot': {reason}; use compile=True or False")
    proposer = build_proposer(model, config, assistant_model, compile)
    resumed = [name for name, value in (("inputs_embeds", inputs_embeds), ("past_key_values", past_key_values))
               if value is not None]
    if resumed and (proposer is not None or compile):
        raise ValueError(f"{resumed[0]} cannot be combined with speculative decoding or compile=True")
    if inputs_embeds is not None:
        if kwargs.get("use_cache") is False:
            raise ValueError("inputs_embeds feeds the prompt once, through the KV cache: it cannot run with "
                             "use_cache=False")
        config.use_cache = True  # as transformers: the embeddings are used for the first step only
    if past_key_values is not None:
        if kwargs.get("use_cache") is False:
            raise ValueError("past_key_values was given with use_cache=False")
        config.use_cache = True  # continuing a cache means using it, whatever the checkpoint's use_cache says
    if proposer is not None:
        if kwargs.get("use_cache") is False:
            raise ValueError("speculative decoding verifies proposals through the KV cache: it cannot run with "
                             "use_cache=False")
        config.use_cache = True
    if compile:
        if kwargs.get("use_cache") is False:
            raise ValueError("compile=True compiles the cached decode step: it cannot run with use_cache=False")
        # A checkpoint's use_cache=false (MPT's default) only reflects its training setup: compiling asks for a cache
        config.use_cache = True
    plan = GenerationPlan.build(model, config, input_ids, attention_mask, streamer, generator, stream, tokenizer,
                                logits_processor, stopping_criteria, compile, inputs_embeds, past_key_values)
    if proposer is not None:
        if stream and plan.ids.shape[0] > 1:
            raise ValueError("speculative decoding streams one sequence: pass a single prompt with stream=True")
        steps = speculative_steps(plan, proposer)
    else:
        steps = plan.beam_search() if config.num_beams > 1 else plan.sample()
    if stream:
        return GenerationStream(steps)
    with _collector_paused():
        try:
            while True:
                next(steps)
        except StopIteration as stop:
            return stop.value


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while the decode loop runs (vLLM freezes it for the same reason): each step
    makes a few dozen short-lived objects, which set off collections that walk every tracked object, the model's
    included: 6% of a packaged SmolLM2 step at batch 1 (perf, 2-core EPYC). Steps make no cycles, so nothing
    accumulates; the collector is back on, as it was, when the loop ends or fails."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _resolve_config(model: Any, generation_config: GenerationConfig | None, kwargs: dict[str, Any]) -> GenerationConfig:
    base = getattr(model, "generation_config", None)
    if base is None:
        mc = model.decoder_config
        base = GenerationConfig.from_dict({k: getattr(mc, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")
                                           if getattr(mc, k) is not None})
    if generation_config is None:
        config = copy.deepcopy(base)
    elif not isinstance(generation_config, GenerationConfig):
        raise ValueError(f"generation_config must be a decoderkit GenerationConfig, got {type(generation_config)}")
    else:
        config = copy.deepcopy(generation_config)
        # As in transformers, the model's own settings fill what the given config leaves unset
        for field in dataclasses.fields(GenerationConfig):
            if field.default is None and getattr(config, field.name) is None:
                setattr(config, field.name, copy.deepcopy(getattr(base, field.name, None)))
        config.validate()
    config.update(**kwargs)  # raises ValueError naming an unknown or invalid argument
    return config


@dataclasses.dataclass
class GenerationPlan:
    """Everything decided and checked before the first forward pass, and the pieces every decoding loop shares.

    Internal (not exported): the loops here and :mod:`decoderkit.generation.speculative` drive it through
    :meth:`prefill`, :meth:`stepper` and :meth:`output`."""

    model: Any
    config: GenerationConfig
    prompt: torch.Tensor  # (batch, L), not expanded
    ids: torch.Tensor  # (rows, max_length) output buffer; the prompt, expanded, fills [:, :L]
    padding: torch.Tensor | None  # (rows, L) bool prompt mask, None without padding
    positions: torch.Tensor  # (rows, L) prompt position ids
    max_length: int
    pad_token_id: int | None
    eos: torch.Tensor | None
    processors: LogitsProcessorList
    criteria: StoppingCriteriaList  # beyond max length and EOS: stop strings, the caller's
    cache: Cache | None
    streamer: BaseStreamer | None
    generator: torch.Generator | None
    compile: bool
    # (rows, L, hidden) prompt embeddings fed instead of the prompt's ids, with their placeholder ids left out of
    # everything the caller sees (`first` = L), as transformers returns only the new tokens for inputs_embeds alone
    embeds: torch.Tensor | None = None
    first: int = 0
    # Prompt tokens already in a cache the caller passed (past_key_values): only the rest is fed
    past: int = 0

    @classmethod
    def build(cls, model, config, input_ids, attention_mask, streamer, generator, stream, tokenizer,
              logits_processor, stopping_criteria, compile, inputs_embeds=None,
              past_key_values=None) -> GenerationPlan:
        mc = model.decoder_config
        device = model.device
        embeds_only = inputs_embeds is not None and input_ids is None
        if inputs_embeds is not None:
            check_embeds(inputs_embeds, input_ids, mc.hidden_size)
            if embeds_only:
                input_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        if input_ids is None:
            if config.bos_token_id is None:
                raise ValueError("input_ids: no prompt was given and the generation config has no bos_token_id")
            input_ids = torch.full((1, 1), config.bos_token_id, dtype=torch.long, device=device)
        prompt, mask = _check_prompt(input_ids, attention_mask, mc.vocab_size)
        prompt, mask = prompt.to(device), (mask.to(device) if mask is not None else None)
        batch, L = prompt.shape
        if getattr(mc, "add_cross_attention", False):
            raise ValueError("generate does not support models with cross-attention (config add_cross_attention)")
        max_length = config.max_length_for(0 if embeds_only else L, mc.max_position_embeddings)
        if embeds_only and (config.max_new_tokens is not None or config.max_length is None):
            max_length += L  # the embedded prompt is not counted in the length the caller asked for
        if max_length < L or (max_length == L and config.max_new_tokens != 0):
            raise ValueError(f"max_length: {max_length} leaves no room after the prompt of {L} tokens; set "
                             "max_new_tokens instead")
        if mc.hard_max_positions:
            limit = mc.max_position_embeddings
            if L > limit:
                raise ValueError(f"input_ids: the prompt has {L} tokens, longer than this {mc.model_type} model's "
                                 f"context (max_position_embeddings={limit})")
            if max_length > limit:
                name = "max_new_tokens" if config.max_new_tokens is not None else "max_length"
                raise ValueError(f"{name}: prompt ({L}) + new tokens = {max_length} tokens, longer than this "
                                 f"{mc.model_type} model's context (max_position_embeddings={limit})")
        beams = config.num_beams > 1
        if embeds_only and beams:
            raise ValueError("inputs_embeds without input_ids supports greedy search and sampling; beam search "
                             "(num_beams > 1) needs input_ids too")
        if config.stop_strings is not None and tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass tokenizer= to generate")
        if beams and (streamer is not None or stream):
            raise ValueError("streamer / stream=True cannot be used with beam search (num_beams > 1)")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != device.type:
                raise ValueError(f"generator is on {generator.device}, the model on {device}")
        cache_kind = config.cache_implementation
        if compile and cache_kind in _DYNAMIC_CACHES and cache_kind is not None:
            raise ValueError("compile=True needs fixed shapes: use cache_implementation='static' (or leave it unset)")
        if compile:
            if mc.attn_implementation == "flash_attention_2":
                raise ValueError("compile=True does not support attn_implementation='flash_attention_2'; use 'sdpa'")
            cache_kind = "static"
        if cache_kind not in _STATIC_CACHES and cache_kind not in _DYNAMIC_CACHES:
            raise ValueError(f"cache_implementation={cache_kind!r} is not supported by decoderkit; use 'static' "
                             "or 'dynamic'")

        eos_ids = config.eos_token_ids
        pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
        if mask is None and not embeds_only and pad is not None and pad not in eos_ids and bool((prompt == pad).any()):
            mask = prompt != pad  # transformers infers the padding from pad_token_id when it differs from EOS
        if mask is None:
            mask = torch.ones_like(prompt, dtype=torch.bool)
        expand = max(config.num_beams, config.num_return_sequences)
        rows = batch * expand
        prompt_rows = prompt.repeat_interleave(expand, dim=0)
        mask = mask.repeat_interleave(expand, dim=0)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
        # transformers drops an all-ones mask (plain causal attention)
        padding = None if bool(mask.all()) else mask
        ids = torch.full((rows, max_length), pad if pad is not None else 0, dtype=torch.long, device=device)
        ids[:, :L] = prompt_rows

        first = L if embeds_only else 0
        # What the caller sees of the prompt: nothing for inputs_embeds alone (penalties then see new tokens only)
        processors = build_logits_processors(config, L - first, padding if first == 0 else None)
        if logits_processor:
            processors.extend(logits_processor)
        criteria = StoppingCriteriaList()
        if config.stop_strings is not None:
            criteria.append(StopStringCriteria(tokenizer, config.stop_strings))
        if stopping_criteria:
            criteria.extend(stopping_criteria)

        cache: Cache | None = None
        past = 0
        if past_key_values is not None:
            past = check_past(past_key_values, config, rows, L, max_length)
            cache = past_key_values
        elif config.use_cache and max_length > L:
            if cache_kind in _STATIC_CACHES:
                # Prompt + new tokens (the last token is never fed back, but one spare slot costs nothing). A compiled
                # step is specialised on the cache length: rounding it up lets other lengths reuse the graph
                slots = compile_slots(max_length) if compile else max_length
                cache = StaticCache(mc, rows, slots, device=device, dtype=model.dtype)
            else:
                cache = DynamicCache()
        eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
        embeds = None
        if inputs_embeds is not None:
            embeds = inputs_embeds.to(device, model.dtype).repeat_interleave(expand, dim=0)
        return cls(model, config, prompt, ids, padding, positions, max_length, pad, eos, processors, criteria, cache,
                   streamer, generator, compile, embeds, first, past)

    # ---------------------------------------------------------------------------------------------- the loops
    def _feed_prompt(self, cache: Cache | None) -> torch.Tensor:
        """Logits after the prompt's tokens not yet in the cache (all of them unless past_key_values was given)."""
        L, P = self.prompt.shape[1], self.past
        if self.embeds is None:
            return forward_full(self.model, self.ids[:, P:L], self.padding, self.positions[:, P:], cache)
        out = self.model.model(inputs_embeds=self.embeds, attention_mask=self.padding, position_ids=self.positions,
                               past_key_values=cache, use_cache=cache is not None, validate=False)
        return self.model.lm_head(out.last_hidden_state[:, -1]).float()

    def prefill(self) -> torch.Tensor:
        """Feed the prompt to the cache (when there is one); the fp32 logits (rows, V) for the first new token."""
        L = self.prompt.shape[1]
        cache = self.cache
        if cache is None or not cache.is_static or self.past:
            return self._feed_prompt(cache)
        # Through a static cache the prompt would attend over every slot under an explicit mask, which loses the
        # causal SDPA kernel; a dynamic cache keeps it, then its entries are copied into the static buffers
        prompt_cache = DynamicCache()
        logits = self._feed_prompt(prompt_cache)
        for layer, (k, v) in enumerate(zip(prompt_cache.keys, prompt_cache.values)):
            cache.keys[layer][:, :, :L].copy_(k)
            cache.values[layer][:, :, :L].copy_(v)
        cache.mark_filled(L)
        return logits

    def stepper(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A function: the tokens just chosen (rows,) -> logits (rows, V) for the next position."""
        L = self.prompt.shape[1]
        if self.cache is not None:
            return DecodeStep(self.model, self.cache, self.padding, self.positions[:, -1] + 1, L, self.max_length,
                               self.compile)
        # Without a cache every step reruns the whole sequence, as transformers does with use_cache=False
        full_mask = torch.ones_like(self.ids, dtype=torch.bool)
        full_pos = self.positions[:, -1:] + torch.arange(1, self.max_length - L + 1, device=self.ids.device)
        full_pos = torch.cat([self.positions, full_pos], dim=1)
        if self.padding is not None:
            full_mask[:, :L] = self.padding
        length = [L]

        def rerun(tokens: torch.Tensor) -> torch.Tensor:
            length[0] += 1
            n = length[0]
            mask = full_mask[:, :n] if self.padding is not None else None
            return forward_full(self.model, self.ids[:, :n], mask, full_pos[:, :n], None)

        return rerun

    def output(self, sequences: torch.Tensor, scores: tuple, logits: tuple, **beam: Any) -> Any:
        """What ``generate`` returns for the final ``sequences``: the tensor, or a :class:`GenerateOutput` with the
        per-step ``scores`` / ``logits`` asked for and any beam fields."""
        config = self.config
        if not config.return_dict_in_generate:
            return sequences
        return GenerateOutput(sequences=sequences, scores=scores if config.output_scores else None,
                              logits=logits if config.output_logits else None, past_key_values=self.cache, **beam)

    def sample(self) -> Generator[torch.Tensor, None, Any]:
        """Greedy search or multinomial sampling; yields each step's tokens (rows,), returns the output."""
        config, ids, streamer, first = self.config, self.ids, self.streamer, self.first
        L, rows = self.prompt.shape[1], ids.shape[0]
        scores: tuple = ()
        raw: tuple = ()
        if streamer is not None and first < L:
            streamer.put(ids[:, first:L].cpu())
        cur = L
        try:
            if self.max_length > L:
                unfinished = torch.ones(rows, dtype=torch.bool, device=ids.device)
                can_stop = self.eos is not None or len(self.criteria) > 0
                with torch.no_grad():
                    logits = self.prefill()
                step = self.stepper()
                while True:
                    with torch.no_grad():
                        next_scores = self.processors(ids[:, first:cur], logits) if self.processors else logits
                        if config.do_sample:
                            probs = next_scores.softmax(dim=-1)
                            tokens = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
                        else:
                            tokens = next_scores.argmax(dim=-1)
                        if self.eos is not None:
                            # Finished rows continue with padding, as transformers does with an EOS criterion
                            tokens = torch.where(unfinished, tokens, self.pad_token_id)
                        ids[:, cur] = tokens
                        cur += 1
                        if config.return_dict_in_generate and config.output_scores:
                            scores += (next_scores,)
                        if config.return_dict_in_generate and config.output_logits:
                            raw += (logits.clone(),)
                        if self.eos is not None:
                            unfinished &= ~torch.isin(tokens, self.eos)
                        if self.criteria:
                            unfinished &= ~self.criteria(ids[:, first:cur], scores or None)
                    if streamer is not None:
                        streamer.put(tokens.cpu())
                    yield tokens
                    if cur == self.max_length or (can_stop and not bool(unfinished.any())):
                        break
                    with torch.no_grad():
                        logits = step(tokens)
        finally:
            if streamer is not None:
                streamer.end()
        return self.output(ids[:, first:cur], scores, raw)

    def beam_search(self) -> Generator[torch.Tensor, None, Any]:
        """Beam search (or beam sampling) driven by :class:`BeamSearchState`; returns the output."""
        config = self.config
        L = self.prompt.shape[1]
        if self.max_length == L:
            return self.output(self.ids, (), (), sequences_scores=None, beam_indices=None)
        state = BeamSearchState.from_config(self.prompt, config, self.max_length,
                                            stopping_criteria=self.criteria or None, generator=self.generator)
        scores: tuple = ()
        raw: tuple = ()
        with torch.no_grad():
            logits = self.prefill()
        step = self.stepper()
        while True:
            with torch.no_grad():
                log_probs = self.processors(state.sequences, logits.log_softmax(dim=-1))
                if config.return_dict_in_generate and config.output_scores:
                    scores += (log_probs,)
                if config.return_dict_in_generate and config.output_logits:
                    raw += (logits.clone(),)
                tokens, beam_idx = state.step(log_probs)
            yield tokens
            if state.is_done():
                break
            with torch.no_grad():
                if self.cache is not None:
                    self.cache.reorder(beam_idx)
                else:
                    self.ids[:, : state.cur_len] = state.sequences
                logits = step(tokens)
        out = state.finalize()
        return self.output(out.sequences, scores, raw, beam_indices=out.beam_indices,
                            sequences_scores=out.sequences_scores if config.output_scores else None)


def _check_prompt(input_ids: Any, attention_mask: torch.Tensor | None,
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a LongTensor (batch, sequence), got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, sequence), got shape {tuple(input_ids.shape)}; "
                         "for a single prompt use input_ids[None]")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids: the batch is empty")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids: the prompt is empty (length 0); give at least one token, e.g. the BOS id")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids holds ids in [{low}, {high}]; the vocabulary has {vocab_size} entries")
    if attention_mask is None:
        return input_ids.long(), None
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected input_ids' "
                         f"{tuple(input_ids.shape)}")
    if attention_mask.dtype.is_floating_point or bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token) as integers or booleans")
    mask = attention_mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask: rows {empty} are all padding; every prompt needs at least one token")
    if input_ids.shape[0] > 1 and not bool(mask[:, -1].all()):
        warnings.warn("right padding detected in attention_mask: decoder-only models need left padding for batched "
                      "generation (tokenizer padding_side='left')", UserWarning, stacklevel=4)
    return input_ids.long(), mask
