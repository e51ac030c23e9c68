"""OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, and the
tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info) that evaluation harnesses use.

Every request is validated at the boundary and answered with OpenAI's error body on failure; generation runs on the
shared `Engine` (continuous batching), whose outputs arrive on the event loop through a per-request asyncio queue.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from decoderkit import __version__
from decoderkit.serve.chat import ChatDeltas, ChatSetup, assistant_message, prepare_chat
from decoderkit.serve.engine import Engine, EngineStoppedError, QueueFullError, RequestOutput, SamplingParams
from decoderkit.serve.grammar import Grammar, GrammarCompiler
from decoderkit.serve.logprobs import LogprobFormatter
from decoderkit.serve.metrics import render_metrics
from decoderkit.serve.protocol import (
    APIError,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ModelCard,
    ModelList,
    Usage,
    error_body,
    new_id,
    parse_body,
)
from decoderkit.serve.structured import output_grammar
from decoderkit.serve.tokenize import tokenizer_router

logger = logging.getLogger("decoderkit.serve")
FINGERPRINT = f"decoderkit-{__version__}"
MODEL_FILE_SUFFIXES = (".gguf",)
ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


@dataclass
class ServerSettings:
    """Operational limits of one server."""

    model_name: str
    api_key: str | None = None
    request_timeout: float = 600.0  # seconds from arrival to the last token
    max_body_bytes: int = 1 << 20
    retry_after_seconds: int = 1
    shutdown_drain_seconds: float = 0.0
    model_path: str | None = None  # reported in /v1/models
    started: float = field(default_factory=time.time)

    def accepts(self, name: str) -> bool:
        """Whether a request's `model` names the served model: its name, with or without a model-file suffix."""
        return name in {self.model_name, *(self.model_name + s for s in MODEL_FILE_SUFFIXES),
                        *(self.model_name.removesuffix(s) for s in MODEL_FILE_SUFFIXES)}


# ---------------------------------------------------------------------------------------------------- middleware


class BodyLimitMiddleware:
    """Reject bodies over `limit` bytes with 413 before the app sees them, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]],
                       send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(send)
            return
        # Read the whole body here (bounded) and replay it: a chunked upload is cut off as soon as it passes the limit.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Callable[[dict], Awaitable[None]]) -> None:
        payload = json.dumps(error_body(f"request body is larger than {self.limit} bytes", "invalid_request_error",
                                        None, "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


# ---------------------------------------------------------------------------------------------------------- the app


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app over a (not yet started) engine; the app's lifespan starts and stops it."""
    tokenizer = engine.tokenizer
    context = engine.max_context
    vocab_size = engine.model.config.vocab_size
    fmt = LogprobFormatter(tokenizer)
    grammars = GrammarCompiler(tokenizer, vocab_size, engine.default_stop_token_ids)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop, settings.shutdown_drain_seconds)

    app = FastAPI(title="decoderkit", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.state.engine = engine
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.",
                           "invalid_request_error", None, "invalid_api_key")

    def check_model(name: str) -> str:
        """The served model's name, which responses carry, if `name` is one that means it."""
        if not settings.accepts(name):
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{settings.model_name}`.",
                           "invalid_request_error", "model", "model_not_found")
        return settings.model_name

    app.include_router(tokenizer_router(tokenizer, context, check_model))

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.is_alive():
            return JSONResponse(error_body("the generation engine is not running", "server_error"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        authorize(request)
        return ModelList(data=[ModelCard(id=settings.model_name, created=int(settings.started),
                                         root=settings.model_path, max_model_len=context)])

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(engine.stats(), settings.model_name),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await parse_body(request, ChatCompletionRequest)
        model = check_model(body.model)
        if body.echo:
            raise APIError(400, "echo is not supported on chat completions; use /v1/completions with echo=true",
                           param="echo", code="invalid_value")
        if not body.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages", code="invalid_value")
        setup = await asyncio.to_thread(prepare_chat, body, tokenizer, grammars)
        prompt = setup.prompt
        if body.logprobs and body.top_logprobs is None:
            body.top_logprobs = 0
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = body.max_completion_tokens or body.max_tokens
        params = sampling_params(body, prompt, max_tokens, body.logprobs, body.top_logprobs or 0, "messages",
                                 grammar=setup.grammar)
        job = submit(request, [prompt], [params])
        request_id = new_id("chatcmpl")
        if body.stream:
            return sse(chat_stream(job, request_id, model, body.logprobs, body.include_usage(), setup))
        results = await job.collect()
        choices = []
        for i, r in enumerate(results):
            message, finish_reason = assistant_message(setup, r.text, r.finish_reason)
            choices.append(ChatChoice(index=i, message=message, finish_reason=finish_reason,
                                      logprobs=fmt.chat(r.logprobs) if body.logprobs else None))
        return JSONResponse(ChatCompletion(id=request_id, model=model, choices=choices, usage=usage(job, results),
                                           system_fingerprint=FINGERPRINT).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body = await parse_body(request, CompletionRequest)
        model = check_model(body.model)
        prompts = completion_prompts(body.prompt)
        logprobs = body.logprobs is not None
        scored = body.logprobs if body.echo and logprobs else None  # echo with logprobs scores the prompt
        grammar = await asyncio.to_thread(output_grammar, body, grammars)
        params = [sampling_params(body, p, body.max_tokens, logprobs, body.logprobs or 0, "prompt", scored, grammar)
                  for p in prompts]
        job = submit(request, prompts, params)
        request_id = new_id("cmpl")
        echoes = [prompts[i // body.n] if body.echo else None for i in range(job.size)]
        if body.stream:
            return sse(completion_stream(job, request_id, model, logprobs, body.include_usage(), echoes))
        results = await job.collect()
        choices = []
        for i, r in enumerate(results):
            text, lp = completion_piece(r, echoes[i], logprobs)
            choices.append(CompletionChoice(index=i, text=text, finish_reason=r.finish_reason, logprobs=lp))
        return JSONResponse(Completion(id=request_id, model=model, choices=choices, usage=usage(job, results),
                                       system_fingerprint=FINGERPRINT).model_dump())

    # -------------------------------------------------------------------------------------------- helpers

    def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]  # type: ignore[list-item]
        out = []
        for p in prompt:
            ids = tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            vocab = engine.model.config.vocab_size
            if any(not isinstance(t, int) or t < 0 or t >= vocab for t in ids):
                raise APIError(400, f"prompt token ids must be in [0, {vocab - 1}]", param="prompt")
            out.append(ids)
        return out

    def sampling_params(body: Any, prompt: list[int], max_tokens: int | None, logprobs: bool, top_logprobs: int,
                        prompt_param: str, prompt_logprobs: int | None = None,
                        grammar: Grammar | None = None) -> list[SamplingParams]:
        room = context - len(prompt)
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {context} tokens; the prompt has "
                           f"{len(prompt)} tokens.", param=prompt_param, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the "
                           "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")
        return [SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else room, temperature=body.temperature,
            top_p=body.top_p, top_k=max(body.top_k, 0), presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            stop=tuple(body.stop_list()), seed=None if body.seed is None else body.seed + i, logprobs=logprobs,
            top_logprobs=top_logprobs, stop_token_ids=() if body.ignore_eos else None, prompt_logprobs=prompt_logprobs,
            logit_bias=body.logit_bias_ids(vocab_size), grammar=grammar,
        ) for i in range(body.n)]

    def submit(request: Request, prompts: list[list[int]], params: list[list[SamplingParams]]) -> Job:
        """Queue n choices per prompt (choice index = prompt index * n + j), all or none."""
        n = len(params[0])
        job = Job(engine, request, settings.request_timeout, [len(p) for p in prompts for _ in range(n)], n)
        try:
            for p, prompt in enumerate(prompts):
                for j, sp in enumerate(params[p]):
                    job.submit(p * n + j, prompt, sp)
        except QueueFullError as exc:
            job.cancel()
            raise APIError(429, f"The server is busy ({exc}); retry shortly.", "rate_limit_error", None,
                           "rate_limit_exceeded", headers={"Retry-After": str(settings.retry_after_seconds)}) from None
        except EngineStoppedError:
            job.cancel()
            raise APIError(503, "The server is shutting down.", "server_error", None, "unavailable") from None
        return job

    def usage(job: Job, results: Sequence[RequestOutput]) -> Usage:
        # As OpenAI counts: the prompt once per prompt (not once per choice), completions over all choices.
        prompt_tokens = sum(job.prompt_lengths[:: job.n_per_prompt])
        completion_tokens = sum(r.completion_tokens for r in results)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)

    async def chat_stream(job: Job, request_id: str, model: str, logprobs: bool, include_usage: bool,
                          setup: ChatSetup) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage_: Usage | None = None) -> str:
            payload = ChatCompletionChunk(id=request_id, model=model, choices=choices, usage=usage_,
                                          system_fingerprint=FINGERPRINT)
            return f"data: {payload.model_dump_json()}\n\n"

        for i in range(job.size):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        parsers = [ChatDeltas(setup) for _ in range(job.size)]
        async for i, out in job.stream():
            deltas, finish_reason = parsers[i].feed(out.text), out.finish_reason
            if finish_reason is not None:
                tail, finish_reason = parsers[i].finish(finish_reason)
                deltas += tail
            if deltas or finish_reason or (logprobs and out.logprobs):
                # Logprobs ride on the first delta; the finish_reason on the last (an empty one if need be).
                deltas = deltas or [ChatDelta()]
                for k, delta in enumerate(deltas):
                    last = k == len(deltas) - 1
                    yield chunk([ChatChunkChoice(index=i, delta=delta, finish_reason=finish_reason if last else None,
                                                 logprobs=fmt.chat(out.logprobs) if logprobs and k == 0 else None)])
        if include_usage:
            yield chunk([], usage(job, job.finals()))

    def completion_piece(out: RequestOutput, echo: list[int] | None, logprobs: bool,
                         offset: int = 0) -> tuple[str, CompletionLogprobs | None]:
        """A choice's text and logprobs; `echo` (the prompt, on a choice's first piece) puts the prompt first."""
        if echo is None:
            return out.text, fmt.completion(out.logprobs, offset) if logprobs else None
        scored = [*(out.prompt_logprobs or []), *(out.logprobs or [])]
        return tokenizer.decode(echo) + out.text, fmt.completion(scored, offset, echo[0]) if logprobs else None

    async def completion_stream(job: Job, request_id: str, model: str, logprobs: bool, include_usage: bool,
                                echoes: list[list[int] | None]) -> AsyncIterator[str]:
        offsets = [0] * job.size
        async for i, out in job.stream():
            echo, echoes[i] = echoes[i], None  # the prompt goes before a choice's first piece only
            if echo or out.text or out.finish_reason or (logprobs and out.logprobs):
                text, lp = completion_piece(out, echo, logprobs, offsets[i])
                offsets[i] += sum(len(t) for t in lp.tokens) if lp else 0
                choice = CompletionChoice(index=i, text=text, finish_reason=out.finish_reason, logprobs=lp)
                payload = Completion(id=request_id, model=model, choices=[choice], usage=None,
                                     system_fingerprint=FINGERPRINT)
                yield f"data: {payload.model_dump_json()}\n\n"
        if include_usage:
            final = Completion(id=request_id, model=model, choices=[], usage=usage(job, job.finals()),
                               system_fingerprint=FINGERPRINT)
            yield f"data: {final.model_dump_json()}\n\n"

    return app


def sse(events: AsyncIterator[str]) -> StreamingResponse:
    async def with_done() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except APIError as exc:
            # Headers are already sent: OpenAI's clients raise on a data event that carries an "error" object.
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(with_done(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Job:
    """The engine requests of one HTTP request (n choices per prompt); outputs arrive on one asyncio queue."""

    def __init__(self, engine: Engine, request: Request, timeout: float, prompt_lengths: list[int],
                 n_per_prompt: int) -> None:
        self.engine = engine
        self.request = request
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.prompt_lengths = prompt_lengths
        self.n_per_prompt = n_per_prompt
        self.size = len(prompt_lengths)
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self.request_ids: list[str] = []
        self.parts: dict[int, list[RequestOutput]] = {}
        self.open: set[int] = set()

    def submit(self, index: int, prompt: list[int], params: SamplingParams) -> None:
        def deliver(out: RequestOutput) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        self.request_ids.append(self.engine.submit(prompt, params, deliver))
        self.open.add(index)
        self.parts[index] = []

    def cancel(self) -> None:
        for rid in self.request_ids:
            self.engine.cancel(rid)

    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs as they come; cancels the engine requests on timeout, disconnect or when the consumer stops."""
        next_check = time.monotonic() + 0.25
        try:
            while self.open:
                now = time.monotonic()
                if now >= self.deadline:
                    raise APIError(504, f"the request did not finish within {self.timeout:g} s", "timeout_error",
                                   None, "timeout")
                if now >= next_check:
                    # Checked on a clock, not only when idle: a busy stream would otherwise never look.
                    next_check = now + 0.25
                    if await self.request.is_disconnected():
                        return
                try:
                    # Outputs usually wait already: take them without the task that wait_for creates.
                    index, out = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    try:
                        index, out = await asyncio.wait_for(self.queue.get(), timeout=min(self.deadline - now, 0.25))
                    except asyncio.TimeoutError:
                        continue
                self.parts[index].append(out)
                if out.finish_reason is not None:
                    self.open.discard(index)
                    if out.finish_reason == "error":
                        raise APIError(500, f"generation failed: {out.error}", "server_error")
                yield index, out
        finally:
            if self.open:
                self.cancel()

    def finals(self) -> list[RequestOutput]:
        """Each choice's outputs merged into one."""
        merged = []
        for i in range(self.size):
            parts = self.parts[i]
            last = parts[-1]
            logprobs = [lp for p in parts for lp in (p.logprobs or [])]
            prompt_logprobs = next((p.prompt_logprobs for p in parts if p.prompt_logprobs is not None), None)
            merged.append(RequestOutput(last.request_id, "".join(p.text for p in parts),
                                        [t for p in parts for t in p.token_ids], logprobs or None, last.finish_reason,
                                        last.prompt_tokens, last.completion_tokens, last.error, prompt_logprobs))
        return merged

    async def collect(self) -> list[RequestOutput]:
        async for _ in self.stream():
            pass
        if self.open:  # the client went away; nobody reads this answer
            raise APIError(499, "client disconnected", "invalid_request_error")
        return self.finals()


# ------------------------------------------------------------------------------------------------------------ CLI


def default_model_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "default-model"


def build_parser() -> argparse.ArgumentParser:
    from decoderkit.cli.adapters import named_adapter
    from decoderkit.cli.common import _Parser, add_activations_arg, positive_int, speculative_mode
    from decoderkit.cli.serve import port_number
    from decoderkit.cli.threads import add_threads_arg

    p = _Parser(prog="decoderkit serve", description="OpenAI-compatible server with continuous batching")
    p.add_argument("model", nargs="?", default=None,
                   help="model directory, .gguf file or hub id in the local cache (default: the shipped model)")
    p.add_argument("--model", "-m", dest="model_option", default=None, help="the same as the positional MODEL")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument("--api-key", default=os.environ.get("DECODERKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $DECODERKIT_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: directory name)")
    p.add_argument("--dtype", default=None,
                   help="weights dtype (float32, bfloat16, float16; default: the checkpoint's, except half precision "
                   "on a CPU without native support for it (no AVX512_BF16 / AMX): float32 there)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quantize", choices=("int8", "int4", "none"), default=None,
                   help="weights: int8 / int4 (quantized on load, CPU), none (float; a GGUF file dequantized); "
                   "default: a GGUF file's quantized tensors stay packed, an HF checkpoint stays float")
    add_activations_arg(p)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests beyond which the server answers 429")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="tokens the shared KV block pool holds (default: 80%% of free CUDA memory, else 16384)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-prefill-tokens", type=int, default=256,
                   help="prompt tokens prefilled per step (longer prompts go in chunks, between decode steps)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence served, prompt and completion (default: the model's context); "
                   "the default KV pool is sized from it")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of prompt prefixes across requests (default on)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="short steps (decode tokens, speculative checks, prompts under 16 tokens) through an "
                        "AOTInductor package of the model's paged step (CPU). Default "
                        "(or DECODERKIT_COMPILE unset): the package where it is cached, else eager while it is "
                        "built in the background (minutes, lowest priority) and the package once it is there; "
                        "--compile: build it before serving; --no-compile: always eager")
    p.add_argument("--speculative", type=speculative_mode, default=None, metavar="lookup|draft:PATH",
                   help="decoding requests verify proposed tokens each step: by prompt lookup, or from a draft model "
                   "(same tokenizer) at PATH; same text, faster where it copies the prompt or the draft guesses well")
    p.add_argument("--num-speculative-tokens", type=positive_int, default=None, metavar="K",
                   help="most tokens proposed per step and request (default 5); fewer after rejections")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is abandoned")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    add_threads_arg(p)
    p.add_argument("--adapter", action="append", type=named_adapter, default=[], metavar="NAME=DIR",
                   help="also serve the base with this LoRA adapter merged in, as model NAME (repeatable; each is a "
                   "separate copy of the weights with its own KV cache; the base then loads as float, a GGUF file "
                   "dequantized)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the model over N ranks (processes started here; gloo on CPU, NCCL on CUDA); with --ray, "
                   "each replica's")
    p.add_argument("--ray", action="store_true",
                   help="serve replicas on Ray Serve behind Ray's HTTP proxy (needs the `ray` extra)")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="with --ray: replicas of the model")
    p.add_argument("--ray-metrics-port", type=int, default=None, metavar="PORT",
                   help="with --ray: the port where Ray exports every replica's metrics in Prometheus format")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug", "trace"))
    p.add_argument("-v", "--verbose", action="store_true", help="full tracebacks on errors")
    return p


def half_precision_is_native(model: Any) -> bool:
    """Whether the model's float weights are in a dtype this device multiplies at full speed: always on an
    accelerator; on CPU float32, or a half precision `native_half_matmul` says the CPU has instructions for. A
    quantized model keeps its own activation dtype."""
    import torch

    from decoderkit.cli.serve import quantization_summary
    from decoderkit.serve.paged import native_half_matmul

    if model.device.type != "cpu" or model.dtype == torch.float32 or quantization_summary(model) != "none":
        return True
    return native_half_matmul(model.dtype)


def load_engine(args: argparse.Namespace, adapter: str | None = None) -> tuple[Engine, str, Path]:
    import torch

    from decoderkit.auto import AutoModelForCausalLM
    from decoderkit.checkpoint import resolve_model_path
    from decoderkit.tokenizer import AutoTokenizer

    name = args.model_option or args.model
    try:
        path = resolve_model_path(name) if name else default_model_path()
    except FileNotFoundError as err:
        raise SystemExit(f"decoderkit serve: error: {err}") from None
    if not path.exists():
        raise SystemExit(f"decoderkit serve: error: model {path} does not exist")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    group = None
    try:
        if getattr(args, "tensor_parallel", 1) > 1:
            from decoderkit.parallel.launch import start_tensor_parallel

            if getattr(args, "activations", None) is not None:
                raise ValueError("--activations applies to quantized layers, which --tensor-parallel does not split")
            group = start_tensor_parallel(path, args.tensor_parallel, dtype=args.dtype, device=device,
                                          quantization=args.quantize)
            model = group.model
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype, device=device,
                                                         quantization=args.quantize,
                                                         activations=getattr(args, "activations", None))
    except ValueError as err:
        raise SystemExit(f"decoderkit serve: error: {err}") from None
    if args.dtype is None and group is None and not half_precision_is_native(model):
        model = model.float()
    if adapter is not None:
        from decoderkit.cli.adapters import apply_adapter

        model = apply_adapter(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        from decoderkit.cli.common import CLIError, compile_choice

        compile_step = compile_choice(args)
        engine = Engine(model, tokenizer, kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size,
                        max_batch_size=args.max_batch_size, max_prefill_tokens=args.max_prefill_tokens,
                        max_queue=args.max_queue, max_model_len=args.max_model_len,
                        enable_prefix_caching=args.enable_prefix_caching, speculative=build_speculator(args, model),
                        compile=compile_step)
    except (ValueError, CLIError) as err:
        raise SystemExit(f"decoderkit serve: error: {err}") from None
    if engine.package_watch is not None and group is None:
        from decoderkit.serve.paged_step import build_paged_in_background

        quantize = None if args.quantize in (None, "none") else args.quantize
        # The model as served (dtype after the float32 rule above); an adapter merged into a copy keeps the base's
        # names and shapes, which is all the package is keyed by
        if build_paged_in_background(engine.package_watch, str(path), str(model.dtype).removeprefix("torch."),
                                     quantize):
            print("decoderkit serve: compiling the decode step in the background (minutes, once per model); "
                  "decoding is eager until it is built", file=sys.stderr, flush=True)
    if group is not None:
        group.attach_engine(engine)
    return engine, args.served_model_name or path.resolve().name, path.resolve()


def build_speculator(args: argparse.Namespace, model: Any) -> Any:
    """The engine's `Speculator` for `--speculative` (None without it); a draft model is loaded like the model."""
    mode, tokens = getattr(args, "speculative", None), getattr(args, "num_speculative_tokens", None)
    if mode is None:
        if tokens is not None:
            raise SystemExit("decoderkit serve: error: --num-speculative-tokens needs --speculative lookup|draft:PATH")
        return None
    from decoderkit.serve.speculative import Speculator

    draft = None
    if mode.startswith("draft:"):
        from decoderkit.auto import AutoModelForCausalLM
        from decoderkit.checkpoint import resolve_model_path

        try:
            draft = AutoModelForCausalLM.from_pretrained(resolve_model_path(mode.removeprefix("draft:")),
                                                         dtype=args.dtype, device=str(model.device),
                                                         quantization=args.quantize)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(f"decoderkit serve: error: --speculative {mode}: {err}") from None
    try:
        return Speculator("draft" if draft is not None else "lookup", tokens or 5, draft_model=draft, model=model)
    except ValueError as err:
        raise SystemExit(f"decoderkit serve: error: --speculative {mode}: {err}") from None


def serve_on_ray(args: argparse.Namespace) -> int:
    """`--ray`: the same app in `--replicas` Ray Serve replicas behind Ray's HTTP proxy, until interrupted."""
    from decoderkit.checkpoint import resolve_model_path

    if args.speculative is not None or args.num_speculative_tokens is not None:
        raise SystemExit("decoderkit serve: error: --ray replicas do not speculate yet; drop --speculative")
    try:
        from decoderkit.serve.ray import require_ray, run

        require_ray()
    except ImportError as err:
        raise SystemExit(f"decoderkit serve: error: {err}") from None
    name = args.model_option or args.model
    path = resolve_model_path(name) if name else default_model_path()
    load = {k: v for k, v in (("dtype", args.dtype), ("device", args.device), ("quantization", args.quantize))
            if v is not None}
    engine = dict(kv_cache_tokens=args.kv_cache_tokens, block_size=args.block_size, max_batch_size=args.max_batch_size,
                  max_prefill_tokens=args.max_prefill_tokens, max_queue=args.max_queue)
    run(path, host=args.host, port=args.port, metrics_port=args.ray_metrics_port, num_replicas=args.replicas,
        served_model_name=args.served_model_name, engine_options=engine, load_options=load, api_key=args.api_key,
        tensor_parallel=args.tensor_parallel)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `decoderkit serve` and `python -m decoderkit.serve`."""
    import uvicorn

    from decoderkit.cli.adapters import adapter_dir, adapter_load_quantization
    from decoderkit.cli.serve import ModelRouter, bind_socket, serve_errors, start_line
    from decoderkit.cli.threads import configure_threads

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    with serve_errors(args.verbose):
        threads = configure_threads(args.threads)
        if args.ray:
            return serve_on_ray(args)
        if args.adapter and args.tensor_parallel > 1:
            raise ValueError("--adapter cannot be combined with --tensor-parallel: merge it first (`decoderkit merge`)")
        for _, directory in args.adapter:
            adapter_dir(directory)
        args.quantize = adapter_load_quantization(args.quantize, args.adapter)
        # The port first: a busy one fails now, not after minutes of loading.
        sock = bind_socket(args.host, args.port)
        engine, name, path = load_engine(args)
        settings = ServerSettings(model_name=name, api_key=args.api_key, request_timeout=args.request_timeout,
                                  max_body_bytes=args.max_body_bytes, model_path=str(path))
        apps = {name: create_app(engine, settings)}
        for adapter_name, directory in args.adapter:
            if adapter_name in apps:
                raise ValueError(f"--adapter {adapter_name}={directory}: the name {adapter_name!r} is served already")
            adapter_engine = load_engine(args, adapter=directory)[0]
            apps[adapter_name] = create_app(adapter_engine, ServerSettings(
                model_name=adapter_name, api_key=args.api_key, request_timeout=args.request_timeout,
                max_body_bytes=args.max_body_bytes, model_path=str(Path(directory).resolve())))
        app = apps[name] if len(apps) == 1 else ModelRouter(apps, args.max_body_bytes)
        print(start_line(list(apps), path, engine.model, threads, engine.max_context, sock), file=sys.stderr,
              flush=True)
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout)
        # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets in-flight requests finish (up to the timeout above),
        # then runs the app's lifespan shutdown, which stops the engine.
        uvicorn.Server(config).run(sockets=[sock])
    return 0
