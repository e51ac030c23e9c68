"""Continuous-batching generation over a paged KV cache.

One background thread runs every request. Each step it gathers the pending tokens of all admitted requests (one token
for those decoding, a prompt chunk for those still prefilling), runs them through the model as one flat batch, samples
one token for every request whose pending tokens are all in the cache (one batched call, `sampler.sample`), and hands
the result to the request's callback. Requests join and leave between steps.

The KV cache is a pool of fixed-size blocks shared by all requests (`BlockPool`); a request holds a block table and
gets a new block only when its sequence crosses a block boundary, so memory follows what requests use, not their
worst case. With prefix caching, full blocks are keyed by their token prefix and outlive their request: an admitted
request starts from the longest cached prefix of its prompt and prefills only the rest. When the pool runs dry the
most recently admitted request is preempted: its blocks are released and it is prefilled again (prompt and tokens so
far, mostly from the prefix cache) once blocks are free.

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
from typing import Any

import torch

from decoderkit._openmp import release_thread_pool
from decoderkit.serve.blocks import BlockPool, block_hashes
from decoderkit.serve.metrics import EngineCounters, EngineStats
from decoderkit.serve.paged import PagedRunner, Segment
from decoderkit.serve.paged_step import PackageWatch, attach
from decoderkit.serve.requests import Request, RequestOutput, SamplingParams, TokenLogprob
from decoderkit.serve.sampler import Sampled, sample
from decoderkit.serve.speculative import Speculator

__all__ = ["Engine", "EngineStats", "EngineStoppedError", "QueueFullError", "RequestOutput", "SamplingParams",
           "TokenLogprob"]
logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; retry later."""


class EngineStoppedError(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class Engine:
    """Serves generation requests from a background thread with continuous batching.

    Args:
        model: a loaded `DecoderForCausalLM` (eval mode is set here).
        tokenizer: its `Tokenizer` (for incremental detokenisation and stop strings).
        kv_cache_tokens: tokens the block pool holds, over all requests; at least max_model_len. Default: 80% of
            the free memory on CUDA, else max(max_model_len, 16384) tokens (CPU pages are committed once written).
        block_size: tokens per KV block.
        max_batch_size: requests decoded together at most.
        max_prefill_tokens: prompt tokens processed per step (the step's token budget beside one token per decoding
            request); a longer prompt is prefilled in chunks of this size, interleaved with the decoding of running
            requests, so their inter-token latency stays bounded.
        max_queue: requests waiting for admission at most; `submit` raises QueueFullError beyond it.
        max_model_len: longest sequence (prompt and completion) served; default the model's context
            (max_position_embeddings). The default pool is sized from it.
        enable_prefix_caching: keep full KV blocks keyed by their token prefix and reuse them across requests.
        speculative: None, or a `Speculator` (`serve.speculative`): decoding requests then verify proposed tokens in
            their step, emitting what the plain engine would.
        compile: how short steps (decode tokens, speculative checks, prompts under 16 tokens) run
            (`serve.paged_step`): "auto" through the AOTInductor package where one for this model is on disk (and
            once one appears there, built by another process: `package_watch`), eagerly until then; True: build
            the package first if it is missing (minutes on a small CPU); False: always eagerly. Where the model
            cannot have a package (GPU, tensor-parallel, ...) all three are eager.
    """

    def __init__(self, model: Any, tokenizer: Any, *, kv_cache_tokens: int | None = None, block_size: int = 16,
                 max_batch_size: int = 32, max_prefill_tokens: int = 256, max_queue: int = 64,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 speculative: Speculator | None = None, compile: bool | str = "auto") -> None:  # noqa: A002
        config = model.decoder_config
        if config.add_cross_attention:
            raise ValueError("the server runs decoder-only models; this one has cross-attention layers")
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        if block_size < 1 or max_batch_size < 1 or max_prefill_tokens < 1 or max_queue < 0:
            raise ValueError("block_size, max_batch_size and max_prefill_tokens must be >= 1, max_queue >= 0")
        if max_model_len is not None and not 1 < max_model_len <= config.max_position_embeddings:
            raise ValueError(f"max_model_len must be in [2, {config.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {max_model_len}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_context = max_model_len or config.max_position_embeddings
        kv_cache_tokens = kv_cache_tokens or _default_kv_tokens(model, self.max_context)
        if kv_cache_tokens < self.max_context:
            raise ValueError(f"kv_cache_tokens={kv_cache_tokens} cannot hold one full context of "
                             f"{self.max_context} tokens (max_model_len; pass a smaller one to serve a smaller pool)")
        num_blocks = -(-kv_cache_tokens // block_size)
        self.pool = BlockPool(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, num_blocks,
                              block_size, model.dtype, model.device)
        self.runner = PagedRunner(model, self.pool)
        self.package_watch: PackageWatch | None = None
        if compile is not False:
            self.package_watch = attach(self.runner, max_batch_size, build=compile is True)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queue = max_queue
        self.default_stop_token_ids = _eos_ids(model, tokenizer)
        self.enable_prefix_caching = enable_prefix_caching
        self.counters = EngineCounters()
        self.speculator = speculative

        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: set[str] = set()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._ids = itertools.count()
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- public API

    def start(self) -> Engine:
        """Start the engine thread. The calling thread's OpenMP workers are ended first (`release_thread_pool`): torch
        work here runs in the engine thread, and a second idle pool would make every parallel region in it sleep. A
        thread that goes on running parallel torch work beside a started engine brings that back (both slow down)."""
        if self._thread is None:
            release_thread_pool()
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
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the maximum context length "
                             f"(max_model_len) is {self.max_context}")
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=self.pool.keys.device)
            # An unseeded request draws a fresh seed without touching torch's global generator (torch.seed would).
            generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        req = Request(
            request_id=request_id or f"req-{next(self._ids)}", prompt_ids=list(prompt_ids), params=params,
            on_output=on_output, generator=generator,
            decoder=self.tokenizer.stream_decoder(skip_special_tokens=True, prefix_ids=prompt_ids),
        )
        req.tokens = list(prompt_ids)
        if params.presence_penalty or params.frequency_penalty:
            req.counts = torch.zeros(self.model.decoder_config.vocab_size, device=self.pool.keys.device)
        if self.speculator is not None:
            self.speculator.attach(req)
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
            return self.counters.snapshot(len(self._inbox) + len(self._waiting), len(self._running),
                                          self.pool.num_free, self.pool.num_blocks, self.pool.num_cached)

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
            if self.package_watch is not None and self.package_watch.poll():
                self.package_watch = None
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
        proposed = [req.speculation.proposed if req.speculation is not None else [] for req, _ in scheduled]
        segments = [Segment(req.num_cached, req.tokens[req.num_cached: end] + extra, req.blocks)
                    for (req, end), extra in zip(scheduled, proposed)]
        tails = [len(extra) + 1 for extra in proposed]  # rows of logits each request needs: one, or k + 1 to verify
        scoring = [self._scoring(req) for req, _ in scheduled]
        if any(scoring):
            every = self.runner.forward(segments, all_positions=True)  # (N, V): a row per token of the step
            ends = list(itertools.accumulate(len(s.ids) for s in segments))
            firsts = [end - tail for end, tail in zip(ends, tails)]
            for (req, _), seg, last, wanted in zip(scheduled, segments, ends, scoring):
                if wanted:
                    self._score_prompt(req, seg.start, every[last - len(seg.ids): last].float())
        elif any(proposed):
            every = self.runner.forward(segments, tails=tails)  # (sum(tails), V)
            firsts = [end - tail for end, tail in zip(itertools.accumulate(tails), tails)]
        else:
            every = self.runner.forward(segments)
            firsts = list(range(len(segments)))
        # The row after each request's last token of the step, before any proposals
        logits = every[torch.tensor(firsts, device=every.device)] if any(proposed) or any(scoring) else every
        ready: list[tuple[int, Request]] = []
        for row, (req, end) in enumerate(scheduled):
            req.num_cached = end
            self._register_blocks(req)
            if end < len(req.tokens):
                continue
            if proposed[row]:
                self._verify(req, every[firsts[row]: firsts[row] + tails[row]])
            elif req.params.max_tokens == 0:
                self._release(req, "length")
                self._emit(req, RequestOutput(req.request_id, "", [], None, "length", len(req.prompt_ids), 0,
                                              prompt_logprobs=req.prompt_logprobs))
            else:
                ready.append((row, req))
        if not ready:
            return
        rows = torch.tensor([row for row, _ in ready], device=logits.device)
        chosen = sample(logits.index_select(0, rows), [req.sample_row() for _, req in ready])
        now = time.monotonic()
        self.counters.tokens(len(ready), now)
        for (_, req), got in zip(ready, chosen):
            self._advance(req, got, now)

    def _scoring(self, req: Request) -> bool:
        """Whether the request still needs logits of prompt positions (echo with logprobs)."""
        return req.params.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt_ids) - 1

    def _score_prompt(self, req: Request, start: int, logits: torch.Tensor) -> None:
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

    # --------------------------------------------------------------------------------------- scheduling, blocks

    def _schedule(self) -> list[tuple[Request, int]]:
        """Pick this step's work: every decoding request, then prompt chunks within the prefill budget."""
        budget = self.max_prefill_tokens
        while self._waiting and len(self._running) < self.max_batch_size:
            req = self._waiting[0]
            hits = self._attach_cached_prefix(req)
            # Admit only what fits now, leaving a block per running request so that decoding rarely preempts.
            need = self.pool.blocks_for(len(req.tokens) + 1) - len(req.blocks) + len(self._running)
            if need > self.pool.num_free and self._running:
                self._detach(req)
                break
            self._running.append(self._waiting.popleft())
            self.counters.admitted(len(req.prompt_ids) if req.admissions == 0 else 0,
                                   len(req.tokens) if self._caching(req) else 0, hits)
            req.admissions += 1
        scheduled: list[tuple[Request, int]] = []
        for req in list(self._running):
            if req not in self._running:  # preempted while making room for an earlier one
                continue
            pending = len(req.tokens) - req.num_cached
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
            if not self._reserve(req, end):
                continue
            if req.speculation is not None:
                self.speculator.schedule(req, end if pending == 1 else None, self.pool, self.max_context)
            scheduled.append((req, end))
        return [(req, end) for req, end in scheduled if req in self._running]

    def _verify(self, req: Request, logits: torch.Tensor) -> None:
        """Emit what the model accepts of the request's proposals (`logits`: k + 1 rows), token by token as plain
        steps emit theirs, then rewind its cache past the rest."""
        emitted = self.speculator.verify(req, logits)  # type: ignore[union-attr]
        now = time.monotonic()
        taken = 0
        for got in emitted:
            self._advance(req, got, now)
            taken += 1
            if req not in self._running:  # finished (stop, length, a stop string): nothing after it is emitted
                break
        self.counters.tokens(taken, now)
        self.speculator.feedback(req, len(emitted) - 1, self.counters)  # type: ignore[union-attr]
        if req in self._running:
            self.speculator.rewind(req, self.pool)  # type: ignore[union-attr]

    def _caching(self, req: Request) -> bool:
        # A request still scoring its prompt needs the logits of every prompt position: it computes them all.
        return self.enable_prefix_caching and not self._scoring(req)

    def _keys(self, req: Request, num_blocks: int) -> list[bytes]:
        """Prefix-cache keys of the request's first num_blocks full blocks, computed once."""
        have = len(req.block_keys)
        if have < num_blocks:
            req.block_keys += block_hashes(req.tokens[: num_blocks * self.pool.block_size], self.pool.block_size,
                                           start=have, parent=req.block_keys[-1] if have else None)
        return req.block_keys[:num_blocks]

    def _attach_cached_prefix(self, req: Request) -> int:
        """Start a request being admitted from the longest cached prefix of its tokens; returns the tokens hit."""
        if not self._caching(req) or req.blocks:
            return 0
        # At least the last token is computed again: its logits choose the next token.
        blocks = self.pool.lookup(self._keys(req, (len(req.tokens) - 1) // self.pool.block_size))
        req.blocks.extend(blocks)
        req.num_registered = len(blocks)
        req.num_cached = len(blocks) * self.pool.block_size
        return req.num_cached

    def _register_blocks(self, req: Request) -> None:
        """Key the blocks the request has filled since the last step, so that later requests can share them."""
        full = req.num_cached // self.pool.block_size
        if not self.enable_prefix_caching or full <= req.num_registered:
            return
        for block, key in zip(req.blocks[req.num_registered: full], self._keys(req, full)[req.num_registered:]):
            self.pool.register(block, key)
        req.num_registered = full

    def _detach(self, req: Request) -> None:
        self.pool.release(req.blocks)
        req.num_cached = req.num_registered = 0

    def _reserve(self, req: Request, length: int) -> bool:
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

    def _preempt(self, req: Request) -> None:
        # Recompute rather than swap: the request goes back to the front of the queue with its tokens so far (its
        # full blocks stay in the prefix cache until evicted, so readmission often finds them).
        self._detach(req)
        self._running.remove(req)
        self._waiting.appendleft(req)
        self.counters.preempted()

    # ------------------------------------------------------------------------------------------------- outputs

    def _advance(self, req: Request, got: Sampled, now: float) -> None:
        token = got.token_id
        logprob = TokenLogprob(token, got.logprob, got.top) if got.logprob is not None else None
        req.tokens.append(token)
        if req.counts is not None and token < req.counts.shape[0]:
            req.counts[token] += 1
        if req.first_token_at is None:
            req.first_token_at = now
            self.counters.first_token(now - req.submitted)
        p = req.params
        finish = None
        stop_ids = p.stop_token_ids if p.stop_token_ids is not None else self.default_stop_token_ids
        if token in stop_ids:
            finish = "stop"
        else:
            req.text += req.decoder.push(token)
            if req.constraint is not None and req.constraint.is_terminated():
                finish = "stop"  # the grammar allows nothing more
            elif req.num_generated >= p.max_tokens or len(req.tokens) >= self.max_context:
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

    def _emit(self, req: Request, out: RequestOutput) -> None:
        try:
            req.on_output(out)
        except Exception:  # noqa: BLE001 - a consumer that went away (closed event loop) must not stop the engine
            self.cancel(req.request_id)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        self._release(req, reason)
        self._emit(req, RequestOutput(req.request_id, "", [], None, reason, len(req.prompt_ids), req.num_generated,
                                      error))

    def _release(self, req: Request, reason: str) -> None:
        self.pool.release(req.blocks)
        if req in self._running:
            self._running.remove(req)
        if req in self._waiting:
            self._waiting.remove(req)
        self.counters.finish(reason)


def _default_kv_tokens(model: Any, max_model_len: int) -> int:
    c = model.decoder_config
    if model.device.type != "cuda":
        return max(max_model_len, 16384)
    free, _ = torch.cuda.mem_get_info(model.device)
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * model.dtype.itemsize
    return max(max_model_len, int(free * 0.8) // per_token)


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
