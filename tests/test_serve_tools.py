"""Tool calling: the parser on literal outputs in each format the families' templates teach (Hermes / Qwen
`<tool_call>` tags, Llama 3.x JSON with "parameters", a plain JSON object), streamed in any chunking; and the server
through the openai client with real templates: tools rendered into the prompt, forced calls whose arguments validate,
streamed tool-call deltas as OpenAI sends them, tool turns in the history, and the 400s."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

import test_serve  # noqa: E402
from shared_data import TOKENIZER_VECTORS  # noqa: E402
from test_serve import API_KEY, MODEL_NAME, TEMPLATE, RunningServer, error_of  # noqa: E402
from test_serve_openai import post  # noqa: E402

import decoderkit  # noqa: E402
from decoderkit.serve.app import ServerSettings  # noqa: E402
from decoderkit.serve.engine import Engine  # noqa: E402
from decoderkit.serve.tools import ToolCallParser, parse_tool_calls, tool_format  # noqa: E402
from decoderkit.tokenizer import AutoTokenizer  # noqa: E402

model_dir = test_serve.model_dir  # the same fixture
TEMPLATES = TOKENIZER_VECTORS / "chat-templates"
NAMES = ["get_weather", "add"]

# (model output, expected content, expected [(name, arguments JSON text)])
OUTPUTS = [
    # Hermes / Qwen: text, then one block per call
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     "Let me look.", [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2}')]),
    ('<tool_call>\n{"name": "add", "arguments": {"a": {"b": "}"}}}\n</tool_call>', None,
     [("add", '{"a": {"b": "}"}}')]),
    # Llama 3.x: one JSON object with "parameters", optionally after <|python_tag|>
    ('{"name": "get_weather", "parameters": {"city": "Oslo", "days": [1, 2]}}', None,
     [("get_weather", '{"city": "Oslo", "days": [1, 2]}')]),
    ('<|python_tag|>{"name": "add", "parameters": {"a": 3}}', None, [("add", '{"a": 3}')]),
    ('{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {"a": 2}}', None,
     [("add", '{"a": 1}'), ("add", '{"a": 2}')]),
    # a plain JSON object, its keys in either order, or a list of them
    ('{"name":"add","arguments":{"a":1}}', None, [("add", '{"a":1}')]),
    ('  {"arguments": {"a": 1}, "name": "add"}', None, [("add", '{"a": 1}')]),
    ('[{"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {}}]', None,
     [("add", '{"a": 1}'), ("get_weather", "{}")]),
    # not calls: JSON of another shape, an unknown function, a call inside prose, plain text
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "launch", "arguments": {}}', '{"name": "launch", "arguments": {}}', []),
    ('I would say {"name": "add", "arguments": {}}', 'I would say {"name": "add", "arguments": {}}', []),
    ("To be, or not to be", "To be, or not to be", []),
    ('{"name": "a\\q", "arguments": {}}', '{"name": "a\\q", "arguments": {}}', []),  # not a JSON escape
]


@pytest.mark.parametrize(("text", "content", "calls"), OUTPUTS)
def test_parse_tool_calls(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    got_content, got_calls = parse_tool_calls(text, NAMES)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    assert len({c.id for c in got_calls}) == len(got_calls) and all(c.id.startswith("call_") for c in got_calls)


@settings(max_examples=40, deadline=None)
@given(case=st.sampled_from(OUTPUTS), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streamed_parse_equals_the_whole(case: tuple, cuts: list[int]) -> None:
    text, content, calls = case
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    parser = ToolCallParser(frozenset(NAMES))
    events = []
    for a, b in zip(bounds, bounds[1:]):
        events += parser.feed(text[a:b])
    events += parser.finish()
    assert (parser.content(events).strip() or None) == content
    assert [(c.name, c.arguments) for c in parser.calls] == calls
    # Each call is announced (index, then name) before its arguments arrive.
    started = [e.call_index for e in events if e.call_started]
    assert started == list(range(len(calls)))


def test_text_without_calls_streams_exactly() -> None:
    for text in ("  To be\n\n", "\n", '{"answer": 1}  ', "a <tool_call is not a tag "):
        parser = ToolCallParser(frozenset(NAMES))
        events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
        assert parser.content(events) == text and not parser.calls


def test_tool_format_of_real_templates() -> None:
    assert tool_format((TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()) == "hermes"
    assert tool_format((TEMPLATES / "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja").read_text()) == "hermes"
    assert tool_format((TEMPLATES / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()) == "llama3_json"
    assert tool_format((TEMPLATES / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text()) == "llama3_json"
    assert tool_format(TEMPLATE) == "json"


# ------------------------------------------------------------------------------------------------ the server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
TEMPLATE_FILES = {"hermes": "Qwen-Qwen2.5-7B-Instruct.jinja", "llama3_json": "meta-llama-Llama-3.1-8B-Instruct.jinja",
                  "json": None}


@pytest.fixture(scope="module")
def long_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a 2k context: real templates' tool prompts take ~1k of its small vocabulary's tokens."""
    directory = tmp_path_factory.mktemp("tiny-llama-2k")
    for f in model_dir.iterdir():
        shutil.copy(f, directory / f.name)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    return directory


@pytest.fixture(scope="module")
def model(long_model_dir: Path):
    return decoderkit.AutoModelForCausalLM.from_pretrained(long_model_dir).eval()


@pytest.fixture(scope="module", params=sorted(TEMPLATE_FILES))
def served(request: pytest.FixtureRequest, model, long_model_dir: Path) -> Iterator[tuple[str, RunningServer]]:
    name = TEMPLATE_FILES[request.param]
    template = (TEMPLATES / name).read_text() if name else TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(long_model_dir, chat_template=template)
    engine = Engine(model, tokenizer, block_size=8, max_batch_size=16, max_prefill_tokens=64)
    settings = ServerSettings(model_name=MODEL_NAME, api_key=API_KEY, request_timeout=60)
    with RunningServer(engine, settings) as running:
        yield request.param, running


def create(server: RunningServer, **kwargs):
    return server.client().chat.completions.create(**{"model": MODEL_NAME, "max_tokens": 120, "temperature": 0,
                                                      **kwargs})


def test_tools_are_rendered_through_the_template(served: tuple[str, RunningServer]) -> None:
    fmt, server = served
    tokenizer = server.engine.tokenizer
    out = create(server, messages=QUESTION, tools=TOOLS, max_tokens=1)
    expected = tokenizer.apply_chat_template(QUESTION, tools=TOOLS, add_generation_prompt=True)
    assert out.usage.prompt_tokens == len(expected)
    if fmt != "json":  # the test template ignores tools; the real ones describe them to the model
        assert out.usage.prompt_tokens > len(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True))
    none = create(server, messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert none.usage.prompt_tokens == len(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True))


def test_a_named_tool_choice_forces_a_valid_call(served: tuple[str, RunningServer]) -> None:
    fmt, server = served
    for name in NAMES:
        choice = {"type": "function", "function": {"name": name}}
        out = create(server, messages=QUESTION, tools=TOOLS, tool_choice=choice).choices[0]
        assert out.finish_reason == "tool_calls" and out.message.content is None, out
        (call,) = out.message.tool_calls
        assert call.type == "function" and call.function.name == name and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[name])

        # Streamed, accumulated as OpenAI's documentation does: the same call.
        calls: dict[int, dict] = {}
        finish = None
        for chunk in create(server, messages=QUESTION, tools=TOOLS, tool_choice=choice, stream=True):
            delta = chunk.choices[0].delta
            assert not delta.content
            for piece in delta.tool_calls or []:
                if piece.index not in calls:  # the first delta of a call: id, type, name, no arguments yet
                    assert piece.id and piece.type == "function" and piece.function.name == name
                    calls[piece.index] = {"id": piece.id, "arguments": piece.function.arguments or ""}
                else:
                    assert piece.id is None and piece.function.name is None
                    calls[piece.index]["arguments"] += piece.function.arguments
            finish = chunk.choices[0].finish_reason or finish
        assert list(calls) == [0] and calls[0]["arguments"] == call.function.arguments and finish == "tool_calls"


def test_auto_answers_stream_as_they_come_whole(served: tuple[str, RunningServer]) -> None:
    fmt, server = served
    for question in (QUESTION, [{"role": "user", "content": "To be, or not to be"}]):
        whole = create(server, messages=question, tools=TOOLS, max_tokens=24, temperature=1.0, seed=3).choices[0]
        content, calls, finish = "", {}, None
        for chunk in create(server, messages=question, tools=TOOLS, max_tokens=24, temperature=1.0, seed=3,
                            stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for piece in delta.tool_calls or []:
                calls.setdefault(piece.index, [piece.function.name, ""])[1] += piece.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert content == (whole.message.content or "") and finish == whole.finish_reason
        assert list(calls.values()) == [[c.function.name, c.function.arguments]
                                        for c in whole.message.tool_calls or []]


def test_required_calls_some_tool_with_valid_arguments(served: tuple[str, RunningServer]) -> None:
    fmt, server = served
    out = create(server, messages=QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                 temperature=1.0, seed=4, n=3)
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    if fmt == "hermes":  # parallel calls: one or more blocks, each valid (the last may be cut by max_tokens)
        parallel = create(server, messages=QUESTION, tools=TOOLS, tool_choice="required", max_tokens=160).choices[0]
        calls = parallel.message.tool_calls
        complete = calls if parallel.finish_reason == "tool_calls" else calls[:-1]
        assert calls and parallel.finish_reason in ("tool_calls", "length")
        for call in complete:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.parametrize("served", ["hermes", "llama3_json"], indirect=True)  # the test template refuses tool turns
def test_tool_turns_in_the_history(served: tuple[str, RunningServer]) -> None:
    fmt, server = served
    args = {"city": "Paris", "unit": "celsius"}
    history = [*QUESTION,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(args)}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, light rain"}]
    out = create(server, messages=history, tools=TOOLS, max_tokens=1)
    rendered = [*QUESTION, {**history[1], "content": "", "tool_calls": [
        {**history[1]["tool_calls"][0], "function": {"name": "get_weather", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, light rain"}]
    tokenizer = server.engine.tokenizer
    text = tokenizer.apply_chat_template(rendered, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert '"city": "Paris"' in text and "light rain" in text  # the call's arguments went in as a dict
    assert out.usage.prompt_tokens == len(tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("served", ["json"], indirect=True)  # nothing here depends on the template
def test_bad_tool_requests_are_400s(served: tuple[str, RunningServer]) -> None:
    fmt, server = served
    base = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 4}
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "launch"}}}, "tool_choice",
         "'launch'"),
        ({"tool_choice": "required"}, "tool_choice", "only allowed when tools"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
         "forces a tool call"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}],
          "tool_choice": "required"}, "tools", "not"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "'sometimes'"),
    ]
    for extra, param, words in cases:
        r = post(server, "/v1/chat/completions", {**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        error = error_of(r)
        assert error["param"] == param and words in error["message"], (extra, error)
    assert create(server, messages=QUESTION, max_tokens=2).choices[0].message.content is not None

