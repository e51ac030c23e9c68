"""What decoderkit writes stands on its own: a LoRA adapter names its base model (so PEFT's AutoPeftModel loads it with
nothing else said), and every file of a saved directory has the same permissions, the umask's."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import oracle
import pytest
import torch

from decoderkit import AutoModelForCausalLM
from decoderkit.training import LoraConfig, PackedDataset, Trainer, TrainingArguments, apply_lora, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def ids(batch: int = 2, n: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 97, (batch, n), generator=torch.Generator().manual_seed(seed))


def trainer_for(model, output_dir: Path, tokenizer=None, **args) -> Trainer:
    defaults = dict(output_dir=str(output_dir), max_steps=2, per_device_batch_size=4, learning_rate=2e-2,
                    progress=False, plot=False)
    return Trainer(model, TrainingArguments(**{**defaults, **args}), PackedDataset(ids(8, 16, seed=1)),
                   tokenizer=tokenizer)


def test_auto_peft_model_loads_the_trained_adapter_alone(tmp_path, monkeypatch):
    oracle.save(oracle.build("llama"), tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLM.from_pretrained("base")  # a relative path: the adapter must not depend on the cwd
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainer_for(model, tmp_path / "run").train()
    adapter = tmp_path / "run/final"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")

    monkeypatch.chdir(tmp_path.parent)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids()).logits
        expected = theirs(input_ids=ids()).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32,
                                                                 attn_implementation="eager")(input_ids=ids()).logits
    assert oracle.rel_err(expected, base) > 1e-3  # the adapter was trained: equality below means something
    assert oracle.rel_err(ours, expected) < 1e-5


def test_adapter_names_the_hub_id_its_base_came_from(tmp_path, monkeypatch):
    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub/models--tiny-org--tiny-llama/snapshots" / sha
    oracle.save(oracle.build("llama"), snapshot)
    (tmp_path / "hub/models--tiny-org--tiny-llama/refs").mkdir()
    (tmp_path / "hub/models--tiny-org--tiny-llama/refs/main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = apply_lora(AutoModelForCausalLM.from_pretrained("tiny-org/tiny-llama"), LoraConfig(r=2))
    adapter = save_adapter(model, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "tiny-org/tiny-llama"
    adapter = save_adapter(model, tmp_path / "named", base_model_name_or_path="org/other")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/other"


def _tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from decoderkit import AutoTokenizer

    directory.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox"] * 4, trainers.BpeTrainer(vocab_size=60, show_progress=False,
                                                                             special_tokens=["<pad>", "</s>"]))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>", "eos_token": "</s>"}))
    return AutoTokenizer.from_pretrained(directory)


def test_every_file_of_a_saved_directory_has_the_same_permissions(tmp_path):
    umask = 0o027  # not the usual 0o022: the modes must follow the umask, not a fixed 0o644
    base = oracle.save(oracle.build("llama"), tmp_path / "base")
    tokenizer = _tokenizer(tmp_path / "tokenizer")
    previous = os.umask(umask)
    try:
        model = AutoModelForCausalLM.from_pretrained(base)
        model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")  # shards and their index
        tokenizer.save_pretrained(tmp_path / "sharded")
        model.save_pretrained(tmp_path / "model", max_shard_size="20KB")
        model.save_pretrained(tmp_path / "model")  # over an earlier save: files replaced one by one
        apply_lora(model, LoraConfig(r=2))
        save_adapter(model, tmp_path / "adapter")
        trainer_for(model, tmp_path / "run", tokenizer, save_steps=2).train()  # checkpoint-2 and final/
        full = AutoModelForCausalLM.from_pretrained(base)
        trainer_for(full, tmp_path / "full", tokenizer, save_steps=2).train()
    finally:
        os.umask(previous)
    directories = [tmp_path / name for name in ("sharded", "model", "adapter", "run/checkpoint-2", "run/final",
                                                 "full/checkpoint-2", "full/final")]
    expected = 0o666 & ~umask
    for directory in directories:
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in directory.iterdir() if p.is_file()}
        assert any(name.endswith(".safetensors") for name in modes), directory
        assert set(modes.values()) == {oct(expected)}, f"{directory.name}: {modes}"
