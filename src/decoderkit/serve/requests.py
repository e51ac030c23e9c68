"""What a request asks of the engine, what the engine hands back, and the engine's record of a request in flight."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from decoderkit.serve.grammar import Grammar
from decoderkit.serve.sampler import SampleRow, TokenConstraint


@dataclass
class SamplingParams:
    """What one request asks for. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-sequence ids
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None  # score the prompt too, with this many alternatives per position
    logit_bias: dict[int, float] | None = None  # added to the logits before sampling
    constraint: TokenConstraint | None = None  # restricts each next token of this one request
    grammar: Grammar | None = None  # the output is constrained to it (each request gets its own matcher)

    def __post_init__(self) -> None:
        # max_tokens 0 only scores the prompt (echo with logprobs, as evaluation harnesses ask).
        checks = (("max_tokens", self.max_tokens >= 0, ">= 0"), ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("top_k", self.top_k >= 0, ">= 0 (0: no limit)"),
                  ("top_logprobs", self.top_logprobs >= 0, ">= 0"))
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
class Request:
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
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the full blocks of `tokens`
    num_registered: int = 0  # leading blocks known to the prefix cache
    admissions: int = 0  # times admitted to the running batch (more than once after preemption)
    text: str = ""  # everything decoded so far
    emitted: int = 0  # characters of `text` already handed out
    first_token_at: float | None = None
    counts: torch.Tensor | None = None  # (V,) generated-token counts, kept only for penalties
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    constraint: TokenConstraint | None = None  # the params' constraint, or a fresh matcher of their grammar
    speculation: Any = None  # a speculating engine's proposer state (`serve.speculative.Speculation`)

    def __post_init__(self) -> None:
        if self.constraint is None:
            p = self.params
            self.constraint = p.constraint if p.constraint is not None else (
                p.grammar.constraint() if p.grammar is not None else None)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    def sample_row(self) -> SampleRow:
        p = self.params
        return SampleRow(p.temperature, p.top_p, p.top_k, p.presence_penalty, p.frequency_penalty, self.counts,
                         p.logit_bias, self.generator, self.constraint, p.top_logprobs if p.logprobs else None)
