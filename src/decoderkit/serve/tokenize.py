"""/tokenize, /detokenize and /tokenizer_info, shaped as vLLM serves them, which is what lm-evaluation-harness's
remote tokenizer (its `local-completions` model with `tokenizer_backend=remote` or auto-detected) calls."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from decoderkit.serve.protocol import APIError, DetokenizeRequest, TokenizeRequest, parse_body


def tokenizer_router(tokenizer: Any, max_model_len: int, accepted_model: Any) -> APIRouter:
    """The tokenizer endpoints; `accepted_model(name)` raises for a model this server does not serve."""
    router = APIRouter()

    @router.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, TokenizeRequest)
        if body.model is not None:
            accepted_model(body.model)
        ids = list(tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len,
                "token_strs": tokenizer.convert_ids_to_tokens(ids)}

    @router.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = await parse_body(request, DetokenizeRequest)
        if body.model is not None:
            accepted_model(body.model)
        size = len(tokenizer)
        bad = next((t for t in body.tokens if not 0 <= t < size), None)
        if bad is not None:
            raise APIError(400, f"tokens: {bad} is not a token id; ids are integers in [0, {size - 1}]",
                           param="tokens", code="invalid_value")
        return {"prompt": tokenizer.decode(body.tokens)}

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
                "model_max_length": max_model_len, "chat_template": template,
                **{name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
                **{f"{name}_id": getattr(tokenizer, f"{name}_id")
                   for name in ("bos_token", "eos_token", "pad_token", "unk_token")},
                "add_bos_token": tokenizer.add_bos_token}

    return router
