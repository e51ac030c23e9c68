"""OpenAI-compatible serving: a continuous-batching engine over a paged KV cache, and its HTTP app."""

from decoderkit.serve.engine import Engine, EngineStoppedError, QueueFullError, RequestOutput, SamplingParams

__all__ = ["Engine", "EngineStoppedError", "QueueFullError", "RequestOutput", "SamplingParams"]
