"""The AOTInductor-packaged decode step (generate(compile="aot")): same greedy ids as eager, kept on disk and reused."""

from __future__ import annotations

import pytest
import torch

import decoderkit
from decoderkit import kernels
from decoderkit.generation import aot_step, decode_step

oracle = pytest.importorskip("oracle")


@pytest.mark.slow
def test_packaged_step_matches_eager_and_is_reused_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(tmp_path / "cache"))
    hf = oracle.build("llama")
    directory = oracle.save(hf, tmp_path / "model")
    ids, mask, _ = oracle.left_padded_batch(hf.config.vocab_size, [5])
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    model = decoderkit.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(ids, **kwargs)
        eager = model.generate(ids, cache_implementation="static", **kwargs)
        packaged = model.generate(ids, compile="aot", **kwargs)
    assert torch.equal(eager, want)
    assert torch.equal(packaged, eager)
    packages = sorted(aot_step.package_dir().glob("*.pt2"))
    assert len(packages) == 1
    stamp = packages[0].stat().st_mtime_ns
    # A fresh model of the same weights (a second start) loads the package instead of compiling one
    again = decoderkit.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad(), pytest.MonkeyPatch.context() as no_compiling:
        no_compiling.setattr(torch._inductor, "aoti_compile_and_package", None)
        # compile="auto" (the command line's default) finds the package and runs it
        assert aot_step.cached_step(again, 1, 256)
        assert torch.equal(again.generate(ids, compile="auto", **kwargs), eager)
        assert again in aot_step._LOADED
        assert torch.equal(again.generate(ids, compile="aot", **kwargs), eager)
    assert sorted(aot_step.package_dir().glob("*.pt2")) == packages
    assert packages[0].stat().st_mtime_ns == stamp
    # Other weights are another package: never the first model's frozen weights
    with torch.no_grad():
        for p in again.parameters():
            p.mul_(1.5)
        assert not aot_step.cached_step(again, 1, 256)
        changed = again.generate(ids, compile="aot", **kwargs)
        assert torch.equal(changed, again.generate(ids, cache_implementation="static", **kwargs))
    assert len(list(aot_step.package_dir().glob("*.pt2"))) == 2

def test_unsupported_models_are_refused_with_the_reason(tmp_path):
    hf = oracle.build("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(hf, tmp_path / "m"), dtype=torch.float32)
    with pytest.raises(ValueError, match="compile='aot': rope_type='dynamic' depends on the length"):
        model.generate(torch.tensor([[3, 4]]), max_new_tokens=2, compile="aot")
    with pytest.raises(ValueError, match="compile='sometimes': expected True, False, 'aot' or 'auto'"):
        model.generate(torch.tensor([[3, 4]]), max_new_tokens=2, compile="sometimes")


def test_auto_without_a_package_runs_eager_and_builds_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(tmp_path / "cache"))
    hf = oracle.build("gemma")
    model = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(hf, tmp_path / "m"), dtype=torch.float32)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        auto = model.generate(ids, max_new_tokens=6, do_sample=False, compile="auto")
        want = hf.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(auto, want)
    assert not aot_step.package_dir().exists() or not list(aot_step.package_dir().iterdir())


def test_background_build_is_started_once(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(tmp_path / "cache"))
    directory = oracle.save(oracle.build("mpt"), tmp_path / "m")
    model = decoderkit.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda command, **kw: started.append((command, kw)))
    assert aot_step.build_in_background(model, directory, "float32", 1, 256)
    command, options = started[0]
    assert command[1:4] == ["-m", "decoderkit.generation.aot_step", directory]
    assert command[command.index("--slots") + 1] == "256" and options["start_new_session"]
    # While a build is under way (its marker is fresh) no second one starts; once the package exists neither
    fingerprint = decode_step.weights_fingerprint(model)
    package = aot_step.package_path(model, fingerprint, 1, 256)
    assert aot_step._marker(fingerprint, 1, 256).is_file()
    assert not aot_step.build_in_background(model, directory, "float32", 1, 256)
    aot_step._marker(fingerprint, 1, 256).unlink()
    package.touch()
    assert not aot_step.build_in_background(model, directory, "float32", 1, 256)
    assert len(started) == 1


@pytest.mark.slow
@pytest.mark.skipif(not kernels.available(), reason="decoderkit's kernel did not build here")
def test_quantized_package_takes_the_weights_as_inputs(tmp_path, monkeypatch):
    from gguf import GGMLQuantizationType as Q
    from test_gguf_model import write_tiny_llama

    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(tmp_path / "cache"))
    models = []
    for seed in (0, 1):
        write_tiny_llama(tmp_path / f"m{seed}.gguf", Q.Q4_1, tie=True, seed=seed)
        models.append(decoderkit.AutoModelForCausalLM.from_pretrained(tmp_path / f"m{seed}.gguf",
                                                                      dtype="float32").eval())
    first, second = models
    assert aot_step.aot_unsupported(first) is None and aot_step.takes_weights(first)
    ids = torch.tensor([[3, 17, 5, 60]])
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)

    def eager(model):
        return model.generate(ids, cache_implementation="static", **kwargs)

    with torch.no_grad():
        assert torch.equal(first.generate(ids, compile="aot", **kwargs), eager(first))
        packages = sorted(aot_step.package_dir().glob("*.pt2"))
        assert len(packages) == 1
        # Other weights of the same shapes run through the same package, and it computes with theirs: a package
        # that had kept the first model's weights would give the first model's tokens
        assert not torch.equal(eager(second), eager(first))
        assert aot_step.cached_step(second, 1, 256)
        with pytest.MonkeyPatch.context() as no_compiling:
            no_compiling.setattr(torch._inductor, "aoti_compile_and_package", None)
            assert torch.equal(second.generate(ids, compile="auto", **kwargs), eager(second))
            # The package reads the model's tensors at every call: a change in place is seen
            head = second.lm_head
            head.scales.copy_(head.scales.flip(0))
            assert torch.equal(second.generate(ids, compile="aot", **kwargs), eager(second))
        assert sorted(aot_step.package_dir().glob("*.pt2")) == packages


def test_packages_are_keyed_by_the_code_a_step_is_traced_from(tmp_path):
    import shutil
    from pathlib import Path

    root = tmp_path / "decoderkit"
    shutil.copytree(Path(decoderkit.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    first = aot_step._digest_of(root, True)
    assert aot_step._digest_of(root, False) != first
    # The loops around the step, the server and the command line are not traced: a change there keeps the packages
    for name in ("cli/common.py", "serve/app.py", "generation/speculative.py", "generation/generate.py"):
        (root / name).write_text((root / name).read_text() + "\n# changed\n")
    assert aot_step._digest_of(root, True) == first
    # The layers, the steps and the models are
    for name in ("layers/attention.py", "generation/decode_step.py", "generation/verify_step.py", "model.py"):
        path = root / name
        original = path.read_text()
        path.write_text(original + "\n# changed\n")
        assert aot_step._digest_of(root, True) != first, name
        path.write_text(original)
    assert aot_step._digest_of(root, True) == first


@pytest.mark.slow
def test_a_large_float_model_package_takes_the_weights_as_inputs(tmp_path, monkeypatch):
    """Past AOT_MAX_WEIGHT_BYTES a float model's package holds only code: the same package runs other weights of the
    same shapes, and computes with them."""
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(aot_step, "AOT_MAX_WEIGHT_BYTES", 1000)
    hf = oracle.build("gpt_bigcode")
    first = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(hf, tmp_path / "m"), dtype=torch.float32)
    first.eval()
    second = decoderkit.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(1.3)
    assert aot_step.aot_unsupported(first) is None and aot_step.takes_weights(first)
    ids = torch.tensor([[3, 17, 5, 60]])
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        want = hf.generate(ids, **kwargs)
        assert torch.equal(first.generate(ids, compile="aot", **kwargs), want)
        assert len(list(aot_step.package_dir().glob("*.pt2"))) == 1
        plain_second = second.generate(ids, cache_implementation="static", **kwargs)
        assert not torch.equal(plain_second, want)
        assert aot_step.cached_step(second, 1, 256)
        with pytest.MonkeyPatch.context() as no_compiling:
            no_compiling.setattr(torch._inductor, "aoti_compile_and_package", None)
            assert torch.equal(second.generate(ids, compile="auto", **kwargs), plain_second)
    assert len(list(aot_step.package_dir().glob("*.pt2"))) == 1
