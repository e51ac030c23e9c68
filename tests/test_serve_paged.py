"""Paged attention on the server: the compiled kernel against dense attention, the paged step's logits against the
model's own forward for all four families (mixed prefill chunks and decodes, fragmented block tables, with and
without the kernel), concurrent greedy requests against their lone runs, the fp32 prefill of bf16 models, and the
engine's per-step token budget keeping running requests decoding while a long prompt is prefilled."""

from __future__ import annotations

import threading

import pytest
import torch

import decoderkit
from decoderkit.kernels import attention as kernel
from decoderkit.serve import paged
from decoderkit.serve.paged import BlockPool, PagedRunner, Segment

oracle = pytest.importorskip("oracle")
pytest.importorskip("transformers")

needs_kernel = pytest.mark.skipif(not kernel.available(), reason="no C++ compiler for the paged-attention kernel")
FAMILIES = ["llama", "gemma", "gpt_bigcode", "mpt"]


def dense_attention(q, k, v, tables, row_starts, positions, slopes, scale, block_size):
    """Causal attention written out: each sequence's keys gathered, scores masked, softmax in q's dtype."""
    heads, kv_heads = q.shape[1], k.shape[1]
    out = torch.empty_like(q)
    for s in range(len(positions)):
        r0, r1, start = int(row_starts[s]), int(row_starts[s + 1]), int(positions[s])
        key_pos = torch.arange(start + r1 - r0)
        rows = tables[s][key_pos // block_size] * block_size + key_pos % block_size
        ks = k[rows].to(q.dtype).repeat_interleave(heads // kv_heads, 1).transpose(0, 1)  # (H, K, D)
        vs = v[rows].to(q.dtype).repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
        q_pos = start + torch.arange(r1 - r0)
        scores = q[r0:r1].transpose(0, 1) @ ks.transpose(1, 2) * scale  # (H, T, K)
        if slopes is not None:
            scores = scores + slopes[:, None, None] * (key_pos[None, None] - q_pos[None, :, None]).to(q.dtype)
        scores = scores.masked_fill(key_pos[None, None] > q_pos[None, :, None], float("-inf"))
        out[r0:r1] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"),
                         [(4, 2, 8, 4), (9, 3, 64, 16), (4, 1, 12, 4), (4, 4, 16, 3)])
@pytest.mark.parametrize("alibi", [False, True])
def test_kernel_equals_dense_attention(dtype, heads, kv_heads, head_dim, block_size, alibi) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + head_dim)
    rows = 120 * block_size
    k = torch.randn(rows, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(rows, kv_heads, head_dim, generator=gen).to(dtype)
    # (new query rows, cached positions before them): prefill from scratch, decodes, chunks over a long context
    shapes = [(5, 0), (1, 17), (40, 23), (1, 0), (70, 3)]
    blocks = (torch.randperm(119, generator=gen) + 1).tolist()  # fragmented: any block anywhere
    tables = torch.zeros(len(shapes), 40, dtype=torch.long)
    for s, (new, cached) in enumerate(shapes):
        n = -(-(new + cached) // block_size)
        tables[s, :n] = torch.tensor([blocks.pop() for _ in range(n)])
    row_starts = torch.tensor([0, *torch.tensor([n for n, _ in shapes]).cumsum(0).tolist()])
    positions = torch.tensor([c for _, c in shapes])
    q = torch.randn(int(row_starts[-1]), heads, head_dim, generator=gen)
    slopes = torch.rand(heads, generator=gen) if alibi else None
    args = (q, k, v, tables, row_starts, positions, slopes, head_dim**-0.5, block_size)
    torch.testing.assert_close(kernel.paged_attention(*args), dense_attention(*args), rtol=1e-5, atol=1e-5)


def float64_attention(q, k, v, tables, row_starts, positions, slopes, scale, block_size):
    """dense_attention in float64 (the reference the tiled kernel's rounding is measured against)."""
    return dense_attention(q.double(), k.double(), v.double(), tables, row_starts, positions,
                           None if slopes is None else slopes.double(), scale, block_size).float()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "block_size"),
                         [(9, 3, 64, 16), (4, 4, 16, 5), (6, 2, 80, 8), (2, 1, 128, 32), (4, 2, 12, 4)])
@pytest.mark.parametrize("alibi", [False, True])
def test_prefill_kernel_equals_dense_attention(dtype, heads, kv_heads, head_dim, block_size, alibi) -> None:
    """The tiled path (where this build has it; else prefill_attention is the per-vector kernel) on chunks of many
    rows: from scratch, mid-sequence over fragmented tables, row counts off every tile size, beside single rows."""
    gen = torch.Generator().manual_seed(heads * 1000 + head_dim)
    shapes = [(150, 0), (1, 40), (67, 133), (16, 7), (200, 64)]  # (new query rows, cached positions before them)
    need = [-(-(n + c) // block_size) for n, c in shapes]
    rows = (sum(need) + 1) * block_size
    k = (torch.randn(rows, kv_heads, head_dim, generator=gen) * 2).to(dtype)
    v = torch.randn(rows, kv_heads, head_dim, generator=gen).to(dtype)
    blocks = (torch.randperm(sum(need), generator=gen) + 1).tolist()
    tables = torch.zeros(len(shapes), max(need), dtype=torch.long)
    for s, n in enumerate(need):
        tables[s, :n] = torch.tensor([blocks.pop() for _ in range(n)])
    row_starts = torch.tensor([0, *torch.tensor([n for n, _ in shapes]).cumsum(0).tolist()])
    positions = torch.tensor([c for _, c in shapes])
    q = torch.randn(int(row_starts[-1]), heads, head_dim, generator=gen)
    slopes = torch.rand(heads, generator=gen) * 0.5 if alibi else None
    args = (q, k, v, tables, row_starts, positions, slopes, head_dim**-0.5, block_size)
    got, reference = kernel.prefill_attention(*args), float64_attention(*args)
    torch.testing.assert_close(got, reference, rtol=2e-5, atol=2e-5)
    # no worse than the per-vector kernel's own rounding, by more than a few float32 steps
    per_vector = (kernel.paged_attention(*args) - reference).abs().max()
    assert (got - reference).abs().max() <= 4 * per_vector + 1e-6
    if not kernel.prefill_tiled(head_dim):
        assert torch.equal(got, kernel.paged_attention(*args))


@needs_kernel
@pytest.mark.parametrize("alibi", [False, True])
def test_prefill_kernel_rows_do_not_depend_on_their_neighbours(alibi) -> None:
    """A row's result is the same bits whichever rows share its tile, whether its chunk starts at 0 or mid-way, and
    whatever other sequences share the call: a request's numbers do not depend on how its prompt was chunked."""
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, head_dim, block_size, length = 9, 3, 64, 16, 300
    k = torch.randn(length, kv_heads, head_dim, generator=gen)
    v = torch.randn(length, kv_heads, head_dim, generator=gen)
    q = torch.randn(length, heads, head_dim, generator=gen)
    table = torch.arange(-(-length // block_size))[None]
    slopes = torch.rand(heads, generator=gen) if alibi else None

    def chunk(start: int, end: int) -> torch.Tensor:
        return kernel.prefill_attention(q[start:end].contiguous(), k, v, table, torch.tensor([0, end - start]),
                                        torch.tensor([start]), slopes, 0.125, block_size)

    whole = chunk(0, length)
    for start, end in [(0, 37), (37, 101), (101, 300), (250, 251), (5, 299)]:
        assert torch.equal(chunk(start, end), whole[start:end]), (start, end)
    two = kernel.prefill_attention(torch.cat([q[10:80], q[0:300]]).contiguous(), k, v, torch.cat([table, table]),
                                   torch.tensor([0, 70, 370]), torch.tensor([10, 0]), slopes, 0.125, block_size)
    assert torch.equal(two[:70], whole[10:80]) and torch.equal(two[70:], whole)


def test_without_a_compiler_the_runner_gathers_keys(monkeypatch) -> None:
    from decoderkit import kernels

    monkeypatch.setattr(kernels, "_compiler", lambda: None)
    kernel._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C.. compiler"):
            assert not kernel.available()
        model = decoderkit.AutoModelForCausalLM.from_config(oracle.hf_config("llama").to_dict())
        c = model.decoder_config
        pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 4, 4, model.dtype, model.device)
        assert not PagedRunner(model, pool).paged_kernel
        with pytest.raises(ValueError, match="paged_kernel=True needs"):
            PagedRunner(model, pool, paged_kernel=True)
    finally:
        monkeypatch.undo()
        kernel._load.cache_clear()


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    directory = oracle.save(oracle.build(request.param), tmp_path_factory.mktemp(request.param))
    return decoderkit.AutoModelForCausalLM.from_pretrained(directory).eval()


def interleaved_tables(pool: BlockPool, lengths: list[int]) -> list[list[int]]:
    """Block tables handed out one block at a time, round robin, so no table is contiguous."""
    need = [pool.blocks_for(n) for n in lengths]
    tables: list[list[int]] = [[] for _ in lengths]
    for b in range(max(need)):
        for t, n in zip(tables, need):
            if b < n:
                t.extend(pool.allocate(1))
    return tables


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("path", [pytest.param("tiled", marks=needs_kernel), pytest.param("flash", marks=needs_kernel),
                                  "gathered"])
@torch.inference_mode()
def test_mixed_step_logits_equal_the_models_own(family_model, path, monkeypatch) -> None:
    """Prefill chunks by the kernel's tiled path, or by flash (where the build lacks the tiled path), or with keys
    gathered (no kernel), beside decode tokens on the per-vector kernel."""
    model = family_model
    c = model.decoder_config
    if path == "tiled" and not kernel.prefill_tiled(c.head_dim):
        pytest.skip(f"this build of the kernel has no tiled path for head_dim {c.head_dim} (needs AVX2)")
    if path == "flash":
        monkeypatch.setattr(kernel, "prefill_tiled", lambda head_dim: False)
    long_chunks: dict[str, list[int]] = {"flash": [], "tiled": []}
    chunk_attention, prefill_attention = paged._chunk_attention, kernel.prefill_attention
    monkeypatch.setattr(paged, "_chunk_attention", lambda *args: long_chunks["flash"].append(args[0].shape[2])
                        or chunk_attention(*args))
    monkeypatch.setattr(kernel, "prefill_attention", lambda q, *args: long_chunks["tiled"].extend(
        (args[3][1:] - args[3][:-1]).tolist()) or prefill_attention(q, *args))
    pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 40, 4, model.dtype, model.device)
    runner = PagedRunner(model, pool, paged_kernel=path != "gathered")
    seqs = [ids(41, 1), ids(12, 2), ids(38, 3)]
    tables = [*interleaved_tables(pool, [41, 12]), pool.allocate(pool.blocks_for(38))]
    assert tables[2] == list(range(tables[2][0], tables[2][0] + len(tables[2])))  # one run: read as a view
    # Per step, each sequence's (start, end) of new tokens: prompt chunks (long ones, from PREFILL_MIN_TOKENS, go
    # to the tiled path, or to flash attention where the family allows it) beside single decode tokens
    steps = [[(0, 8), (0, 9), None], [(8, 28), (9, 10), (0, 17)], [(28, 40), (10, 11), (17, 37)],
             [(40, 41), (11, 12), (37, 38)]]
    assert paged.PREFILL_MIN_TOKENS <= 17
    for step in steps:
        members = [(i, span) for i, span in enumerate(step) if span is not None]
        segments = [Segment(a, seqs[i][a:b], tables[i]) for i, (a, b) in members]
        got = runner.forward(segments, all_positions=True).split([len(s.ids) for s in segments])
        for (i, (a, b)), rows in zip(members, got):
            expected = model(input_ids=torch.tensor([seqs[i][:b]])).logits[0, a:b]
            torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)
    # the three long chunks went to the path under test, in every layer
    if path == "tiled":
        assert sorted(set(long_chunks["tiled"])) == [17, 20] and not long_chunks["flash"]
    elif path == "flash" and c.position_embedding != "alibi":
        assert sorted(set(long_chunks["flash"])) == [17, 20] and not long_chunks["tiled"]
    else:  # the gathered path takes flash's split attention for every chunk of more than one token
        assert not long_chunks["tiled"]


@needs_kernel
def test_kernel_path_gathers_no_context(family_model, monkeypatch) -> None:
    def gathered(*args, **kwargs):
        raise AssertionError("keys were gathered from the pool")

    monkeypatch.setattr(PagedRunner, "_gathered_attention", gathered)
    model = family_model
    c = model.decoder_config
    pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 16, 4, model.dtype, model.device)
    runner = PagedRunner(model, pool)
    assert runner.paged_kernel
    a, b = ids(12, 4), ids(5, 5)
    ta, tb = interleaved_tables(pool, [13, 5])
    runner.forward([Segment(0, a, ta), Segment(0, b, tb)])
    runner.forward([Segment(12, [7], ta), Segment(5, [9], tb)])


@torch.inference_mode()
def test_concurrent_greedy_requests_equal_their_lone_runs(family_model) -> None:
    """Requests arriving at different steps, prompts prefilled in chunks of 5 beside the others' decoding."""
    model = family_model
    c = model.decoder_config
    prompts = [ids(17, 6), ids(3, 7), ids(11, 8)]
    arrivals, new_tokens, chunk = [0, 1, 3], 6, 5

    def run(which: list[int]) -> dict[int, list[int]]:
        pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 48, 4, model.dtype, model.device)
        runner = PagedRunner(model, pool)
        state = {i: (list(prompts[i]), 0, pool.allocate(pool.blocks_for(len(prompts[i]) + new_tokens)))
                 for i in which}
        out: dict[int, list[int]] = {i: [] for i in which}
        step = 0
        while any(len(out[i]) < new_tokens for i in which):
            active = [i for i in which if arrivals[i] <= step and len(out[i]) < new_tokens]
            segments = []
            for i in active:
                tokens, done, table = state[i]
                end = min(len(tokens), (done // chunk + 1) * chunk) if len(tokens) - done > 1 else len(tokens)
                segments.append(Segment(done, tokens[done:end], table))
            logits = runner.forward(segments) if segments else None
            for row, (i, seg) in enumerate(zip(active, segments)):
                tokens, _, table = state[i]
                state[i] = (tokens, seg.end, table)
                if seg.end == len(tokens):
                    token = int(logits[row].argmax())
                    tokens.append(token)
                    out[i].append(token)
            step += 1
        return out

    together = run([0, 1, 2])
    for i in range(3):
        alone = run([i])[i]
        assert together[i] == alone, i
        reference = []
        seq = list(prompts[i])
        for _ in range(new_tokens):
            reference.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(reference[-1])
        assert alone == reference, i


# ------------------------------------------------------------------------------------------ fp32 prefill of bf16


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return oracle.save(oracle.build("llama"), tmp_path_factory.mktemp("llama-bf16"))


@torch.inference_mode()
def test_long_segments_of_a_bf16_model_compute_in_fp32(llama_dir) -> None:
    bf16 = decoderkit.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    fp32 = decoderkit.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).float().eval()
    c = bf16.decoder_config

    def runner(model, prefill_dtype):
        pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 16, 4, torch.bfloat16, model.device)
        return PagedRunner(model, pool, prefill_dtype=prefill_dtype), pool

    long, short = ids(paged.PREFILL_MIN_TOKENS + 4, 9), ids(paged.PREFILL_MIN_TOKENS - 1, 10)
    mixed, pool = runner(bf16, torch.float32)
    tables = [pool.allocate(pool.blocks_for(len(long) + 1)), pool.allocate(pool.blocks_for(len(short)))]
    got = mixed.forward([Segment(0, long, tables[0]), Segment(0, short, tables[1])])
    assert got.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    # The long prompt computes as the fp32 model would (into the same bf16 pool); the short one in bf16.
    as_fp32, pool32 = runner(fp32, None)
    expected_long = as_fp32.forward([Segment(0, long, pool32.allocate(pool32.blocks_for(len(long) + 1)))])
    as_bf16, pool16 = runner(bf16, None)
    expected_short = as_bf16.forward([Segment(0, short, pool16.allocate(pool16.blocks_for(len(short))))])
    assert torch.equal(got[0], expected_long[0].to(torch.bfloat16))
    assert torch.equal(got[1], expected_short[0])
    # Every position's logits (prompt scoring), in segment order across the two dtypes' passes
    every = mixed.forward([Segment(0, long, tables[0]), Segment(0, short, tables[1])], all_positions=True)
    assert every.shape[0] == len(long) + len(short)
    assert torch.equal(every[len(long) - 1], got[0]) and torch.equal(every[-1], got[1])
    assert not torch.equal(expected_long[0].to(torch.bfloat16), runner(bf16, None)[0].forward(
        [Segment(0, long, tables[0])])[0])  # the two dtypes do differ here: the test can tell them apart


def test_auto_prefill_dtype_follows_the_cpu(llama_dir, monkeypatch) -> None:
    bf16 = decoderkit.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    c = bf16.decoder_config
    pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 4, 4, torch.bfloat16, bf16.device)
    monkeypatch.setattr(paged, "native_half_matmul", lambda dtype: False)
    assert PagedRunner(bf16, pool).prefill_dtype == torch.float32
    monkeypatch.setattr(paged, "native_half_matmul", lambda dtype: True)
    assert PagedRunner(bf16, pool).prefill_dtype is None
    fp32 = decoderkit.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    assert PagedRunner(fp32, pool).prefill_dtype is None
    with pytest.raises(ValueError, match="prefill_dtype"):
        PagedRunner(bf16, pool, prefill_dtype="float32")


# ------------------------------------------------------------------------------- chunked prefill, the token budget


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server tests' tiny Llama and its tokenizer."""
    test_serve = pytest.importorskip("test_serve")
    from decoderkit.tokenizer import AutoTokenizer

    directory = test_serve.build_tiny_model(tmp_path_factory.mktemp("served"))
    model = decoderkit.AutoModelForCausalLM.from_pretrained(directory).eval()
    return test_serve, model, AutoTokenizer.from_pretrained(directory)


def test_running_requests_decode_every_step_while_a_long_prompt_prefills(served, monkeypatch) -> None:
    from decoderkit.serve.engine import Engine, SamplingParams

    test_serve, model, tokenizer = served
    budget, new_tokens = 4, 40
    engine = Engine(model, tokenizer, block_size=4, max_prefill_tokens=budget, enable_prefix_caching=False)
    steps: list[list[int]] = []  # per step: the new tokens of each segment, in batch order
    forward = engine.runner.forward

    def recording(segments, all_positions=False):
        steps.append([len(s.ids) for s in segments])
        return forward(segments, all_positions)

    monkeypatch.setattr(engine.runner, "forward", recording)
    short = tokenizer.encode(test_serve.PROMPTS[0])
    long = tokenizer.encode(" ".join(test_serve.PROMPTS) * 3)
    assert len(long) > 8 * budget
    short_steps = -(-len(short) // budget)
    tokens: list[int] = []
    finished = threading.Event()

    def on_short(out) -> None:
        tokens.extend(out.token_ids)
        if len(tokens) == 1:  # called on the engine thread: the long prompt is admitted at the very next step
            engine.submit(long, SamplingParams(max_tokens=1, temperature=0), lambda o: None)
        if out.finish_reason is not None:
            finished.set()

    engine.start()
    try:
        engine.submit(short, SamplingParams(max_tokens=new_tokens, temperature=0, stop_token_ids=()), on_short)
        assert finished.wait(120)
    finally:
        engine.stop()
    # The first steps prefilled the short prompt; from then on it decodes, first in every batch. The long prompt
    # took one chunk of at most `budget` tokens per step, and every one of those steps gave the short one a token.
    chunked = [step for step in steps[short_steps:] if len(step) > 1]
    assert sum(step[1] for step in chunked) == len(long)
    assert len(chunked) == -(-len(long) // budget)
    assert all(step[0] == 1 and step[1] <= budget for step in chunked)
    assert len(steps) == short_steps + new_tokens - 1  # a token every step: the long prefill never stalled it
    assert tokens == test_serve.reference_greedy(model, short, new_tokens, eos=-1)
