"""LoRA adapters on the command line (issue 12, item 6): `--adapter DIR` on generate / chat / bench, serve's
`--adapter NAME=DIR`, and `decoderkit merge BASE ADAPTER OUT`, with PEFT's merge as the oracle."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from test_cli import TEXT, run_cli, run_main, save_tiny_model
from test_cli_contract import first_line, wait_until_healthy

import decoderkit
from decoderkit.training.lora import LoraConfig, apply_lora, save_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("adapters") / "tiny")


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    """A LoRA on q, v and down of `tiny` with large random B, so that it changes what the model says."""
    model = decoderkit.AutoModelForCausalLM.from_pretrained(tiny)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "poet")


def completion(capsys, *args: str) -> str:
    code, out, err = run_main(capsys, "generate", "--greedy", "--max-new-tokens", "6", "--json", *args)
    assert code == 0, err
    return json.loads(out)["completions"][0]


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.slow
def test_a_trained_adapter_generates_and_merges_as_peft_does(capsys, tmp_path, tiny):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 4)
    # transformers' spellings of the flags, as a user copying a script would type them.
    proc = run_cli("train", "--model", str(tiny), "--data", str(corpus), "--output_dir", str(tmp_path / "run"),
                   "--lora", "--lora-targets", "all-linear", "--max_steps", "3", "--learning_rate", "0.05",
                   "--block-size", "32", "--batch-size", "2", "--no-progress", "--no-plot")
    assert proc.returncode == 0, proc.stderr
    trained = tmp_path / "run" / "final"
    proc = run_cli("merge", str(tiny), str(trained), str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "merged").iterdir()}

    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation="eager")
    expected = peft.PeftModel.from_pretrained(base, trained).merge_and_unload().eval()
    ours = decoderkit.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    want, got = hf_logits(expected, ids), hf_logits(ours, ids)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    plain = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation="eager")
    assert ((hf_logits(plain, ids) - want).norm() / want.norm()).item() > 1e-3  # the adapter did change the model

    # --adapter merges on load: the same text as the merged checkpoint.
    assert completion(capsys, "--model", str(tiny), "--adapter", str(trained), "To be") == completion(
        capsys, "--model", str(tmp_path / "merged"), "To be")


def test_adapter_on_generate_chat_and_bench(capsys, monkeypatch, tiny, adapter):
    import io

    with_adapter = completion(capsys, "--model", str(tiny), "--adapter", str(adapter), "To be")
    assert with_adapter != completion(capsys, "--model", str(tiny), "To be")
    monkeypatch.setattr(sys, "stdin", io.StringIO("To be\n"))
    code, out, err = run_main(capsys, "chat", "--model", str(tiny), "--adapter", str(adapter), "--greedy",
                              "--max-new-tokens", "4")
    assert code == 0, err
    code, out, err = run_main(capsys, "bench", "--model", str(tiny), "--adapter", str(adapter), "-p", "4", "-n", "2",
                              "--json")
    assert code == 0 and json.loads(out)["new_tokens"] == 2, err


def test_adapters_that_do_not_fit(capsys, tmp_path, tiny, adapter):
    wider = decoderkit.AutoModelForCausalLM.from_config({**json.loads((tiny / "config.json").read_text()),
                                                          "intermediate_size": 96})
    wider.save_pretrained(tmp_path / "wider")
    (tmp_path / "wider" / "tokenizer.json").write_bytes((tiny / "tokenizer.json").read_bytes())
    code, _, err = run_main(capsys, "generate", "--model", str(tmp_path / "wider"), "--adapter", str(adapter), "hi")
    assert code == 1 and f"--adapter {adapter}: does not fit this base model" in err
    assert re.search(r"down_proj\.lora_A\.weight has shape \(4, 64\); this model expects \(4, 96\)", err), err
    assert len(err.strip().splitlines()) == 1

    (tmp_path / "empty").mkdir()
    for where, message in [(tiny, "not a LoRA adapter directory (no adapter_config.json or adapter_model.safetensors)"
                                  "; it looks like a full model, pass it as --model"),
                           (tmp_path / "empty", "not a LoRA adapter directory"),
                           (tmp_path / "none", "no such directory")]:
        code, _, err = run_main(capsys, "generate", "--model", str(tiny), "--adapter", str(where), "hi")
        assert code == 1 and f"--adapter {where}: {message}" in err
    code, _, err = run_main(capsys, "generate", "--model", str(tiny), "--adapter", str(adapter), "--quantize", "int8",
                            "hi")
    assert code == 2 and "--quantize int8 cannot be combined with it" in err


def test_merge_writes_once_unless_overwrite(capsys, tmp_path, tiny, adapter):
    out = tmp_path / "merged"
    assert run_main(capsys, "merge", str(tiny), str(adapter), str(out))[0] == 0
    first = (out / "model.safetensors").read_bytes()
    code, _, err = run_main(capsys, "merge", str(tiny), str(adapter), str(out))
    assert code == 1 and "directory is not empty; pass --overwrite" in err
    # A failing merge leaves what is there as it was, and no temporary directory beside it.
    code, _, err = run_main(capsys, "merge", str(tiny), str(tiny), str(out), "--overwrite")
    assert code == 1 and "ADAPTER" in err and "not a LoRA adapter directory" in err
    assert (out / "model.safetensors").read_bytes() == first
    assert run_main(capsys, "merge", str(tiny), str(adapter), str(out), "--overwrite", "--dtype", "bf16")[0] == 0
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert completion(capsys, "--model", str(out), "To be") == completion(
        capsys, "--model", str(tiny), "--adapter", str(adapter), "--dtype", "bf16", "To be")


@pytest.mark.slow
def test_serve_serves_each_adapter_as_a_model(capsys, tiny, adapter):
    proc = subprocess.Popen([sys.executable, "-m", "decoderkit", "serve", "--model", str(tiny), "--port", "0",
                             "--adapter", f"poet={adapter}", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        line = first_line(proc)
        assert "serving tiny (+ adapters: poet)" in line, line
        base = "http://127.0.0.1:" + re.search(r"127\.0\.0\.1:(\d+)/v1", line).group(1)
        wait_until_healthy(base, proc)
        assert [m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]] == ["tiny", "poet"]

        def served(model: str) -> httpx.Response:
            return httpx.post(f"{base}/v1/completions", timeout=60, json={
                "model": model, "prompt": "To be", "max_tokens": 6, "temperature": 0})

        assert served("poet").json()["choices"][0]["text"] == completion(
            capsys, "--model", str(tiny), "--adapter", str(adapter), "To be")
        assert served("tiny").json()["choices"][0]["text"] == completion(capsys, "--model", str(tiny), "To be")
        missing = served("nope")
        assert missing.status_code == 404 and "serves `tiny`, `poet`" in missing.json()["error"]["message"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_bad_adapter_before_loading(capsys, tmp_path):
    # The model does not exist: had it been loaded first, that would be the error.
    code, _, err = run_main(capsys, "serve", "--model", "/no/such/model", "--port", "0", "--adapter", f"x={tmp_path}")
    assert code == 1 and f"--adapter {tmp_path}: not a LoRA adapter directory" in err
    assert len(err.strip().splitlines()) == 1
