"""Tool calling: tools rendered through the chat template, calls parsed out of the model's text (streamed or whole),
and the grammar that forces a call when `tool_choice` is "required" or names a function.

Three formats, as the families' templates ask for them:
- `hermes`: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call, after optional text
  (Hermes, Qwen 2.5 / 3 and the templates that copy them);
- `llama3_json`: one JSON object `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>` (Llama 3.x);
- `json`: one JSON object `{"name": ..., "arguments": {...}}` (what any other template gets).
The parser reads all three whatever the template, so a model that answers in another of them is still understood.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from decoderkit.serve.grammar import JSON_OPTIONS, Grammar, GrammarCompiler, GrammarError
from decoderkit.serve.protocol import APIError, ChatMessage, Tool

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
TOOL_CHOICES = ("none", "auto", "required")
# The head of a call: everything up to where the arguments' JSON value starts.
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"(?P<name>(?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_HEAD_LIMIT = 512  # characters a call's head may take before the text is taken as plain content
_DECODER = json.JSONDecoder()


def tool_format(template: str | None) -> str:
    """The tool-call format a chat template teaches its model: "hermes", "llama3_json" or "json"."""
    template = template or ""
    if HERMES_OPEN in template:
        return "hermes"
    if '"parameters"' in template:
        return "llama3_json"
    return "json"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -------------------------------------------------------------------------------------------- request side


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates read them: tool calls with their arguments as a dict, tool results with their id."""
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": m.role, "content": m.text() or ""}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": _arguments(c)}}
                                     for c in m.tool_calls]
        out.append(message)
    return out


def _arguments(call: Any) -> Any:
    args = call.function.arguments
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args  # as the client sent it; a template that needs a dict will say so
    return args


def resolve_tool_choice(tools: Sequence[Tool] | None, choice: Any) -> str:
    """"none", "auto", "required" or the forced function's name; APIError 400 on a choice the tools cannot meet."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str) and choice not in TOOL_CHOICES:
        raise APIError(400, f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or "
                       f'{{"type": "function", "function": {{"name": ...}}}}; got {choice!r}',
                       param="tool_choice", code="invalid_value")
    if choice == "none":
        return choice
    if not tools:
        raise APIError(400, "tool_choice is only allowed when tools are specified", param="tool_choice",
                       code="invalid_value")
    if isinstance(choice, str):
        return choice
    names = [t.function.name for t in tools]
    if choice.function.name not in names:
        raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                       f"({', '.join(names)})", param="tool_choice", code="invalid_value")
    return choice.function.name


def tool_call_grammar(compiler: GrammarCompiler, tools: Sequence[Tool], choice: str, fmt: str,
                      parallel: bool) -> Grammar:
    """Output that is nothing but calls (one; one or more for "required" with `parallel` in the hermes format) of the
    allowed tools, written as `fmt` writes them, each call's arguments valid under its function's parameters schema."""
    allowed = [t for t in tools if choice == "required" or t.function.name == choice]
    key = "parameters" if fmt == "llama3_json" else "arguments"
    open_, close = (HERMES_OPEN + "\n", "\n" + HERMES_CLOSE) if fmt == "hermes" else ("", "")
    rules = []
    for i, tool in enumerate(allowed):
        schema = tool.function.parameters if tool.function.parameters is not None else {"type": "object"}
        schema = {**schema, "x-guidance": JSON_OPTIONS}
        head = f'{open_}{{"name": {json.dumps(tool.function.name)}, "{key}": '
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps('}' + close)}\n"
                     f"args_{i}: %json {json.dumps(schema)}")
    call = " | ".join(f"call_{i}" for i in range(len(allowed)))
    several = parallel and fmt == "hermes" and choice == "required"  # a named choice is one call, as OpenAI's
    start = f'start: call ("\\n" call)*\ncall: {call}' if several else f"start: {call}"
    try:
        return compiler.lark("\n".join([start, *rules]), "tools' parameter schemas")
    except GrammarError as exc:
        raise APIError(400, f"tools: {exc}", param="tools", code="invalid_schema") from None


# ------------------------------------------------------------------------------------------------- parsing


@dataclass
class ParsedCall:
    id: str
    name: str
    arguments: str = ""  # the JSON text of the arguments, as the model wrote it


@dataclass
class ParserEvent:
    """What a piece of model text turned out to be: content, a call's start (index, id, name), or more arguments."""

    content: str | None = None
    call_index: int | None = None
    call_started: bool = False
    arguments: str | None = None


@dataclass
class ToolCallParser:
    """Splits a choice's text, as it streams in, into content and tool calls of the known tools.

    `feed` takes more text and returns what can be told already; text that may still turn into a call (an open
    `<tool_call>`, a leading `{`) is held back until it does or cannot; `finish` settles the rest.
    """

    names: frozenset[str]
    text: str = ""
    done: int = 0  # text[:done] is accounted for
    # "content"; "head": a call may start at `done`; "args": inside a call's arguments; "close" / "tag": after them
    mode: str = "content"
    calls: list[ParsedCall] = field(default_factory=list)
    _args_start: int = 0
    _pending_space: str = ""  # whitespace-only content, sent only if real content follows
    _json_call_allowed: bool = True  # a bare JSON call only at the start of the text, or right after another

    def feed(self, delta: str) -> list[ParserEvent]:
        self.text += delta
        return self._advance(final=False)

    def finish(self) -> list[ParserEvent]:
        events = self._advance(final=True)
        if self._pending_space and not self.calls:  # an answer without calls keeps its text exactly
            events.append(ParserEvent(content=self._pending_space))
            self._pending_space = ""
        return events

    def content(self, events: Sequence[ParserEvent]) -> str:
        return "".join(e.content for e in events if e.content)

    # ------------------------------------------------------------------------------------------- machinery

    def _advance(self, final: bool) -> list[ParserEvent]:
        events: list[ParserEvent] = []
        while True:
            before = (self.mode, self.done)
            if self.mode == "content":
                self._scan_content(events, final)
            elif self.mode == "head":
                self._scan_head(events, final)
            elif self.mode == "args":
                self._scan_args(events, final)
            else:
                self._scan_close(final)
            if (self.mode, self.done) == before:
                return events

    def _emit_content(self, events: list[ParserEvent], text: str) -> None:
        if not text:
            return
        if not text.strip():
            self._pending_space += text
            return
        events.append(ParserEvent(content=self._pending_space + text))
        self._pending_space = ""
        self._json_call_allowed = False

    def _scan_content(self, events: list[ParserEvent], final: bool) -> None:
        rest = self.text[self.done:]
        if self._json_call_allowed:
            stripped = rest.lstrip()
            if not final and PYTHON_TAG.startswith(stripped) and stripped != PYTHON_TAG:
                return  # nothing yet, or the start of the tag: wait
            if stripped.startswith(("{", "[", PYTHON_TAG)):
                skip = len(rest) - len(stripped)
                self.done += skip + (len(PYTHON_TAG) if stripped.startswith(PYTHON_TAG) else 0)
                self.mode = "head"
                return
            if stripped:
                self._json_call_allowed = False
        at = rest.find(HERMES_OPEN)
        if at >= 0:
            self._emit_content(events, rest[:at])
            self.done += at
            self.mode = "head"
            return
        hold = 0 if final else _partial_suffix(rest, HERMES_OPEN)
        self._emit_content(events, rest[: len(rest) - hold])
        self.done += len(rest) - hold

    def _scan_head(self, events: list[ParserEvent], final: bool) -> None:
        rest = self.text[self.done:]
        hermes = rest.startswith(HERMES_OPEN)
        offset = len(rest) - len(rest[len(HERMES_OPEN):].lstrip()) if hermes else 0
        match = _HEAD.match(rest, offset)
        name = _json_string(match["name"]) if match else None
        if match and name in self.names:
            self.calls.append(ParsedCall(new_call_id(), name))
            events.append(ParserEvent(call_index=len(self.calls) - 1, call_started=True))
            self._args_start = self.done = self.done + match.end()
            self.mode = "args"
            return
        if match is None and not final and len(rest) < _HEAD_LIMIT and (hermes or _may_be_call(rest)):
            return  # may still become a call
        whole = _whole_call(rest[offset:], self.names) if match is None else None
        if whole is not None:  # a complete call written some other way (keys in another order, a list of calls)
            for name, arguments in whole:
                self.calls.append(ParsedCall(new_call_id(), name, arguments))
                events.append(ParserEvent(call_index=len(self.calls) - 1, call_started=True, arguments=arguments))
            self.done, self.mode = len(self.text), "content"
            return
        # Not a call after all: content (past a hermes tag, so that it is not taken for a call again).
        taken = len(HERMES_OPEN) if hermes else len(rest)
        self._emit_content(events, rest[:taken])
        self._json_call_allowed = False
        self.done += taken
        self.mode = "content"

    def _scan_args(self, events: list[ParserEvent], final: bool) -> None:
        call = self.calls[-1]
        if self.done == self._args_start:  # the value has not started: skip the whitespace before it
            rest = self.text[self.done:]
            self._args_start = self.done = self.done + len(rest) - len(rest.lstrip())
        try:
            _, end = _DECODER.raw_decode(self.text, self._args_start)
        except json.JSONDecodeError:
            end = None
        upto = len(self.text) if end is None else end
        if upto > self.done:
            piece = self.text[self.done: upto]
            call.arguments += piece
            events.append(ParserEvent(call_index=len(self.calls) - 1, arguments=piece))
            self.done = upto
        if end is not None:
            self.mode = "close"
        elif final:  # truncated arguments: the call is what it is
            self.done, self.mode = len(self.text), "content"

    def _scan_close(self, final: bool) -> None:
        """After a call's arguments: its closing brace, then (hermes) the closing tag and a `;` between calls."""
        rest = self.text[self.done:]
        if self.mode == "close":
            brace = re.match(r"\s*\}", rest)
            if brace is not None:
                self.done += brace.end()
                self.mode = "tag"
            elif final or rest.strip():
                self.mode, self._json_call_allowed = "content", False
            return
        stripped = rest.lstrip()
        for tag in (HERMES_CLOSE, ";"):
            if stripped.startswith(tag):
                self.done += len(rest) - len(stripped) + len(tag)
                return
        if final or (stripped and not HERMES_CLOSE.startswith(stripped)):
            self.mode, self._json_call_allowed = "content", True


def _may_be_call(text: str) -> bool:
    """Whether a text starting with `{` may still turn out to be a call object as it grows."""
    compact = re.sub(r"\s+", "", text).removeprefix("[")
    return any(compact.startswith(h) or h.startswith(compact) for h in ('{"name":', '{"arguments":', '{"parameters":'))


def _json_string(body: str) -> str | None:
    """The string a JSON string literal's body (between the quotes) stands for; None if its escapes are not JSON."""
    try:
        return json.loads(f'"{body}"')
    except json.JSONDecodeError:
        return None


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _whole_call(text: str, names: frozenset[str]) -> list[tuple[str, str]] | None:
    """The calls in `text` if it is (ignoring a closing tag) one JSON call object or a list of them."""
    text = text.strip().removesuffix(HERMES_CLOSE).strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("arguments", item.get("parameters", {}))
        calls.append((item["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return calls or None


def parse_tool_calls(text: str, names: Sequence[str]) -> tuple[str | None, list[ParsedCall]]:
    """The content (None if there is none) and the tool calls of the named tools in a whole model output."""
    parser = ToolCallParser(frozenset(names))
    events = parser.feed(text) + parser.finish()
    content = parser.content(events).strip()
    return content or None, parser.calls
