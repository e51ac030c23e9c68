"""`decoderkit serve --speculative`: the engine returns the plain engine's greedy text with prompt lookup and with a
draft model (alone and sharing steps, penalties, stop strings, logprobs), sampled requests keep the target
distribution, /metrics counts drafts under vLLM's names, rejected proposals give their blocks back, and the HTTP server
answers concurrent openai clients with the same text as without speculation.

Oracle: the same engine without speculation, itself checked against full forwards of the model in test_serve.py
(and here against `reference_greedy`).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

import test_serve  # noqa: E402
from test_serve import API_KEY, MODEL_NAME, RunningServer, generate_concurrently, reference_greedy  # noqa: E402
from test_speculative import unwatched_init  # noqa: E402  (a sibling test module)

import decoderkit  # noqa: E402
from decoderkit.generation.speculative import ProposalSchedule  # noqa: E402
from decoderkit.serve import speculative as speculative_module  # noqa: E402
from decoderkit.serve.app import ServerSettings, build_parser, build_speculator, load_engine, serve_on_ray  # noqa: E402
from decoderkit.serve.engine import Engine, SamplingParams  # noqa: E402
from decoderkit.serve.metrics import render_metrics  # noqa: E402
from decoderkit.serve.sampler import SampleRow, processed_scores  # noqa: E402
from decoderkit.serve.speculative import Speculator  # noqa: E402

model_dir, model, tokenizer = test_serve.model_dir, test_serve.model, test_serve.tokenizer  # the same fixtures

# Prompts that repeat themselves, so that the tiny model's continuations copy parts of them
PROMPTS = ["To be, or not to be, to be, or not to be, to be, or", "The slings and arrows, the slings and arrows, the",
           "Or to take arms", "Whether tis nobler in the mind to suffer, whether tis nobler in the mind"]
GREEDY = [SamplingParams(max_tokens=24, temperature=0),
          SamplingParams(max_tokens=24, temperature=0, frequency_penalty=0.4, presence_penalty=0.2, stop=("arrows",)),
          SamplingParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)]


def metric_values(text: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"^([a-z_:]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}


@pytest.fixture(scope="module")
def draft(model_dir):
    """The model with noise on its weights: the same vocabulary, agreeing with it often but not always."""
    draft = decoderkit.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in draft.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * 0.3 * weight.std())
    return draft


def run_all(engine: Engine, prompts: list[list[int]]) -> list[tuple]:
    try:
        results = [engine.generate(p, r, timeout=120) for p in prompts for r in GREEDY]
        results += generate_concurrently(engine, prompts, GREEDY[0], timeout=120)
        assert engine.stats().free_blocks == engine.pool.num_blocks  # every block back, the rewound ones too
        return [(r.token_ids, r.text, r.finish_reason,
                 [(lp.token_id, round(lp.logprob, 4), [t for t, _ in lp.top]) for lp in r.logprobs or []])
                for r in results]
    finally:
        engine.stop()


@pytest.mark.parametrize("method", ["lookup", "draft"])
def test_speculative_engine_gives_the_plain_greedy_text(model, tokenizer, draft, method, monkeypatch):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    plain = run_all(Engine(model, tokenizer, block_size=4, max_prefill_tokens=16).start(), prompts)
    if method == "lookup":
        # Watched (the default: proposals only after right guesses), then unwatched, so that proposals of every
        # length are made and the metrics of each position show
        watched = Engine(model, tokenizer, block_size=4, max_prefill_tokens=16,
                         speculative=Speculator(method, 4, model=model)).start()
        assert run_all(watched, prompts) == plain
        monkeypatch.setattr(ProposalSchedule, "__init__", unwatched_init)
    speculator = Speculator(method, 4, draft_model=draft if method == "draft" else None, model=model)
    engine = Engine(model, tokenizer, block_size=4, max_prefill_tokens=16, speculative=speculator).start()
    assert run_all(engine, prompts) == plain
    assert plain[0][0] == reference_greedy(model, prompts[0], 24)[: len(plain[0][0])]
    stats = engine.stats()
    values = metric_values(render_metrics(stats, "m"))
    drafts = values['vllm:spec_decode_num_drafts_total{model_name="m"}']
    proposed = values['vllm:spec_decode_num_draft_tokens_total{model_name="m"}']
    accepted = values['vllm:spec_decode_num_accepted_tokens_total{model_name="m"}']
    assert 0 < accepted < proposed and drafts > 0, values
    per_position = [values[f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{model_name="m",position="{p}"}}']
                    for p in range(4)]
    assert sum(per_position) == accepted and per_position == sorted(per_position, reverse=True)
    assert values["decoderkit_spec_decode_accepted_tokens_total"] == accepted
    # Every drafted step verified its proposals in one forward: fewer steps than tokens
    assert stats.generated_tokens_total == sum(len(r[0]) for r in plain)


def test_rejected_proposals_release_their_blocks(model, tokenizer, draft):
    """After every step a decoding request holds only the blocks its cached tokens fill, as without speculation."""
    speculator = Speculator("draft", 6, draft_model=draft, model=model)
    engine = Engine(model, tokenizer, block_size=2, max_prefill_tokens=16, speculative=speculator)
    held = []
    step = engine._step

    def watched(cancels):
        step(cancels)
        held.extend((len(r.blocks), engine.pool.blocks_for(r.num_cached), r.num_cached, len(r.tokens))
                    for r in engine._running)

    engine._step = watched
    engine.start()
    try:
        engine.generate(tokenizer.encode(PROMPTS[0]), GREEDY[0], timeout=120)
    finally:
        engine.stop()
    decoding = [h for h in held if h[2] == h[3] - 1]
    assert decoding and all(blocks == need for blocks, need, _, _ in decoding), held
    assert engine.counters.spec_draft_tokens > engine.counters.spec_accepted  # there were rejections to undo


@pytest.fixture(scope="module")
def stranger(tmp_path_factory, model):
    """A small random draft with the model's vocabulary and a very different distribution: its proposals are
    rejected often, so the residual draws of the sampling rule carry much of the output."""
    torch.manual_seed(1)
    config = dict(model_type="llama", vocab_size=model.config.vocab_size, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                  initializer_range=0.5)
    directory = tmp_path_factory.mktemp("stranger")
    decoderkit.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return decoderkit.AutoModelForCausalLM.from_pretrained(directory).eval()


@torch.no_grad()
def sequence_probabilities(model, prompt: list[int], steps: int, row: SampleRow) -> dict[tuple[int, ...], float]:
    """The probability of every sequence of `steps` tokens that plain sampling with `row` can draw."""
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(steps):
        grown = {}
        for seq, pr in probs.items():
            logits = model(torch.tensor([prompt + list(seq)])).logits[0, -1]
            p = processed_scores(logits[None], [row])[0].softmax(-1)
            for t in p.nonzero().flatten().tolist():
                grown[seq + (t,)] = pr * float(p[t])
        probs = grown
    return probs


def always_accept(probs, draft_probs, proposed, generator=None):
    """A wrong rule: every proposal kept, then a draw from the model."""
    k = proposed.shape[0]
    return torch.cat([proposed, torch.multinomial(probs[k], 1, generator=generator)])


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["speculative", "always_accept"])
def test_sampled_speculation_keeps_the_target_distribution(model, tokenizer, stranger, rule, monkeypatch):
    """Chi-square of the first three sampled tokens over many seeds against the distribution plain sampling draws
    from (top_k=2: eight sequences). The second step verifies a draft's proposal, so the test sees the rule; with
    a wrong rule the same test must fail."""
    if rule == "always_accept":
        monkeypatch.setattr(speculative_module, "sampled_accept", always_accept)
    prompt = tokenizer.encode("To be, or not to be, to be, or not to be")
    row = SampleRow(temperature=1.5, top_k=2)
    expected = sequence_probabilities(model, prompt, 3, row)
    engine = Engine(model, tokenizer, block_size=4, speculative=Speculator("draft", 2, draft_model=stranger,
                                                                           model=model)).start()
    draws = 400
    params = dict(max_tokens=3, temperature=row.temperature, top_k=row.top_k, stop_token_ids=())
    try:
        seen = [tuple(engine.generate(prompt, SamplingParams(seed=s, **params)).token_ids) for s in range(draws)]
    finally:
        engine.stop()
    assert engine.counters.spec_drafts > 0
    if rule == "speculative":
        assert engine.counters.spec_accepted < engine.counters.spec_draft_tokens  # residual draws happened
    observed = torch.tensor([seen.count(seq) for seq in expected], dtype=torch.float64)
    counts = torch.tensor(list(expected.values()), dtype=torch.float64) * draws
    chi2 = float(((observed - counts) ** 2 / counts).sum())
    plausible = set(seen) <= set(expected) and chi2 < 24.3  # p = 0.001 at 7 degrees of freedom
    assert plausible == (rule == "speculative"), (chi2, observed, counts, set(seen) - set(expected))


def test_constrained_requests_decode_plainly(model, tokenizer):
    from decoderkit.serve.requests import Request

    class OnlyEven:
        def fill_mask(self, allowed):
            allowed[1::2] = False

        def accept(self, token_id):
            pass

        def is_terminated(self):
            return False

    speculator = Speculator("lookup", 3)
    plain = Request("a", [1, 2], SamplingParams(temperature=0), print, None, None)
    constrained = Request("b", [1, 2], SamplingParams(temperature=0, constraint=OnlyEven()), print, None, None)
    speculator.attach(plain)
    speculator.attach(constrained)
    assert plain.speculation is not None and constrained.speculation is None


def test_server_flags_and_bad_settings(model, model_dir, tmp_path):
    args = build_parser().parse_args([str(model_dir), "--speculative", "lookup", "--num-speculative-tokens", "3"])
    assert (args.speculative, args.num_speculative_tokens) == ("lookup", 3)
    engine, _, _ = load_engine(args)
    assert (engine.speculator.method, engine.speculator.num_tokens) == ("lookup", 3)
    engine, _, _ = load_engine(build_parser().parse_args([str(model_dir), "--speculative", f"draft:{model_dir}"]))
    assert engine.speculator.draft_model is not None and engine.speculator.num_tokens == 5
    assert load_engine(build_parser().parse_args([str(model_dir)]))[0].speculator is None
    for bad in (["--speculative", "ngram"], ["--speculative", "draft:"], ["--num-speculative-tokens", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    with pytest.raises(SystemExit, match="--num-speculative-tokens needs --speculative"):
        build_speculator(build_parser().parse_args(["--num-speculative-tokens", "3"]), model)
    other = decoderkit.AutoModelForCausalLM.from_config({
        "model_type": "llama", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128})
    other.save_pretrained(tmp_path / "other")
    args = build_parser().parse_args(["--speculative", f"draft:{tmp_path / 'other'}"])
    with pytest.raises(SystemExit, match=f"vocabulary of 50 tokens, the model {model.config.vocab_size}"):
        build_speculator(args, model)
    with pytest.raises(SystemExit, match="--ray replicas do not speculate yet"):
        serve_on_ray(build_parser().parse_args(["--ray", "--speculative", "lookup"]))
    with pytest.raises(ValueError, match="supports 'lookup'"):
        Speculator("ngram")
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 1, got 0"):
        Speculator("lookup", 0)
    with pytest.raises(ValueError, match="needs draft_model="):
        Speculator("draft")


def test_concurrent_openai_clients_get_the_plain_text(model, tokenizer):
    settings = ServerSettings(model_name=MODEL_NAME, api_key=API_KEY, request_timeout=60, max_body_bytes=64 * 1024)
    texts = {}
    for speculative in (None, Speculator("lookup", 4)):
        engine = Engine(model, tokenizer, block_size=8, max_prefill_tokens=16, speculative=speculative)
        with RunningServer(engine, settings) as server:
            client = server.client()

            def complete(prompt: str, client=client) -> str:
                return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24,
                                                 temperature=0).choices[0].text

            with ThreadPoolExecutor(8) as pool:
                texts[speculative is not None] = list(pool.map(complete, PROMPTS * 2))
            metrics = server.metrics()
        drafted = sum(v for k, v in metrics.items() if k.startswith("decoderkit_spec_decode_draft_tokens_total"))
        assert (drafted > 0) == (speculative is not None)
    assert texts[True] == texts[False]


@pytest.mark.slow
def test_preempted_speculating_requests_give_the_plain_text(model, tokenizer, draft, monkeypatch):
    """A pool of one context: speculating requests are preempted and recomputed, and still give the model's greedy
    text; a draft never carries proposals of a step its request was preempted from (its cache stays within the
    sequence it is asked to continue)."""
    from decoderkit.generation.speculative import DraftModelProposer

    seen = []
    propose = DraftModelProposer.propose

    def checked(self, ids, limit):
        seen.append((self.cache.get_seq_length(), ids.shape[1]))
        return propose(self, ids, limit)

    monkeypatch.setattr(DraftModelProposer, "propose", checked)
    speculator = Speculator("draft", 4, draft_model=draft, model=model)
    engine = Engine(model, tokenizer, kv_cache_tokens=test_serve.CONTEXT, block_size=4, max_prefill_tokens=8,
                    speculative=speculator).start()
    try:
        prompts = [tokenizer.encode(p) for p in test_serve.PROMPTS]
        params = SamplingParams(max_tokens=100, temperature=0, stop_token_ids=())
        outputs = generate_concurrently(engine, prompts, params, timeout=120)
        assert [o.token_ids for o in outputs] == [reference_greedy(model, p, 100, eos=-1) for p in prompts]
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.stop()
    assert engine.stats().preemptions > 0 and engine.counters.spec_drafts > 0
    assert all(cached < length for cached, length in seen), [s for s in seen if s[0] >= s[1]]


def test_a_draft_forgets_proposals_that_are_never_verified(model, tokenizer, draft):
    """Proposals dropped for want of free blocks, or left behind by a preemption, are rolled out of the draft's
    cache: the next proposal continues the sequence itself, not the unverified guesses."""
    from decoderkit.serve.blocks import BlockPool
    from decoderkit.serve.requests import Request

    speculator = Speculator("draft", 4, draft_model=draft, model=model)
    prompt = tokenizer.encode(PROMPTS[0])[:8]
    req = Request("a", prompt, SamplingParams(temperature=0, max_tokens=20), print, None, None)
    req.tokens = list(prompt)
    speculator.attach(req)
    c = model.decoder_config
    pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 2, 4, model.dtype, model.device)
    req.blocks = pool.allocate(2)  # the prompt's 8 tokens fill the pool: no block is left for proposals
    draft_cache = req.speculation.proposer
    speculator.schedule(req, len(req.tokens), pool, 256)
    assert req.speculation.proposed == [] and draft_cache.cache.get_seq_length() <= len(req.tokens)
    pool.release(req.blocks)
    req.blocks = pool.allocate(1)
    speculator.schedule(req, 4, pool, 256)  # room now: proposals made for a step...
    assert req.speculation.proposed and draft_cache.cache.get_seq_length() > len(req.tokens)
    speculator.schedule(req, None, pool, 256)  # ...that never ran (preempted, now prefilling again)
    assert req.speculation.proposed == [] and draft_cache.cache.get_seq_length() <= len(req.tokens)
