"""What a chat completion request turns into before the engine sees it (the prompt through the chat template, with its
tools, and the grammar that constrains the answer), and what the model's text turns back into (content and tool
calls, whole or as stream deltas)."""

from __future__ import annotations

from dataclasses import dataclass

from decoderkit.chat_template import select_chat_template
from decoderkit.serve.grammar import Grammar, GrammarCompiler
from decoderkit.serve.protocol import (
    APIError,
    AssistantMessage,
    ChatCompletionRequest,
    ChatDelta,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
)
from decoderkit.serve.structured import output_grammar, requested_grammars
from decoderkit.serve.tools import (
    ParserEvent,
    ToolCallParser,
    resolve_tool_choice,
    template_messages,
    tool_call_grammar,
    tool_format,
)


@dataclass
class ChatSetup:
    prompt: list[int]
    grammar: Grammar | None
    tool_names: frozenset[str]  # tools whose calls are parsed out of the answer (empty: the answer is content)


def prepare_chat(body: ChatCompletionRequest, tokenizer: object, compiler: GrammarCompiler) -> ChatSetup:
    """The prompt ids and output grammar of a chat request; APIError 400 on what the template or grammar refuses.

    Blocking (the first grammar builds the vocabulary's token table): run it off the event loop."""
    choice = resolve_tool_choice(body.tools, body.tool_choice)
    tools = [t.model_dump(exclude_none=True) for t in body.tools or ()] if choice != "none" else None
    try:
        template = select_chat_template(tokenizer.chat_template, None, tools)
        prompt = tokenizer.apply_chat_template(template_messages(body.messages), tools=tools,
                                               add_generation_prompt=True, tokenize=True)
    except ValueError as exc:  # ChatTemplateError: a role or message shape the template refuses
        raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages",
                       code="invalid_messages") from None
    if choice in ("none", "auto"):
        grammar = output_grammar(body, compiler)
    else:
        others = requested_grammars(body, compiler)
        if others:
            raise APIError(400, f"tool_choice {choice!r} forces a tool call, which {others[0][0]} cannot also "
                           "constrain", param=others[0][0], code="invalid_value")
        grammar = tool_call_grammar(compiler, body.tools or [], choice, tool_format(template),
                                    body.parallel_tool_calls)
    names = frozenset(t.function.name for t in body.tools or ()) if choice != "none" else frozenset()
    return ChatSetup(list(prompt), grammar, names)


def assistant_message(setup: ChatSetup, text: str, finish_reason: str | None) -> tuple[AssistantMessage, str | None]:
    """The message of a whole answer, and its finish_reason ("tool_calls" when the model called tools)."""
    if not setup.tool_names:
        return AssistantMessage(content=text), finish_reason
    parser = ToolCallParser(setup.tool_names)
    events = parser.feed(text) + parser.finish()
    if not parser.calls:
        return AssistantMessage(content=text), finish_reason
    content = parser.content(events).strip() or None
    calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in parser.calls]
    return AssistantMessage(content=content, tool_calls=calls), "tool_calls" if finish_reason == "stop" else \
        finish_reason


class ChatDeltas:
    """One streamed choice's text turned into the deltas OpenAI sends: content, and tool calls whose first delta
    carries id, type and name (with empty arguments) and whose later ones carry pieces of the arguments."""

    def __init__(self, setup: ChatSetup) -> None:
        self.parser = ToolCallParser(setup.tool_names) if setup.tool_names else None

    def feed(self, text: str) -> list[ChatDelta]:
        if self.parser is None:
            return [ChatDelta(content=text)] if text else []
        return self._deltas(self.parser.feed(text))

    def finish(self, finish_reason: str | None) -> tuple[list[ChatDelta], str | None]:
        if self.parser is None:
            return [], finish_reason
        deltas = self._deltas(self.parser.finish())
        return deltas, "tool_calls" if self.parser.calls and finish_reason == "stop" else finish_reason

    def _deltas(self, events: list[ParserEvent]) -> list[ChatDelta]:
        assert self.parser is not None
        deltas = []
        for e in events:
            if e.content:
                deltas.append(ChatDelta(content=e.content))
            elif e.call_started:
                call = self.parser.calls[e.call_index]
                deltas.append(ChatDelta(tool_calls=[ToolCallDelta(
                    index=e.call_index, id=call.id, type="function",
                    function=FunctionCallDelta(name=call.name, arguments=e.arguments or ""))]))
            elif e.arguments:
                deltas.append(ChatDelta(tool_calls=[ToolCallDelta(index=e.call_index,
                                                                  function=FunctionCallDelta(arguments=e.arguments))]))
        return deltas
