"""Chat templates: Jinja rendering that produces the same text as transformers' `apply_chat_template`.

Chat templates are untrusted code from model repositories, so they run in jinja2's immutable sandbox, and everything
they can see is rebuilt from plain JSON-like data first. The environment (whitespace control, extensions, filters and
globals) follows transformers, because templates on the Hub are written against it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "apply_chat_template", "render_chat_template", "select_chat_template"]

Message = dict[str, Any]
Conversation = list[Message]

# Message fields a model's reasoning is passed under; templates read the first, gpt-oss templates read "thinking".
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render (including templates calling `raise_exception`)."""


def select_chat_template(
    templates: str | Mapping[str, str] | None, chat_template: str | None = None, tools: Sequence | None = None
) -> str:
    """Pick the template text to render.

    Args:
        templates: the tokenizer's template, or its named templates.
        chat_template: a template text, or the name of one of `templates`.
        tools: when given and a template named "tool_use" exists, that one is the default.
    """
    if isinstance(templates, Mapping):
        if chat_template is not None:
            return templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        raise ValueError(
            "This tokenizer has several chat templates and none is named 'default'; pass `chat_template=` with one "
            f"of the names {sorted(templates)} or a template text."
        )
    if chat_template is not None:
        return chat_template
    if templates is None:
        raise ValueError(
            "Cannot apply a chat template: the tokenizer has no `chat_template` (none in tokenizer_config.json, "
            "chat_template.jinja or the GGUF metadata) and no `chat_template=` argument was passed."
        )
    return templates


def apply_chat_template(
    tokenizer: Any,
    conversation: Sequence[Any],
    *,
    tools: Sequence[Any] | None,
    documents: Sequence[Any] | None,
    chat_template: str | None,
    add_generation_prompt: bool,
    continue_final_message: bool | str,
    tokenize: bool,
    return_dict: bool,
    return_assistant_tokens_mask: bool,
    encode_kwargs: Mapping[str, Any],
    template_kwargs: dict[str, Any],
) -> Any:
    """The body of `Tokenizer.apply_chat_template` (see there); `tokenizer` is the calling `Tokenizer`."""
    if template_kwargs.pop("sanitize_control_tokens", False):
        raise ValueError("sanitize_control_tokens is not supported by decoderkit")
    if return_assistant_tokens_mask and not (tokenize and return_dict):
        raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True")
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt cannot both be set: the first continues the last "
            "message, the second opens a new assistant message."
        )
    template = select_chat_template(tokenizer.chat_template, chat_template, tools)
    if not conversation:
        raise ValueError("Cannot apply a chat template to an empty conversation")
    batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
    conversations = conversation if batched else [conversation]
    # Some APIs send content=None / tool_calls=None; templates handle a missing key better than a None.
    conversations = [
        [{k: v for k, v in m.items() if v is not None} for m in getattr(c, "messages", c)] for c in conversations
    ]
    texts, spans = render_chat_template(
        template,
        conversations,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        track_generation=return_assistant_tokens_mask,
        **template_kwargs,
    )
    if not tokenize:
        return texts if batched else texts[0]
    out = tokenizer(texts if batched else texts[0], add_special_tokens=False, **encode_kwargs)
    if not return_dict:
        return out["input_ids"]
    if return_assistant_tokens_mask:
        out["assistant_masks"] = _assistant_masks(tokenizer, texts, spans, out, batched)
    return out


def _assistant_masks(tokenizer: Any, texts: list[str], spans: list, out: Mapping[str, Any], batched: bool) -> Any:
    """1 for the tokens that overlap a `{% generation %}` block, shaped like `out["input_ids"]`."""
    ids, attention = out["input_ids"], out["attention_mask"]
    as_rows = batched or hasattr(ids, "tolist")
    rows = ids.tolist() if hasattr(ids, "tolist") else (ids if batched else [ids])
    attention = attention.tolist() if hasattr(attention, "tolist") else (attention if batched else [attention])
    masks = []
    for text, text_spans, row, row_attention in zip(texts, spans, rows, attention, strict=True):
        offsets = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).offsets
        first = row_attention.index(1) if 1 in row_attention else 0  # after left padding
        mask = [0] * len(row)
        for start, end in text_spans:
            for position, (a, b) in enumerate(offsets[: sum(row_attention)]):
                if a < end and b > start:
                    mask[first + position] = 1
        masks.append(mask)
    if hasattr(ids, "new_tensor"):
        return ids.new_tensor(masks)
    if isinstance(ids, np.ndarray):
        return np.asarray(masks, dtype=ids.dtype)
    return masks if as_rows else masks[0]


def render_chat_template(
    template: str,
    conversations: Sequence[Sequence[Any]],
    *,
    tools: Sequence[Any] | None = None,
    documents: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    track_generation: bool = False,
    **variables: Any,
) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """Render each conversation with `template`.

    Args:
        template: the Jinja source.
        conversations: lists of messages (dicts, dataclasses or pydantic models).
        tools: JSON-schema dicts describing tools.
        documents: dicts (e.g. with "title" and "text") for retrieval-augmented templates.
        add_generation_prompt: passed to the template; asks for the assistant header at the end.
        continue_final_message: leave the last message open (True continues "content"; a string names the field).
        track_generation: record the character spans of `{% generation %}` blocks.
        **variables: further template variables (special tokens, `enable_thinking`, ...).

    Returns:
        The rendered texts, and per text the `(start, end)` character spans of its `{% generation %}` blocks
        (empty lists unless `track_generation`).

    Raises:
        ChatTemplateError: the template does not compile, or raised while rendering.
    """
    compiled = _compile(template)
    tool_schemas = _tool_schemas(tools)
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise TypeError("`documents` must be a list of dicts, e.g. with 'title' and 'text' keys")
    context = {
        "tools": _plain(tool_schemas),
        "documents": _plain(documents),
        "add_generation_prompt": add_generation_prompt,
        **_plain(variables),
    }
    texts, spans = [], []
    for conversation in conversations:
        messages = _plain(getattr(conversation, "messages", conversation))
        for message in messages:
            if not isinstance(message, dict):
                raise TypeError(f"Chat messages must be dicts, dataclasses or pydantic models, got {message!r}")
        messages = _alias_reasoning(messages)
        continued = _tag_final_message(messages, continue_final_message, template) if continue_final_message else None
        text, generation_spans = _render(compiled, {**context, "messages": messages}, track_generation)
        if continued is not None:
            text = _cut_at_tag(text, continued)
        texts.append(text)
        spans.append(generation_spans)
    return texts, spans


# --------------------------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------------------------

# Spans of {% generation %} blocks for the render in progress on this thread/task (None when not tracking).
_generation_spans: ContextVar[list | None] = ContextVar("generation_spans", default=None)
_rendered_blocks: ContextVar[list | None] = ContextVar("rendered_blocks", default=None)


def _render(compiled: jinja2.Template, context: dict, track: bool) -> tuple[str, list[tuple[int, int]]]:
    blocks: list[str] = []
    spans: list[tuple[int, int]] = []
    tokens = (_rendered_blocks.set(blocks if track else None), _generation_spans.set(spans if track else None))
    try:
        if track:
            for block in compiled.generate(**context):
                blocks.append(block)
            text = "".join(blocks)
        else:
            text = compiled.render(**context)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template error: {err.message or err}") from err
    except (TypeError, AttributeError, KeyError, IndexError, ArithmeticError) as err:
        # Python errors raised by operations inside the template are the template's failure, not the caller's.
        raise ChatTemplateError(f"chat template error: {type(err).__name__}: {err}") from err
    finally:
        _rendered_blocks.reset(tokens[0])
        _generation_spans.reset(tokens[1])
    return text, spans


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: marks assistant text (for assistant-token masks)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark", []), [], [], body).set_lineno(lineno)

    def _mark(self, caller: Callable[[], str]) -> str:
        text = caller()
        spans, blocks = _generation_spans.get(), _rendered_blocks.get()
        if spans is not None and blocks is not None:
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes and sorts keys; templates expect plain json.dumps output.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _DictFactory:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, which could reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attributes ({name!r})")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictFactory(), namespace=_Namespace
    )
    return env


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"chat template does not compile: {err}") from err


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


def _tool_schemas(tools: Sequence[Any] | None) -> list[dict] | None:
    if tools is None:
        return None
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise ValueError(
                f"tools must be JSON-schema dicts (e.g. {{'type': 'function', 'function': {{...}}}}), got {tool!r}"
            )
    return [dict(tool) for tool in tools]


def _plain(value: Any) -> Any:
    """Rebuild `value` from JSON-like types, so the sandbox never sees methods of arbitrary objects.

    Anything that is not a scalar, mapping, sequence, dataclass or pydantic model becomes an inert placeholder such as
    "<ndarray>" (templates only test whether media fields exist).
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    """Expose a message's reasoning under every name templates read it by (order of keys as transformers builds it)."""
    out = []
    for message in messages:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _tag_final_message(messages: list[dict], field: bool | str, template: str) -> str:
    """Append a marker to the final message so the text after it can be cut off; returns the original text."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty")
    field = field if isinstance(field, str) else "content"
    final = messages[-1].get(field)
    if final is None:
        raise ValueError(f"continue_final_message is set but the final message has no {field!r} to continue")
    fields = [field]
    if field in _REASONING_FIELDS:
        fields = [f for f in _REASONING_FIELDS if messages[-1].get(f) == final]
    if not any(f in template for f in fields):
        raise ValueError(f"continue_final_message is set to {field!r} but the chat template never reads that field")
    messages[-1] = dict(messages[-1])
    if isinstance(final, (list, tuple)):
        blocks = [dict(b) if isinstance(b, dict) else b for b in final]
        for block in reversed(blocks):
            if isinstance(block, dict) and "text" in block:
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                break
        else:
            raise ValueError("continue_final_message is set but the final message has no text block to continue")
        messages[-1][field] = blocks
    else:
        for f in fields:
            messages[-1][f] = messages[-1][f] + _CONTINUE_TAG
    return final


def _cut_at_tag(text: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ValueError(
            "continue_final_message is set but the chat template drops (part of) the final message, so it cannot be "
            f"continued. Final message: {final.strip()!r}"
        )
    at = text.rindex(tag)
    if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:at]
    # The template trimmed whitespace after the message; cut the same way
    return text[:at].rstrip()
