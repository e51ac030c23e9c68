"""Tensor-parallel inference: 2 gloo processes under torchrun (`from_pretrained(tp_plan="auto")`) give the logits and
greedy generations of one process, for every family and fused-qkv layout, each rank holding about half the weights;
sizes that do not split and mismatched checkpoints are refused."""

from __future__ import annotations

import json
import os
import textwrap

import oracle
import pytest
import torch
from torchrun import run_two_ranks

from decoderkit import AutoModelForCausalLM, DecoderConfig
from decoderkit.parallel import partition

VARIANTS = {
    "llama": ("llama", {}),  # grouped-query: 2 kv heads split over 2 ranks
    "gemma": ("gemma", {}),  # 1 kv head, replicated
    "gpt_bigcode_mqa": ("gpt_bigcode", {}),  # fused [q | k | v], one kv head
    "gpt_bigcode_mha": ("gpt_bigcode", {"multi_query": False}),  # fused per-head interleaved [q_h | k_h | v_h]
    "mpt": ("mpt", {}),  # fused [q; k; v] chunks, ALiBi slopes per local head
}
LENGTHS = [5, 3, 7]  # left-padded
NEW_TOKENS = 6

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {here!r})
    from oracle import left_padded_batch
    from decoderkit import AutoModelForCausalLM
    torch.set_num_threads(1)
    out, dirs = sys.argv[1], json.loads(sys.argv[2])
    rank = int(__import__("os").environ["RANK"])
    for name, path in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype="float32")
        ids, mask, _ = left_padded_batch(model.config.vocab_size, {lengths})
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        result = {{"logits": logits}}
        for cache in ("dynamic", "static"):
            result[cache] = model.generate(ids, attention_mask=mask, max_new_tokens={new}, do_sample=False,
                                           cache_implementation=cache)
        if name == "llama":  # the compiled decode step per rank (one compilation: the slow part of this file)
            result["compiled"] = model.generate(ids, attention_mask=mask, max_new_tokens={new}, do_sample=False,
                                                cache_implementation="static", compile=True)
        params = {{id(p): p for p in model.parameters()}}.values()
        mine = {{n: p.numel() * p.element_size() for n, p in model.named_parameters()}}
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        result["bytes"] = every
        if rank == 0:
            torch.save(result, f"{{out}}/{{name}}.pt")
    # Ranks that load different checkpoints are refused, on every rank
    names = list(dirs)
    try:
        AutoModelForCausalLM.from_pretrained(dirs[names[rank]], tp_plan="auto")
        error = None
    except ValueError as err:
        error = str(err)
    json.dump({{"error": error}}, open(f"{{out}}/mismatch-{{rank}}.json", "w"))
""")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp-models")
    return {name: oracle.save(oracle.build(model_type, **overrides), root / name)
            for name, (model_type, overrides) in VARIANTS.items()}


@pytest.fixture(scope="module")
def two_ranks(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp-out")
    script = out / "worker.py"
    script.write_text(WORKER.format(here=os.path.dirname(os.path.abspath(__file__)), lengths=LENGTHS,
                                    new=NEW_TOKENS))
    run_two_ranks(script, str(out), json.dumps(checkpoints), timeout=300)
    return out


def _reference(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    ids, mask, _ = oracle.left_padded_batch(model.config.vocab_size, LENGTHS)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    return model, logits, generated


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_ranks_match_one_process(variant, checkpoints, two_ranks):
    model, logits, generated = _reference(checkpoints[variant])
    result = torch.load(two_ranks / f"{variant}.pt")
    assert result["logits"].shape == logits.shape
    assert float((result["logits"] - logits).abs().max()) < 1e-5
    assert generated.shape[1] > max(LENGTHS)
    assert torch.equal(result["dynamic"], generated)
    assert torch.equal(result["static"], generated)
    if variant == "llama":
        assert torch.equal(result["compiled"], generated)

    # Each rank holds its share of every split tensor and a whole copy of the rest (norms, position tables, the
    # row-parallel biases and, with one kv head, the k/v projections)
    full = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    kv_split = model.decoder_config.num_key_value_heads % 2 == 0
    split_kinds = ("q_proj", "o_proj.weight", "gate_proj", "up_proj", "down_proj.weight", "embed_tokens") + (
        ("k_proj", "v_proj") if kv_split else ())
    replicated = sum(b for n, b in full.items() if not any(k in n for k in split_kinds))
    total = sum(full.values())
    for rank_bytes in result["bytes"]:
        held = sum(rank_bytes.values())
        odd_vocab_row = 4 * model.decoder_config.hidden_size
        assert held <= (total - replicated) / 2 + replicated + odd_vocab_row
        assert held < 0.62 * total
    assert sum(sum(r.values()) for r in result["bytes"]) >= total


@pytest.mark.slow
def test_ranks_loading_different_checkpoints_are_refused(two_ranks):
    errors = [json.loads((two_ranks / f"mismatch-{rank}.json").read_text())["error"] for rank in (0, 1)]
    for error in errors:
        assert error is not None and "different checkpoints" in error
        assert "rank 0" in error and "rank 1" in error


def test_partition_of_heads_and_kv_heads():
    llama = DecoderConfig.from_hf_dict(oracle.hf_config("llama", num_attention_heads=8, num_key_value_heads=2,
                                                        hidden_size=64).to_dict())
    # 4 ranks, 2 kv heads: ranks 0-1 share kv head 0, ranks 2-3 kv head 1 (their query heads' group)
    parts = [partition(llama, r, 4) for r in range(4)]
    assert [(p.num_heads, p.num_kv_heads, p.kv_head_start) for p in parts] == [(2, 1, 0), (2, 1, 0), (2, 1, 1),
                                                                             (2, 1, 1)]
    assert [partition(llama, r, 2).kv_head_start for r in range(2)] == [0, 1]
    # The vocabulary (97) splits unevenly: the last rank holds the remainder
    assert [(p.vocab_start, p.vocab_end) for p in parts] == [(0, 25), (25, 50), (50, 75), (75, 97)]


def test_a_size_that_does_not_split_the_model_names_the_sizes():
    config = DecoderConfig.from_hf_dict(oracle.hf_config("llama").to_dict())  # 4 heads, 2 kv heads, ffn 48
    with pytest.raises(ValueError, match=r"size 3 .*num_attention_heads=4.*num_key_value_heads=2"):
        partition(config, 0, 3)
    with pytest.raises(ValueError, match=r"intermediate_size=49"):
        partition(config.replace(intermediate_size=49), 0, 2)


def test_tp_plan_needs_a_process_group(checkpoints, monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node N"):
        AutoModelForCausalLM.from_pretrained(checkpoints["llama"], tp_plan="auto")
    with pytest.raises(ValueError, match=r"tp_plan='colwise' is not supported; allowed: \['auto'\]"):
        AutoModelForCausalLM.from_pretrained(checkpoints["llama"], tp_plan="colwise")
