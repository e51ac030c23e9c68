"""The grammar a request asks for: OpenAI's `response_format`, or vLLM's `guided_*` / `structured_outputs` fields.

Each maps to one `Grammar` (or None: free text); a request that asks for more than one, names an unknown
`response_format` type, or gives a schema the grammar library cannot enforce is a 400 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from decoderkit.serve.grammar import Grammar, GrammarCompiler, GrammarError
from decoderkit.serve.protocol import APIError

RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


def output_grammar(body: Any, compiler: GrammarCompiler) -> Grammar | None:
    """The grammar `body`'s response_format or vLLM extension fields ask for; APIError 400 on a bad one."""
    asked = requested_grammars(body, compiler)
    if len(asked) > 1:
        raise APIError(400, f"at most one output constraint per request; got {', '.join(p for p, _ in asked)}",
                       param=asked[1][0], code="invalid_value")
    if not asked:
        return None
    param, build = asked[0]
    try:
        return build()
    except GrammarError as exc:
        raise APIError(400, f"{param}: {exc}", param=param, code="invalid_schema") from None


def requested_grammars(body: Any, compiler: GrammarCompiler) -> list[tuple[str, Callable[[], Grammar]]]:
    """(field, builder) for each constraint the request names, not compiled yet."""
    asked: list[tuple[str, Callable[[], Grammar]]] = []
    fmt = body.response_format
    if fmt is not None:
        if fmt.type not in RESPONSE_FORMAT_TYPES:
            raise APIError(400, f"response_format.type {fmt.type!r} is not supported; allowed: "
                           f"{', '.join(RESPONSE_FORMAT_TYPES)}", param="response_format.type", code="invalid_value")
        if fmt.type == "json_object":
            asked.append(("response_format", lambda: compiler.json_schema(None)))
        elif fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format.json_schema is required when type is 'json_schema'",
                               param="response_format.json_schema", code="invalid_value")
            schema = fmt.json_schema.json_schema
            asked.append(("response_format.json_schema.schema", lambda: compiler.json_schema(schema)))
    extension = body.structured_outputs
    fields = {
        "guided_json": body.guided_json, "guided_regex": body.guided_regex, "guided_choice": body.guided_choice,
        "guided_grammar": body.guided_grammar,
        **({f"structured_outputs.{k}": getattr(extension, a) for k, a in
            (("json", "json_"), ("regex", "regex"), ("choice", "choice"), ("grammar", "grammar"))}
           if extension is not None else {}),
    }
    for param, value in fields.items():
        if value is None:
            continue
        kind = param.rsplit(".", 1)[-1].removeprefix("guided_")
        asked.append((param, _builder(compiler, param, kind, value)))
    return asked


def _builder(compiler: GrammarCompiler, param: str, kind: str, value: Any) -> Callable[[], Grammar]:
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise APIError(400, f"{param}: not valid JSON ({exc})", param=param, code="invalid_schema") from None
        return lambda: compiler.json_schema(value)
    if kind == "regex":
        return lambda: compiler.regex(value)
    if kind == "choice":
        return lambda: compiler.choice(value)
    return lambda: compiler.lark(value)
