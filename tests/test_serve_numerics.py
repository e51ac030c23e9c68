"""Numbers that must not depend on what else runs: length-dependent rope (longrope, dynamic) per request on the
server's paged step and per row in generate, with transformers running each sequence alone as the oracle; and MPT's
bf16 ALiBi on the server, which must give the model's own numbers."""

from __future__ import annotations

import copy

import pytest
import torch

import decoderkit
from decoderkit.cache import DynamicCache
from decoderkit.serve.paged import BlockPool, PagedRunner, Segment

oracle = pytest.importorskip("oracle")
pytest.importorskip("transformers")

# Original length 8: a 4-token prompt and its few new tokens stay on the short factors, a 20-token one is long
ROPES = {
    "longrope": dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                      "long_factor": [1.0, 1.5, 2.0, 3.0], "short_factor": [1.0, 1.1, 1.2, 1.3],
                                      "original_max_position_embeddings": 8}),
    "dynamic": dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                    max_position_embeddings=8),
}
SHORT, LONG, NEW = 4, 20, 3


def prompts() -> tuple[list[int], list[int]]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randint(3, 97, (SHORT,), generator=gen).tolist(),
            torch.randint(3, 97, (LONG,), generator=gen).tolist())


@torch.no_grad()
def transformers_alone(hf, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits of transformers decoding `prompt` on its own, through its cache.

    On a copy: transformers' dynamic rope remembers the longest sequence of earlier calls, so that only a fresh
    model computes what that sequence alone gives."""
    hf = copy.deepcopy(hf)
    out = hf(input_ids=torch.tensor([prompt]), use_cache=True)
    tokens, logits = [], []
    for _ in range(steps):
        logits.append(out.logits[0, -1])
        tokens.append(int(out.logits[0, -1].argmax()))
        out = hf(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits


@torch.inference_mode()
def paged_greedy(model, requests: list[list[int]], steps: int) -> list[list[torch.Tensor]]:
    """Each request's logits per step when all of them share every step of the paged runner."""
    c = model.decoder_config
    pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 32, 4, model.dtype, model.device)
    runner = PagedRunner(model, pool)
    tables = [pool.allocate(pool.blocks_for(len(p) + steps)) for p in requests]
    segments = [Segment(0, list(p), t) for p, t in zip(requests, tables)]
    result: list[list[torch.Tensor]] = [[] for _ in requests]
    for _ in range(steps):
        logits = runner.forward(segments)
        for row in range(len(segments)):
            result[row].append(logits[row])
        segments = [Segment(s.end, [int(logits[row].argmax())], s.block_table) for row, s in enumerate(segments)]
    return result


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # fp32; the paged step batches its matrix products differently from a lone forward (rounding only)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.fixture(scope="module", params=sorted(ROPES))
def rope_pair(request, tmp_path_factory):
    hf = oracle.build("llama", **ROPES[request.param])
    directory = oracle.save(hf, tmp_path_factory.mktemp(request.param))
    return hf, decoderkit.AutoModelForCausalLM.from_pretrained(directory).eval()


def test_paged_request_does_not_depend_on_a_long_batch_mate(rope_pair):
    hf, model = rope_pair
    short, long = prompts()
    alone = paged_greedy(model, [short], NEW)[0]
    together_short, together_long = paged_greedy(model, [short, long], NEW)
    for got, lone in zip(together_short, alone):
        assert_logits_close(got, lone)
    for logits, prompt in ((alone, short), (together_long, long)):
        tokens, expected = transformers_alone(hf, prompt, NEW)
        assert [int(x.argmax()) for x in logits] == tokens
        for got, ref in zip(logits, expected):
            assert_logits_close(got, ref)


def test_generate_rows_do_not_depend_on_their_batch_mates(rope_pair):
    hf, model = rope_pair
    short, long = prompts()
    ids = torch.zeros(2, LONG, dtype=torch.long)
    mask = torch.zeros(2, LONG, dtype=torch.long)
    ids[0], ids[1, -SHORT:] = torch.tensor(long), torch.tensor(short)
    mask[0], mask[1, -SHORT:] = 1, 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None,
                           return_dict_in_generate=True, output_logits=True)
    for row, prompt in enumerate((long, short)):
        tokens, expected = transformers_alone(hf, prompt, NEW)
        assert batch.sequences[row, LONG:].tolist() == tokens
        for step, ref in enumerate(expected):
            assert_logits_close(batch.logits[step][row], ref)


def test_rotary_keeps_no_state_between_calls(rope_pair):
    """generate and the server may call one model's rotary module from two threads: a call must not change it."""
    rotary = rope_pair[1].model.rotary
    before = {name: b.clone() for name, b in rotary.named_buffers()}
    short = rotary(torch.arange(SHORT)[None], torch.float32)
    rotary(torch.arange(LONG)[None], torch.float32)
    assert all(torch.equal(b, before[name]) for name, b in rotary.named_buffers())
    again = rotary(torch.arange(SHORT)[None], torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(short, again))
    # Rows of one call are independent: a long row beside does not change a short row
    both = rotary(torch.stack([torch.arange(LONG), torch.arange(LONG).clamp(max=SHORT - 1)]), torch.float32)
    assert all(torch.equal(b[1, :SHORT], a[0]) for a, b in zip(short, both))


@torch.inference_mode()
def test_mpt_bf16_paged_logits_equal_the_models(tmp_path):
    """Bit-identical: the paged step runs the same eager math (fp32 ALiBi bias and softmax over bf16 scores) on the
    same shapes as the model's forward through its cache, for a request on its own."""
    model = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(oracle.build("mpt"), tmp_path),
                                                            dtype=torch.bfloat16).eval()
    c = model.decoder_config
    pool = BlockPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, 16, 4, model.dtype, model.device)
    runner = PagedRunner(model, pool)
    prompt = torch.randint(3, 97, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    table = pool.allocate(8)
    cache = DynamicCache()

    def model_logits(ids: list[int]) -> torch.Tensor:
        hidden = model.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True).last_hidden_state
        return model.lm_head(hidden[:, -1])[0]

    expected, got = model_logits(prompt), runner.forward([Segment(0, prompt, table)])[0]
    assert torch.equal(got, expected)
    length = len(prompt)
    for _ in range(4):
        token = int(expected.argmax())
        expected, got = model_logits([token]), runner.forward([Segment(length, [token], table)])[0]
        length += 1
        assert torch.equal(got, expected)
