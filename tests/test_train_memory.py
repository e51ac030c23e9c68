"""Training memory: the chunked causal-LM loss equals transformers' loss and gradients, the trainer never makes
full-vocabulary logits for every position, LoRA runs recompute activations, and short data is reported."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import oracle
import pytest
import torch

import decoderkit
from decoderkit import AutoModelForCausalLM
from decoderkit.training import LoraConfig, PackedDataset, Trainer, TrainingArguments, apply_lora

transformers = pytest.importorskip("transformers")

# The subprocess imports the same decoderkit as this test run.
SRC = Path(decoderkit.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return oracle.save(oracle.build("llama"), tmp_path_factory.mktemp("llama"))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 5 positions (vocabulary 97), so a 2 x 12 batch takes several chunks and a ragged last one."""
    monkeypatch.setattr("decoderkit.loss.CHUNK_ELEMENTS", 97 * 5)
    return 5


def head_rows(model) -> list[int]:
    """Rows of every output the LM head produces (records into the returned list)."""
    rows: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: rows.append(out.reshape(-1, out.shape[-1]).shape[0]))
    return rows


def batch(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(3, 97, (2, 12), generator=gen)
    labels = x.clone()
    labels[0, :4] = -100  # prompt tokens without a loss
    labels[1, 9:] = -100
    return x, labels


@pytest.mark.parametrize("num_items", [None, 13])
def test_chunked_loss_and_gradients_equal_transformers(llama_dir, small_chunks, num_items):
    x, labels = batch()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="eager",
                                                               dtype=torch.float32)
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref = theirs(input_ids=x, labels=labels, **extra).loss
    ref.backward()
    ours = AutoModelForCausalLM.from_pretrained(llama_dir)
    rows = head_rows(ours)
    out = ours(input_ids=x, labels=labels, skip_logits=True, **extra)
    assert out.logits is None
    out.loss.backward()
    assert max(rows) <= small_chunks < int((labels[:, 1:] != -100).sum())
    assert abs(float(out.loss) - float(ref)) <= 1e-5 * abs(float(ref))
    grads = {n: p.grad for n, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        assert oracle.rel_err(p.grad, grads[name]) < 1e-4, name


def test_chunked_loss_without_targets_is_zero_with_a_graph(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    x, _ = batch()
    out = model(input_ids=x, labels=torch.full_like(x, -100), skip_logits=True, num_items_in_batch=1)
    assert float(out.loss) == 0.0
    out.loss.backward()
    with pytest.raises(ValueError, match="skip_logits=True returns only the loss, so it needs labels"):
        model(input_ids=x, skip_logits=True)


def test_trainer_never_makes_logits_for_every_position(llama_dir, small_chunks, tmp_path):
    data = PackedDataset(torch.randint(3, 97, (8, 12), generator=torch.Generator().manual_seed(0)))
    args = dict(max_steps=3, per_device_batch_size=4, learning_rate=1e-2, progress=False, plot=False,
                save_final=False, shuffle=False)

    def run(loss_only: bool, out: str):
        torch.manual_seed(0)  # the adapters' initialisation
        model = apply_lora(AutoModelForCausalLM.from_pretrained(llama_dir), LoraConfig(r=2))
        rows = head_rows(model)
        trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path / out), **args), data)
        assert trainer.loss_only
        trainer.loss_only = loss_only
        return trainer.train().losses, rows

    chunked, rows = run(True, "a")
    assert max(rows) <= small_chunks
    whole, whole_rows = run(False, "b")
    assert max(whole_rows) == 4 * 12  # the reference path does project every position at once
    assert chunked == pytest.approx(whole, rel=1e-5)


def test_lora_runs_checkpoint_activations_by_default(llama_dir, tmp_path):
    data = PackedDataset(torch.randint(3, 97, (8, 12), generator=torch.Generator().manual_seed(0)))

    def checkpointing(lora: bool, **extra) -> bool:
        model = AutoModelForCausalLM.from_pretrained(llama_dir)
        if lora:
            apply_lora(model, LoraConfig(r=2))
        Trainer(model, TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_batch_size=4,
                                         progress=False, plot=False, **extra), data)
        return model.model.gradient_checkpointing

    assert checkpointing(lora=True)
    assert not checkpointing(lora=True, gradient_checkpointing=False)
    assert not checkpointing(lora=False)
    assert checkpointing(lora=False, gradient_checkpointing=True)


def test_data_shorter_than_the_run_is_reported(llama_dir, tmp_path, caplog):
    data = PackedDataset(torch.randint(3, 97, (3, 12), generator=torch.Generator().manual_seed(0)))
    data.source = "corpus.txt"
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    common = dict(output_dir=str(tmp_path), progress=False, plot=False, per_device_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="decoderkit.training.trainer"):
        Trainer(model, TrainingArguments(max_steps=100, **common), data)
    assert "corpus.txt gives 3 blocks of 12 tokens = 1 optimizer step at batch size 2; asked for 100 steps, so " \
           "the data is repeated 100 times" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="decoderkit.training.trainer"):
        Trainer(model, TrainingArguments(max_steps=1, **common), data)
        Trainer(model, TrainingArguments(**common), data)  # one epoch, as asked
    assert caplog.text == ""
    with caplog.at_level(logging.WARNING, logger="decoderkit.training.trainer"):
        Trainer(model, TrainingArguments(max_steps=1, gradient_accumulation_steps=4, **common), data)
    assert "1 micro-batch(es) at batch size 2 x 4 accumulation steps: one optimizer step takes more than all " \
           "of the data" in caplog.text
    with pytest.raises(ValueError, match="corpus.txt gives 3 blocks of 12 tokens, fewer than one batch of 4"):
        Trainer(model, TrainingArguments(**{**common, "per_device_batch_size": 4}), data)


@pytest.mark.slow
def test_cli_prints_the_short_data_warning(tmp_path):
    config = {**oracle.BASE["llama"], "model_type": "llama", "vocab_size": 320}
    (tmp_path / "config.json").write_text(json.dumps(config))
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(320)} | {"[UNK]": 319}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok/tokenizer.json"))
    (tmp_path / "corpus.txt").write_text(" ".join(f"w{3 + i % 300}" for i in range(100)))
    cmd = [sys.executable, "-m", "decoderkit.training", "--model", str(tmp_path / "config.json"), "--tokenizer",
           str(tmp_path / "tok"), "--data", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "out"),
           "--block-size", "32", "--batch-size", "2", "--steps", "4", "--lora", "--no-progress", "--no-plot"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)},
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "corpus.txt gives 3 blocks of 32 tokens = 1 optimizer step at batch size 2; asked for 4 steps" \
        in done.stdout
