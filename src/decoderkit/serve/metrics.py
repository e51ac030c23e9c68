"""The engine's counters and their Prometheus text exposition at /metrics.

Each quantity appears under decoderkit's own name and, where vLLM exposes the same quantity, under vLLM's name too
(`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_hits_total`, ...), so the dashboards and
routers written against vLLM (llm-d, the Gateway API inference extension, KServe's autoscaling) read this server as is.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW = 10.0  # seconds over which tokens/s is measured
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
    prompt_tokens_total: int = 0  # prompt tokens of admitted requests
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found cached
    cached_blocks: int = 0
    preemptions: int = 0
    spec_drafts: int = 0  # decoding steps of a request that verified proposals
    spec_draft_tokens: int = 0  # tokens proposed
    spec_accepted_tokens: int = 0  # of which the model kept
    spec_accepted_per_position: list[int] = field(default_factory=list)  # [p]: drafts that kept proposal p

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the pool held by requests (cached blocks nobody holds count as free: they are reusable)."""
        return 1.0 - self.free_blocks / self.total_blocks if self.total_blocks else 0.0


class EngineCounters:
    """Counters the engine thread updates and /metrics reads, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generated = 0
        self.recent: deque[float] = deque()  # times of the tokens generated in the last RATE_WINDOW seconds
        self.ttft_counts = [0] * len(TTFT_BUCKETS)
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.spec_drafts = self.spec_draft_tokens = self.spec_accepted = 0
        self.spec_per_position: list[int] = []

    def first_token(self, ttft: float) -> None:
        with self.lock:
            self.ttft_sum += ttft
            self.ttft_count += 1
            bucket = next((i for i, bound in enumerate(TTFT_BUCKETS) if ttft <= bound), None)
            if bucket is not None:
                self.ttft_counts[bucket] += 1

    def tokens(self, n: int, now: float) -> None:
        with self.lock:
            self.generated += n
            self.recent.extend([now] * n)
            while self.recent and self.recent[0] < now - RATE_WINDOW:
                self.recent.popleft()

    def finish(self, reason: str) -> None:
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def admitted(self, prompt_tokens: int, queried: int, hits: int) -> None:
        with self.lock:
            self.prompt_tokens += prompt_tokens
            self.prefix_queries += queried
            self.prefix_hits += hits

    def preempted(self) -> None:
        with self.lock:
            self.preemptions += 1

    def speculated(self, proposed: int, accepted: int) -> None:
        """One request's verify step: `accepted` of its `proposed` tokens kept (the first `accepted` of them)."""
        with self.lock:
            self.spec_drafts += 1
            self.spec_draft_tokens += proposed
            self.spec_accepted += accepted
            if len(self.spec_per_position) < proposed:
                self.spec_per_position += [0] * (proposed - len(self.spec_per_position))
            for p in range(accepted):
                self.spec_per_position[p] += 1

    def snapshot(self, waiting: int, running: int, free_blocks: int, total_blocks: int,
                 cached_blocks: int) -> EngineStats:
        with self.lock:
            now = time.monotonic()
            while self.recent and self.recent[0] < now - RATE_WINDOW:
                self.recent.popleft()
            buckets = list(zip(TTFT_BUCKETS, itertools.accumulate(self.ttft_counts)))
            return EngineStats(waiting, running, free_blocks, total_blocks, self.generated,
                               len(self.recent) / RATE_WINDOW, buckets, self.ttft_sum, self.ttft_count,
                               dict(self.finished), self.prompt_tokens, self.prefix_queries, self.prefix_hits,
                               cached_blocks, self.preemptions, self.spec_drafts, self.spec_draft_tokens,
                               self.spec_accepted, list(self.spec_per_position))


def render_metrics(stats: EngineStats, model_name: str | None = None) -> str:
    """Prometheus text exposition (format 0.0.4) of the engine's state."""
    lines: list[str] = []
    label = f'model_name="{_escape(model_name)}"' if model_name else ""

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                     for labels, value in samples)

    def labelled(extra: str = "") -> str:
        labels = ",".join(part for part in (label, extra) if part)
        return f"{{{labels}}}" if labels else ""

    def vllm(name: str, kind: str, help_: str, value: float) -> None:
        metric(name, kind, help_, [(labelled(), value)])

    s = stats
    metric("decoderkit_queue_length", "gauge", "Requests waiting for admission.", [("", s.waiting)])
    metric("decoderkit_running_requests", "gauge", "Requests in the running batch.", [("", s.running)])
    metric("decoderkit_generated_tokens_total", "counter", "Tokens generated since start.",
           [("", s.generated_tokens_total)])
    metric("decoderkit_tokens_per_second", "gauge", f"Generated tokens per second over the last {RATE_WINDOW:g} s.",
           [("", s.tokens_per_second)])
    metric("decoderkit_kv_blocks_free", "gauge", "Free KV-cache blocks (cached blocks nobody holds included).",
           [("", s.free_blocks)])
    metric("decoderkit_kv_blocks_total", "gauge", "KV-cache blocks in the pool.", [("", s.total_blocks)])
    metric("decoderkit_kv_blocks_cached", "gauge", "KV-cache blocks holding a reusable prompt prefix.",
           [("", s.cached_blocks)])
    metric("decoderkit_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           [("", s.prefix_cache_queries)])
    metric("decoderkit_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
           [("", s.prefix_cache_hits)])
    metric("decoderkit_requests_finished_total", "counter", "Finished requests by reason.",
           [(f'{{reason="{k}"}}', v) for k, v in sorted(s.requests_finished.items())])
    buckets = [(f'_bucket{{le="{bound:g}"}}', count) for bound, count in s.ttft_buckets]
    buckets += [('_bucket{le="+Inf"}', s.ttft_count), ("_sum", s.ttft_sum), ("_count", s.ttft_count)]
    lines.extend(["# HELP decoderkit_time_to_first_token_seconds Time from arrival to the first generated token.",
                  "# TYPE decoderkit_time_to_first_token_seconds histogram"])
    lines.extend(f"decoderkit_time_to_first_token_seconds{suffix} {value:g}" for suffix, value in buckets)

    vllm("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", s.running)
    vllm("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", s.waiting)
    vllm("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
    # The v0 name, still read by older dashboards and gateway configurations.
    vllm("vllm:gpu_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
    vllm("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried tokens.",
         s.prefix_cache_queries)
    vllm("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
         s.prefix_cache_hits)
    rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
    vllm("vllm:gpu_prefix_cache_hit_rate", "gauge", "Prefix cache hit rate (hit tokens / queried tokens).", rate)
    vllm("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions.", s.preemptions)
    vllm("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", s.prompt_tokens_total)
    vllm("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
         s.generated_tokens_total)
    metric("decoderkit_spec_decode_draft_tokens_total", "counter", "Tokens proposed by speculative decoding.",
           [("", s.spec_draft_tokens)])
    metric("decoderkit_spec_decode_accepted_tokens_total", "counter", "Proposed tokens the model accepted.",
           [("", s.spec_accepted_tokens)])
    vllm("vllm:spec_decode_num_drafts_total", "counter", "Number of spec decoding drafts.", s.spec_drafts)
    vllm("vllm:spec_decode_num_draft_tokens_total", "counter", "Number of draft tokens.", s.spec_draft_tokens)
    vllm("vllm:spec_decode_num_accepted_tokens_total", "counter", "Number of accepted tokens.",
         s.spec_accepted_tokens)
    metric("vllm:spec_decode_num_accepted_tokens_per_pos_total", "counter", "Accepted tokens per draft position.",
           [(labelled(f'position="{p}"'), v) for p, v in enumerate(s.spec_accepted_per_position)])
    metric("vllm:request_success_total", "counter", "Count of finished requests by reason.",
           [(labelled(f'finished_reason="{_escape(k)}"'), v) for k, v in sorted(s.requests_finished.items())])
    lines.extend(["# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
                  "# TYPE vllm:time_to_first_token_seconds histogram"])
    for suffix, value in buckets:
        name, _, bound = suffix.partition("{")
        lines.append(f"vllm:time_to_first_token_seconds{name}{labelled(bound.rstrip('}'))} {value:g}")
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
