"""Chat templates: decoderkit must render exactly what transformers renders, for real templates from many models."""

from __future__ import annotations

import dataclasses
import datetime as dt

import numpy as np
import pytest
from shared_data import TOKENIZER_VECTORS

import decoderkit.chat_template as dk_chat
from decoderkit.chat_template import ChatTemplateError, render_chat_template
from decoderkit.tokenizer import AutoTokenizer, tokenizer_from_gguf

transformers = pytest.importorskip("transformers")
hf_chat = pytest.importorskip("transformers.utils.chat_template_utils")

TEMPLATES = sorted((TOKENIZER_VECTORS / "chat-templates").glob("*.jinja"))
VOCAB = TOKENIZER_VECTORS / "ggml-vocab-llama-spm.gguf"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke about llamas 🦙 — ünïcödé"},
]
TOOL_CALL = [
    {"role": "user", "content": "What's the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,  # dropped before rendering, as transformers does
        "reasoning_content": "I should call the tool.",
        "tool_calls": [
            {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "22°C, sunny"},
]
CASES = {
    "chat": (CHAT, None),
    "chat-with-tools": (CHAT, [WEATHER_TOOL]),
    "user-only": ([{"role": "user", "content": "Hi"}], None),
    "tool-call": (TOOL_CALL, [WEATHER_TOOL]),
}


class _FixedDatetime(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2024, 7, 26, 12, 0, 0)


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    # Templates print today's date via strftime_now; pin it in both implementations.
    monkeypatch.setattr(hf_chat, "datetime", _FixedDatetime)
    monkeypatch.setattr(dk_chat, "datetime", _FixedDatetime)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The same tokenizer in both libraries (Llama SentencePiece vocabulary: <s>, </s>, <unk>)."""
    directory = tmp_path_factory.mktemp("chat-tokenizer")
    tokenizer_from_gguf(VOCAB, pad_token="</s>").save_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def _render(tokenizer, messages, **kwargs):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs), None
    except Exception as err:  # noqa: BLE001 - whatever transformers raises is the expectation
        return None, err


@pytest.mark.parametrize("template_file", TEMPLATES, ids=lambda p: p.stem)
def test_template_renders_like_transformers(tokenizers, template_file):
    hf, dk = tokenizers
    template = template_file.read_text(encoding="utf-8")
    rendered = 0
    for case, (messages, tools) in CASES.items():
        for add_generation_prompt in (False, True):
            kwargs = {"chat_template": template, "tools": tools, "add_generation_prompt": add_generation_prompt}
            expected, hf_error = _render(hf, messages, **kwargs)
            if hf_error is not None:
                with pytest.raises(ValueError):
                    dk.apply_chat_template(messages, tokenize=False, **kwargs)
                continue
            got = dk.apply_chat_template(messages, tokenize=False, **kwargs)
            assert got == expected, (case, add_generation_prompt)
            rendered += 1
    assert rendered > 0 or template_file.stem in {"fireworks-ai-llama-3-firefunction-v2"}, "nothing rendered"


@pytest.mark.parametrize("template_file", TEMPLATES, ids=lambda p: p.stem)
def test_template_tokenizes_like_transformers(tokenizers, template_file):
    hf, dk = tokenizers
    template = template_file.read_text(encoding="utf-8")
    for messages, tools in CASES.values():
        kwargs = {"chat_template": template, "tools": tools, "add_generation_prompt": True}
        if _render(hf, messages, **kwargs)[1] is None:
            break
    else:
        pytest.skip("transformers renders none of the test conversations with this template")
    expected = hf.apply_chat_template(messages, return_dict=False, **kwargs)
    assert dk.apply_chat_template(messages, **kwargs) == expected


# ----------------------------------------------------------------------------------- environment details


def _both(template, messages=None, **kwargs):
    messages = messages or [{"role": "user", "content": "Hi"}]
    expected = hf_chat.render_jinja_template([messages], chat_template=template, **kwargs)[0][0]
    got = render_chat_template(template, [messages], **kwargs)[0][0]
    return got, expected


@pytest.mark.parametrize(
    "template",
    [
        "{{ messages | tojson }}",
        "{{ messages | tojson(indent=2) }}",
        "{{ {'b': 1, 'a': '<é>'} | tojson(sort_keys=True, ensure_ascii=True) }}",
        "{{ strftime_now('%d %b %Y') }}",
        "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% break %}{% endfor %}",
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
        "{{ dict(a=1) | tojson }} {{ dict.fromkeys(['x'], 0) | tojson }}",
        "  {% if true %}\n    kept {{ bos_token }}\n  {% endif %}\n",  # trim_blocks + lstrip_blocks
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}",
        "{{ messages[-1].thinking }}|{{ messages[-1].reasoning_content }}",
        "{{ messages[0].content.value }}|{{ messages[0].content.shape }}|{{ messages[0].extra }}",
    ],
)
def test_environment_matches_transformers(template):
    @dataclasses.dataclass
    class Block:
        value: int

    messages = [
        {"role": "user", "content": "Hi <b>&</b>", "extra": np.float32(0.5)},
        {"role": "assistant", "content": "ok", "reasoning": "thought"},
    ]
    if "content.value" in template:
        messages[0]["content"] = Block(3)
    got, expected = _both(template, messages, bos_token="<s>")
    assert got == expected


def test_raise_exception_becomes_value_error_with_the_message():
    with pytest.raises(ValueError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [[{"role": "user", "content": "x"}]])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat_template("{% for %}", [[]])


def test_sandbox_rejects_underscore_namespace_attributes():
    with pytest.raises(ValueError, match="underscore"):
        render_chat_template("{% set ns = namespace(_x=1) %}", [[]])
    with pytest.raises(ValueError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [[]])


@pytest.mark.parametrize("field", [True, "reasoning_content"])
def test_continue_final_message_matches_transformers(tokenizers, field):
    hf, dk = tokenizers
    template = (
        "{% for m in messages %}<{{ m.role }}>"
        "{{ m.reasoning_content }}|{{ m.content }}</{{ m.role }}>{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Partial answer", "reasoning_content": "Partial thought"},
    ]
    kwargs = {"chat_template": template, "continue_final_message": field, "tokenize": False}
    assert dk.apply_chat_template(messages, **kwargs) == hf.apply_chat_template(messages, **kwargs)


def test_documents_batches_and_template_kwargs_match_transformers(tokenizers):
    hf, dk = tokenizers
    template = (
        "{{ bos_token }}{% for d in documents %}[{{ d.title }}: {{ d.text }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}{{ enable_thinking }}{{ eos_token }}"
    )
    documents = [{"title": "Doc", "text": "Body"}]
    batch = [
        [{"role": "user", "content": "a"}],
        [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
    ]
    kwargs = {"chat_template": template, "documents": documents, "enable_thinking": False}
    assert dk.apply_chat_template(batch, tokenize=False, **kwargs) == hf.apply_chat_template(
        batch, tokenize=False, **kwargs
    )
    got = dk.apply_chat_template(batch, padding=True, return_dict=True, **kwargs)
    expected = hf.apply_chat_template(batch, padding=True, return_dict=True, **kwargs)
    assert got["input_ids"] == expected["input_ids"] and got["attention_mask"] == expected["attention_mask"]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_assistant_masks_match_transformers(tokenizers, padding_side):
    hf, dk = tokenizers
    template = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}"
        "{% endgeneration %}{% else %}[{{ m.content }}]{% endif %}{% endfor %}"
    )
    batch = [CHAT[1:3], CHAT]
    kwargs = {"chat_template": template, "return_dict": True, "return_assistant_tokens_mask": True, "padding": True}
    got = dk.apply_chat_template(batch, tokenizer_kwargs={"padding_side": padding_side}, **kwargs)
    expected = hf.apply_chat_template(batch, tokenizer_kwargs={"padding_side": padding_side}, **kwargs)
    assert got["input_ids"] == expected["input_ids"]
    assert got["assistant_masks"] == expected["assistant_masks"]
    assert any(any(row) for row in got["assistant_masks"])


def test_template_selection(tokenizers, tmp_path):
    _, dk = tokenizers
    messages = [{"role": "user", "content": "x"}]
    assert dk.chat_template is None
    with pytest.raises(ValueError, match="no `chat_template`"):
        dk.apply_chat_template(messages, tokenize=False)
    dk.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("default:{{ messages[0].content }}")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("tools:{{ tools | length }}")
    for tok in (AutoTokenizer.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)):
        assert tok.apply_chat_template(messages, tokenize=False) == "default:x"
        assert tok.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False) == "tools:1"
        assert tok.apply_chat_template(messages, chat_template="tool_use", tools=[], tokenize=False) == "tools:0"
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="tool_use"):
        AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False)
