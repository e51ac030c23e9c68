"""Reading and writing checkpoints: transformers 5.23 is the oracle in both directions.

transformers saves -> decoderkit loads, and decoderkit saves -> transformers loads, for every family and head, must give
the same fp32 outputs; then the formats (sharded, .bin, tied, old buffers, hub cache, GGUF), dtypes, devices, atomic
saving, and every error a user can meet.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.torch
import torch
from oracle import HF_CLASSES, build, left_padded_batch, rel_err, save
from safetensors.torch import load_file, save_file

from decoderkit import checkpoint
from decoderkit.model import HEAD_CLASSES

TOL = 1e-5
# transformers implements these heads; the others are decoderkit's alone.
HF_HEADS = {
    "llama": list(HF_CLASSES),
    "gemma": ["causal_lm", "base", "sequence_classification", "token_classification"],
    "gpt_bigcode": ["causal_lm", "base", "sequence_classification", "token_classification"],
    "mpt": list(HF_CLASSES),
}
HF_CASES = [(family, head) for family, heads in HF_HEADS.items() for head in heads]
OURS_ONLY = [("gemma", "question_answering"), ("gpt_bigcode", "question_answering")]
VOCAB = 97


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """(family, head, tie) -> (transformers model, the directory it saved); each built once per module."""
    cache: dict[tuple, tuple[torch.nn.Module, Path]] = {}

    def get(family: str, head: str = "causal_lm", **overrides):
        key = (family, head, tuple(sorted(overrides.items())))
        if key not in cache:
            model = build(family, head, **overrides)
            cache[key] = model, Path(save(model, tmp_path_factory.mktemp(f"{family}-{head}")))
        return cache[key]

    return get


def run(model: torch.nn.Module, family: str, head: str) -> torch.Tensor:
    """The head's outputs at the real (non-padding) tokens of a left-padded batch, as one tensor."""
    ids, mask, pos = left_padded_batch(VOCAB, [5, 8])
    kwargs = dict(input_ids=ids, attention_mask=mask)
    if family != "mpt":  # transformers' MPT takes no position ids (ALiBi needs none)
        kwargs["position_ids"] = pos
    with torch.no_grad():
        out = model(**kwargs)
    if head == "sequence_classification":
        return out.logits
    if head == "question_answering":
        return torch.stack([out.start_logits, out.end_logits], -1)[mask.bool()]
    value = out.last_hidden_state if head == "base" else out.logits
    return value[mask.bool()]


@pytest.fixture
def log(caplog):
    """caplog, fed straight from decoderkit.checkpoint's logger: other code (the CLI) may stop propagation."""
    logger = logging.getLogger("decoderkit.checkpoint")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def warned(log, text: str) -> bool:
    return any(r.levelno == logging.WARNING and text in r.getMessage() for r in log.records)


def load(path, head: str = "causal_lm", **kwargs) -> torch.nn.Module:
    return HEAD_CLASSES[head].from_pretrained(path, **kwargs)


def hf_load(path, head: str = "causal_lm", **kwargs) -> torch.nn.Module:
    return HF_CLASSES[head].from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family,head", HF_CASES)
def test_transformers_saves_decoderkit_loads(hf_dirs, family, head):
    hf, path = hf_dirs(family, head)
    ours = load(path, head)
    assert ours.dtype == torch.float32 and not ours.training
    assert rel_err(run(ours, family, head), run(hf, family, head)) <= TOL


@pytest.mark.parametrize("family,head", HF_CASES)
def test_decoderkit_saves_transformers_loads(hf_dirs, tmp_path, family, head):
    hf, path = hf_dirs(family, head)
    ours = load(path, head)
    ours.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family
    assert config["architectures"] == [type(hf).__name__]
    assert config["dtype"] == "float32"
    assert (tmp_path / "out" / "generation_config.json").exists()
    reloaded = hf_load(tmp_path / "out", head)
    assert type(reloaded) is type(hf)
    assert rel_err(run(reloaded, family, head), run(hf, family, head)) <= TOL
    # The same tensors under the same names as transformers' own save (our names are translated back exactly).
    theirs, mine = weights(path), weights(tmp_path / "out")
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("family,head", OURS_ONLY)
def test_heads_transformers_lacks_round_trip_through_decoderkit(hf_dirs, tmp_path, family, head, log):
    _, path = hf_dirs(family, "causal_lm")
    ours = load(path, head)
    assert warned(log, "qa_outputs.weight") and warned(log, "qa_outputs.bias")
    ours.save_pretrained(tmp_path / "out")
    prefix = {"gemma": "Gemma", "gpt_bigcode": "GPTBigCode"}[family]
    assert warned(log, f"transformers has no {prefix}ForQuestionAnswering")
    again = load(tmp_path / "out", head)
    assert torch.equal(run(again, family, head), run(ours, family, head))


@pytest.mark.parametrize("family", ["llama", "gpt_bigcode"])
def test_causal_lm_checkpoint_into_a_classification_head_and_back(hf_dirs, family, log):
    hf, path = hf_dirs(family, "causal_lm", tie_word_embeddings=False)
    ours = load(path, "sequence_classification", num_labels=3)
    assert warned(log, "score.weight")  # the missing head is named, and initialised
    assert ours.score.weight.shape == (3, 32) and ours.score.weight.std() > 0
    base = load(path, "base")
    with torch.no_grad():
        hidden = hf.base_model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state
    assert rel_err(base(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state, hidden) <= TOL

    _, cls_path = hf_dirs(family, "sequence_classification")
    log.clear()
    lm = load(cls_path, "causal_lm", tie_word_embeddings=False)
    assert warned(log, "lm_head.weight")
    assert lm.lm_head.weight.data_ptr() != lm.model.embed_tokens.weight.data_ptr()


# ---------------------------------------------------------------------------------------------- formats
def test_sharded_both_ways(hf_dirs, tmp_path):
    hf = hf_dirs("llama")[0]
    hf.save_pretrained(tmp_path / "theirs", max_shard_size="20KB")
    assert (tmp_path / "theirs" / checkpoint.SAFE_INDEX).exists()
    ours = load(tmp_path / "theirs")
    assert rel_err(run(ours, "llama", "causal_lm"), run(hf, "llama", "causal_lm")) <= TOL

    ours.save_pretrained(tmp_path / "mine", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "mine").glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "mine" / checkpoint.SAFE_INDEX).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in weights(tmp_path / "mine").values())
    assert rel_err(run(hf_load(tmp_path / "mine"), "llama", "causal_lm"), run(hf, "llama", "causal_lm")) <= TOL


def _write_bin(hf: torch.nn.Module, directory: Path, shards: int) -> None:
    directory.mkdir()
    hf.config.save_pretrained(directory)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    if shards == 1:
        torch.save(state, directory / checkpoint.BIN_SINGLE)
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: state[n] for n in part}, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    (directory / checkpoint.BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shards", [1, 3])
def test_pytorch_bin(hf_dirs, tmp_path, shards):
    hf = hf_dirs("gpt_bigcode")[0]
    _write_bin(hf, tmp_path / "bin", shards)
    ours = load(tmp_path / "bin")
    assert rel_err(run(ours, "gpt_bigcode", "causal_lm"), run(hf, "gpt_bigcode", "causal_lm")) <= TOL


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_lm_head(hf_dirs, tmp_path, tie):
    hf, path = hf_dirs("llama", "causal_lm", tie_word_embeddings=tie)
    assert ("lm_head.weight" in weights(path)) is not tie  # transformers omits a tied head
    ours = load(path)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) is tie
    assert rel_err(run(ours, "llama", "causal_lm"), run(hf, "llama", "causal_lm")) <= TOL
    ours.save_pretrained(tmp_path / "out")
    assert ("lm_head.weight" in weights(tmp_path / "out")) is not tie
    reloaded = hf_load(tmp_path / "out")
    assert (reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()) is tie
    assert rel_err(run(reloaded, "llama", "causal_lm"), run(hf, "llama", "causal_lm")) <= TOL


def test_tied_checkpoint_that_still_stores_lm_head_and_old_buffers(hf_dirs, tmp_path):
    """Older exports carry a (redundant) lm_head copy and rotary/causal-mask buffers; both are ignored."""
    hf, path = hf_dirs("llama", "causal_lm", tie_word_embeddings=True)
    shutil.copytree(path, tmp_path / "old")
    state = weights(path)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    for i in range(2):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(state, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
    ours = load(tmp_path / "old")
    assert rel_err(run(ours, "llama", "causal_lm"), run(hf, "llama", "causal_lm")) <= TOL


def _hub_cache(root: Path, repo: str, source: Path, sha: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The layout huggingface_hub's cache uses: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / sha
    shutil.copytree(source, snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)
    return snapshot


def test_hub_repo_id_from_the_local_cache(hf_dirs, tmp_path, monkeypatch):
    hf, path = hf_dirs("mpt")
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    _hub_cache(tmp_path / "hub", "tiny-org/tiny-mpt", path, sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = load("tiny-org/tiny-mpt")
    assert rel_err(run(ours, "mpt", "causal_lm"), run(hf, "mpt", "causal_lm")) <= TOL
    assert load("tiny-org/tiny-mpt", revision=sha).config.vocab_size == VOCAB
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        load("tiny-org/absent")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load(tmp_path / "nowhere" / "model")


# ---------------------------------------------------------------------------------------------- GGUF
def _write_gguf(hf: torch.nn.Module, path: Path) -> None:
    """A llama GGUF in F32, written as llama.cpp's converter does (q/k rows permuted for its rope layout)."""
    c = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_bos_token_id(c.bos_token_id)
    writer.add_eos_token_id(c.eos_token_id)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in hf.state_dict().items():
        value = tensor.float().numpy().copy()
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gguf_name = f"blk.{i}.{layer[module]}.{kind}"
            if module == "self_attn.q_proj":
                value = permute(value, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                value = permute(value, c.num_key_value_heads)
        elif name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        else:
            gguf_name = names[name]
        writer.add_tensor(gguf_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, hf_dirs):
    hf = hf_dirs("llama", "causal_lm", tie_word_embeddings=False)[0]
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    _write_gguf(hf, path)
    return hf, path


def test_gguf_file_and_gguf_file_argument(tiny_gguf):
    hf, path = tiny_gguf
    for ours in (load(path), load(path.parent, gguf_file=path.name)):
        assert ours.dtype == torch.float32
        assert rel_err(run(ours, "llama", "causal_lm"), run(hf, "llama", "causal_lm")) <= TOL
    assert load(path, dtype="bfloat16").dtype == torch.bfloat16
    meta = load(path, device="meta")
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_gguf(tiny_gguf, tmp_path, damage):
    data = tiny_gguf[1].read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(ValueError, match="truncated or corrupt GGUF file"):
        load(bad)


def test_directory_of_gguf_files_asks_for_gguf_file(tiny_gguf):
    with pytest.raises(FileNotFoundError, match="gguf_file=<name>"):
        load(tiny_gguf[1].parent)


# ---------------------------------------------------------------------------------------------- dtype and device
def test_dtype_auto_follows_the_config_and_explicit_dtypes_win(hf_dirs, tmp_path):
    hf, path = hf_dirs("gemma")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load(tmp_path / "bf16").dtype == torch.bfloat16
    assert load(tmp_path / "bf16", dtype="auto").config.dtype == torch.bfloat16
    assert load(path).dtype == torch.float32
    for dtype, want in [("float16", torch.float16), (torch.bfloat16, torch.bfloat16), ("torch.float32", torch.float32)]:
        assert load(tmp_path / "bf16", dtype=dtype).dtype == want
    assert load(tmp_path / "bf16", torch_dtype="float32").dtype == torch.float32
    # The bf16 values convert to fp32 exactly.
    assert torch.equal(load(tmp_path / "bf16", dtype=torch.float32).model.norm.weight,
                       hf.model.norm.weight.bfloat16().float())


def test_dtype_auto_without_a_config_dtype_uses_the_checkpoints(hf_dirs, tmp_path):
    hf = hf_dirs("llama")[0]
    copy.deepcopy(hf).to(torch.float16).save_pretrained(tmp_path / "fp16")
    config = json.loads((tmp_path / "fp16" / "config.json").read_text())
    config.pop("dtype")
    (tmp_path / "fp16" / "config.json").write_text(json.dumps(config))
    assert load(tmp_path / "fp16").dtype == torch.float16


def test_meta_device_reads_no_data(hf_dirs, monkeypatch):
    _, path = hf_dirs("llama")

    def no_reading(*args, **kwargs):
        raise AssertionError("weight data was read")

    monkeypatch.setattr(checkpoint.SafetensorsSource, "tensors", no_reading)
    model = load(path, device="meta", dtype="bfloat16")
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(ValueError, match="meta device"):
        model.save_pretrained(path.parent / "never")
    assert not (path.parent / "never").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device(hf_dirs):
    hf, path = hf_dirs("llama")
    ours = load(path, device="cuda")
    assert ours.device.type == "cuda"
    assert rel_err(run(ours.cpu(), "llama", "causal_lm"), run(hf, "llama", "causal_lm")) <= TOL


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_device_when_unavailable_is_an_error(hf_dirs):
    with pytest.raises(ValueError, match="CUDA is not available"):
        load(hf_dirs("llama")[1], device="cuda")


def test_unknown_device_and_init_functions_restored(hf_dirs):
    normal = torch.nn.init.normal_
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        load(hf_dirs("llama")[1], device="gpu")
    load(hf_dirs("llama")[1], device="meta")
    assert torch.nn.init.normal_ is normal  # the no-op stand-ins used while building on meta are gone again


def test_progress_bar_only_when_asked_or_on_a_terminal(hf_dirs, capsys):
    _, path = hf_dirs("llama")
    capsys.readouterr()  # transformers' own bar, if the fixture saved the model just now
    load(path)
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    load(path, progress=True)
    assert "loading" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- saving
def test_failed_save_leaves_existing_checkpoint_untouched(hf_dirs, tmp_path, monkeypatch):
    _, path = hf_dirs("llama")
    ours = load(path)
    target = tmp_path / "target"
    shutil.copytree(path, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    real_save_file = safetensors.torch.save_file
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        ours.save_pretrained(target, max_shard_size="20KB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        ours.save_pretrained(tmp_path / "fresh", max_shard_size="20KB")
    assert sorted(os.listdir(tmp_path)) == ["target"]  # no half-written directory, no staging left over


def test_save_over_an_earlier_save(hf_dirs, tmp_path):
    hf, path = hf_dirs("llama")
    ours = load(path)
    target = tmp_path / "target"
    ours.save_pretrained(target, max_shard_size="20KB")
    (target / "tokenizer.json").write_text("{}")
    (target / "pytorch_model.bin").write_bytes(b"stale")
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~_umask()
    ours.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert rel_err(run(hf_load(target), "llama", "causal_lm"), run(hf, "llama", "causal_lm")) <= TOL
    ours.save_pretrained(target, max_shard_size="20KB")
    assert not (target / "model.safetensors").exists()
    assert rel_err(run(load(target), "llama", "causal_lm"), run(hf, "llama", "causal_lm")) <= TOL


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_parse_size():
    assert checkpoint.parse_size("5GB") == 5 * 10**9
    assert checkpoint.parse_size("10KiB") == 10 * 1024
    assert checkpoint.parse_size("1.5mb") == 1_500_000
    assert checkpoint.parse_size(1234) == 1234
    for bad in ("lots", "0", -1):
        with pytest.raises(ValueError, match="max_shard_size"):
            checkpoint.parse_size(bad)


# ---------------------------------------------------------------------------------------------- errors
@pytest.fixture
def llama_copy(hf_dirs, tmp_path) -> Path:
    _, path = hf_dirs("llama")
    return Path(shutil.copytree(path, tmp_path / "copy"))


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_config_json(llama_copy):
    (llama_copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(llama_copy)


def test_invalid_config_json(llama_copy):
    (llama_copy / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config.json: invalid JSON"):
        load(llama_copy)


def test_unsupported_model_type(llama_copy):
    _edit_config(llama_copy, model_type="bert")
    with pytest.raises(ValueError, match=r"'bert' is not supported.*gemma.*gpt_bigcode.*llama.*mpt"):
        load(llama_copy)


def test_missing_and_unexpected_weights_are_listed(llama_copy):
    state = weights(llama_copy)
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.o_proj.weight", "model.norm.weight"):
        del state[name]
    state["model.layers.0.mlp.extra.weight"] = torch.ones(2)
    save_file(state, llama_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as info:
        load(llama_copy)
    message = str(info.value)
    assert "1 weights that a llama model does not have: model.layers.0.mlp.extra.weight" in message
    assert "3 weights missing from the checkpoint" in message
    assert "model.layers.1.mlp.up_proj.weight" in message and "model.norm.weight" in message


def test_many_missing_weights_show_the_first_few(llama_copy):
    state = weights(llama_copy)
    save_file({"model.embed_tokens.weight": state["model.embed_tokens.weight"]}, llama_copy / "model.safetensors")
    with pytest.raises(ValueError, match=r"19 weights missing.*, \.\.\. \(19 in all\)"):
        load(llama_copy)


def test_shape_mismatch_names_the_tensor_and_both_shapes(llama_copy):
    _edit_config(llama_copy, intermediate_size=40)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(48, 32\); the config "
                                         r"expects \(40, 32\)"):
        load(llama_copy)


def test_fused_tensor_that_does_not_split_is_a_shape_error(hf_dirs, tmp_path):
    _, path = hf_dirs("mpt")
    shutil.copytree(path, tmp_path / "mpt")
    state = weights(path)
    state["transformer.blocks.0.attn.Wqkv.weight"] = state["transformer.blocks.0.attn.Wqkv.weight"][:90]
    save_file(state, tmp_path / "mpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"transformer.blocks.0.attn.Wqkv.weight: shape \(90, 32\) does not fit"):
        load(tmp_path / "mpt")


@pytest.mark.parametrize("damage", ["truncated", "corrupt header", "empty"])
def test_damaged_safetensors(llama_copy, damage):
    file = llama_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncated": data[: len(data) // 2], "corrupt header": data[:8] + b"#" * 40 + data[48:],
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated safetensors file"):
        load(llama_copy)


def test_damaged_shard_index(hf_dirs, tmp_path):
    hf_dirs("llama")[0].save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = tmp_path / "sharded" / checkpoint.SAFE_INDEX
    weight_map = json.loads(index.read_text())["weight_map"]
    first = sorted(set(weight_map.values()))[0]
    (tmp_path / "sharded" / first).rename(tmp_path / "sharded" / "moved")
    with pytest.raises(FileNotFoundError, match=f"shard files that are missing: {first}"):
        load(tmp_path / "sharded")
    (tmp_path / "sharded" / "moved").rename(tmp_path / "sharded" / first)
    wrong = next(f for f in sorted(set(weight_map.values())) if f != weight_map["model.norm.weight"])
    weight_map["model.norm.weight"] = wrong
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=f"puts model.norm.weight in {wrong}, which does not contain"):
        load(tmp_path / "sharded")
    index.write_text("{")
    with pytest.raises(ValueError, match="invalid shard index"):
        load(tmp_path / "sharded")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_tensor_in_two_shards(hf_dirs, tmp_path, fmt):
    """Which copy of a tensor held twice would load depends on the reading order: an error naming both files."""
    hf = hf_dirs("llama")[0]
    directory = tmp_path / fmt
    if fmt == "safetensors":
        hf.save_pretrained(directory, max_shard_size="20KB")
        index_file = directory / checkpoint.SAFE_INDEX
    else:
        _write_bin(hf, directory, 3)
        index_file = directory / checkpoint.BIN_INDEX
    weight_map = json.loads(index_file.read_text())["weight_map"]
    name = "model.norm.weight"
    home = weight_map[name]
    other = next(f for f in sorted(set(weight_map.values())) if f != home)

    # The index names the tensor in two shards (JSON keeps the last of repeated keys, so this is otherwise unseen).
    pairs = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in weight_map.items())
    index_file.write_text(f'{{"metadata": {{}}, "weight_map": {{{pairs}, {json.dumps(name)}: "{other}"}}}}')
    with pytest.raises(ValueError, match=f"names tensor {name} twice, in {home} and in {other}"):
        load(directory)

    # The index is right, but a second shard holds another copy (different values) of the tensor.
    index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if fmt == "safetensors":
        shard = load_file(directory / other)
        save_file({**shard, name: torch.full_like(hf.model.norm.weight, 7.0)}, directory / other)
    else:
        shard = torch.load(directory / other, weights_only=True)
        torch.save({**shard, name: torch.full_like(hf.model.norm.weight, 7.0)}, directory / other)
    first, second = sorted([home, other])
    with pytest.raises(ValueError, match=f"tensor {name} is in two shard files, {first} and {second}"):
        load(directory)


def test_no_weights_and_unreadable_bin(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load(llama_copy)
    (llama_copy / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="unreadable PyTorch checkpoint"):
        load(llama_copy)


@pytest.mark.parametrize("dtype", ["float8", "fp33", "int8", torch.int32])
def test_unknown_dtype(hf_dirs, dtype):
    with pytest.raises(ValueError, match=r"dtype"):
        load(hf_dirs("llama")[1], dtype=dtype)
