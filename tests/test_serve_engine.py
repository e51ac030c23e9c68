"""The serving engine's scheduler and sampler: prefix caching (same tokens as a cold run, hits counted, shared system
prompts, eviction under a small pool, prompt logprobs and cancellation beside it), chunked prefill, --max-model-len,
16 concurrent mixed requests against their single-request outputs, and the batched sampler against the per-request
logits processors."""

from __future__ import annotations

import re
import threading

import httpx
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import test_serve  # noqa: E402
from test_serve import API_KEY, MODEL_NAME, PROMPTS, RunningServer, generate_concurrently, reference_greedy  # noqa: E402
from test_serve_openai import direct_logprobs  # noqa: E402

from decoderkit.generation.logits_process import (  # noqa: E402
    PresenceFrequencyPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from decoderkit.serve.app import ServerSettings  # noqa: E402
from decoderkit.serve.blocks import BlockPool, block_hashes  # noqa: E402
from decoderkit.serve.engine import Engine, SamplingParams  # noqa: E402
from decoderkit.serve.sampler import SampleRow, processed_scores, sample  # noqa: E402

model_dir, model, tokenizer = test_serve.model_dir, test_serve.model, test_serve.tokenizer  # the same fixtures
GREEDY = SamplingParams(max_tokens=12, temperature=0)
SYSTEM = "To be, or not to be, that is the question. Whether tis nobler in the mind to suffer "


def hits(engine: Engine) -> tuple[int, int]:
    s = engine.stats()
    return s.prefix_cache_hits, s.prefix_cache_queries


# ------------------------------------------------------------------------------------------------ prefix caching


def test_prefix_cache_hit_gives_the_cold_runs_tokens(model, tokenizer) -> None:
    prompt = tokenizer.encode(SYSTEM + PROMPTS[0])
    cold = Engine(model, tokenizer, block_size=4, max_prefill_tokens=8, enable_prefix_caching=False).start()
    warm = Engine(model, tokenizer, block_size=4, max_prefill_tokens=8).start()
    try:
        expected = cold.generate(prompt, GREEDY).token_ids
        assert expected == reference_greedy(model, prompt, 12)
        assert hits(cold) == (0, 0)
        first = warm.generate(prompt, GREEDY)
        assert first.token_ids == expected and hits(warm)[0] == 0
        second = warm.generate(prompt, GREEDY)
        assert second.token_ids == expected
        # Every full block but the one holding the last prompt token (its logits pick the first new token) was hit.
        assert hits(warm) == ((len(prompt) - 1) // 4 * 4, 2 * len(prompt))
        assert warm.pool.num_free == warm.pool.num_blocks and warm.pool.num_cached > 0
        # A second turn: the first turn's prompt and answer are a prefix of it.
        turn2 = prompt + expected + tokenizer.encode(PROMPTS[1])
        before = hits(warm)[0]
        assert warm.generate(turn2, GREEDY).token_ids == reference_greedy(model, turn2, 12)
        assert hits(warm)[0] - before >= len(prompt) // 4 * 4
    finally:
        cold.stop()
        warm.stop()


def test_requests_sharing_a_system_prompt_prefill_it_once(model, tokenizer) -> None:
    engine = Engine(model, tokenizer, block_size=4, max_prefill_tokens=16).start()
    try:
        system = tokenizer.encode(SYSTEM)
        prompts = [system + tokenizer.encode(p) for p in PROMPTS]
        engine.generate(prompts[0], GREEDY)
        outputs = generate_concurrently(engine, prompts, GREEDY, timeout=60)
        assert [o.token_ids for o in outputs] == [reference_greedy(model, p, 12) for p in prompts]
        assert hits(engine)[0] >= len(PROMPTS) * (len(system) // 4 * 4)
    finally:
        engine.stop()


def test_eviction_under_a_small_pool(model, tokenizer) -> None:
    # A pool of one context: cached prefixes must be evicted, least recently used first, to serve new prompts.
    engine = Engine(model, tokenizer, kv_cache_tokens=test_serve.CONTEXT, block_size=4, max_prefill_tokens=8).start()
    try:
        prompts = [tokenizer.encode(f"{p} {q}" * 3) for p in PROMPTS for q in PROMPTS]
        params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=())
        for p in prompts:
            assert engine.generate(p, params).token_ids == reference_greedy(model, p, 8, eos=-1)
        assert engine.pool.evictions > 0
        # The most recent prompt is still cached; the first ones were evicted for later ones.
        before = hits(engine)[0]
        assert engine.generate(prompts[-1], params).token_ids == reference_greedy(model, prompts[-1], 8, eos=-1)
        assert hits(engine)[0] > before
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.stop()


def test_pool_reference_counts_and_lru_order() -> None:
    pool = BlockPool(1, 1, 2, num_blocks=3, block_size=2, dtype=torch.float32, device=torch.device("cpu"))
    keys = block_hashes([1, 2, 3, 4, 5], 2)
    assert len(keys) == 2 and block_hashes([1, 2, 3, 4], 2, start=1, parent=keys[0]) == keys[1:]
    assert block_hashes([9, 2, 3, 4], 2)[1] != keys[1]  # a block's key covers everything before it
    held = pool.allocate(2)
    a = list(held)  # release empties the list it is given
    for block, key in zip(a, keys):
        pool.register(block, key)
    shared = pool.lookup(keys)
    assert shared == a and pool.num_free == 1
    pool.release(held)
    assert pool.num_free == 1  # still held by the second holder
    pool.release(shared)
    assert pool.num_free == 3 and pool.num_cached == 2
    pool.allocate(2)  # the never-used block, then the least recently released cached one (the chain's tail)
    assert pool.evictions == 1 and pool.lookup(keys) == a[:1]


def test_prompt_logprobs_are_computed_whatever_is_cached(model, tokenizer) -> None:
    engine = Engine(model, tokenizer, block_size=4, max_prefill_tokens=8).start()
    try:
        ids = tokenizer.encode(SYSTEM + PROMPTS[2])
        engine.generate(ids, GREEDY)  # the prompt is now cached
        out = engine.generate(ids, SamplingParams(max_tokens=0, temperature=0, prompt_logprobs=2))
        expected, _ = direct_logprobs(model, tokenizer, ids, 2)
        assert [lp.token_id for lp in out.prompt_logprobs] == ids[1:]
        assert [lp.logprob for lp in out.prompt_logprobs] == pytest.approx(expected, abs=1e-4)
    finally:
        engine.stop()


def test_cancelled_request_leaves_a_usable_cache(model, tokenizer) -> None:
    engine = Engine(model, tokenizer, block_size=4, max_prefill_tokens=4)
    ids = tokenizer.encode(SYSTEM + PROMPTS[1])
    done = threading.Event()
    seen: list = []

    def on_output(out) -> None:
        seen.append(out)
        if len(seen) == 2:
            engine.cancel(rid)
        if out.finish_reason:
            done.set()

    rid = engine.submit(ids, SamplingParams(max_tokens=50, temperature=0, stop_token_ids=()), on_output)
    engine.start()
    try:
        assert done.wait(30) and seen[-1].finish_reason == "cancelled"
        assert engine.pool.num_free == engine.pool.num_blocks
        assert engine.generate(ids, GREEDY).token_ids == reference_greedy(model, ids, 12)
        assert hits(engine)[0] > 0
    finally:
        engine.stop()


# ---------------------------------------------------------------------------------------- scheduling, limits


def test_chunked_prefill_equals_unchunked(model, tokenizer) -> None:
    ids = tokenizer.encode(SYSTEM + PROMPTS[2] + PROMPTS[0])
    params = SamplingParams(max_tokens=12, temperature=0, prompt_logprobs=1)
    results = []
    for budget in (3, 4096):
        engine = Engine(model, tokenizer, block_size=4, max_prefill_tokens=budget).start()
        try:
            results.append(engine.generate(ids, params))
        finally:
            engine.stop()
    chunked, whole = results
    assert chunked.token_ids == whole.token_ids == reference_greedy(model, ids, 12)
    assert [lp.logprob for lp in chunked.prompt_logprobs] == pytest.approx(
        [lp.logprob for lp in whole.prompt_logprobs], abs=1e-5)


def test_max_model_len_bounds_prompts_and_completions(model, tokenizer, model_dir) -> None:
    with pytest.raises(ValueError, match="max_model_len must be in"):
        Engine(model, tokenizer, max_model_len=test_serve.CONTEXT + 1)
    engine = Engine(model, tokenizer, block_size=4, max_model_len=20, kv_cache_tokens=20)
    assert engine.pool.num_blocks == 5
    with pytest.raises(ValueError, match="max_model_len"):
        engine.submit(list(range(3, 23)), GREEDY, lambda out: None)
    engine.start()
    try:
        ids = tokenizer.encode(PROMPTS[0])
        out = engine.generate(ids, SamplingParams(max_tokens=100, temperature=0, stop_token_ids=()))
        assert out.finish_reason == "length" and len(ids) + len(out.token_ids) == 20
        settings = ServerSettings(model_name=MODEL_NAME, api_key=API_KEY, request_timeout=30,
                                  max_body_bytes=64 * 1024, model_path=str(model_dir))
        with RunningServer(engine, settings) as server:
            r = httpx.post(f"{server.base}/v1/completions", json={"model": MODEL_NAME, "prompt": SYSTEM * 2},
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
            assert r.status_code == 400
            assert r.json()["error"]["code"] == "context_length_exceeded" and "20" in r.json()["error"]["message"]
    finally:
        engine.stop()


def test_sixteen_concurrent_mixed_requests_match_their_single_runs(model, tokenizer) -> None:
    """Greedy, sampled (seeded), echoed and prefix-hitting requests share steps; each gets what it gets alone."""
    system = tokenizer.encode(SYSTEM)
    prompts = [(system if i % 3 == 0 else []) + tokenizer.encode(PROMPTS[i % 4] + " " + PROMPTS[(i + 1) % 4])
               for i in range(16)]

    def params(i: int) -> SamplingParams:
        if i % 4 == 1:
            return SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=20, seed=i,
                                  presence_penalty=0.4, frequency_penalty=0.3, logit_bias={5: 3.0})
        if i % 4 == 2:
            return SamplingParams(max_tokens=10, temperature=0, prompt_logprobs=1, logprobs=True, top_logprobs=2)
        return SamplingParams(max_tokens=10, temperature=0)

    engine = Engine(model, tokenizer, block_size=4, max_batch_size=16, max_prefill_tokens=12).start()
    try:
        alone = [engine.generate(prompts[i], params(i)) for i in range(16)]
        results: list = [None] * 16
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, engine.generate(prompts[i], params(i))))
                   for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=90)
        for i in range(16):
            assert results[i].token_ids == alone[i].token_ids, i
            if params(i).temperature == 0:
                assert alone[i].token_ids == reference_greedy(model, prompts[i], 10)
            if params(i).prompt_logprobs is not None:
                expected, _ = direct_logprobs(model, tokenizer, prompts[i], 1)
                assert [lp.logprob for lp in results[i].prompt_logprobs] == pytest.approx(expected, abs=1e-4)
                assert [len(lp.top) for lp in results[i].logprobs] == [2] * len(results[i].token_ids)
        assert hits(engine)[0] > 0
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.stop()


def test_metrics_carry_vllm_names(model, tokenizer, model_dir) -> None:
    engine = Engine(model, tokenizer, block_size=4, max_prefill_tokens=8)
    settings = ServerSettings(model_name=MODEL_NAME, api_key=API_KEY, request_timeout=30, max_body_bytes=64 * 1024,
                              model_path=str(model_dir))
    with RunningServer(engine, settings) as server:
        client = server.client()
        for _ in range(2):
            client.completions.create(model=MODEL_NAME, prompt=SYSTEM, max_tokens=2, temperature=0)
        text = httpx.get(f"{server.base}/metrics", timeout=5).text
    values = {name: float(v) for name, v in re.findall(r'^(vllm:[a-z_]+)\{model_name="tiny-llama"\} (\S+)$', text,
                                                        re.M)}
    prompt_len = len(tokenizer.encode(SYSTEM))
    assert values["vllm:num_requests_running"] == 0 and values["vllm:num_requests_waiting"] == 0
    assert values["vllm:kv_cache_usage_perc"] == 0 and values["vllm:gpu_cache_usage_perc"] == 0
    assert values["vllm:prefix_cache_queries_total"] == 2 * prompt_len
    assert values["vllm:prefix_cache_hits_total"] == (prompt_len - 1) // 4 * 4
    assert values["vllm:generation_tokens_total"] == 4
    assert re.search(r"^# TYPE vllm:time_to_first_token_seconds histogram$", text, re.M)
    assert re.search(r'^vllm:time_to_first_token_seconds_count\{model_name="tiny-llama"\} 2$', text, re.M)
    assert len(re.findall(r"^# TYPE (\S+)", text, re.M)) == len(set(re.findall(r"^# TYPE (\S+)", text, re.M)))
    engine.stop()


# ----------------------------------------------------------------------------------------------- the sampler


def reference_scores(logits: torch.Tensor, row: SampleRow, generated: list[int]) -> torch.Tensor:
    """The same row through the per-request logits processors, in the engine's former order."""
    scores = logits[None].clone()
    if row.presence_penalty or row.frequency_penalty:
        scores = PresenceFrequencyPenaltyLogitsProcessor(row.presence_penalty, row.frequency_penalty)(
            torch.tensor([generated]), scores)
    for token, bias in (row.logit_bias or {}).items():
        scores[0, token] += bias
    if row.temperature == 0:
        return scores[0]
    scores = TemperatureLogitsWarper(row.temperature)(None, scores)
    if row.top_k:
        scores = TopKLogitsWarper(row.top_k)(None, scores)
    if row.top_p < 1:
        scores = TopPLogitsWarper(row.top_p)(None, scores)
    return scores[0]


def test_batched_sampler_equals_the_per_request_processors() -> None:
    torch.manual_seed(0)
    vocab = 50
    logits = torch.randn(6, vocab) * 3
    generated = [[1, 1, 4], [], [7, 7, 7, 2], [3], [9, 1], [0, 0]]

    def counts(ids: list[int]) -> torch.Tensor:
        return torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab).float()

    rows = [SampleRow(temperature=0.7, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.3,
                      counts=counts(generated[0])),
            SampleRow(temperature=0.0, logit_bias={3: 5.0, 8: -100.0}),
            SampleRow(temperature=1.3, top_k=5, frequency_penalty=-0.4, counts=counts(generated[2])),
            SampleRow(temperature=0.0, presence_penalty=1.5, counts=counts(generated[3])),
            SampleRow(temperature=1.0, top_k=3, top_p=0.5, logit_bias={2: 1.0}),
            SampleRow(temperature=1.0)]
    got = processed_scores(logits, rows)
    for i, row in enumerate(rows):
        expected = reference_scores(logits[i], row, generated[i])
        assert torch.equal(torch.isinf(got[i]), torch.isinf(expected)), i
        assert torch.allclose(got[i].softmax(-1), expected.softmax(-1), atol=1e-6), i
    chosen = sample(logits, rows)
    for i in (1, 3):
        assert chosen[i].token_id == int(reference_scores(logits[i], rows[i], generated[i]).argmax())


def test_batched_sampler_draws_from_the_distribution_with_each_requests_seed() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 8)

    def draws(seed: int, n: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        other = torch.Generator().manual_seed(seed + 100)
        out = []
        for _ in range(n):
            rows = [SampleRow(temperature=1.0, generator=g), SampleRow(temperature=0.5, generator=other)]
            out.append(sample(logits, rows)[0].token_id)
        return out

    tokens = draws(3, 4000)
    freq = torch.bincount(torch.tensor(tokens), minlength=8).float() / len(tokens)
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.03)
    assert draws(3, 50) == tokens[:50] and draws(4, 50) != tokens[:50]
    # Logprobs are the model's own (before temperature), with the top alternatives.
    got = sample(logits, [SampleRow(temperature=2.0, generator=torch.Generator().manual_seed(0), top_logprobs=3),
                          SampleRow(temperature=0.0, top_logprobs=0)])
    lp = logits.log_softmax(-1)
    assert got[0].logprob == pytest.approx(float(lp[0, got[0].token_id]))
    assert [t for t, _ in got[0].top] == lp[0].topk(3).indices.tolist() and got[1].top == []
    assert got[1].token_id == int(logits[1].argmax()) and got[1].logprob == pytest.approx(float(lp[1].max()))


class _OnlyEven:
    """A stand-in for a grammar: even token ids only."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def fill_mask(self, allowed: torch.Tensor) -> None:
        allowed[1::2] = False

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)


def test_constraint_masks_apply_per_row() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 3] = 5.0  # odd: the constrained row may not take it
    constraint = _OnlyEven()
    got = sample(logits, [SampleRow(temperature=0.0, constraint=constraint), SampleRow(temperature=0.0)])
    assert got[0].token_id % 2 == 0 and got[1].token_id == 3 and constraint.accepted == [got[0].token_id]


def test_a_zero_noise_draw_never_picks_a_ruled_out_token(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    rows = [SampleRow(temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))]

    def zeros(self, generator=None):  # the draw every entry of an exponential could be
        return self.zero_()

    monkeypatch.setattr(torch.Tensor, "exponential_", zeros)
    assert sample(logits, rows)[0].token_id in (1, 3)


# ------------------------------------------------------------------------------------------------- threads


def test_start_releases_the_starting_threads_openmp_pool(model, tokenizer, monkeypatch) -> None:
    # The model runs in the engine thread; an idle OpenMP pool left in the starting thread made every parallel region
    # there sleep (tests/test_cli_contract.py counts the workers release_thread_pool ends).
    import decoderkit.serve.engine as engine_module

    calls: list[tuple[threading.Thread, int]] = []
    monkeypatch.setattr(engine_module, "release_thread_pool",
                        lambda: calls.append((threading.current_thread(), threading.active_count())) or True)
    engine = Engine(model, tokenizer)
    started_with = threading.active_count()
    engine.start()
    try:
        assert calls == [(threading.current_thread(), started_with)]  # here, before the engine thread existed
        assert engine.generate(tokenizer.encode(PROMPTS[0]), GREEDY).token_ids == \
            reference_greedy(model, tokenizer.encode(PROMPTS[0]), 12)
    finally:
        engine.stop()
