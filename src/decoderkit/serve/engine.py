"""Continuous-batching generation over a paged KV cache.

One background thread runs every request. Each step it gathers the pending tokens of all admitted requests (one token
for those decoding, a prompt chunk for those still prefilling), runs them through the model as one flat batch, samples
one token for every request whose pending tokens are all in the cache, and hands the result to the request's callback.
Requests join and leave between steps.

The KV cache is a pool of fixed-size blocks shared by all requests (`BlockPool`); a request holds a block table and
gets a new block only when its sequence crosses a block boundary, so memory follows what requests use, not their
worst case. When the pool runs dry the most recently admitted request is preempted: its blocks are freed and it is
prefilled again (prompt and tokens so far) once blocks are free.

Speculative decoding (`speculative="lookup"`): a greedy request's decode step carries, after its last token, the
tokens prompt lookup proposes (`decoderkit.generation.speculative`); the step's logits at every one of those positions
are taken as plain steps would take them, proposals are kept while they equal the model's choice, and the blocks past
what is kept are released. The text is the one plain greedy decoding gives.

`PagedRunner` is the model's forward pass written against that pool, using the model's own modules (norms,
projections, rotary, MLP); per-request outputs do not depend on which other requests share the step, up to the
floating-point rounding of batched matrix products.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from decoderkit.generation.logits_process import PresenceFrequencyPenaltyLogitsProcessor, TopPLogitsWarper
from decoderkit.generation.speculative import PromptLookupProposer
from decoderkit.serve.paged import BlockPool, PagedRunner, Segment

logger = logging.getLogger(__name__)
RATE_WINDOW = 10.0  # seconds over which tokens/s is measured
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; retry later."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


# -------------------------------------------------------------------------------------------------------- requests


@dataclass
class SamplingParams:
    """What one request asks for. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-sequence ids
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None  # score the prompt too, with this many alternatives per position
    logit_bias: dict[int, float] | None = None  # added to the logits before sampling

    def __post_init__(self) -> None:
        # max_tokens 0 only scores the prompt (echo with logprobs, as evaluation harnesses ask).
        checks = (("max_tokens", self.max_tokens >= 0, ">= 0"), ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("top_logprobs", self.top_logprobs >= 0, ">= 0"))
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    """What one step produced for one request; the final one has `finish_reason` set."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop", "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # positions 1.. of the prompt; set on the first output only


@dataclass(eq=False)  # identity, not field-by-field comparison: requests are looked up in lists every step
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    decoder: Any
    generator: torch.Generator | None
    submitted: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0
    text: str = ""  # everything decoded so far
    emitted: int = 0  # characters of `text` already handed out
    first_token_at: float | None = None
    penalty: PresenceFrequencyPenaltyLogitsProcessor | None = None
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    proposer: PromptLookupProposer | None = None  # greedy requests of a speculating engine
    proposed: list[int] = field(default_factory=list)  # this step's proposals, fed after the last token

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)


@dataclass
class EngineStats:
    waiting: int
    running: int
    free_blocks: int
    total_blocks: int
    generated_tokens_total: int
    tokens_per_second: float
    ttft_buckets: list[tuple[float, int]]  # (upper bound, cumulative count), Prometheus style
    ttft_sum: float
    ttft_count: int
    requests_finished: dict[str, int]
    speculative_proposed_tokens: int = 0
    speculative_accepted_tokens: int = 0


# ---------------------------------------------------------------------------------------------------------- engine


class Engine:
    """Serves generation requests from a background thread with continuous batching.

    Args:
        model: a loaded `DecoderForCausalLM` (eval mode is set here).
        tokenizer: its `Tokenizer` (for incremental detokenisation and stop strings).
        kv_cache_tokens: tokens the block pool holds, over all requests; at least one full context. Default: 80% of
            the free memory on CUDA, else 16384 tokens (CPU pages are only committed once written).
        block_size: tokens per KV block.
        max_batch_size: requests decoded together at most.
        max_prefill_tokens: prompt tokens processed per step; a longer prompt is prefilled in chunks of this size,
            interleaved with the decoding of running requests.
        max_queue: requests waiting for admission at most; `submit` raises QueueFullError beyond it.
        speculative: None, or "lookup": greedy requests speculate with prompt lookup.
        num_speculative_tokens: most tokens proposed per step and request.
    """

    def __init__(self, model: Any, tokenizer: Any, *, kv_cache_tokens: int | None = None, block_size: int = 16,
                 max_batch_size: int = 32, max_prefill_tokens: int = 256, max_queue: int = 64,
                 speculative: str | None = None, num_speculative_tokens: int = 10) -> None:
        config = model.config
        if config.add_cross_attention:
            raise ValueError("the server runs decoder-only models; this one has cross-attention layers")
        if block_size < 1 or max_batch_size < 1 or max_prefill_tokens < 1 or max_queue < 0:
            raise ValueError("block_size, max_batch_size and max_prefill_tokens must be >= 1, max_queue >= 0")
        if speculative not in (None, "lookup"):
            raise ValueError(f"speculative={speculative!r}: the server supports None or 'lookup'")
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.speculative, self.num_speculative_tokens = speculative, num_speculative_tokens
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = config.max_position_embeddings
        kv_cache_tokens = kv_cache_tokens or _default_kv_tokens(model)
        if kv_cache_tokens < self.max_context:
            raise ValueError(f"kv_cache_tokens={kv_cache_tokens} cannot hold one full context of "
                             f"{self.max_context} tokens (max_position_embeddings)")
        num_blocks = -(-kv_cache_tokens // block_size)
        self.pool = BlockPool(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, num_blocks,
                              block_size, model.dtype, model.device)
        self.runner = PagedRunner(model, self.pool)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queue = max_queue
        self.default_stop_token_ids = _eos_ids(model, tokenizer)

        self._cond = threading.Condition()
        self._inbox: list[_Request] = []
        self._cancels: set[str] = set()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._ids = itertools.count()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self._generated_total = 0
        self._recent: deque[float] = deque()  # times of the tokens generated in the last RATE_WINDOW seconds
        self._ttft_counts = [0] * len(TTFT_BUCKETS)
        self._ttft_sum = 0.0
        self._ttft_count = 0
        self._finished: dict[str, int] = {}
        self._proposed_total = 0
        self._accepted_total = 0

    # ----------------------------------------------------------------------------------------------- public API

    def start(self) -> Engine:
        if self._thread is None:
            self._stop, self._accepting = False, True
            self._thread = threading.Thread(target=self._loop, name="decoderkit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain_timeout: float = 0.0) -> None:
        """Stop taking requests; let running ones finish for up to `drain_timeout` seconds, cancel the rest."""
        with self._cond:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and self.has_work():
            time.sleep(0.02)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def is_alive(self) -> bool:
        """Whether the engine thread is running and taking requests."""
        return self._thread is not None and self._thread.is_alive() and self._accepting

    def has_work(self) -> bool:
        with self._cond:
            return bool(self._inbox or self._waiting or self._running)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_output: Callable[[RequestOutput], None], request_id: str | None = None) -> str:
        """Queue a request; `on_output` is called from the engine thread after every step that produced text."""
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.max_context}")
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.pool.keys.device)
            # An unseeded request draws a fresh seed without touching torch's global generator (torch.seed would).
            generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        req = _Request(
            request_id=request_id or f"req-{next(self._ids)}", prompt_ids=list(prompt_ids), params=params,
            on_output=on_output, generator=generator,
            decoder=self.tokenizer.stream_decoder(skip_special_tokens=True, prefix_ids=prompt_ids),
        )
        req.tokens = list(prompt_ids)
        if self.speculative and params.temperature == 0:
            req.proposer = PromptLookupProposer(self.num_speculative_tokens)
        if params.presence_penalty or params.frequency_penalty:
            req.penalty = PresenceFrequencyPenaltyLogitsProcessor(params.presence_penalty, params.frequency_penalty,
                                                                  prompt_length=len(prompt_ids))
        with self._cond:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            if len(self._inbox) + len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} requests are already waiting")
            self._inbox.append(req)
            self._cond.notify_all()
        return req.request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request; its KV blocks are freed before the next step."""
        with self._cond:
            self._cancels.add(request_id)
            self._cond.notify_all()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, timeout: float = 120.0) -> RequestOutput:
        """Blocking convenience: run one request to the end and return everything it produced."""
        done = threading.Event()
        parts: list[RequestOutput] = []

        def collect(out: RequestOutput) -> None:
            parts.append(out)
            if out.finish_reason is not None:
                done.set()

        rid = self.submit(prompt_ids, params, collect)
        if not done.wait(timeout):
            self.cancel(rid)
            raise TimeoutError(f"request {rid} did not finish in {timeout} s")
        logprobs = [lp for p in parts for lp in (p.logprobs or [])] if params.logprobs else None
        last = parts[-1]
        prompt_logprobs = next((p.prompt_logprobs for p in parts if p.prompt_logprobs is not None), None)
        return RequestOutput(rid, "".join(p.text for p in parts), [t for p in parts for t in p.token_ids], logprobs,
                             last.finish_reason, last.prompt_tokens, last.completion_tokens, last.error,
                             prompt_logprobs)

    def stats(self) -> EngineStats:
        with self._cond:
            now = time.monotonic()
            while self._recent and self._recent[0] < now - RATE_WINDOW:
                self._recent.popleft()
            rate = len(self._recent) / RATE_WINDOW
            buckets = list(zip(TTFT_BUCKETS, itertools.accumulate(self._ttft_counts)))
            return EngineStats(len(self._inbox) + len(self._waiting), len(self._running), self.pool.num_free,
                               self.pool.num_blocks, self._generated_total, rate, buckets, self._ttft_sum,
                               self._ttft_count, dict(self._finished), self._proposed_total, self._accepted_total)

    # ------------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._inbox or self._cancels or self._waiting or self._running):
                    self._cond.wait()
                if self._stop:
                    for req in [*self._inbox, *self._waiting, *self._running]:
                        self._finish(req, "cancelled")
                    self._inbox.clear()
                    return
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                cancels, self._cancels = self._cancels, set()
            try:
                self._step(cancels)
            except Exception as exc:  # a failing step must not take the server down: fail what was running instead
                logger.exception("engine step failed")
                for req in list(self._running):
                    self._finish(req, "error", error=f"{type(exc).__name__}: {exc}")

    def _step(self, cancels: set[str]) -> None:
        for req in [r for r in [*self._waiting, *self._running] if r.request_id in cancels]:
            self._finish(req, "cancelled")
        scheduled = self._schedule()
        if not scheduled:
            return
        segments = [Segment(req.num_cached, req.tokens[req.num_cached: end] + req.proposed, req.blocks)
                    for req, end in scheduled]
        scoring = [req.params.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt_ids) - 1
                   for req, _ in scheduled]
        if any(scoring) or any(req.proposed for req, _ in scheduled):
            every = self.runner.forward(segments, all_positions=True)  # (N, V): a row per token of the step
            ends = list(itertools.accumulate(len(s.ids) for s in segments))
            logits = every[torch.tensor(ends, device=every.device) - 1]
            for (req, _), seg, last, wanted in zip(scheduled, segments, ends, scoring):
                if wanted:
                    self._score_prompt(req, seg.start, every[last - len(seg.ids): last].float())
        else:
            logits = self.runner.forward(segments)
        for row, (req, end) in enumerate(scheduled):
            req.num_cached = end
            if end == len(req.tokens):
                if req.params.max_tokens == 0:
                    self._release(req, "length")
                    self._emit(req, RequestOutput(req.request_id, "", [], None, "length", len(req.prompt_ids), 0,
                                                  prompt_logprobs=req.prompt_logprobs))
                elif req.proposed:
                    self._verify(req, every[ends[row] - len(req.proposed) - 1: ends[row]].float())
                else:
                    self._advance(req, logits[row].float())

    def _score_prompt(self, req: _Request, start: int, logits: torch.Tensor) -> None:
        """Record the log-probabilities of the prompt tokens that logits (rows for positions start, ...) predict."""
        # A preempted request prefills again: positions already scored are skipped, so each is recorded once.
        first = len(req.prompt_logprobs)  # logits at position first predict prompt token first + 1
        stop = min(start + len(logits), len(req.prompt_ids) - 1)
        if stop <= first:
            return
        rows = logits[first - start: stop - start].log_softmax(-1)
        targets = torch.tensor(req.prompt_ids[first + 1: stop + 1], device=rows.device)
        chosen = rows.gather(1, targets[:, None])[:, 0].tolist()
        k = req.params.prompt_logprobs or 0
        top = rows.topk(k) if k else None
        tops = zip(top.indices.tolist(), top.values.tolist()) if top is not None else (([], []) for _ in chosen)
        for token, value, (ids, values) in zip(targets.tolist(), chosen, tops):
            req.prompt_logprobs.append(TokenLogprob(token, value, list(zip(ids, values))))

    def _schedule(self) -> list[tuple[_Request, int]]:
        """Pick this step's work: every decoding request, then prompt chunks within the prefill budget."""
        budget = self.max_prefill_tokens
        while self._waiting and len(self._running) < self.max_batch_size:
            req = self._waiting[0]
            # Admit only what fits now, leaving a block per running request so that decoding rarely preempts.
            need = self.pool.blocks_for(len(req.tokens) + 1) + len(self._running)
            if need > self.pool.num_free and self._running:
                break
            self._running.append(self._waiting.popleft())
        scheduled: list[tuple[_Request, int]] = []
        for req in list(self._running):
            if req not in self._running:  # preempted while making room for an earlier one
                continue
            pending = len(req.tokens) - req.num_cached
            req.proposed = []
            if pending > 1:
                if budget <= 0:  # a started chunk may overrun the budget: its boundaries must not move
                    continue
                # Chunk boundaries depend only on the request (multiples of max_prefill_tokens), never on what else
                # is in the step, so a prompt's cache is computed the same way whatever it shares the step with.
                chunk_end = (req.num_cached // self.max_prefill_tokens + 1) * self.max_prefill_tokens
                end = min(len(req.tokens), chunk_end)
                budget -= end - req.num_cached
            else:
                end = len(req.tokens)
                self._propose(req)
            if not self._reserve(req, end + len(req.proposed)):
                continue
            scheduled.append((req, end))
        return [(req, end) for req, end in scheduled if req in self._running]

    def _reserve(self, req: _Request, length: int) -> bool:
        """Give `req` blocks for `length` tokens, preempting the newest other requests if the pool is empty."""
        need = self.pool.blocks_for(length) - len(req.blocks)
        while need > self.pool.num_free:
            victim = self._running[-1]
            self._preempt(victim)
            if victim is req:
                return False
        if need > 0:
            req.blocks.extend(self.pool.allocate(need))
        return True

    def _preempt(self, req: _Request) -> None:
        # Recompute rather than swap: the request goes back to the front of the queue with its tokens so far.
        self.pool.release(req.blocks)
        req.num_cached = 0
        self._running.remove(req)
        self._waiting.appendleft(req)

    def _propose(self, req: _Request) -> None:
        """Set the tokens a speculating request feeds after its last one this step (none while its schedule waits)."""
        if req.proposer is None:
            return
        # Every step emits the model's own token too: proposals fill the room left after it
        room = min(req.params.max_tokens - req.num_generated, self.max_context - len(req.tokens)) - 1
        wanted = req.proposer.schedule.next(room)
        if wanted > 0:
            req.proposed = req.proposer.propose(torch.tensor([req.tokens]), wanted)[0].tolist()

    def _verify(self, req: _Request, logits: torch.Tensor) -> None:
        """Greedy verification: `logits` (k + 1, V) follow the last token and each of the k proposals. Each row is
        taken as a plain step takes it (penalties, stop conditions, outputs) while the proposals equal the model's
        choices; then the blocks past the kept tokens go back to the pool."""
        proposed, req.proposed = req.proposed, []
        accepted = 0
        for row, guess in zip(logits, [*proposed, None]):
            self._advance(req, row)
            if req not in self._running or req.tokens[-1] != guess:
                break
            accepted += 1
        req.proposer.schedule.update(len(proposed), accepted)
        with self._cond:
            self._proposed_total += len(proposed)
            self._accepted_total += accepted
        if req in self._running:
            req.num_cached = len(req.tokens) - 1  # the rejected proposals' keys and values are overwritten later
            keep = self.pool.blocks_for(len(req.tokens))
            self.pool.release(req.blocks[keep:])
            del req.blocks[keep:]

    def _advance(self, req: _Request, logits: torch.Tensor) -> None:
        token, logprob = self._sample(req, logits)
        req.tokens.append(token)
        now = time.monotonic()
        if req.first_token_at is None:
            req.first_token_at = now
            ttft = now - req.submitted
            with self._cond:
                self._ttft_sum += ttft
                self._ttft_count += 1
                bucket = next((i for i, bound in enumerate(TTFT_BUCKETS) if ttft <= bound), None)
                if bucket is not None:
                    self._ttft_counts[bucket] += 1
        with self._cond:
            self._generated_total += 1
            self._recent.append(now)
            while self._recent[0] < now - RATE_WINDOW:
                self._recent.popleft()
        p = req.params
        finish = None
        stop_ids = p.stop_token_ids if p.stop_token_ids is not None else self.default_stop_token_ids
        if token in stop_ids:
            finish = "stop"
        else:
            req.text += req.decoder.push(token)
            if req.num_generated >= p.max_tokens or len(req.tokens) >= self.max_context:
                finish = "length"
        if finish is not None:
            req.text += req.decoder.flush()
        stop_at = _find_stop(req.text, p.stop, req.emitted)
        if stop_at is not None:
            req.text, finish = req.text[:stop_at], "stop"
        safe = len(req.text) if finish is not None else len(req.text) - _held_back(req.text, p.stop)
        delta, req.emitted = req.text[req.emitted: safe], max(req.emitted, safe)
        if finish is not None:
            self._release(req, finish)  # before the final output, so a client that sees it finished sees it freed
        prompt_logprobs = req.prompt_logprobs if p.prompt_logprobs is not None and req.num_generated == 1 else None
        self._emit(req, RequestOutput(req.request_id, delta, [token], [logprob] if logprob else None, finish,
                                      len(req.prompt_ids), req.num_generated, prompt_logprobs=prompt_logprobs))

    def _sample(self, req: _Request, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        p = req.params
        scores = logits[None]
        if req.penalty is not None:
            scores = req.penalty(torch.tensor([req.tokens], device=logits.device), scores)
        if p.logit_bias:
            ids, bias = zip(*p.logit_bias.items())
            scores = scores.index_add(1, torch.tensor(ids, device=scores.device),
                                      torch.tensor([bias], dtype=scores.dtype, device=scores.device))
        if p.temperature == 0:
            token = int(scores.argmax(-1))
        else:
            scores = scores / p.temperature
            if p.top_p < 1.0:
                scores = TopPLogitsWarper(p.top_p)(None, scores)
            token = int(torch.multinomial(scores.softmax(-1)[0], 1, generator=req.generator))
        if not p.logprobs:
            return token, None
        # Log-probabilities of the model's own distribution (before penalties and temperature), as OpenAI reports.
        logprobs = logits.log_softmax(-1)
        top = logprobs.topk(p.top_logprobs) if p.top_logprobs else None
        pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return token, TokenLogprob(token, float(logprobs[token]), pairs)

    def _emit(self, req: _Request, out: RequestOutput) -> None:
        try:
            req.on_output(out)
        except Exception:  # noqa: BLE001 - a consumer that went away (closed event loop) must not stop the engine
            self.cancel(req.request_id)

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        self._release(req, reason)
        self._emit(req, RequestOutput(req.request_id, "", [], None, reason, len(req.prompt_ids), req.num_generated,
                                      error))

    def _release(self, req: _Request, reason: str) -> None:
        self.pool.release(req.blocks)
        if req in self._running:
            self._running.remove(req)
        if req in self._waiting:
            self._waiting.remove(req)
        with self._cond:
            self._finished[reason] = self._finished.get(reason, 0) + 1


def _default_kv_tokens(model: Any) -> int:
    c = model.config
    floor = max(c.max_position_embeddings, 16384)
    if model.device.type != "cuda":
        return floor
    free, _ = torch.cuda.mem_get_info(model.device)
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize
    return max(c.max_position_embeddings, int(free * 0.8) // per_token)


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(model.config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if value is None:
            continue
        ids.extend([value] if isinstance(value, int) else list(value))
    return tuple(dict.fromkeys(ids))


def _find_stop(text: str, stops: Sequence[str], emitted: int) -> int | None:
    """Index of the earliest stop string in text, looking only where one could newly appear."""
    found = None
    for stop in stops:
        at = text.find(stop, max(0, emitted - len(stop) + 1))
        if at >= 0 and (found is None or at < found):
            found = at
    return found


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of text that could be the start of a stop string, so cannot be streamed yet."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold
