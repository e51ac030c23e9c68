"""The OpenAI-compatible server: paged forward vs the model, batch-invariant greedy decoding, the HTTP API through the
official `openai` client, error bodies, cancellation, API keys, a bounded concurrent load and graceful shutdown."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import decoderkit  # noqa: E402
from decoderkit.serve.app import ServerSettings, create_app  # noqa: E402
from decoderkit.serve.engine import Engine, SamplingParams  # noqa: E402
from decoderkit.serve.paged import BlockPool, PagedRunner, Segment  # noqa: E402
from decoderkit.tokenizer import AutoTokenizer, Tokenizer  # noqa: E402

API_KEY = "test-key"
MODEL_NAME = "tiny-llama"
CONTEXT = 256
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PROMPTS = ["To be, or not", "The slings and", "Whether tis nobler in the mind to suffer the slings", "Or"]


def build_tiny_model(directory: Path) -> Path:
    """A random 2-layer Llama (GQA) and a byte-level BPE tokenizer with a chat template that rejects unknown roles."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    text = ["To be, or not to be, that is the question.", "Whether tis nobler in the mind to suffer",
            "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"]
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(text * 3, trainer)
    Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"},
              chat_template=TEMPLATE).save_pretrained(directory)
    torch.manual_seed(0)
    # A wide init spreads the logits, so greedy choices are not decided by rounding-level differences.
    config = dict(model_type="llama", vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    decoderkit.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def model(model_dir: Path):
    return decoderkit.AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


def generate_concurrently(engine, prompts: list, params, timeout: float) -> list:
    """Each prompt through `engine.generate` on its own thread, all at once (the engine batches them)."""
    outputs: list = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: outputs.__setitem__(i, engine.generate(prompts[i], params)))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return outputs


@torch.no_grad()
def reference_greedy(model, ids: list[int], max_new: int, eos: int = 2) -> list[int]:
    """Greedy decoding with full forwards of the model: what the engine must reproduce."""
    ids, out = list(ids), []
    for _ in range(max_new):
        token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token == eos:
            break
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    def client(self, api_key: str = API_KEY, timeout: float = 30.0):
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0, timeout=timeout)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.base}/metrics", timeout=5).text
        return {k: float(v) for k, v in re.findall(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def server(model, tokenizer) -> Iterator[RunningServer]:
    engine = Engine(model, tokenizer, block_size=8, max_batch_size=32, max_prefill_tokens=16, max_queue=64)
    settings = ServerSettings(model_name=MODEL_NAME, api_key=API_KEY, request_timeout=60, max_body_bytes=64 * 1024)
    with RunningServer(engine, settings) as running:
        yield running


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Speak verse."}, {"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt_bigcode", "mpt"])
@torch.inference_mode()
def test_paged_forward_matches_model(family: str, tmp_path: Path) -> None:
    oracle = pytest.importorskip("oracle")
    model = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(oracle.build(family), tmp_path)).eval()
    c = model.decoder_config
    pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 64, 4, model.dtype, model.device)
    runner = PagedRunner(model, pool)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (13, 7, 20)]
    tables = [pool.allocate(pool.blocks_for(40)) for _ in seqs]
    for s, table in zip(seqs, tables):  # prefill in two chunks that straddle block boundaries
        runner.forward([Segment(0, s[:3], table)])
        runner.forward([Segment(3, s[3:-2], table)])
    for j in (2, 1):  # then decode the last tokens of all three together, with a fresh prompt in the same step
        fresh = torch.randint(3, 97, (9,), generator=gen).tolist()
        fresh_table = pool.allocate(3)
        segments = [Segment(len(s) - j, [s[-j]], t) for s, t in zip(seqs, tables)] + [Segment(0, fresh, fresh_table)]
        logits = runner.forward(segments)
        pool.release(fresh_table)
        for row, ids in enumerate([s[: len(s) - j + 1] for s in seqs] + [fresh]):
            expected = model(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(logits[row], expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_engine_greedy_does_not_depend_on_the_batch(model, tokenizer) -> None:
    engine = Engine(model, tokenizer, block_size=4, max_prefill_tokens=8).start()
    try:
        prompts = [tokenizer.encode(p) for p in PROMPTS]
        greedy = SamplingParams(max_tokens=24, temperature=0)
        alone = [engine.generate(p, greedy).token_ids for p in prompts]
        assert alone == [reference_greedy(model, p, 24) for p in prompts]
        for p, ids in zip(prompts, alone):
            generated = model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)[0, len(p):].tolist()
            assert generated[: len(ids)] == ids
        results: list = [None] * 16

        def run(i: int) -> None:
            params = greedy if i % 2 == 0 else SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=i,
                                                              presence_penalty=0.5, frequency_penalty=0.5)
            results[i] = engine.generate(prompts[i % 4], params, timeout=60)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [results[i].token_ids for i in range(0, 16, 2)] == [alone[i % 4] for i in range(0, 16, 2)]
        # A seeded sampled request is reproducible alone, whatever it shared the batch with.
        again = engine.generate(prompts[1], SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=1,
                                                           presence_penalty=0.5, frequency_penalty=0.5))
        assert again.token_ids == results[1].token_ids
        assert engine.stats().free_blocks == engine.pool.num_blocks
    finally:
        engine.stop()


def test_engine_preempts_when_blocks_run_out(model, tokenizer) -> None:
    # A pool of exactly one context: four long requests cannot all fit, so some are preempted and recomputed.
    engine = Engine(model, tokenizer, kv_cache_tokens=CONTEXT, block_size=4, max_prefill_tokens=8).start()
    try:
        prompts = [tokenizer.encode(p) for p in PROMPTS]
        params = SamplingParams(max_tokens=100, temperature=0, stop_token_ids=())
        expected = [reference_greedy(model, p, 100, eos=-1) for p in prompts]
        outputs = generate_concurrently(engine, prompts, params, timeout=60)
        assert [o.token_ids for o in outputs] == expected
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.stop()


def test_a_request_holds_only_the_blocks_it_has_filled(model, tokenizer) -> None:
    engine = Engine(model, tokenizer, block_size=4).start()
    try:
        prompt = tokenizer.encode(PROMPTS[2])
        used: list[tuple[int, int]] = []  # (tokens in the cache after this step, blocks held), seen from the engine

        def record(out) -> None:
            if out.finish_reason is None:
                used.append((len(prompt) + out.completion_tokens - 1, engine.pool.num_blocks - engine.pool.num_free))

        done = threading.Event()
        engine.submit(prompt, SamplingParams(max_tokens=40, temperature=0, stop_token_ids=()),
                      lambda out: (record(out), out.finish_reason and done.set()))
        assert done.wait(30)
        assert used and all(blocks == -(-cached // 4) for cached, blocks in used), used
        assert used[-1][1] > used[0][1]
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.stop()


def test_stop_strings_and_eos(model, tokenizer) -> None:
    engine = Engine(model, tokenizer).start()
    try:
        prompt = tokenizer.encode(PROMPTS[0])
        full = engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=()))
        stop = full.text[6:9]
        cut = engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=(stop,)))
        assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(stop)]
        eos = full.token_ids[4]
        ended = engine.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop_token_ids=(eos,)))
        assert ended.finish_reason == "stop" and ended.token_ids == full.token_ids[:5]
    finally:
        engine.stop()


# ----------------------------------------------------------------------------------------------------- the API


def test_models_and_health(server: RunningServer) -> None:
    assert httpx.get(f"{server.base}/health", timeout=5).json() == {"status": "ok"}
    assert [m.id for m in server.client().models.list()] == [MODEL_NAME]


def test_chat_completion_streamed_and_not(server: RunningServer, model, tokenizer) -> None:
    client = server.client()
    whole = client.chat.completions.create(model=MODEL_NAME, messages=chat(PROMPTS[0]), max_tokens=20, temperature=0)
    prompt = tokenizer.apply_chat_template(chat(PROMPTS[0]), add_generation_prompt=True)
    expected = reference_greedy(model, prompt, 20)
    assert whole.choices[0].message.content == tokenizer.decode([t for t in expected if t != 2],
                                                                skip_special_tokens=True)
    assert whole.choices[0].finish_reason == ("stop" if expected[-1] == 2 else "length")
    assert whole.usage.prompt_tokens == len(prompt) and whole.usage.completion_tokens == len(expected)
    assert whole.usage.total_tokens == len(prompt) + len(expected)

    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=chat(PROMPTS[0]), max_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    quiet = list(client.chat.completions.create(model=MODEL_NAME, messages=chat(PROMPTS[0]), max_tokens=20,
                                                temperature=0, stream=True))
    assert chunks[-1].usage is not None and all(c.usage is None for c in quiet) and len(quiet) == len(chunks) - 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_streamed_and_not(server: RunningServer, model, tokenizer) -> None:
    client = server.client()
    whole = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=12, temperature=0)
    expected = reference_greedy(model, tokenizer.encode(PROMPTS[2]), 12)
    assert whole.choices[0].text == tokenizer.decode([t for t in expected if t != 2], skip_special_tokens=True)
    assert whole.usage.completion_tokens == len(expected)
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # Token-id prompts and several prompts in one request.
    both = client.completions.create(model=MODEL_NAME, prompt=[PROMPTS[2], PROMPTS[0]], max_tokens=12, temperature=0)
    assert both.choices[0].text == whole.choices[0].text and len(both.choices) == 2
    by_ids = client.completions.create(model=MODEL_NAME, prompt=tokenizer.encode(PROMPTS[2]), max_tokens=12,
                                       temperature=0)
    assert by_ids.choices[0].text == whole.choices[0].text


def test_sampling_options(server: RunningServer) -> None:
    client = server.client()
    kwargs = dict(model=MODEL_NAME, messages=chat(PROMPTS[1]), max_tokens=16, temperature=0.9, top_p=0.9, seed=7,
                  n=3, presence_penalty=0.5, frequency_penalty=0.5)
    first, second = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len(first.choices) == 3 and len({c.message.content for c in first.choices}) > 1
    assert 3 <= first.usage.completion_tokens <= 48

    streamed = list(client.chat.completions.create(**kwargs, stream=True))
    for i, choice in enumerate(first.choices):
        deltas = [c.choices[0] for c in streamed if c.choices and c.choices[0].index == i]
        assert "".join(d.delta.content or "" for d in deltas) == choice.message.content
        assert [d.finish_reason for d in deltas if d.finish_reason] == [choice.finish_reason]

    lp = client.chat.completions.create(model=MODEL_NAME, messages=chat(PROMPTS[1]), max_tokens=5, temperature=0,
                                        logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.logprob == pytest.approx(e.top_logprobs[0].logprob) for e in content)  # greedy picks the top one
    clp = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=5, temperature=0, logprobs=2)
    assert len(clp.choices[0].logprobs.token_logprobs) == 5 and len(clp.choices[0].logprobs.top_logprobs[0]) == 2

    full = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    stop = full.choices[0].text[4:7]
    cut = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    streamed = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


# ------------------------------------------------------------------------------------------------------- errors


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_bad_requests_get_openai_errors(server: RunningServer) -> None:
    url = f"{server.base}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    ok = {"model": MODEL_NAME, "messages": chat("To be"), "max_tokens": 4}
    with httpx.Client(timeout=10, headers=auth) as http:
        r = http.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"
        r = http.post(url, json={**ok, "temperature": "hot"})
        assert r.status_code == 400 and error_of(r)["param"] == "temperature"
        r = http.post(url, json={**ok, "max_tokens": "4"})
        assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
        r = http.post(url, json={**ok, "messages": "hi"})
        assert r.status_code == 400 and error_of(r)["param"].startswith("messages")
        r = http.post(url, json={**ok, "seed": 2**70})
        assert r.status_code == 400 and error_of(r)["param"] == "seed"
        r = http.post(url, json={**ok, "n": 0})
        assert r.status_code == 400 and error_of(r)["param"] == "n"
        r = http.post(url, json=[ok])
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_json"
        r = http.post(url, json={**ok, "model": "gpt-9"})
        assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
        r = http.post(url, json={**ok, "max_tokens": CONTEXT})
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
        r = http.post(url, json={**ok, "messages": []})
        assert r.status_code == 400 and error_of(r)["param"] == "messages"
        r = http.post(url, json={**ok, "messages": [{"role": "wizard", "content": "hi"}]})
        assert r.status_code == 400 and "wizard" in error_of(r)["message"]
        r = http.post(url, json={**ok, "messages": [{"role": "user", "content": "x" * 100_000}]})
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
        r = http.post(f"{server.base}/v1/completions", json={"model": MODEL_NAME, "prompt": [10**6]})
        assert r.status_code == 400 and error_of(r)["param"] == "prompt"
        r = http.get(f"{server.base}/v1/nothing")
        assert r.status_code == 404 and error_of(r)
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="To be", max_tokens=4)
    # ... and the server keeps serving.
    assert server.client().chat.completions.create(model=MODEL_NAME, messages=chat("To be"), max_tokens=4).choices


def test_a_failing_step_fails_its_requests_only(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    forward = server.engine.runner.forward
    calls = []

    def broken_once(segments):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device failure")
        return forward(segments)

    monkeypatch.setattr(server.engine.runner, "forward", broken_once)
    r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL_NAME, "prompt": "To", "max_tokens": 3},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert r.status_code == 500 and error_of(r)["type"] == "server_error"
    assert "simulated" in error_of(r)["message"]
    assert server.client().completions.create(model=MODEL_NAME, prompt="To", max_tokens=3).choices[0].finish_reason
    wait_until(lambda: server.engine.pool.num_free == server.engine.pool.num_blocks)


def test_api_key_is_required(server: RunningServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model=MODEL_NAME, messages=chat("To"), max_tokens=2)
    r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL_NAME, "prompt": "To"}, timeout=10)
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.get(f"{server.base}/v1/models", timeout=10).status_code == 401


def test_full_queue_answers_429(server: RunningServer) -> None:
    limit, server.engine.max_queue = server.engine.max_queue, 0
    try:
        r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL_NAME, "prompt": "To"},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert error_of(r)["code"] == "rate_limit_exceeded"
    finally:
        server.engine.max_queue = limit


@pytest.fixture
def slow_steps(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each engine step takes at least 10 ms, so a 200-token request is surely still running when its client leaves."""
    forward = server.engine.runner.forward

    def slow(segments):
        time.sleep(0.01)
        return forward(segments)

    monkeypatch.setattr(server.engine.runner, "forward", slow)


def test_request_timeout(server: RunningServer, slow_steps: None) -> None:
    before = server.metrics().get('decoderkit_requests_finished_total{reason="cancelled"}', 0)
    timeout, server.settings.request_timeout = server.settings.request_timeout, 0.05
    try:
        r = httpx.post(f"{server.base}/v1/completions", timeout=10, headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": MODEL_NAME, "prompt": "To", "max_tokens": 200, "ignore_eos": True})
        assert r.status_code == 504 and error_of(r)["code"] == "timeout"
    finally:
        server.settings.request_timeout = timeout
    wait_until(lambda: server.metrics()['decoderkit_requests_finished_total{reason="cancelled"}'] > before)


def wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except KeyError:
            pass
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_client_disconnect_cancels_and_frees_blocks(server: RunningServer, slow_steps: None) -> None:
    m = server.metrics()
    cancelled = m.get('decoderkit_requests_finished_total{reason="cancelled"}', 0)
    body = {"model": MODEL_NAME, "prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        with http.stream("POST", f"{server.base}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # A non-streamed request whose client gives up is cancelled too.
        with pytest.raises(httpx.ReadTimeout):
            http.post(f"{server.base}/v1/completions", json={**body, "stream": False}, timeout=0.5)
    wait_until(lambda: server.metrics()['decoderkit_requests_finished_total{reason="cancelled"}'] >= cancelled + 2)
    m = server.metrics()
    assert m["decoderkit_running_requests"] == 0
    assert m["decoderkit_kv_blocks_free"] == m["decoderkit_kv_blocks_total"]


def test_metrics(server: RunningServer) -> None:
    server.client().completions.create(model=MODEL_NAME, prompt="To", max_tokens=3)
    text = httpx.get(f"{server.base}/metrics", timeout=5).text
    for name in ("decoderkit_queue_length", "decoderkit_running_requests", "decoderkit_generated_tokens_total",
                 "decoderkit_tokens_per_second", "decoderkit_kv_blocks_free",
                 "decoderkit_time_to_first_token_seconds_bucket"):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? \S+$", text, re.M), name
    m = server.metrics()
    assert m["decoderkit_generated_tokens_total"] >= 3 and m["decoderkit_time_to_first_token_seconds_count"] >= 1


def test_sixteen_concurrent_streaming_clients(server: RunningServer) -> None:
    client = server.client(timeout=60)
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(8)]
    single = {p: client.chat.completions.create(model=MODEL_NAME, messages=chat(p), max_tokens=24,
                                                temperature=0).choices[0].message.content for p in prompts}
    results: dict[tuple[int, int], tuple[str, str | None, int | None]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(2):
                prompt = prompts[(i + j) % len(prompts)]
                text, finish, usage = "", None, None
                for chunk in client.chat.completions.create(model=MODEL_NAME, messages=chat(prompt), max_tokens=24,
                                                            temperature=0, stream=True,
                                                            stream_options={"include_usage": True}):
                    if chunk.choices:
                        text += chunk.choices[0].delta.content or ""
                        finish = chunk.choices[0].finish_reason or finish
                    if chunk.usage:
                        usage = chunk.usage.completion_tokens
                results[i, j] = (prompt, text, finish, usage)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not errors, errors
    assert len(results) == 32
    for prompt, text, finish, usage in results.values():
        assert finish in ("stop", "length") and usage is not None
        assert text == single[prompt]
    wait_until(lambda: server.metrics()["decoderkit_kv_blocks_free"] == server.engine.pool.num_blocks)


# ------------------------------------------------------------------------------------------------- the process


def test_python_m_serve_shuts_down_gracefully_on_sigterm(model_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "decoderkit.serve", str(model_dir), "--port", str(port),
                             "--served-model-name", MODEL_NAME, "--threads", "1", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        body = {"model": MODEL_NAME, "prompt": "To be", "max_tokens": 150, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)  # in flight: the stream must still finish
            rest = list(lines)
        assert [x for x in rest if x][-1] == "data: [DONE]"
        events = [json.loads(x[5:]) for x in rest if x.startswith("data: {")]
        assert any(c["choices"] and c["choices"][0]["finish_reason"] for c in events)
        # uvicorn re-raises the signal once it has shut down cleanly, so the status is "terminated by SIGTERM".
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
