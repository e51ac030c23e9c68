"""transformers' model surface beyond forward and generate (#12.1-3): `model.config` as the family's own config class,
`return_dict=False` tuples, embeddings access and resizing, parameter counts, `from_pretrained`'s keywords, and
`generate` continuing from `past_key_values` or starting from `inputs_embeds`.

Oracle: the same checkpoint loaded by transformers (tests/oracle.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from oracle import HF_CLASSES, build, rel_err, save

import decoderkit
from decoderkit.families import get_family

FAMILIES = ["llama", "gemma", "gpt_bigcode", "mpt"]
OURS = {
    "causal_lm": decoderkit.AutoModelForCausalLM,
    "base": decoderkit.AutoModel,
    "sequence_classification": decoderkit.AutoModelForSequenceClassification,
    "token_classification": decoderkit.AutoModelForTokenClassification,
    "question_answering": decoderkit.AutoModelForQuestionAnswering,
}
IDS = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """One saved causal LM per family (transformers' tied-embedding default for each)."""
    root = tmp_path_factory.mktemp("surface")
    return {mt: save(build(mt), root / mt) for mt in FAMILIES}


def both(path: str, head: str = "causal_lm", **kwargs):
    theirs = HF_CLASSES[head].from_pretrained(path, **kwargs).eval()
    ours = OURS[head].from_pretrained(path, **kwargs).eval()
    return theirs, ours


# --------------------------------------------------------------------------------------------------------------------
# 1. model.config


@pytest.mark.parametrize("model_type", FAMILIES)
def test_config_is_transformers_config(checkpoints, model_type, tmp_path):
    theirs, ours = both(checkpoints[model_type])
    a, b = theirs.config, ours.config
    assert type(b).__name__ == type(a).__name__
    assert b.to_dict() == a.to_dict()
    assert b.to_diff_dict() == a.to_diff_dict()
    assert b.to_json_string() == a.to_json_string()
    assert b.to_json_string(use_diff=False) == a.to_json_string(use_diff=False)
    names = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "model_type", "architectures",
             "num_labels", "return_dict", "output_hidden_states", "tie_word_embeddings", "use_cache", "dtype",
             "pad_token_id", "eos_token_id", "name_or_path", "id2label", *a.attribute_map, *a.to_dict()]
    for name in names:
        if name == "attn_config":  # MPT's sub-config
            assert b.attn_config.to_dict() == {**a.attn_config.to_dict(), "transformers_version": None} or \
                {**b.attn_config.to_dict(), "transformers_version": None} == {**a.attn_config.to_dict(),
                                                                              "transformers_version": None}
            continue
        assert getattr(b, name) == getattr(a, name), name
    for name in ("rope_scaling", "max_position_embeddings", "n_embd", "d_model", "head_dim", "norm_type",
                 "no_such_field"):
        assert hasattr(b, name) == hasattr(a, name), name
        if hasattr(a, name):
            assert getattr(b, name) == getattr(a, name), name
    if model_type == "mpt":
        assert b.attn_config.alibi_bias_max == a.attn_config.alibi_bias_max
    b.save_pretrained(tmp_path / "cfg")
    reread = transformers.AutoConfig.from_pretrained(tmp_path / "cfg")
    assert {k: v for k, v in reread.to_dict().items() if k != "_name_or_path"} == \
           {k: v for k, v in a.to_dict().items() if k != "_name_or_path"}


@pytest.mark.parametrize("model_type", ["llama", "gpt_bigcode"])
def test_config_reads_legacy_fields_as_transformers(tmp_path, model_type):
    """A hand-written config.json (older spellings, fields left out) gets transformers' derived values."""
    if model_type == "llama":
        fields = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97, rope_theta=50000.0,
                      rope_scaling={"type": "linear", "factor": 2.0}, torch_dtype="float32", num_labels=3)
    else:
        fields = dict(model_type="gpt_bigcode", n_embd=32, n_layer=2, n_head=4, n_inner=48, vocab_size=97,
                      n_positions=64, activation_function="gelu", torch_dtype="float32")
    model = build(model_type)
    save(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    a = transformers.AutoConfig.from_pretrained(tmp_path)
    b = decoderkit.AutoModelForCausalLM.from_pretrained(tmp_path).config
    # transformers' to_dict() names its own version; decoderkit keeps the file's (none here)
    assert b.to_dict() == {k: v for k, v in a.to_dict().items() if k != "transformers_version"}


def test_config_writes(checkpoints, tmp_path):
    """use_cache / output_hidden_states / return_dict written on the config steer calls, as in transformers; a size
    written after load is recorded and saved but changes no layer."""
    # MPT: transformers 5.23's Llama reads its own base model's output by name, so config.return_dict=False fails there
    theirs, ours = both(checkpoints["mpt"])
    for model in (theirs, ours):
        model.config.use_cache = False
        model.config.output_hidden_states = True
    with torch.no_grad():
        a, b = theirs(IDS), ours(IDS)
    assert set(a.keys()) == set(b.keys()) == {"logits", "hidden_states"}
    assert len(a.hidden_states) == len(b.hidden_states)
    for model in (theirs, ours):
        model.config.return_dict = False
        model.config.use_cache = True
    with torch.no_grad():
        a, b = theirs(IDS), ours(IDS)
    assert isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) == 3
    ours.config.return_dict = True
    ours.config.output_hidden_states = False
    ours.config.hidden_size = 8
    ours.config.use_cache = False
    assert ours.decoder_config.hidden_size == 32 and ours.decoder_config.use_cache is False
    assert ours.config.d_model == 8 and ours.config.to_dict()["d_model"] == 8
    with torch.no_grad():
        assert ours(IDS).logits.shape == (2, 5, 97)
    ours.config.hidden_size = 32
    ours.config.use_cache = False
    ours.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["use_cache"] is False
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config.use_cache is False


def test_config_of_a_gguf_model(tmp_path, checkpoints):
    """A model read from GGUF answers with the transformers config the file maps to."""
    from decoderkit.gguf_writer import write_gguf

    source = transformers.AutoConfig.from_pretrained(checkpoints["llama"])
    write_gguf(checkpoints["llama"], tmp_path / "model.gguf", "f32")
    config = decoderkit.AutoModelForCausalLM.from_pretrained(tmp_path / "model.gguf").config
    assert type(config).__name__ == "LlamaConfig"
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "intermediate_size", "vocab_size", "rope_parameters", "model_type", "tie_word_embeddings"):
        assert getattr(config, name) == getattr(source, name), name
    assert config.rms_norm_eps == pytest.approx(source.rms_norm_eps)  # GGUF stores it as float32
    assert config.architectures == ["LlamaForCausalLM"]


# --------------------------------------------------------------------------------------------------------------------
# 2. return_dict=False


def _same(a, b) -> None:
    assert type(a).__name__ == type(b).__name__ or (isinstance(a, tuple) and isinstance(b, tuple))
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and rel_err(b, a) <= 1e-4
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_return_dict_false_gives_transformers_tuples(tmp_path, model_type):
    family = get_family(model_type)
    labels = {"causal_lm": IDS, "sequence_classification": torch.tensor([0, 1]),
              "token_classification": IDS % 2}
    for head in family.hf_heads:
        model = build(model_type, head, pad_token_id=0)
        path = save(model, tmp_path / head)
        theirs, ours = both(path, head)
        for kwargs in ({}, {"output_hidden_states": True, "use_cache": True}):
            if head in labels:
                kwargs = {**kwargs, "labels": labels[head]}
            if head == "question_answering":
                kwargs = {**kwargs, "start_positions": torch.tensor([1, 2]), "end_positions": torch.tensor([3, 4])}
            with torch.no_grad():
                a = theirs(IDS, return_dict=False, **kwargs)
                b = ours(IDS, return_dict=False, **kwargs)
            assert isinstance(b, tuple), (head, kwargs)
            if model_type == "mpt" and head in ("token_classification", "question_answering"):
                # transformers' MPT slices its base outputs by position ([2:]), dropping the hidden states when
                # there is no cache; decoderkit returns every set field, as the other families' heads do
                b = b[:len(a)]
            _same(a, b)


# --------------------------------------------------------------------------------------------------------------------
# 3. methods


@pytest.mark.parametrize("model_type", FAMILIES)
def test_num_parameters(checkpoints, model_type):
    theirs, ours = both(checkpoints[model_type])
    for only_trainable in (False, True):
        for exclude_embeddings in (False, True):
            kw = dict(only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
            assert ours.num_parameters(**kw) == theirs.num_parameters(**kw), kw
    for p in ours.model.layers[0].parameters():
        p.requires_grad_(False)
    for p in theirs.base_model.get_submodule(
            {"gpt_bigcode": "h", "mpt": "blocks"}.get(model_type, "layers"))[0].parameters():
        p.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == theirs.num_parameters(only_trainable=True)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_resize_token_embeddings(tmp_path, model_type, tied):
    path = save(build(model_type, tie_word_embeddings=tied), tmp_path / "m")
    theirs, ours = both(path)
    old = ours.get_input_embeddings().weight.detach().clone()
    for new_size, multiple in ((100, None), (101, 8), (90, None)):
        torch.manual_seed(0)
        a = theirs.resize_token_embeddings(new_size, pad_to_multiple_of=multiple)
        b = ours.resize_token_embeddings(new_size, pad_to_multiple_of=multiple)
        assert b.weight.shape == a.weight.shape
        assert ours.config.vocab_size == theirs.config.vocab_size == a.weight.shape[0]
        assert (ours.lm_head.weight is b.weight) == (theirs.lm_head.weight is a.weight) == tied
        assert ours.lm_head.weight.shape == theirs.lm_head.weight.shape
        n = min(97, b.weight.shape[0])
        assert torch.equal(b.weight[:n], old[:n])
        # New rows: the old rows' mean plus noise of 1e-9 times their covariance, in both
        assert torch.allclose(b.weight, a.weight, atol=1e-3)
        assert torch.allclose(ours.lm_head.weight, theirs.lm_head.weight, atol=1e-3)
        with torch.no_grad():
            assert rel_err(ours(IDS).logits, theirs(IDS).logits) <= 1e-4
            # A new row is the mean row plus noise of ~1e-5, which the first norm scales up by 1 / its small rms
            ids = torch.tensor([[b.weight.shape[0] - 1, 3, 4]])
            assert rel_err(ours(ids).logits, theirs(ids).logits) <= 1e-2
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()


def test_resize_without_mean_draws_from_the_init(checkpoints):
    ours = decoderkit.AutoModelForCausalLM.from_pretrained(checkpoints["llama"])
    ours.resize_token_embeddings(600, mean_resizing=False)
    new = ours.get_input_embeddings().weight[97:]
    assert 0.015 < float(new.std()) < 0.025  # N(0, initializer_range=0.02)
    with pytest.raises(ValueError, match="new_num_tokens must be a positive integer"):
        ours.resize_token_embeddings(0)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        ours.resize_token_embeddings(100, pad_to_multiple_of=0)


def test_embedding_accessors(checkpoints):
    theirs, ours = both(checkpoints["gemma"])
    with torch.no_grad():
        # Gemma's embedding module scales its rows in transformers; ours too, so inputs_embeds built from it agree
        assert rel_err(ours.get_input_embeddings()(IDS), theirs.get_input_embeddings()(IDS)) <= 1e-6
    assert ours.get_output_embeddings() is ours.lm_head
    table = torch.nn.Embedding(97, 32)
    ours.set_input_embeddings(table)
    assert ours.get_input_embeddings() is table and ours.model.embed_tokens is table
    head = torch.nn.Linear(32, 97, bias=False)
    ours.set_output_embeddings(head)
    ours.tie_weights()
    assert ours.lm_head.weight is table.weight
    base = decoderkit.AutoModel.from_pretrained(checkpoints["gemma"])
    assert base.get_output_embeddings() is None


def test_tie_weights_follows_the_config(tmp_path):
    path = save(build("llama", tie_word_embeddings=False), tmp_path / "untied")
    theirs, ours = both(path)
    for model in (theirs, ours):
        assert model.lm_head.weight is not model.get_input_embeddings().weight
        model.config.tie_word_embeddings = True
        model.tie_weights()
    assert ours.lm_head.weight is ours.get_input_embeddings().weight
    assert (theirs.lm_head.weight is theirs.get_input_embeddings().weight) is True


def test_from_pretrained_keywords(checkpoints):
    path = checkpoints["llama"]
    load = decoderkit.AutoModelForCausalLM.from_pretrained
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['tp_plann'\].*allowed.*device_map"):
        load(path, tp_plann="auto")
    with pytest.raises(TypeError, match="force_download= is not supported"):
        load(path, force_download=True)
    with pytest.raises(TypeError, match="max_memory= is not supported"):
        load(path, max_memory={0: "1GB"})
    model = load(path, trust_remote_code=True, low_cpu_mem_usage=True, use_safetensors=True, use_cache=False,
                 num_labels=3)
    assert model.config.use_cache is False and model.decoder_config.use_cache is False
    assert model.config.num_labels == 3
    for device_map in ("cpu", "auto", "sequential", {"": "cpu"}, {"model": "cpu", "lm_head": torch.device("cpu")}):
        assert load(path, device_map=device_map).device.type == "cpu", device_map
    with pytest.raises(ValueError, match="several devices"):
        load(path, device_map={"model.layers.0": "cpu", "model.layers.1": "cuda:0"})
    with pytest.raises(ValueError, match="disagree"):
        load(path, device="cpu", device_map="cuda:1")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_continues_from_past_key_values(checkpoints, model_type):
    results = []
    for model in both(checkpoints[model_type]):
        out = model.generate(IDS, max_new_tokens=4, do_sample=False, use_cache=True, return_dict_in_generate=True)
        longer = torch.cat([out.sequences, torch.tensor([[20, 21], [22, 23]])], dim=1)
        more = model.generate(longer, past_key_values=out.past_key_values, max_new_tokens=3, do_sample=False,
                              use_cache=True)
        results.append((out.sequences.tolist(), more.tolist()))
    assert results[0] == results[1]
    ours = decoderkit.AutoModelForCausalLM.from_pretrained(checkpoints[model_type])
    cache = ours.generate(IDS, max_new_tokens=2, return_dict_in_generate=True, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="must extend it by at least one token"):
        ours.generate(IDS[:, :3], past_key_values=cache, max_new_tokens=2)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_from_inputs_embeds(checkpoints, model_type):
    results = []
    for model in both(checkpoints[model_type]):
        with torch.no_grad():
            embeds = model.get_input_embeddings()(IDS)
        mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
        results.append([
            model.generate(inputs_embeds=embeds, max_new_tokens=4, do_sample=False).tolist(),
            model.generate(inputs_embeds=embeds, attention_mask=mask, max_length=8, do_sample=False).tolist(),
            model.generate(IDS, inputs_embeds=embeds, max_new_tokens=3, do_sample=False).tolist(),
        ])
    assert results[0] == results[1]
    assert len(results[1][0][0]) == 4  # only the new tokens


def test_family_config_is_pickled_and_copied(checkpoints):
    import copy
    import pickle

    ours = decoderkit.AutoModelForCausalLM.from_pretrained(checkpoints["mpt"])
    for clone in (pickle.loads(pickle.dumps(ours.config)), copy.deepcopy(ours.config)):
        assert type(clone).__name__ == "MptConfig" and clone == ours.config
        clone.use_cache = True
        assert ours.decoder_config.use_cache is False  # a copy does not steer the model


def test_model_built_from_a_transformers_style_config(checkpoints, tmp_path: Path):
    ours = decoderkit.AutoModelForCausalLM.from_pretrained(checkpoints["gpt_bigcode"])
    fresh = decoderkit.GPTBigCodeForCausalLM(ours.config)
    assert fresh.config.to_dict() == {**ours.config.to_dict(), "_name_or_path": ""}
    again = decoderkit.AutoModelForCausalLM.from_config(ours.config)
    assert again.config.n_embd == 32
