"""Multi-process training: 2 gloo processes under torchrun (FSDP2 and DDP) match one process; checkpoints written by
2 processes resume in 1."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from torchrun import run_two_ranks

from decoderkit import AutoModelForCausalLM, DecoderForCausalLM
from decoderkit.training import PackedDataset, Trainer, TrainingArguments

CONFIG = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
STEPS = 4

# Run by each torchrun process: the same training as `run_training` below, with half the per-process batch.
WORKER = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {here!r})
    from test_distributed import run_training
    out = sys.argv[1]
    results = {{s: run_training(f"{{out}}/{{s}}", strategy=s, world_size=2) for s in ("fsdp", "ddp")}}
    if torch.distributed.get_rank() == 0:
        json.dump(results, open(f"{{out}}/results.json", "w"))
""")


def run_training(output_dir: str, strategy: str = "none", world_size: int = 1, resume_from: str | None = None):
    torch.manual_seed(0)
    model = DecoderForCausalLM.from_config(CONFIG)
    data = PackedDataset(torch.randint(0, 64, (32, 16), generator=torch.Generator().manual_seed(1)))
    args = TrainingArguments(output_dir=output_dir, max_steps=STEPS, per_device_batch_size=4 // world_size,
                             gradient_accumulation_steps=2, learning_rate=1e-2, warmup_steps=1, save_steps=2,
                             save_total_limit=None, strategy=strategy, progress=False, plot=False,
                             resume_from=resume_from)
    result = Trainer(model, args, data, eval_dataset=data).train()
    return {"losses": result.losses, "eval": result.eval_history[-1]}


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    script = out / "worker.py"
    script.write_text(WORKER.format(here=os.path.dirname(os.path.abspath(__file__))))
    run_two_ranks(script, str(out), timeout=120)
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("single")
        return out, run_training(str(out / "run"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_processes_match_one(strategy, two_process_results, single):
    _, results = two_process_results
    _, reference = single
    assert results[strategy]["losses"] == pytest.approx(reference["losses"], rel=1e-4, abs=1e-4)
    assert results[strategy]["eval"]["eval_loss"] == pytest.approx(reference["eval"]["eval_loss"], rel=1e-4)
    assert len(set(reference["losses"])) == STEPS  # the losses move, so equality means something


def test_fsdp_checkpoint_resumes_in_one_process(two_process_results, tmp_path):
    out, results = two_process_results
    checkpoint = out / "fsdp/checkpoint-2"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = run_training(str(tmp_path / "resumed"), resume_from=str(checkpoint))
    finally:
        torch.set_num_threads(threads)
    assert resumed["losses"][:2] == results["fsdp"]["losses"][:2]
    assert resumed["losses"][2:] == pytest.approx(results["fsdp"]["losses"][2:], rel=1e-4, abs=1e-4)


def test_fsdp_final_model_is_a_whole_checkpoint(two_process_results, single):
    out, _ = two_process_results
    single_out, _ = single
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    sharded = AutoModelForCausalLM.from_pretrained(out / "fsdp/final")
    plain = AutoModelForCausalLM.from_pretrained(single_out / "run/final")
    with torch.no_grad():
        torch.testing.assert_close(sharded(input_ids=x).logits, plain(input_ids=x).logits, rtol=1e-4, atol=1e-4)
