"""The `decoderkit` command, driven as a user drives it: `python -m decoderkit ...` in a subprocess.

The subprocess tests use the shipped model (decoderkit/assets/default-model) when it is present, else a tiny random
Llama saved into a temporary directory. Each subprocess pays for importing torch, so the many bad-input cases and
the cases that need to patch something (Ctrl-C) call `decoderkit.cli.main` in-process instead.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import decoderkit
from decoderkit import cli
from decoderkit.model import DecoderForCausalLM

TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles. ") * 4
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TIMING_FIELDS = {"load_s", "time_to_first_token_s", "total_s", "tokens_per_s"}


# ---------------------------------------------------------------------------------------------- fixtures
def save_tiny_model(directory: Path, max_positions: int = 128) -> Path:
    """A 2-layer random Llama with a byte-level BPE tokenizer and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    model = decoderkit.AutoModelForCausalLM.from_config({
        "model_type": "llama", "vocab_size": tok.get_vocab_size(), "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": max_positions, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2,
    })
    model.save_pretrained(directory)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "chat_template": TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def write_tiny_gguf(path: Path) -> int:
    """A 1-layer llama GGUF with a SentencePiece vocabulary and a Q8_0 embedding; return its parameter count."""
    import gguf

    rng = np.random.default_rng(0)
    pieces = ["\u2581", "a", "b", "\u2581a", "ab", "\u2581ab"]
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces]
    kinds = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, *[gguf.TokenType.BYTE] * 256]
    kinds += [gguf.TokenType.NORMAL] * len(pieces)
    hidden, heads, kv_heads, ffn, vocab = 32, 4, 2, 64, len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(1, len(pieces) + 1)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(TEMPLATE)
    d = hidden // heads
    shapes = {
        "output_norm.weight": (hidden,), "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (heads * d, hidden), "blk.0.attn_k.weight": (kv_heads * d, hidden),
        "blk.0.attn_v.weight": (kv_heads * d, hidden), "blk.0.attn_output.weight": (hidden, heads * d),
        "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    embedding = rng.normal(0, 0.5, (vocab, hidden)).astype(np.float32)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(embedding, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.normal(0, 0.5, shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return embedding.size + sum(int(np.prod(s)) for s in shapes.values())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    """The shipped model when the package has it, else the tiny random one."""
    shipped = cli.default_model_path()
    return shipped if (shipped / "config.json").is_file() else tiny_model


@pytest.fixture(scope="module")
def model_args(model_dir) -> list[str]:
    """`--model` arguments: none at all for the shipped model, so that the default is what gets exercised."""
    return [] if model_dir == cli.default_model_path() else ["--model", str(model_dir)]


@pytest.fixture(scope="module")
def chat_args(model_dir, model_args) -> list[str]:
    has_template = cli._has_chat_template(model_dir)
    return model_args + ([] if has_template else ["--chat-template", TEMPLATE])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, int]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def run_cli(*args: str, stdin: str | bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:
    """`python -m decoderkit ARGS` with stdin as given (empty when None), offline, output captured as text."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    proc = subprocess.run([sys.executable, "-m", "decoderkit", *args], input=data, capture_output=True,
                          env=full_env, timeout=timeout, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


def assert_clean_failure(proc: subprocess.CompletedProcess, code: int, message: str) -> None:
    """A non-zero exit with `message` in one line on stderr and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """`decoderkit ARGS` in this process; (exit status, stdout, stderr)."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------- generate
def test_generate_streams_text_that_matches_the_json_record(model_args):
    prompt = "To be, or not to be"
    text = run_cli("generate", *model_args, "--max-new-tokens", "12", "--greedy", prompt)
    assert text.returncode == 0, text.stderr
    assert "Traceback" not in text.stderr
    assert "\r" not in text.stderr  # no progress bar when stderr is not a terminal
    assert "new tokens in" in text.stderr  # the statistics line
    # The same greedy run through stdin with --json: the streamed text is the decoded completion.
    record_run = run_cli("generate", *model_args, "--max-new-tokens", "12", "--greedy", "--json", stdin=prompt)
    assert record_run.returncode == 0, record_run.stderr
    record = json.loads(record_run.stdout)
    assert set(record) >= {"model", "prompt", "completions", "prompt_tokens", "completion_tokens", "timings"}
    assert record["prompt"] == prompt
    assert text.stdout == record["completions"][0] + "\n"
    assert record["prompt_tokens"] > 0
    assert 1 <= record["completion_tokens"] <= 12
    assert set(record["timings"]) == TIMING_FIELDS
    timings = record["timings"]
    assert 0 < timings["time_to_first_token_s"] <= timings["total_s"]
    assert timings["load_s"] > 0 and timings["tokens_per_s"] > 0
    assert record["interrupted"] is False


def test_generate_several_sampled_completions(capsys, tiny_model):
    args = ("generate", "--model", str(tiny_model), "--max-new-tokens", "6", "--top-k", "20", "--seed", "7", "-n", "3",
            "--json", "--quiet", "To be")
    code, out, err = run_main(capsys, *args)
    assert code == 0 and err == ""
    record = json.loads(out)
    assert len(record["completions"]) == 3
    assert record["completion_tokens"] <= 18
    # --seed makes sampling reproducible
    assert json.loads(run_main(capsys, *args)[1])["completions"] == record["completions"]


def test_ctrl_c_prints_what_was_generated_and_exits_130(capsys, monkeypatch, tiny_model):
    args = ("generate", "--model", str(tiny_model), "--greedy", "To be")
    real_generate = DecoderForCausalLM.generate

    def interrupted_after_three_tokens(self, *a, streamer=None, **kw):
        class Interrupting:
            calls = 0

            def put(self, value):
                self.calls += 1
                if self.calls > 4:  # the prompt, then three tokens
                    raise KeyboardInterrupt
                streamer.put(value)

            def end(self):
                streamer.end()

        return real_generate(self, *a, streamer=Interrupting(), **kw)

    code, expected, _ = run_main(capsys, *args, "--max-new-tokens", "3", "--json")
    with monkeypatch.context() as patch:
        patch.setattr(DecoderForCausalLM, "generate", interrupted_after_three_tokens)
        code, out, err = run_main(capsys, *args, "--max-new-tokens", "50")
    assert code == 130
    assert "interrupted" in err
    assert out == json.loads(expected)["completions"][0] + "\n"


# ---------------------------------------------------------------------------------------------- chat
def test_chat_two_turns_and_reset_through_stdin(chat_args):
    proc = run_cli("chat", *chat_args, "--greedy", "--max-new-tokens", "6", "--system", "You are a poet.", "--verbose",
                   stdin="Hello there\nAnd then?\n/reset\nHello there\n/exit\nnever read\n")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "[history cleared]" in proc.stderr
    prompts = [line for line in proc.stderr.splitlines() if "prompt:" in line]
    # Three turns sent (nothing after /exit); the second carries the history, the third starts afresh.
    assert len(prompts) == 3, proc.stderr
    assert "2 message(s)" in prompts[0] and "4 message(s)" in prompts[1] and "2 message(s)" in prompts[2]
    assert prompts[0].split("prompt:")[1] == prompts[2].split("prompt:")[1]
    assert proc.stdout.count("\n") >= 3


def test_chat_drops_oldest_turns_to_fit_the_context(capsys, monkeypatch, tmp_path):
    short = save_tiny_model(tmp_path / "short", max_positions=40)
    # 40 positions - 12 new tokens leaves 28 prompt tokens: enough for one exchange, not two.
    monkeypatch.setattr(sys, "stdin", io.StringIO("To be or not\nthat is the question\nwhether tis nobler\n"))
    code, _, err = run_main(capsys, "chat", "--model", str(short), "--greedy", "--max-new-tokens", "12")
    assert code == 0
    assert "context window full: dropped the oldest" in err


def test_chat_without_a_template_says_so(capsys, monkeypatch, tmp_path, tiny_model):
    plain = save_tiny_model(tmp_path / "plain")
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    code, _, err = run_main(capsys, "chat", "--model", str(plain))
    assert code == 1 and "has no chat template; pass --chat-template" in err


# ---------------------------------------------------------------------------------------------- info / bench
def test_info_json_describes_the_checkpoint(model_dir):
    proc = run_cli("info", "--json", str(model_dir))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    config = json.loads((model_dir / "config.json").read_text())
    assert record["family"] == config["model_type"]
    assert record["context_length"] == config["max_position_embeddings"]
    assert record["rope_type"] == "default"
    assert record["tokenizer"] is True
    model = decoderkit.AutoModelForCausalLM.from_pretrained(model_dir)
    assert record["parameters"] == model.num_parameters()
    assert record["dtype"] == str(model.dtype).removeprefix("torch.")
    names = {f["name"] for f in record["files"]}
    assert {"config.json", "tokenizer.json"} <= names
    assert record["total_size_bytes"] == sum(f["size_bytes"] for f in record["files"])


def test_info_reads_gguf_headers(capsys, tiny_gguf):
    path, parameters = tiny_gguf
    code, out, _ = run_main(capsys, "info", "--json", str(path))
    assert code == 0
    record = json.loads(out)
    assert record["format"] == "gguf" and record["family"] == "llama" and record["parameters"] == parameters
    assert record["tensor_types"]["Q8_0"] == 265 * 32 and record["tokenizer"] and record["chat_template"]


def test_info_counts_parameters_from_config_without_safetensors(capsys, tmp_path, tiny_model):
    import torch
    from safetensors.torch import load_file

    (tmp_path / "config.json").write_text((tiny_model / "config.json").read_text())
    torch.save(load_file(tiny_model / "model.safetensors"), tmp_path / "pytorch_model.bin")
    code, out, _ = run_main(capsys, "info", "--json", str(tmp_path))
    assert code == 0
    record = json.loads(out)
    assert record["parameters_source"] == "config shapes" and record["tokenizer"] is False
    assert record["parameters"] == decoderkit.AutoModelForCausalLM.from_pretrained(tiny_model).num_parameters()
    code, out, _ = run_main(capsys, "info", str(tiny_model))  # the table
    assert code == 0 and "safetensors headers" in out and "llama" in out


def test_bench_json_reports_speed_and_memory(model_args):
    proc = run_cli("bench", *model_args, "--json", "--batch-size", "2", "--prompt-tokens", "8", "--new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["batch_size"] == 2 and record["prompt_tokens"] == 8 and record["new_tokens"] == 4
    for field in ("prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_s", "total_s", "load_s",
                  "peak_rss_bytes", "weights_bytes"):
        assert record[field] > 0, field
    assert record["cuda_max_allocated_bytes"] is None or record["device"].startswith("cuda")


# ---------------------------------------------------------------------------------------------- convert / train
def test_convert_gguf_to_hf_then_change_dtype(capsys, tiny_gguf, tmp_path):
    path, parameters = tiny_gguf
    hf_dir, bf16_dir = tmp_path / "hf", tmp_path / "bf16"
    proc = run_cli("convert", str(path), str(hf_dir))
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf_dir.iterdir()}
    code, _, err = run_main(capsys, "convert", str(hf_dir), str(bf16_dir), "--dtype", "bf16")
    assert code == 0, err
    code, out, _ = run_main(capsys, "info", "--json", str(bf16_dir))
    record = json.loads(out)
    assert record["dtype"] == "bfloat16" and record["parameters"] == parameters and record["chat_template"]
    # The converted model runs; its SentencePiece tokenizer gives the streamed text and the record the same spaces.
    generate = ("generate", "--model", str(bf16_dir), "--max-new-tokens", "6", "--greedy", "ab")
    code, streamed, err = run_main(capsys, *generate)
    assert code == 0, err
    code, out, err = run_main(capsys, *generate, "--json")
    assert code == 0, err
    assert streamed == json.loads(out)["completions"][0] + "\n"
    # A second conversion into the same, now non-empty, directory needs --force.
    code, _, err = run_main(capsys, "convert", str(hf_dir), str(bf16_dir), "--dtype", "bf16")
    assert code == 1 and "pass --force" in err


def test_train_forwards_to_the_trainer(capsys):
    import importlib.util

    code, _, err = run_main(capsys, "train", "--help")
    if importlib.util.find_spec("decoderkit.training.__main__") is None:
        assert code == 1 and "trainer" in err
    else:
        assert code == 0


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("args, code, message", [
    (["generate", "--model", "/no/such/model", "hi"], 1, "/no/such/model: no such file or directory"),
    (["generate", "--top-p", "1.5", "hi"], 2, "argument --top-p: must be in (0, 1], got 1.5"),
])
def test_bad_input_in_a_subprocess(args, code, message):
    assert_clean_failure(run_cli(*args), code, message)


def test_hub_id_missing_from_the_cache_while_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, _, err = run_main(capsys, "generate", "--model", "no-such-org/no-such-model", "hi")
    assert code == 1 and "not in the Hugging Face cache" in err and "download no-such-org/no-such-model" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, code, message", [
    (["generate", "--max-new-tokens", "-1", "hi"], 2, "--max-new-tokens: must be a positive integer, got -1"),
    (["generate", "--max-new-tokens", "ten", "hi"], 2, "--max-new-tokens: expected an integer, got 'ten'"),
    (["generate", "--temperature", "0", "hi"], 2, "--temperature: must be > 0"),
    (["generate", "--top-k", "-3", "hi"], 2, "--top-k: must be >= 0"),
    (["generate", "--min-p", "2", "hi"], 2, "--min-p: must be in [0, 1]"),
    (["generate", "--repetition-penalty", "-1", "hi"], 2, "--repetition-penalty: must be > 0"),
    (["generate", "--dtype", "int3", "hi"], 2, "unknown dtype 'int3'"),
    (["generate", "--device", "gpu", "hi"], 2, "unknown device 'gpu'"),
    (["generate", "--greedy", "--do-sample", "hi"], 2, "not allowed with argument"),
    (["generate", "--greedy", "-n", "2", "hi"], 2, "--num-return-sequences > 1 needs sampling"),
    (["bench", "--batch-size", "0"], 2, "--batch-size/-b: must be a positive integer"),
    (["bench", "--prompt-tokens", "100", "--new-tokens", "100"], 2, "exceeds the model's context window of 128"),
    (["convert", "SRC", "OUT"], 2, "converting a model directory needs --dtype"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["chat", "--max-new-tokens", "128"], 2, "leaves no room for the conversation"),
    (["generate", "--model", "NOTACHECKPOINT", "hi"], 1, "not a model checkpoint (no config.json"),
    (["generate", "--model", "NOTGGUF", "hi"], 1, "not a model checkpoint (expected a directory"),
    (["info", "BOGUS.gguf"], 1, "truncated or corrupt GGUF file"),
])
def test_bad_input(capsys, tmp_path, tiny_model, args, code, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    (tmp_path / "bogus.gguf").write_bytes(b"GGUF" + b"\1" * 40)
    names = {"NOTACHECKPOINT": tmp_path / "empty", "NOTGGUF": tmp_path / "weights.bin",
             "BOGUS.gguf": tmp_path / "bogus.gguf", "SRC": tiny_model, "OUT": tmp_path / "out"}
    args = [str(names.get(a, a)) for a in args]
    if args[0] in ("generate", "bench", "chat") and "--model" not in args:
        args[1:1] = ["--model", str(tiny_model)]
    code_got, out, err = run_main(capsys, *args)
    assert code_got == code, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_prompt_from_unreadable_or_missing_stdin(capsys, monkeypatch, tiny_model):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 \xff"), encoding="utf-8"))
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_model))
    assert code == 1 and "stdin is not valid UTF-8 text (byte 3: b'\\xe9')" in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi\n\xff\n"), encoding="utf-8"))
    code, out, err = run_main(capsys, "chat", "--model", str(tiny_model), "--max-new-tokens", "2")
    assert code == 1 and "stdin is not valid UTF-8 text (byte 0" in err and out  # the first line was answered
    monkeypatch.setattr(sys, "stdin", None)
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_model))
    assert code == 2 and "stdin is closed" in err


def test_verbose_shows_the_traceback(capsys):
    code, _, err = run_main(capsys, "info", "--verbose", "/no/such/model")
    assert code == 1 and "Traceback" in err and "no such file or directory" in err.splitlines()[-1]


def test_cuda_device_is_checked(capsys, tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_main(capsys, "generate", "--model", str(tiny_model), "--device", "cuda", "hi")
    assert code == 1 and "CUDA is not available" in err


@pytest.mark.parametrize("command", ["generate", "chat", "bench", "info", "convert"])
def test_help(capsys, command):
    code, out, _ = run_main(capsys, command, "--help")
    assert code == 0 and f"usage: decoderkit {command}" in out


def test_serve_is_forwarded_to_the_server(capsys):
    """`decoderkit serve` hands every argument, --help included, to the server's own parser."""
    code, out, _ = run_main(capsys, "serve", "--help")
    assert code == 0
    assert "OpenAI-compatible server" in out and "--api-key" in out
    code, _, err = run_main(capsys, "serve", "--model", "/definitely/not/here")
    assert code != 0
    assert "/definitely/not/here" in err
