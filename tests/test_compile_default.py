"""The compiled decode step as the command line's default, and inductor's on-disk cache shared between models.

The suite runs with DECODERKIT_COMPILE=0 (conftest.py); these tests take it away to see the real default (auto:
the AOTInductor-packaged step where one is on disk, else eager).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import run_cli, run_main

import decoderkit
from decoderkit import cli
from decoderkit.cli import common, text

SHIPPED = cli.default_model_path()
PROMPT = "To be, or not to be"


@pytest.fixture
def recorded_kwargs(monkeypatch) -> list[dict]:
    """`generate` keyword arguments the CLI passes, without generating (so nothing is compiled)."""
    calls: list[dict] = []
    monkeypatch.setattr(text, "run_generate", lambda model, ids, kwargs, streamer: calls.append(kwargs) or True)
    # and no background build of the packaged step
    monkeypatch.setattr(text, "build_step_in_background", lambda *args: None)
    monkeypatch.delenv("DECODERKIT_COMPILE", raising=False)
    _unset_inductor_cache_dir(monkeypatch)
    _unset(monkeypatch, "DECODERKIT_KERNELS")  # an auto run sets it to "cached"
    return calls


@pytest.fixture(autouse=True)
def _restore_inductor_config():
    """The CLI turns inductor's weight prepacking off for the process: give this test process its setting back."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.weight_prepack": inductor_config.cpp.weight_prepack}):
        yield


def _unset(monkeypatch, name: str) -> None:
    # set first, so that monkeypatch also removes the value the code under test sets
    monkeypatch.setenv(name, "unset")
    monkeypatch.delenv(name)


def _unset_inductor_cache_dir(monkeypatch) -> None:
    _unset(monkeypatch, "TORCHINDUCTOR_CACHE_DIR")


def test_generate_compiles_when_asked(capsys, recorded_kwargs, monkeypatch, tmp_path):
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(tmp_path / "dk"))
    code, _, err = run_main(capsys, "generate", "--device", "cpu", "--max-new-tokens", "4", PROMPT)
    assert code == 0, err
    # auto by default: the packaged step if it is on disk, else eager (see resolve_compile); no torch.compile
    assert recorded_kwargs[-1]["compile"] == "auto"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("DECODERKIT_COMPILE", "1")
    code, _, err = run_main(capsys, "generate", "--device", "cpu", "--max-new-tokens", "4", PROMPT)
    assert code == 0, err
    assert recorded_kwargs[-1]["compile"] is True
    # Turning compilation on points inductor's caches at decoderkit's directory
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "dk" / "inductor")


def test_no_compile_flag_and_environment_turn_it_off(capsys, recorded_kwargs, monkeypatch):
    code, _, err = run_main(capsys, "generate", "--device", "cpu", "--no-compile", "--max-new-tokens", "4", PROMPT)
    assert code == 0, err
    assert recorded_kwargs[-1]["compile"] is False
    monkeypatch.setenv("DECODERKIT_COMPILE", "0")
    assert run_main(capsys, "generate", "--device", "cpu", "--max-new-tokens", "4", PROMPT)[0] == 0
    assert recorded_kwargs[-1]["compile"] is False
    # The flag wins over the environment
    assert run_main(capsys, "generate", "--device", "cpu", "--compile", "--max-new-tokens", "4", PROMPT)[0] == 0
    assert recorded_kwargs[-1]["compile"] is True


def test_a_bad_compile_environment_value_is_named(capsys, recorded_kwargs, monkeypatch):
    monkeypatch.setenv("DECODERKIT_COMPILE", "sometimes")
    code, _, err = run_main(capsys, "generate", "--device", "cpu", "--max-new-tokens", "4", PROMPT)
    assert code == 1
    assert "DECODERKIT_COMPILE='sometimes'" in err and "expected one of" in err
    assert recorded_kwargs == []


def test_a_user_chosen_inductor_cache_dir_is_kept(monkeypatch, tmp_path):
    _unset_inductor_cache_dir(monkeypatch)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(tmp_path / "dk"))
    common.use_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


def _random_default_size_model(directory: Path, seed: int) -> Path:
    """The shipped model's architecture and tokenizer with other (random) weights."""
    torch.manual_seed(seed)
    config = json.loads((SHIPPED / "config.json").read_text())
    model = decoderkit.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # norm weights away from 1, so each model is its own
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(SHIPPED / name, directory / name)
    return directory


def _fx_graph_entries(cache: Path) -> set[str]:
    root = cache / "inductor" / "fxgraph"
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()


@pytest.mark.slow
def test_a_shared_compile_cache_never_serves_another_models_weights(capsys, tmp_path, monkeypatch):
    # Freezing folds the weights into the compiled graph: two models of the same shapes, compiled in two processes
    # through one cache directory, must each decode with their own weights, and the second must reuse the first's code
    models = [_random_default_size_model(tmp_path / f"model-{i}", seed=i) for i in range(2)]
    args = ["--device", "cpu", "--dtype", "float32", "--greedy", "--max-new-tokens", "12", "--json", PROMPT]
    env = {"DECODERKIT_CACHE_DIR": str(tmp_path / "cache"), "DECODERKIT_COMPILE": "1"}
    _unset_inductor_cache_dir(monkeypatch)
    eager, compiled, entries = [], [], []
    for model in models:
        code, out, err = run_main(capsys, "generate", "--model", str(model), "--no-compile", *args)
        assert code == 0, err
        eager.append(json.loads(out)["completions"][0])
        proc = run_cli("generate", "--model", str(model), *args, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr
        compiled.append(json.loads(proc.stdout)["completions"][0])
        entries.append(_fx_graph_entries(tmp_path / "cache"))
    assert eager[0] != eager[1]
    assert compiled == eager
    assert entries[0], "the first compiled start wrote nothing to the cache directory"
    assert entries[1] == entries[0], "the second start compiled anew instead of reusing the cached graph"
