"""Tests for decoderkit.gguf_writer: models written as GGUF files and read back.

Oracles: the original transformers model (its tensors, quantized with the `gguf` package's own quantize ->
dequantize; its fp32 logits), transformers' own GGUF loader reading our file, the `gguf` package's reader (tensor
types and metadata), and the source tokenizer.json encoding the same texts as the tokenizer rebuilt from our file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from oracle import build, rel_err, save
from shared_data import TOKENIZER_VECTORS
from test_gguf_model import llama_cpp_permute

import decoderkit
from decoderkit import gguf_writer
from decoderkit.cli import main as cli_main
from decoderkit.gguf_model import open_gguf, read_gguf
from decoderkit.gguf_vocab import read_gguf_metadata
from decoderkit.gguf_vocab_writer import pre_tokenizer_name
from decoderkit.gguf_writer import GGUF_TYPES, write_gguf
from decoderkit.tokenizer import AutoTokenizer, Tokenizer, tokenizer_from_gguf

FAMILIES = ["llama", "gemma", "gpt_bigcode", "mpt"]
TYPES = list(GGUF_TYPES)
DEFAULT_MODEL = Path(decoderkit.__file__).parent / "assets" / "default-model"
TEXTS = ["Hello world", " leading space", "To be, or not to be: that is the question.\n\n\tIndented 123 4567",
         "naïve café — 数学 🦙", ""]  # fmt: skip


def _hf_model_dir(tmp_path: Path, model_type: str, **overrides) -> tuple[transformers.PreTrainedModel, Path]:
    model = build(model_type, **overrides)
    return model, Path(save(model, tmp_path / model_type))


def _expected(value: torch.Tensor, qtype: Q, offset: float = 0.0) -> torch.Tensor:
    """What a reader must give back for an HF tensor stored as ``qtype`` (``offset`` added before storing)."""
    data = value.float().numpy() + np.float32(offset)
    decoded = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype).reshape(data.shape)
    return torch.from_numpy(decoded - np.float32(offset))


# --------------------------------------------------------------------------------------------------------------------
# Round trips: our writer -> gguf reader -> our reader


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_type_round_trips_for_every_family(tmp_path, model_type, qtype):
    model, directory = _hf_model_dir(tmp_path, model_type)
    result = write_gguf(directory, tmp_path / "model.gguf", qtype)
    stored = {t.name: t.tensor_type for t in open_gguf(result.path).tensors}
    assert stored == result.tensor_types
    checkpoint = read_gguf(result.path)
    reference = {k: v for k, v in model.state_dict().items() if k in checkpoint.state_dict}
    tied = model.config.tie_word_embeddings
    untied = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    assert set(checkpoint.state_dict) == set(reference) == untied
    gguf_names = {hf: g for g, hf in gguf_writer_names(result.path, checkpoint.config).items()}
    requested = GGUF_TYPES[qtype]
    for name, value in reference.items():
        gguf_name = gguf_names[name]
        kind = stored[gguf_name]
        if value.dim() == 1 or gguf_name.startswith("position_embd."):
            assert kind == Q.F32, name
        elif gguf_name == ("token_embd.weight" if tied else "output.weight") and requested in (Q.Q4_0, Q.Q4_1):
            assert kind == Q.Q8_0  # the output projection, as llama-quantize keeps it
        elif value.shape[-1] % gguf.GGML_QUANT_SIZES[requested][0]:
            assert kind == Q.F16, name  # rows of 48 values are no whole number of 32-value blocks
        else:
            assert kind == requested, name
        offset = 1.0 if model_type == "gemma" and name.endswith("norm.weight") else 0.0
        got = checkpoint.state_dict[name]
        assert torch.equal(got, _expected(value, kind, offset)), f"{name} ({kind.name}): {rel_err(got, value)}"


def gguf_writer_names(path: Path, config: dict) -> dict[str, str]:
    from decoderkit.families import get_family
    from decoderkit.gguf_model import _gguf_to_hf_names

    family = get_family(config["model_type"])
    return _gguf_to_hf_names(family.gguf_architecture, config[family.gguf_layers_key])


@pytest.mark.parametrize("model_type", FAMILIES)
def test_f32_file_gives_the_original_logits(tmp_path, model_type):
    model, directory = _hf_model_dir(tmp_path, model_type)
    path = write_gguf(directory, tmp_path / "model.gguf", "f32").path
    ours = decoderkit.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-4


def test_q_and_k_rows_are_stored_in_llama_cpp_order(tmp_path):
    model, directory = _hf_model_dir(tmp_path, "llama", attention_bias=True)
    path = write_gguf(directory, tmp_path / "model.gguf", "f32").path
    raw = {t.name: np.asarray(t.data) for t in open_gguf(path).tensors}
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for proj, name, heads in (("q_proj", "attn_q", 4), ("k_proj", "attn_k", 2)):
        for kind in ("weight", "bias"):
            value = state[f"model.layers.1.self_attn.{proj}.{kind}"]
            # llama.cpp's converter's own permutation (verbatim in test_gguf_model) with (n_head, n_head_kv)
            assert np.array_equal(raw[f"blk.1.{name}.{kind}"], llama_cpp_permute(value, 4, heads)), (name, kind)
            assert not np.array_equal(raw[f"blk.1.{name}.{kind}"], value)


def test_gemma_norms_are_stored_as_one_plus_weight(tmp_path):
    model, directory = _hf_model_dir(tmp_path, "gemma")
    path = write_gguf(directory, tmp_path / "model.gguf", "f32").path
    raw = {t.name: np.asarray(t.data) for t in open_gguf(path).tensors}
    norm = model.state_dict()["model.layers.0.input_layernorm.weight"].numpy()
    assert np.array_equal(raw["blk.0.attn_norm.weight"], norm + np.float32(1.0))


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0},
    {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "original_max_position_embeddings": 16,
     "beta_fast": 32.0, "beta_slow": 1.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 16.0, "rope_theta": 50000.0,
     "original_max_position_embeddings": 2048},
], ids=lambda r: r["rope_type"])  # fmt: skip
def test_rope_scaling_round_trips(tmp_path, rope):
    model, directory = _hf_model_dir(tmp_path, "llama", rope_parameters=rope, head_dim=16, hidden_size=64,
                                     max_position_embeddings=4096)
    path = write_gguf(directory, tmp_path / "model.gguf", "f32").path
    config = read_gguf(path).config
    assert {k: config["rope_parameters"][k] for k in rope} == rope
    assert ("rope_freqs.weight" in {t.name for t in open_gguf(path).tensors}) is (rope["rope_type"] == "llama3")
    ours = decoderkit.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-4


def test_metadata_llama_cpp_needs(tmp_path):
    _, directory = _hf_model_dir(tmp_path, "llama", rms_norm_eps=1e-5)
    path = write_gguf(directory, tmp_path / "model.gguf", "q8_0").path
    meta = read_gguf_metadata(path)
    expected = {
        "general.architecture": "llama", "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "general.quantization_version": gguf.GGML_QUANT_VERSION, "llama.block_count": 2, "llama.context_length": 64,
        "llama.embedding_length": 32, "llama.feed_forward_length": 48, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 8, "llama.vocab_size": 97,
        "tokenizer.ggml.model": "none", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }  # fmt: skip
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)


# --------------------------------------------------------------------------------------------------------------------
# transformers' GGUF loader reads our files (it knows llama among our four families)


@pytest.mark.parametrize("qtype", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
def test_transformers_gguf_loader_reads_our_llama(tmp_path, qtype):
    model, directory = _hf_model_dir(tmp_path, "llama", tie_word_embeddings=False)
    path = write_gguf(directory, tmp_path / "model.gguf", qtype).path
    ours = read_gguf(path).state_dict
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    reference = theirs.state_dict()
    assert set(reference) == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
    if qtype == "f32":
        ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert rel_err(theirs(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-4


def test_default_model_reads_back_in_transformers_with_the_same_logits(tmp_path):
    path = write_gguf(DEFAULT_MODEL, tmp_path / "default.gguf").path
    assert read_gguf_metadata(path)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_BF16)  # auto: bf16 stays
    original = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = torch.randint(3, 4096, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, original(input_ids=ids).logits)  # bf16 weights: exact
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    source = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    for text in TEXTS[:4]:
        assert tokenizer.encode(text, add_special_tokens=False) == source.encode(text, add_special_tokens=False)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_byte_level_tokenizer_round_trips(tmp_path):
    path = write_gguf(DEFAULT_MODEL, tmp_path / "default.gguf", "q8_0").path
    meta = read_gguf_metadata(path, prefixes=("tokenizer.",))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    source = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    back = tokenizer_from_gguf(path)
    assert len(meta["tokenizer.ggml.tokens"]) == 4096 and back.get_vocab() == source.get_vocab()
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (
        source.bos_token_id, source.eos_token_id, source.pad_token_id)
    assert back.chat_template == source.chat_template and back.chat_template
    for text in TEXTS:
        assert back.encode(text) == source.encode(text), text
        assert back.decode(back.encode(text)) == source.decode(source.encode(text))


def _model_with_vocabulary(tmp_path: Path, name: str, model_type: str) -> tuple[Path, Tokenizer]:
    source = tokenizer_from_gguf(TOKENIZER_VECTORS / f"ggml-vocab-{name}.gguf")
    ids = {k: getattr(source, k) for k in ("bos_token_id", "eos_token_id")}
    _, directory = _hf_model_dir(tmp_path, model_type, vocab_size=len(source), pad_token_id=None,
                                 **{k: v if v is not None else 0 for k, v in ids.items()})
    source.save_pretrained(directory)
    return directory, AutoTokenizer.from_pretrained(directory)


@pytest.mark.slow
def test_sentencepiece_vocabulary_round_trips(tmp_path):
    directory, source = _model_with_vocabulary(tmp_path, "llama-spm", "llama")
    path = write_gguf(directory, tmp_path / "model.gguf", "q8_0").path
    meta = read_gguf_metadata(path, prefixes=("tokenizer.",))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("llama", "default")
    original = read_gguf_metadata(TOKENIZER_VECTORS / "ggml-vocab-llama-spm.gguf", prefixes=("tokenizer.",))
    assert meta["tokenizer.ggml.tokens"] == original["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.token_type"] == original["tokenizer.ggml.token_type"]
    back = tokenizer_from_gguf(path)
    texts = (TOKENIZER_VECTORS / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8")
    for text in texts.split("\n__ggml_vocab_test__\n")[:-1]:
        assert back.encode(text) == source.encode(text), repr(text)


@pytest.mark.parametrize("name", ["gpt-2", pytest.param("llama-bpe", marks=pytest.mark.slow), "starcoder", "mpt"])
def test_pre_tokenizer_name_is_the_one_llama_cpp_wrote(name):
    # llama.cpp's converter named these files' pre-tokenizers by hashing the original tokenizers' output
    original = read_gguf_metadata(TOKENIZER_VECTORS / f"ggml-vocab-{name}.gguf", prefixes=("tokenizer.ggml.pre",))
    backend = tokenizer_from_gguf(TOKENIZER_VECTORS / f"ggml-vocab-{name}.gguf").backend_tokenizer
    ignore_merges = bool(json.loads(backend.to_str())["model"].get("ignore_merges"))
    assert pre_tokenizer_name(backend, ignore_merges) == original["tokenizer.ggml.pre"]


def test_pre_tokenizer_no_llama_cpp_name_reproduces_is_an_error(tmp_path):
    directory = tmp_path / "default"
    shutil.copytree(DEFAULT_MODEL, directory)
    spec = json.loads((directory / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                      "use_regex": False}]}  # fmt: skip
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="splits text unlike every llama.cpp pre-tokenizer"):
        write_gguf(directory, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


# --------------------------------------------------------------------------------------------------------------------
# Bad input, atomic writes, the command line


@pytest.mark.parametrize(("model_type", "overrides", "message"), [
    ("gpt_bigcode", {"multi_query": False}, "multi_query=false cannot be written"),
    ("mpt", {"attn_config": {"softmax_scale": 0.5}}, "softmax_scale cannot be written"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' cannot be written"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
     "rope_type 'dynamic' cannot be written to GGUF; supported: default, linear, yarn, llama3"),
])  # fmt: skip
def test_settings_llama_cpp_cannot_represent_are_errors(tmp_path, model_type, overrides, message):
    _, directory = _hf_model_dir(tmp_path, model_type, **overrides)
    with pytest.raises(ValueError, match=message):
        write_gguf(directory, tmp_path / "x.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf*"))


def test_unsupported_type_names_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match=r"'q5_0' is not supported; supported: auto, f32, f16, bf16, q8_0, q4_0, q4_1"):
        write_gguf(DEFAULT_MODEL, tmp_path / "x.gguf", "q5_0")


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    _, directory = _hf_model_dir(tmp_path, "llama")
    writer = gguf_writer.gguf.GGUFWriter
    for owner, method in ((gguf_writer.gguf.quants, "quantize"), (writer, "write_tensors_to_file")):
        with monkeypatch.context() as patch:
            patch.setattr(owner, method, fail)
            with pytest.raises(RuntimeError, match="disk full"):
                write_gguf(directory, target, "q8_0")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "model.gguf"]


def test_cli_convert_writes_a_gguf_that_generates(tmp_path, capsys):
    out = tmp_path / "default-q8.gguf"
    code = cli_main(["convert", str(DEFAULT_MODEL), str(out), "--type", "q8_0"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert "q8_0" in err and "with its tokenizer" in err
    assert read_gguf_metadata(out)["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    code = cli_main(["generate", "--model", str(out), "--max-new-tokens", "4", "--greedy", "Once upon a time"])
    printed, err = capsys.readouterr()
    assert code == 0, err
    assert printed.strip()
    # an existing file needs --force; a bad type is a usage error naming the allowed ones
    assert cli_main(["convert", str(DEFAULT_MODEL), str(out), "--type", "q8_0"]) == 1
    assert "pass --force" in capsys.readouterr().err
    assert cli_main(["convert", str(DEFAULT_MODEL), str(tmp_path / "y.gguf"), "--type", "q2_k"]) == 2
    assert "supported: auto, f32, f16, bf16, q8_0, q4_0, q4_1" in capsys.readouterr().err
    assert cli_main(["convert", str(DEFAULT_MODEL), str(tmp_path / "dir"), "--type", "q8_0"]) == 2
    assert "--type applies to a .gguf OUTPUT" in capsys.readouterr().err
