"""The Trainer and the data loaders: every head learns, checkpoints resume exactly, bad inputs fail clearly.

Models are tiny Llama configs built with `from_config`; the tokenizer is a byte-level BPE trained on the spot with the
`tokenizers` library (with a chat template), loaded through decoderkit's AutoTokenizer.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from decoderkit import DecoderConfig
from decoderkit.model import HEAD_CLASSES
from decoderkit.training import (
    IGNORE_INDEX,
    PackedDataset,
    Trainer,
    TrainingArguments,
    list_checkpoints,
    load_chat_dataset,
    load_classification_dataset,
    load_qa_dataset,
    load_text_dataset,
    load_token_classification_dataset,
)
from decoderkit.training.__main__ import main as cli_main
from decoderkit.training.trainer import lr_lambda

ASSET = Path(__file__).resolve().parents[1] / "src/decoderkit/assets/default-model"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
WORDS = ("the quick brown fox jumps over a lazy dog while good kings and bad queens sing songs of old "
         "Paris London Rome are cities where people live and work").split()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHAT_TEMPLATE,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from decoderkit import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def tiny_config(**overrides) -> dict:
    return {**dict(model_type="llama", vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2), **overrides}


def tiny_model(head: str = "causal_lm", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return HEAD_CLASSES[head].from_config(tiny_config(**overrides))


def args_for(tmp_path: Path, **overrides) -> TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "run"), max_steps=20, per_device_batch_size=4, learning_rate=1e-2,
                    warmup_steps=2, progress=False, plot=False, save_final=False, logging_steps=5)
    return TrainingArguments(**{**defaults, **overrides})


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def falls(losses: list[float]) -> bool:
    k = max(2, len(losses) // 5)
    return sum(losses[-k:]) / k < 0.7 * sum(losses[:k]) / k


# ------------------------------------------------------------------------------------------------- every head learns
def test_causal_lm_on_text_learns_and_writes_outputs(tmp_path, tokenizer):
    text = tmp_path / "a.txt"
    text.write_text(" ".join(WORDS * 12))
    data = load_text_dataset([text], tokenizer, block_size=32)
    assert data.blocks.shape[1] == 32 and int(data.blocks[0, 0]) == tokenizer.bos_token_id
    model = tiny_model()
    trainer = Trainer(model, args_for(tmp_path, max_steps=30, save_final=True, plot=True, eval_steps=15),
                      data, eval_dataset=data, tokenizer=tokenizer)
    result = trainer.train()
    assert falls(result.losses), str([round(v, 2) for v in result.losses])
    assert [e["step"] for e in result.eval_history] == [15, 30]
    last = result.eval_history[-1]
    assert math.isclose(last["eval_perplexity"], math.exp(last["eval_loss"]), rel_tol=1e-9)
    assert 0.0 <= last["eval_accuracy"] <= 1.0
    out = tmp_path / "run"
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert len((out / "log.jsonl").read_text().splitlines()) == 6 + 2  # losses every 5 steps, two evaluations
    from decoderkit import AutoModelForCausalLM, AutoTokenizer

    reloaded = AutoModelForCausalLM.from_pretrained(out / "final")
    x = data.blocks[:2]
    torch.testing.assert_close(reloaded(input_ids=x).logits, model.eval()(input_ids=x).logits)
    assert AutoTokenizer.from_pretrained(out / "final").encode("the fox") == tokenizer.encode("the fox")


def test_sequence_classification_learns(tmp_path, tokenizer):
    records = [{"text": f"{a} {b} {w}", "label": int(w in ("good", "kings"))}
               for a in ("the", "a", "old") for b in ("fox", "dog") for w in ("good", "bad", "kings", "queens")]
    data = load_classification_dataset(write_jsonl(tmp_path / "cls.jsonl", records), tokenizer, num_labels=2)
    assert data[0]["labels"] == 1 and data[0]["input_ids"][0] == tokenizer.bos_token_id
    result = Trainer(tiny_model("sequence_classification"), args_for(tmp_path, max_steps=25), data,
                     eval_dataset=data, tokenizer=tokenizer).train()
    assert falls(result.losses), str([round(v, 2) for v in result.losses])
    assert result.eval_history[-1]["eval_accuracy"] >= 0.9


def test_token_classification_learns_from_csv(tmp_path, tokenizer):
    rows = ["tokens,labels"]
    for i in range(24):
        words = [WORDS[(i * 3 + k) % len(WORDS)] for k in range(5)]
        rows.append(f"{' '.join(words)},{' '.join(str(int(w[0].isupper())) for w in words)}")
    (tmp_path / "tok.csv").write_text("\n".join(rows) + "\n")
    data = load_token_classification_dataset(tmp_path / "tok.csv", tokenizer, num_labels=2)
    first = data[0]
    # One label per word on its first token; other tokens (BOS, word continuations) are ignored.
    assert sum(label != IGNORE_INDEX for label in first["labels"]) == 5
    assert first["labels"][0] == IGNORE_INDEX
    result = Trainer(tiny_model("token_classification", classifier_dropout=0.0), args_for(tmp_path, max_steps=25),
                     data, eval_dataset=data, tokenizer=tokenizer).train()
    assert falls(result.losses), str([round(v, 2) for v in result.losses])
    assert result.eval_history[-1]["eval_accuracy"] >= 0.9


def test_question_answering_learns(tmp_path, tokenizer):
    records = []
    for i in range(16):
        city = ("Paris", "London", "Rome")[i % 3]
        who = WORDS[i % 8]
        records.append({"question": "where do people live", "context": f"{who} and the dog live in {city} now",
                        "answer": city})
    data = load_qa_dataset(write_jsonl(tmp_path / "qa.jsonl", records), tokenizer)
    ex = data[0]
    answer = tokenizer.decode(ex["input_ids"][ex["start_positions"]:ex["end_positions"] + 1])
    assert answer.strip() == "Paris"
    result = Trainer(tiny_model("question_answering"), args_for(tmp_path, max_steps=25), data, eval_dataset=data,
                     tokenizer=tokenizer).train()
    assert falls(result.losses), str([round(v, 2) for v in result.losses])


def test_chat_loss_only_on_assistant_turns(tmp_path, tokenizer):
    convo = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"},
             {"role": "assistant", "content": "jumps over"}, {"role": "user", "content": "the dog"},
             {"role": "assistant", "content": "is lazy"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": convo}] * 8)
    data = load_chat_dataset(path, tokenizer)
    ex = data[0]
    rendered = tokenizer.apply_chat_template(convo, tokenize=False)
    assert tokenizer.decode(ex["input_ids"]) == rendered
    trained = [t if t != IGNORE_INDEX else None for t in ex["labels"]]
    spans, current = [], []
    for token in trained + [None]:
        if token is None and current:
            spans.append(tokenizer.decode(current))
            current = []
        elif token is not None:
            current.append(token)
    # Exactly the assistant replies with their end-of-turn token; never the prompt, system or user text.
    assert spans == ["jumps over</s>\n", "is lazy</s>\n"]
    result = Trainer(tiny_model(), args_for(tmp_path, max_steps=15), data, tokenizer=tokenizer).train()
    assert falls(result.losses), str([round(v, 2) for v in result.losses])


# ------------------------------------------------------------------------------------------------- the loop itself
def test_lr_schedule_warms_up_then_decays_to_floor():
    values = [lr_lambda(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert values[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert values[20] == pytest.approx(0.1)


def test_accumulation_and_checkpointing_change_nothing(tmp_path):
    blocks = torch.randint(3, 320, (16, 24), generator=torch.Generator().manual_seed(0))
    data = PackedDataset(blocks)
    base = Trainer(tiny_model(), args_for(tmp_path / "a", max_steps=4), data).train().losses
    accum = Trainer(tiny_model(), args_for(tmp_path / "b", max_steps=4, per_device_batch_size=2,
                                           gradient_accumulation_steps=2), data).train().losses
    ckpt = Trainer(tiny_model(), args_for(tmp_path / "c", max_steps=4, gradient_checkpointing=True),
                   data).train().losses
    assert accum == pytest.approx(base, rel=1e-5)
    assert ckpt == pytest.approx(base, rel=1e-5)


def test_padded_batches_weight_every_token_once(tmp_path, tokenizer):
    """With accumulation, the step loss is the mean over all target tokens of the step, not a mean of means."""
    convos = [[{"role": "user", "content": "the fox"}, {"role": "assistant", "content": " ".join(WORDS[:n])}]
              for n in (1, 9, 2, 12, 3, 7, 1, 5)]
    data = load_chat_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convos]), tokenizer)
    one = Trainer(tiny_model(), args_for(tmp_path / "a", max_steps=2, shuffle=False), data).train().losses
    two = Trainer(tiny_model(), args_for(tmp_path / "b", max_steps=2, shuffle=False, per_device_batch_size=1,
                                         gradient_accumulation_steps=4), data).train().losses
    assert two == pytest.approx(one, rel=1e-5)


def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path):
    # Dropout on, shuffling on, accumulation on: the RNG states and the data position must all come back.
    blocks = torch.randint(3, 320, (24, 16), generator=torch.Generator().manual_seed(0))
    data = PackedDataset(blocks)
    kwargs = dict(max_steps=8, per_device_batch_size=2, gradient_accumulation_steps=2, save_steps=3,
                  save_total_limit=None)
    full = Trainer(tiny_model(attention_dropout=0.2), args_for(tmp_path / "full", **kwargs), data).train()
    assert [p.name for p in list_checkpoints(tmp_path / "full/run")] == ["checkpoint-3", "checkpoint-6"]
    # An "interrupted" run: only the step-3 checkpoint survived.
    resumed_dir = tmp_path / "resumed/run"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full/run/checkpoint-3", resumed_dir / "checkpoint-3")
    torch.manual_seed(123)  # the resumed process starts from unrelated RNG state and a fresh model
    resumed = Trainer(tiny_model(seed=5, attention_dropout=0.2),
                      args_for(tmp_path / "resumed", resume_from="latest", **kwargs), data).train()
    assert resumed.losses == full.losses  # bit-for-bit
    assert len(full.losses) == 8 and len(set(full.losses)) == 8


def test_checkpoint_write_is_atomic_and_never_clobbers(tmp_path):
    data = PackedDataset(torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(0)))
    Trainer(tiny_model(), args_for(tmp_path, max_steps=2, save_steps=2), data).train()
    run = tmp_path / "run"
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no staging leftovers
    saved = {p.name: p.read_bytes() for p in (run / "checkpoint-2").iterdir()}
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(tiny_model(), args_for(tmp_path, max_steps=2, save_steps=2), data).train()
    with pytest.raises(ValueError, match="different model"):
        Trainer(tiny_model(hidden_size=48), args_for(tmp_path, max_steps=4, resume_from="latest"), data).train()
    with pytest.raises(ValueError, match="different model"):
        Trainer(tiny_model("sequence_classification"), args_for(tmp_path, resume_from=str(run / "checkpoint-2")),
                PackedDataset(torch.randint(3, 320, (8, 16)))).train()
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        Trainer(tiny_model(), args_for(tmp_path, resume_from=str(run / "checkpoint-9")), data).train()
    assert {p.name: p.read_bytes() for p in (run / "checkpoint-2").iterdir()} == saved


class _RunsCode:
    """Unpickles by calling exec: what a crafted checkpoint would hold to run code on the machine that resumes it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_rng_state_is_plain_tensors_and_numbers_and_round_trips(tmp_path):
    import random

    import numpy as np

    data = PackedDataset(torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(0)))
    Trainer(tiny_model(), args_for(tmp_path, max_steps=2, save_steps=2), data).train()
    # What resuming reads must load without unpickling arbitrary objects (numpy arrays included).
    torch.load(tmp_path / "run/checkpoint-2/rng_state_0.pt", weights_only=True)
    from decoderkit.training.rng import load_rng_state, rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # a cached second normal is part of both states
    torch.save(rng_state(), tmp_path / "rng.pt")

    def draws():
        return (random.random(), random.gauss(0, 1), float(np.random.standard_normal()), float(np.random.rand()),
                torch.rand(3).tolist())

    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(load_rng_state(tmp_path / "rng.pt"))
    assert draws() == expected


def test_resume_refuses_an_rng_file_that_would_run_code(tmp_path):
    data = PackedDataset(torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(0)))
    Trainer(tiny_model(), args_for(tmp_path, max_steps=2, save_steps=2), data).train()
    marker = tmp_path / "code-ran"
    torch.save({"python": _RunsCode(marker)}, tmp_path / "run/checkpoint-2/rng_state_0.pt")
    trainer = Trainer(tiny_model(seed=1), args_for(tmp_path, max_steps=4, resume_from="latest"), data)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(ValueError, match=r"rng_state_0.pt: not an RNG state that loads safely .*Unpickl"):
        trainer.train()
    assert not marker.exists()
    assert trainer.step == 0
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())  # nothing was restored


def test_trainer_refuses_a_non_empty_output_dir(tmp_path):
    data = PackedDataset(torch.randint(3, 320, (8, 16), generator=torch.Generator().manual_seed(0)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"run is not empty \(it holds notes.txt\); pass overwrite_output_dir=True"):
        Trainer(tiny_model(), args_for(tmp_path, max_steps=2), data).train()
    with pytest.raises(ValueError, match="and no checkpoint to resume from"):
        Trainer(tiny_model(), args_for(tmp_path, max_steps=2, resume_from="latest"), data).train()
    first = Trainer(tiny_model(), args_for(tmp_path, max_steps=4, save_steps=2, save_total_limit=None,
                                           overwrite_output_dir=True), data).train()
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(ValueError, match=r"already holds checkpoints .*checkpoint-4.*resume_from='latest'.*"
                                         r"overwrite_output_dir=True"):
        Trainer(tiny_model(), args_for(tmp_path, max_steps=2), data).train()
    second = Trainer(tiny_model(seed=1), args_for(tmp_path, max_steps=3, save_steps=3, overwrite_output_dir=True),
                     data).train()
    # The earlier run's checkpoints and log are gone (not mixed with or pruned in favour of the new ones); the
    # user's own file stays.
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-3"]
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [3]
    assert (run / "notes.txt").read_text() == "mine"
    assert len(first.losses) == 4 and len(second.losses) == 3


# ------------------------------------------------------------------------------------------------- bad inputs
def test_missing_and_empty_data_files(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.txt: no such data file"):
        load_text_dataset([tmp_path / "nope.txt"], tokenizer, 16)
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl: the data file is empty"):
        load_chat_dataset(tmp_path / "empty.jsonl", tokenizer)
    (tmp_path / "short.txt").write_text("the fox")
    with pytest.raises(ValueError, match="fewer than one block"):
        load_text_dataset([tmp_path / "short.txt"], tokenizer, 64)


def test_jsonl_errors_name_the_line(tmp_path, tokenizer):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the fox"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [good, good, {"conversation": []}])
    with pytest.raises(ValueError, match=r"chat.jsonl:3: missing field 'messages'"):
        load_chat_dataset(path, tokenizer)
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "{not json"])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        load_chat_dataset(path, tokenizer)
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": "the fox", "label": 1}, {"txt": "a dog", "label": 0}])
    with pytest.raises(ValueError, match=r"cls.jsonl:2: missing field 'text'"):
        load_classification_dataset(path, tokenizer, num_labels=2)
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "context": "the fox", "answer": "dog"}])
    with pytest.raises(ValueError, match=r"qa.jsonl:1: the answer 'dog' does not occur"):
        load_qa_dataset(path, tokenizer)


def test_labels_outside_num_labels(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "cls.jsonl", [{"text": "the fox", "label": 1}, {"text": "a dog", "label": 3}])
    with pytest.raises(ValueError, match=r"cls.jsonl:2: label 3 is outside \[0, 2\] \(num_labels=3\)"):
        load_classification_dataset(path, tokenizer, num_labels=3)
    (tmp_path / "tok.csv").write_text("tokens,labels\nthe fox,0 1\na dog,0 -1\n")
    with pytest.raises(ValueError, match=r"tok.csv:3: word 1: label -1 is outside"):
        load_token_classification_dataset(tmp_path / "tok.csv", tokenizer, num_labels=2)
    (tmp_path / "n.csv").write_text("tokens,labels\nthe fox jumps,0 1\n")
    with pytest.raises(ValueError, match=r"n.csv:2: 3 words but 2 labels"):
        load_token_classification_dataset(tmp_path / "n.csv", tokenizer, num_labels=2)


# ------------------------------------------------------------------------------------------------- command line
def test_cli_trains_from_config_and_with_lora(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    (tmp_path / "train.txt").write_text(" ".join(WORDS * 8))
    common = ["--data", str(tmp_path / "train.txt"), "--block-size", "32", "--steps", "6", "--batch-size", "2",
              "--no-progress", "--no-plot", "--lr", "3e-3"]
    assert cli_main(["--model", str(tmp_path / "config.json"), "--tokenizer", str(tokenizer_dir),
                     "--out", str(tmp_path / "full"), *common]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 6 and summary["final_loss"] < 6.0
    final = tmp_path / "full/final"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert cli_main(["--model", str(final), "--out", str(tmp_path / "lora"), "--lora", "--lora-r", "2", "--merge",
                     *common]) == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "lora/final").iterdir()}
    assert (tmp_path / "lora/merged/model.safetensors").exists()
    # A bad input is an error message and exit status 1, not a traceback.
    assert cli_main(["--model", str(final), "--out", str(tmp_path / "x"), "--data", str(tmp_path / "none.txt")]) == 1
    assert "none.txt: no such data file" in capsys.readouterr().err


def test_cli_train_refuses_an_earlier_run_unless_overwrite_or_resume(tmp_path, tokenizer_dir, capsys):
    from decoderkit import cli

    base = tmp_path / "base"
    tiny_model().save_pretrained(base)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, base / file.name)
    (tmp_path / "train.txt").write_text(" ".join(WORDS * 8))
    out = tmp_path / "out"
    common = ["--model", str(base), "--data", str(tmp_path / "train.txt"), "--out", str(out), "--block-size", "32",
              "--batch-size", "2", "--no-progress", "--no-plot", "--lora", "--lora-r", "2", "--logging-steps", "1"]

    def train(*extra: str) -> tuple[int, str]:
        code = cli.main(["train", *common, *extra])
        return code, capsys.readouterr().err

    def logged_steps() -> list[int]:
        return [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]

    # The issue's case: a finished run without checkpoints (adapter, merged model, log), then a second run.
    assert train("--steps", "4", "--merge")[0] == 0
    adapter = (out / "final/adapter_model.safetensors").read_bytes()
    code, err = train("--steps", "1")
    assert code == 1 and "out is not empty (it holds final, log.jsonl, merged); pass --overwrite" in err
    assert (out / "final/adapter_model.safetensors").read_bytes() == adapter and logged_steps() == [1, 2, 3, 4]

    assert train("--steps", "2", "--save-steps", "2", "--overwrite")[0] == 0
    # The earlier run is gone as a whole: no stale merged model, a log of this run only, a new adapter.
    assert not (out / "merged").exists()
    assert logged_steps() == [1, 2]
    assert (out / "final/adapter_model.safetensors").read_bytes() != adapter
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]

    code, err = train("--steps", "1")
    assert code == 1
    assert "already holds checkpoints of an earlier run (checkpoint-2); pass --resume latest" in err
    assert "or --overwrite" in err

    assert train("--steps", "3", "--save-steps", "2", "--resume", "latest")[0] == 0
    assert logged_steps() == [1, 2, 3]  # continued, not restarted

    (tmp_path / "other").mkdir()
    (tmp_path / "other/notes.txt").write_text("mine")
    code = cli.main(["train", *common[:4], "--out", str(tmp_path / "other"), *common[6:], "--steps", "1",
                     "--resume", "latest"])
    err = capsys.readouterr().err
    assert code == 1 and "not empty (it holds notes.txt) and no checkpoint to resume from" in err
    assert "--overwrite" in err


# ------------------------------------------------------------------------------------------------- shipped model
@pytest.mark.skipif(not (ASSET / "model.safetensors").exists(),
                    reason="the default model is not built yet (run scripts/train_default_model.py)")
def test_shipped_model_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from decoderkit import AutoModelForCausalLM, AutoTokenizer

    size_mb = sum(p.stat().st_size for p in ASSET.iterdir()) / 1e6
    assert size_mb <= 25
    config = DecoderConfig.from_pretrained(ASSET)
    assert config.model_type == "llama" and config.dtype == "bfloat16"
    tok = AutoTokenizer.from_pretrained(ASSET)
    ids = tok("ROMEO.\nBut soft, what light through yonder window breaks?", return_tensors="pt")["input_ids"]
    assert int(ids[0, 0]) == tok.bos_token_id
    ours = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert float((a - b).abs().max() / b.abs().max()) < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(ASSET)
    assert hf_tok("To be, or not to be")["input_ids"] == tok("To be, or not to be")["input_ids"]
    chat = [{"role": "user", "content": "Speak."}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
