"""The server's packaged decode step (serve.paged_step): its logits and pool writes against the eager paged runner
over changing batches and block tables, the engine's requests through it against an eager engine's, the package
picked up from disk (and once built by another process), the models it refuses, and the command line's switch."""

from __future__ import annotations

import functools
import threading

import pytest
import torch

import decoderkit
from decoderkit.kernels import attention as kernel
from decoderkit.serve import paged_step
from decoderkit.serve.engine import Engine, RequestOutput, SamplingParams
from decoderkit.serve.paged import PREFILL_MIN_TOKENS, BlockPool, PagedRunner, Segment
from decoderkit.serve.speculative import Speculator
from decoderkit.tokenizer import AutoTokenizer

oracle = pytest.importorskip("oracle")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not kernel.available(), reason="no C++ compiler for the paged-attention kernel")]

BLOCK, ROWS = 4, 6


def load(directory: str, **kwargs):
    return decoderkit.AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _cache(cache_dir, monkeypatch):
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(cache_dir))


@pytest.fixture(scope="module", params=["llama", "mpt"])
def family(request, tmp_path_factory, cache_dir):
    """A model directory of the family (llama: the server tests' model, with its tokenizer; mpt: ALiBi and no rope),
    the model, and its package built once per module."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DECODERKIT_CACHE_DIR", str(cache_dir))
        where = tmp_path_factory.mktemp(request.param)
        if request.param == "llama":
            directory = str(pytest.importorskip("test_serve").build_tiny_model(where))
        else:
            directory = oracle.save(oracle.build(request.param), where)
        model = load(directory, attn_implementation="sdpa")  # the paged kernel's attention (not the eager math)
        assert paged_step.paged_unsupported(PagedRunner(model, pool_for(model))) is None
        path = paged_step.build_paged_package(model, BLOCK, ROWS)
    return directory, model, path


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 97, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def pool_for(model) -> BlockPool:
    c = model.decoder_config
    return BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 48, BLOCK, model.dtype, model.device)


class Counting:
    """A packaged step that records the number of sequences (or with `tokens`, of tokens) of each call."""

    def __init__(self, step, calls: list, tokens: bool = False) -> None:
        self.step, self.calls, self.tokens = step, calls, tokens

    def takes(self, segments, tails=None) -> bool:
        return self.step.takes(segments, tails)

    def __call__(self, segments, tails=None):
        self.calls.append(sum(len(s.ids) for s in segments) if self.tokens else len(segments))
        return self.step(segments, tails)


def runner_pair(model, path) -> tuple[PagedRunner, PagedRunner, list]:
    """An eager runner and one with the package (counting its calls' sequences), each over a pool of its own."""
    eager, packaged = PagedRunner(model, pool_for(model)), PagedRunner(model, pool_for(model))
    calls: list = []
    packaged.decode_step = Counting(paged_step.PagedDecodeStep(packaged, path, ROWS), calls)
    return eager, packaged, calls


def assert_same_step(eager: PagedRunner, packaged: PagedRunner, segments, got, want) -> None:
    """The packaged step's logits and pool rows written are the eager step's, within float rounding."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    for seg in segments:
        written = eager.pool.slots(seg.block_table, seg.end)
        for buffers in ("keys", "values"):
            torch.testing.assert_close(getattr(packaged.pool, buffers)[:, written],
                                       getattr(eager.pool, buffers)[:, written], rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_packaged_steps_equal_the_eager_runners(family) -> None:
    _, model, path = family
    eager, packaged, calls = runner_pair(model, path)
    seqs = [ids(9, 1), ids(3, 2), ids(14, 3), ids(1, 4)]
    # Handed out a block at a time, round robin (no table is one run of blocks); the same blocks in both pools
    need = [eager.pool.blocks_for(len(s) + 12) for s in seqs]
    tables: list[list[int]] = [[] for _ in seqs]
    for b in range(max(need)):
        for table, n in zip(tables, need):
            if b < n:
                table.extend(eager.pool.allocate(1))
                assert packaged.pool.allocate(1) == table[-1:]
    for runner in (eager, packaged):  # each prompt but its last token: eager in both (more tokens than it takes)
        runner.forward([Segment(0, s[:-1], t) for s, t in zip(seqs, tables) if len(s) > 1])
    assert not calls
    # Batches of 1 to 4 sequences, crossing block boundaries (the tables' width changes from step to step)
    batches = [[0, 1, 2, 3], [1], [2, 0], [3, 1, 0]] * 3
    for members in batches:
        segments = [Segment(len(seqs[i]) - 1, [seqs[i][-1]], tables[i]) for i in members]
        want, got = eager.forward(segments), packaged.forward(segments)
        assert_same_step(eager, packaged, segments, got, want)
        for i, row in zip(members, want):
            seqs[i].append(int(row.argmax()))
    assert calls == [len(m) for m in batches]
    # A step with more sequences or tokens than the package takes, or a segment of PREFILL_MIN_TOKENS (flash
    # attention's, eagerly), runs eagerly
    step = packaged.decode_step
    assert not step.takes([Segment(0, [1], tables[0])] * (ROWS + 1))
    assert not step.takes([Segment(0, [1] * 12, tables[0]), Segment(0, [1] * 5, tables[1])])  # 17 tokens
    assert not step.takes([Segment(0, [1] * PREFILL_MIN_TOKENS, tables[0])])
    assert step.takes([Segment(0, [1] * (PREFILL_MIN_TOKENS - 1), tables[0])])


@torch.inference_mode()
def test_short_prompts_and_speculative_checks_through_the_package_equal_the_eager_runners(family) -> None:
    # Steps of several tokens per sequence: short prompts beside decode tokens (logits after each one's last token),
    # then checks of proposed tokens (logits after each of a segment's last `tails` tokens), as the engine sends them
    _, model, path = family
    eager, packaged, calls = runner_pair(model, path)
    tables = [eager.pool.allocate(5) for _ in range(3)]
    assert [packaged.pool.allocate(5) for _ in range(3)] == tables
    seqs = [ids(7, 21), ids(1, 22), ids(10, 23)]
    steps = [  # (sequence, start, new tokens, tails) per segment
        [(0, 0, 7, None), (1, 0, 1, None)],
        [(0, 7, 1, None), (1, 1, 5, None), (2, 0, 9, None)],  # 15 tokens; sequence 2's 9 cross two blocks
        [(0, 8, 4, 4), (1, 6, 1, 1), (2, 9, 3, 2)],  # checks: logits after the last 4, 1 and 2 tokens
        [(2, 12, 1, None), (0, 12, 2, None)],
    ]
    for step in steps:
        for i, start, n, _ in step:
            while len(seqs[i]) < start + n:
                seqs[i].append(int(torch.randint(3, 97, (1,), generator=torch.Generator().manual_seed(len(seqs[i])))))
        segments = [Segment(start, seqs[i][start:start + n], tables[i]) for i, start, n, _ in step]
        tails = [t for *_, t in step] if step[0][3] is not None else None
        assert packaged.decode_step.takes(segments, tails)
        want, got = eager.forward(segments, tails=tails), packaged.forward(segments, tails=tails)
        assert got.shape == want.shape == (sum(tails) if tails else len(segments), model.config.vocab_size)
        assert_same_step(eager, packaged, segments, got, want)
    assert calls == [len(step) for step in steps]


@pytest.mark.parametrize("family", ["llama"], indirect=True)  # the model with a tokenizer
def test_the_engine_decodes_through_the_package_as_it_does_eagerly(family) -> None:
    directory, _, _ = family
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = [ids(7, 11), ids(2, 12), ids(13, 13)]
    eager = Engine(load(directory), tokenizer, kv_cache_tokens=512, block_size=BLOCK, max_batch_size=ROWS,
                   compile=False)
    assert eager.runner.decode_step is None and eager.package_watch is None
    packaged = Engine(load(directory), tokenizer, kv_cache_tokens=512, block_size=BLOCK, max_batch_size=ROWS)
    assert isinstance(packaged.runner.decode_step, paged_step.PagedDecodeStep)  # "auto" found it on disk
    calls: list = []
    packaged.runner.decode_step = Counting(packaged.runner.decode_step, calls)
    assert run_requests(packaged, prompts, 9) == run_requests(eager, prompts, 9)
    assert calls and max(calls) > 1  # decode steps of several requests went through it


@pytest.mark.parametrize("family", ["llama"], indirect=True)  # the model with a tokenizer
def test_short_prompts_and_speculative_checks_in_the_engine_go_through_the_package(family) -> None:
    # A short prompt's prefill and a draft's checks (several tokens, logits after each) take the package too, with
    # the eager engine's tokens. The draft is the model itself, so that it proposes from the start and is kept.
    directory, _, _ = family
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = ids(12, 31)
    eager = Engine(load(directory), tokenizer, kv_cache_tokens=512, block_size=BLOCK, max_batch_size=ROWS,
                   compile=False)
    want = run_requests(eager, [prompt], 10)
    model = load(directory)
    packaged = Engine(model, tokenizer, kv_cache_tokens=512, block_size=BLOCK, max_batch_size=ROWS,
                      speculative=Speculator("draft", 3, draft_model=load(directory), model=model))
    calls: list = []
    packaged.runner.decode_step = Counting(packaged.runner.decode_step, calls, tokens=True)
    assert run_requests(packaged, [prompt], 10) == want
    assert calls[0] == len(prompt)  # the prefill step, all 12 tokens of it
    assert any(n > 1 for n in calls[1:])  # a check of proposed tokens
    assert packaged.counters.spec_draft_tokens > 0 and packaged.counters.spec_accepted > 0


def run_requests(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy requests all queued before the engine starts (so they are decoded together); their tokens."""
    tokens: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def collect(i: int, out: RequestOutput) -> None:
        tokens[i] += out.token_ids
        if out.finish_reason is not None:
            done[i].set()

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    for i, prompt in enumerate(prompts):
        engine.submit(prompt, params, functools.partial(collect, i))
    engine.start()
    try:
        assert all(event.wait(120) for event in done)
    finally:
        engine.stop()
    return tokens


@pytest.mark.parametrize("family", ["llama"], indirect=True)
def test_a_package_built_elsewhere_is_picked_up_while_serving(family, tmp_path, monkeypatch) -> None:
    directory, model, path = family
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(tmp_path))  # an empty cache: nothing to load at first
    engine = Engine(load(directory), None, kv_cache_tokens=512, block_size=BLOCK, max_batch_size=ROWS)
    watch = engine.package_watch
    assert engine.runner.decode_step is None and watch is not None
    assert watch.path.parent == tmp_path / "aoti" and watch.path.name == path.name
    watch.interval = 0.0
    assert not watch.poll()  # not there yet: still watching
    watch.path.parent.mkdir(parents=True)
    watch.path.write_bytes(path.read_bytes())  # what the background builder leaves
    assert watch.poll()
    assert isinstance(engine.runner.decode_step, paged_step.PagedDecodeStep)


def test_models_without_a_package_decode_eagerly(tmp_path) -> None:
    directory = oracle.save(oracle.build("llama"), tmp_path / "eager")
    engine = Engine(load(directory, attn_implementation="eager"), None, kv_cache_tokens=512, block_size=BLOCK,
                    compile=True)
    assert engine.runner.decode_step is None and engine.package_watch is None
    assert "eager math" in paged_step.paged_unsupported(engine.runner)
    with pytest.raises(ValueError, match="compile must be True, False or 'auto', got 'yes'"):
        Engine(load(directory, attn_implementation="eager"), None, kv_cache_tokens=512, compile="yes")


def test_the_package_takes_no_more_rows_than_every_quantized_layer_runs_its_kernel_for(tmp_path) -> None:
    directory = oracle.save(oracle.build("llama", attn_implementation="sdpa"), tmp_path / "m")
    model = load(directory, quantization="int8")
    from decoderkit.layers.quantized import QuantizedLinear

    limit = min(m.kernel_rows() for m in model.modules() if isinstance(m, QuantizedLinear))
    assert paged_step.max_rows(model, 1000) == limit
    assert paged_step.max_rows(model, 5) == 5
    assert paged_step.max_rows(model, 1) == 2  # traced with two sequences


@pytest.mark.parametrize("family", ["llama"], indirect=True)
def test_the_command_line_builds_the_package_in_the_background_unless_told_not_to(family, tmp_path,
                                                                                   monkeypatch) -> None:
    from decoderkit.generation import aot_step
    from decoderkit.serve import app

    directory, _, path = family
    started = []
    monkeypatch.setattr(aot_step, "start_builder", lambda *args: started.append(args) or True)
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(tmp_path))  # no package there yet
    monkeypatch.delenv("DECODERKIT_COMPILE", raising=False)  # the suite's own setting (conftest.py): eager
    flags = [directory, "--device", "cpu", "--block-size", str(BLOCK), "--max-batch-size", str(ROWS)]
    engine, _, _ = app.load_engine(app.build_parser().parse_args(flags))
    assert engine.package_watch is not None and engine.runner.decode_step is None
    [(module, arguments, package, marker)] = started
    assert module == "decoderkit.serve.paged_step" and package.name == path.name
    assert arguments[0] == directory and arguments[arguments.index("--rows") + 1] == str(ROWS)
    assert arguments[arguments.index("--dtype") + 1] == "float32"
    # What the builder is told builds the very package the server watches for
    built = paged_step.main([directory, "--dtype", "float32", "--block-size", str(BLOCK), "--rows", str(ROWS),
                             "--expect", arguments[arguments.index("--expect") + 1]])
    assert built == 0 and engine.package_watch.path.is_file()
    started.clear()
    engine, _, _ = app.load_engine(app.build_parser().parse_args([*flags, "--no-compile"]))
    assert engine.package_watch is None and engine.runner.decode_step is None and not started
    monkeypatch.setenv("DECODERKIT_COMPILE", "sometimes")
    with pytest.raises(SystemExit, match="DECODERKIT_COMPILE='sometimes'"):
        app.load_engine(app.build_parser().parse_args(flags))
