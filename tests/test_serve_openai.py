"""The server as OpenAI's own client and types see it: the documentation's streaming loop, every response validated
against the `openai` package's pydantic types, logit_bias, bounded stop strings, served-model names, and eval-grade
completions (echo with prompt logprobs equal to scoring the text with the model directly; /tokenize & co.)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import test_serve  # noqa: E402
from openai.types import Completion, Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from test_serve import API_KEY, MODEL_NAME, PROMPTS, RunningServer, chat, error_of, generate_concurrently  # noqa: E402

from decoderkit.serve.app import ServerSettings  # noqa: E402
from decoderkit.serve.engine import Engine, SamplingParams  # noqa: E402
from decoderkit.serve.protocol import MAX_STOP_LENGTH, MAX_STOP_STRINGS  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}
model_dir, model, tokenizer = test_serve.model_dir, test_serve.model, test_serve.tokenizer  # the same fixtures


@pytest.fixture(scope="module")
def server(model, tokenizer, model_dir) -> Iterator[RunningServer]:
    # A small prefill budget, so that scored prompts span several chunks.
    engine = Engine(model, tokenizer, block_size=8, max_batch_size=16, max_prefill_tokens=16, max_queue=64)
    settings = ServerSettings(model_name=MODEL_NAME, api_key=API_KEY, request_timeout=60, max_body_bytes=64 * 1024,
                              model_path=str(model_dir))
    with RunningServer(engine, settings) as running:
        yield running


def post(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base}{path}", json=body, headers=AUTH, timeout=30)


def sse_events(server: RunningServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    import json

    with httpx.stream("POST", f"{server.base}{path}", json=body, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def assert_fits(cls: type[BaseModel], data: dict[str, Any]) -> None:
    """`data` validates as the openai type and carries no field the type does not know."""

    def walk(obj: Any, where: str) -> None:
        if isinstance(obj, BaseModel):
            assert not obj.model_extra, f"{where}: fields unknown to the openai types: {sorted(obj.model_extra)}"
            for name in type(obj).model_fields:
                walk(getattr(obj, name), f"{where}.{name}")
        elif isinstance(obj, list):
            for i, item in enumerate(obj):
                walk(item, f"{where}[{i}]")

    walk(cls.model_validate(data), cls.__name__)


@torch.no_grad()
def direct_logprobs(model, tokenizer, ids: list[int], k: int) -> tuple[list[float], list[dict[str, float]]]:
    """What decoderkit's model says the prompt tokens 1.. cost, and the top-k alternatives at each position (keyed by
    their text, the likelier one kept when two decode alike)."""
    lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)[:-1]
    chosen = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    top = lp.topk(k)
    tops = []
    for row_ids, row_values in zip(top.indices.tolist(), top.values.tolist()):
        tops.append({})
        for t, v in zip(row_ids, row_values):
            tops[-1].setdefault(tokenizer.decode([t]), v)
    return chosen.tolist(), tops


# ------------------------------------------------------------------------------------------- the wire format


def test_the_documentation_streaming_loop(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0)
    question = [{"role": "user", "content": "Say this is a test"}]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=question, max_tokens=12, temperature=0)
    capsys.readouterr()
    # The quick-start loop, as OpenAI's documentation writes it: it indexes choices[0] of every chunk.
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Say this is a test"}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="")
    assert capsys.readouterr().out == whole.choices[0].message.content


def test_responses_fit_the_openai_types(server: RunningServer) -> None:
    body = {"model": MODEL_NAME, "messages": chat(PROMPTS[0]), "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    r = post(server, "/v1/chat/completions", body)
    assert_fits(ChatCompletion, r.json())
    message = r.json()["choices"][0]["message"]
    assert "refusal" in message and r.json()["system_fingerprint"]

    events = sse_events(server, "/v1/chat/completions", {**body, "stream": True, "n": 2})
    for event in events:
        assert_fits(ChatCompletionChunk, event)
    assert all(e["choices"] for e in events), "no usage chunk unless stream_options.include_usage"
    for i in range(2):  # n with streaming: each choice opens with the role and ends with one finish_reason
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] in (["stop"], ["length"])
    counted = sse_events(server, "/v1/chat/completions",
                         {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert counted[-1]["choices"] == [] and counted[-1]["usage"]["completion_tokens"] >= 1
    assert all(e["usage"] is None for e in counted[:-1])

    completion = {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 5, "temperature": 0, "logprobs": 2}
    assert_fits(Completion, post(server, "/v1/completions", completion).json())
    echoed = post(server, "/v1/completions", {**completion, "echo": True}).json()
    # OpenAI's legacy API sends null for the prompt's first token, which the openai types do not model.
    lp = echoed["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    lp["token_logprobs"][0], lp["top_logprobs"][0] = 0.0, {}
    assert_fits(Completion, echoed)
    for event in sse_events(server, "/v1/completions", {**completion, "stream": True,
                                                        "stream_options": {"include_usage": True}}):
        for choice in event["choices"]:  # null until the last chunk, as OpenAI streams; the type does not say so
            choice["finish_reason"] = choice["finish_reason"] or "length"
        assert_fits(Completion, event)
    models = httpx.get(f"{server.base}/v1/models", headers=AUTH, timeout=10).json()["data"]
    for card in models:
        assert_fits(Model, {k: v for k, v in card.items() if k not in ("root", "max_model_len")})
    assert models[0]["root"] == server.settings.model_path and models[0]["max_model_len"] == 256


def test_max_completion_tokens_and_model_names(server: RunningServer) -> None:
    client = server.client()
    out = client.chat.completions.create(model=MODEL_NAME, messages=chat(PROMPTS[1]), max_tokens=9,
                                         max_completion_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    # The served name with a model-file suffix means the same model; responses name it as /v1/models does.
    aliased = client.completions.create(model=f"{MODEL_NAME}.gguf", prompt="To", max_tokens=2)
    assert aliased.model == MODEL_NAME
    settings = ServerSettings(model_name="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert settings.accepts("SmolLM2-135M-Instruct.Q4_1") and settings.accepts("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert not settings.accepts("SmolLM2-135M-Instruct") and not settings.accepts("gpt-4o")


def test_logit_bias(server: RunningServer, model, tokenizer) -> None:
    client = server.client()
    target = tokenizer.encode("slings", add_special_tokens=False)[0]
    prompt = tokenizer.encode(PROMPTS[0])
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    forced = client.completions.create(**kwargs, logit_bias={str(target): 100})
    assert forced.choices[0].text == tokenizer.decode([target]) * 4
    with torch.no_grad():
        ranked = model(torch.tensor([prompt])).logits[0, -1].argsort(descending=True).tolist()
    banned = client.completions.create(**{**kwargs, "max_tokens": 1}, logit_bias={str(ranked[0]): -100})
    assert banned.choices[0].text == tokenizer.decode([ranked[1]])
    # Sampling too: a +100 bias leaves the model no other choice.
    sampled = client.chat.completions.create(model=MODEL_NAME, messages=chat("To"), max_tokens=3, temperature=1.0,
                                             seed=3, logit_bias={str(target): 100}, extra_body={"ignore_eos": True})
    assert sampled.choices[0].message.content == tokenizer.decode([target]) * 3


def test_stop_strings_beyond_openais_four_up_to_the_bound(server: RunningServer) -> None:
    client = server.client()
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    stop = full.choices[0].text[4:7]
    stops = [f"never-{i}" for i in range(MAX_STOP_STRINGS - 1)] + [stop]
    cut = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=stops)
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]


def test_bad_inputs_are_openai_400s(server: RunningServer) -> None:
    chat_ok = {"model": MODEL_NAME, "messages": chat("To be"), "max_tokens": 3}
    completion_ok = {"model": MODEL_NAME, "prompt": "To be", "max_tokens": 3}
    cases = [
        ("/v1/chat/completions", {**chat_ok, "logit_bias": {"100000": 1}}, "logit_bias", "100000"),
        ("/v1/chat/completions", {**chat_ok, "logit_bias": {"5": 100.5}}, "logit_bias", "[-100, 100]"),
        ("/v1/completions", {**completion_ok, "logit_bias": {"five": 1}}, "logit_bias", "five"),
        ("/v1/completions", {**completion_ok, "logit_bias": {"-3": 1}}, "logit_bias", "-3"),
        ("/v1/completions", {**completion_ok, "stop": ["x"] * (MAX_STOP_STRINGS + 1)}, "stop",
         f"at most {MAX_STOP_STRINGS} stop strings"),
        ("/v1/chat/completions", {**chat_ok, "stop": "y" * (MAX_STOP_LENGTH + 1)}, "stop",
         f"at most {MAX_STOP_LENGTH} characters"),
        ("/v1/chat/completions", {**chat_ok, "echo": True}, "echo", "chat completions"),
        ("/v1/chat/completions", {**chat_ok, "stream_options": {"include_usage": True}}, "stream_options",
         "stream is true"),
        ("/v1/completions", {**completion_ok, "max_tokens": -1}, "max_tokens", "0"),
        ("/tokenize", {"prompt": 5}, "prompt", "string"),
        ("/detokenize", {"tokens": [10**6]}, "tokens", "token id"),
    ]
    for path, body, param, words in cases:
        r = post(server, path, body)
        assert r.status_code == 400, (body, r.text)
        error = error_of(r)
        assert error["param"] == param and words in error["message"], (body, error)
        assert error["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="echo"):
        server.client().chat.completions.create(model=MODEL_NAME, messages=chat("To"), extra_body={"echo": True})
    assert server.client().completions.create(model=MODEL_NAME, prompt="To", max_tokens=2).choices[0].text is not None


# -------------------------------------------------------------------------------------- eval-grade completions


def test_echo_scores_the_prompt_as_the_model_does(server: RunningServer, model, tokenizer) -> None:
    client = server.client()
    text = " ".join(PROMPTS) + " " + PROMPTS[2]  # longer than one prefill chunk
    ids = tokenizer.encode(text)
    assert len(ids) > 2 * server.engine.max_prefill_tokens
    expected, expected_top = direct_logprobs(model, tokenizer, ids, 3)

    scored = client.completions.create(model=MODEL_NAME, prompt=text, max_tokens=0, echo=True, logprobs=3)
    choice = scored.choices[0]
    lp = choice.logprobs
    assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    assert lp.tokens == [tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    for top, want in zip(lp.top_logprobs[1:], expected_top, strict=True):
        assert top == pytest.approx(want, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]

    # As lm-evaluation-harness asks: token ids, echo, one generated token, whose logprob comes last.
    one = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    values = one.choices[0].logprobs.token_logprobs
    assert len(values) == len(ids) + 1 and values[1:-1] == pytest.approx(expected, abs=1e-4)
    assert values[-1] == pytest.approx(max(one.choices[0].logprobs.top_logprobs[-1].values()), abs=1e-6)

    # Batches: several id lists, and several strings, in one request.
    others = [tokenizer.encode(p) for p in PROMPTS[:3]]
    batch = client.completions.create(model=MODEL_NAME, prompt=others, max_tokens=0, echo=True, logprobs=0)
    strings = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[:3], max_tokens=0, echo=True, logprobs=0)
    for result in (batch, strings):
        assert [c.index for c in result.choices] == [0, 1, 2]
        for c, p in zip(result.choices, others):
            assert c.logprobs.token_logprobs[1:] == pytest.approx(direct_logprobs(model, tokenizer, p, 1)[0], abs=1e-4)
    # Echo without logprobs just prepends the prompt.
    echoed = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=0, echo=True)
    assert echoed.choices[0].text == tokenizer.decode(tokenizer.encode(PROMPTS[1]))
    assert echoed.choices[0].logprobs is None
    # Streamed, the prompt and its scores come first, and the pieces add up to the whole answer.
    whole = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, echo=True, logprobs=2, temperature=0)
    pieces = [c.choices[0] for c in client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=5, echo=True,
                                                              logprobs=2, temperature=0, stream=True)]
    assert "".join(p.text for p in pieces) == whole.choices[0].text
    streamed = {field: [v for p in pieces for v in getattr(p.logprobs, field)]
                for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    want = whole.choices[0].logprobs
    assert streamed["tokens"] == want.tokens and streamed["text_offset"] == want.text_offset
    assert streamed["token_logprobs"] == pytest.approx(want.token_logprobs, abs=1e-5)
    for got, top in zip(streamed["top_logprobs"], want.top_logprobs, strict=True):
        assert got == top if top is None else got == pytest.approx(top, abs=1e-5)


def test_tokenizer_endpoints_as_lm_eval_probes_them(server: RunningServer, tokenizer) -> None:
    # lm-evaluation-harness's remote tokenizer: GET /tokenizer_info (needs eos_token), POST /tokenize with
    # {"prompt", "add_special_tokens": false} reading "tokens", POST /detokenize with {"tokens"} reading "prompt".
    info = httpx.get(f"{server.base}/tokenizer_info", timeout=10).json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert info["chat_template"] == tokenizer.chat_template and info["model_max_length"] == 256
    r = httpx.post(f"{server.base}/tokenize", json={"prompt": PROMPTS[2], "add_special_tokens": False}, timeout=10)
    ids = tokenizer.encode(PROMPTS[2], add_special_tokens=False)
    assert r.json()["tokens"] == ids and r.json()["count"] == len(ids)
    eos = httpx.post(f"{server.base}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False},
                     timeout=10).json()["tokens"]
    assert eos == [tokenizer.eos_token_id]
    back = httpx.post(f"{server.base}/detokenize", json={"tokens": ids}, timeout=10).json()["prompt"]
    assert back == tokenizer.decode(ids) == PROMPTS[2]


def test_prompt_scores_survive_preemption(model, tokenizer) -> None:

    # A pool of one context: the four requests cannot all fit, so some are preempted and prefilled again.
    engine = Engine(model, tokenizer, kv_cache_tokens=256, block_size=4, max_prefill_tokens=8)
    preempted, preempt = [], engine._preempt
    engine._preempt = lambda req: (preempted.append(req), preempt(req))
    engine.start()
    try:
        prompts = [tokenizer.encode(p) for p in PROMPTS]
        params = SamplingParams(max_tokens=100, temperature=0, stop_token_ids=(), prompt_logprobs=2)
        outputs = generate_concurrently(engine, prompts, params, timeout=90)
        assert sum(o.completion_tokens for o in outputs) == 400 and preempted
        for ids, out in zip(prompts, outputs):
            expected, expected_top = direct_logprobs(model, tokenizer, ids, 2)
            assert [lp.token_id for lp in out.prompt_logprobs] == ids[1:]
            assert [lp.logprob for lp in out.prompt_logprobs] == pytest.approx(expected, abs=1e-4)
            assert [len(lp.top) for lp in out.prompt_logprobs] == [2] * (len(ids) - 1)
    finally:
        engine.stop()
