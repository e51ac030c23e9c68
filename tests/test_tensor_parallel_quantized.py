"""Quantized weights under tensor parallelism: 2 gloo ranks (torchrun) of an int8, an int4 and a GGUF (Q4_0, untied;
Q8_0, tied) model give the logits and greedy generations of the same quantized model in one process, each rank
holding about half its bytes; a row-parallel split that cuts a quantization group is refused, naming the sizes."""

from __future__ import annotations

import json
import os
import textwrap

import oracle
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_gguf_model import write_tiny_llama
from torchrun import run_two_ranks

from decoderkit import AutoModelForCausalLM
from decoderkit.layers.quantized import Int4Linear

# hidden 64 over 4 heads: o_proj gets 32 inputs per rank, down_proj 64: whole groups of 32 on each of 2 ranks
SIZES = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
LENGTHS = [5, 3, 7]  # left-padded; 21 rows take the dequantized prefill path, decode steps the packed kernel
NEW_TOKENS = 5

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {here!r})
    from oracle import left_padded_batch
    from decoderkit import AutoModelForCausalLM
    from decoderkit.layers.quantized import QuantizationConfig
    torch.set_num_threads(1)
    out, cases = sys.argv[1], json.loads(sys.argv[2])
    rank = int(os.environ["RANK"])
    for name, (path, quantization) in cases.items():
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype="float32",
                                                     quantization=quantization)
        ids, mask, _ = left_padded_batch(model.config.vocab_size, {lengths})
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(ids, attention_mask=mask, max_new_tokens={new}, do_sample=False)
        tensors = {{id(t): t for t in [*model.parameters(), *model.buffers()]}}.values()
        mine = sum(t.numel() * t.element_size() for t in tensors)
        kinds = sorted({{type(m).__name__ for m in model.modules()}})
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        if rank == 0:
            torch.save({{"logits": logits, "generated": generated, "bytes": every, "kinds": kinds}},
                       f"{{out}}/{{name}}.pt")
    # o_proj's 64 inputs split into 32 per rank: not a whole group of 64
    try:
        AutoModelForCausalLM.from_pretrained(cases["int4"][0], tp_plan="auto",
                                             quantization=QuantizationConfig(bits=4, group_size=64))
        error = None
    except ValueError as err:
        error = str(err)
    json.dump({{"error": error}}, open(f"{{out}}/group-{{rank}}.json", "w"))
""")


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[str, str | None]]:
    root = tmp_path_factory.mktemp("tp-quantized")
    # biases on every projection: the row-parallel layers add theirs once, after the all-reduce
    hf = oracle.save(oracle.build("llama", **SIZES, attention_bias=True, mlp_bias=True), root / "llama")
    plain = oracle.save(oracle.build("llama", **SIZES), root / "llama-plain")
    write_tiny_llama(root / "q4_0.gguf", Q.Q4_0, tie=False)
    write_tiny_llama(root / "q8_0.gguf", Q.Q8_0, tie=True)
    return {"int8": (hf, "int8"), "int4": (plain, "int4"), "gguf_q4_0": (str(root / "q4_0.gguf"), None),
            "gguf_q8_0_tied": (str(root / "q8_0.gguf"), None)}


@pytest.fixture(scope="module")
def two_ranks(cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp-quantized-out")
    script = out / "worker.py"
    script.write_text(WORKER.format(here=os.path.dirname(os.path.abspath(__file__)), lengths=LENGTHS,
                                    new=NEW_TOKENS))
    run_two_ranks(script, str(out), json.dumps(cases), timeout=170)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["int8", "int4", "gguf_q4_0", "gguf_q8_0_tied"])
def test_quantized_two_ranks_match_one_quantized_process(case, cases, two_ranks):
    path, quantization = cases[case]
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", quantization=quantization)
    ids, mask, _ = oracle.left_padded_batch(model.config.vocab_size, LENGTHS)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    result = torch.load(two_ranks / f"{case}.pt")
    # the ranks run the quantized layers, split (not float layers); an int4 head whose vocabulary (97) torch's
    # layout cannot pack is int8, in one process as on the ranks
    head = "Int4" if isinstance(model.lm_head, Int4Linear) else "Int8"
    expected_kinds = {"int8": {"RowParallelInt8Linear", "VocabParallelInt8Linear"},
                      "int4": {"RowParallelInt4Linear", f"VocabParallel{head}Linear"},
                      "gguf_q4_0": {"RowParallelInt4Linear", "VocabParallelInt4Linear"},
                      "gguf_q8_0_tied": {"RowParallelInt8Linear", "VocabParallelInt8Embedding"}}[case]
    assert expected_kinds <= set(result["kinds"]), result["kinds"]
    assert "RowParallelLinear" not in result["kinds"]
    assert result["logits"].shape == logits.shape
    # 1e-5 of the logits' scale: the GGUF models' logits reach ~12, where float32 sums in another order (the
    # all-reduce of o / down) differ by ~1e-5
    assert float((result["logits"] - logits).abs().max()) < 1e-5 * max(1.0, float(logits.abs().max()))
    assert torch.equal(result["generated"], generated)

    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    total = sum(t.numel() * t.element_size() for t in tensors)
    for held in result["bytes"]:
        assert held < 0.62 * total, (held, total)
    assert sum(result["bytes"]) >= total


@pytest.mark.slow
def test_a_row_parallel_split_that_cuts_a_group_names_the_sizes(two_ranks):
    for rank in (0, 1):
        error = json.loads((two_ranks / f"group-{rank}.json").read_text())["error"]
        assert error is not None
        assert "model.layers.0.self_attn.o_proj" in error and "input size 64" in error, error
        assert "groups of 64" in error and "size 2" in error, error
