"""GenerationConfig: transformers' names, defaults and file format; strict updates; validation naming the argument."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

from decoderkit.generation import GENERATION_CONFIG_NAME, GenerationConfig

transformers = pytest.importorskip("transformers")

DECODERKIT_ONLY = {"presence_penalty", "frequency_penalty", "extra_fields"}


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(GenerationConfig) if f.name not in DECODERKIT_ONLY]


def test_field_names_are_transformers_names():
    hf = transformers.GenerationConfig()
    missing = [name for name in field_names() if not hasattr(hf, name)]
    assert not missing


def test_defaults_are_transformers_effective_defaults():
    hf_defaults = transformers.GenerationConfig._get_default_generation_params()
    ours = GenerationConfig()
    for name in field_names():
        if name == "max_length":
            # Unset on purpose: transformers' 20 means "20 new tokens" only while nobody set max_length
            assert ours.max_length is None and ours.max_length_for(7) == 7 + hf_defaults["max_length"]
        elif name == "num_assistant_tokens_schedule":
            # On purpose: a draft model that keeps missing proposes fewer tokens instead of slowing decoding down
            assert ours.num_assistant_tokens_schedule == "heuristic" and hf_defaults[name] == "constant"
        elif name in hf_defaults:
            assert getattr(ours, name) == hf_defaults[name], name
        else:
            # Unset in transformers; ours is None too, or False for output flags that transformers reads as falsy
            assert getattr(ours, name) in (None, False) and getattr(transformers.GenerationConfig(), name) is None


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(min_new_tokens=-2), "min_new_tokens"),
        (dict(max_length=0), "max_length"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.2), "min_p"),
        (dict(min_p=-0.1), "min_p"),
        (dict(typical_p=0.0), "typical_p"),
        (dict(typical_p=1.1), "typical_p"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(num_return_sequences=0), "num_return_sequences"),
        (dict(length_penalty="long"), "length_penalty"),
        (dict(length_penalty=None), "length_penalty"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(early_stopping=1), "early_stopping"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(eos_token_id=[]), "eos_token_id"),
        (dict(eos_token_id="</s>"), "eos_token_id"),
        (dict(stop_strings=[""]), "stop_strings"),
        (dict(cache_implementation="magic"), "cache_implementation"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
    ],
)
def test_validate_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`"):
        GenerationConfig(**kwargs)
    config = GenerationConfig()
    with pytest.raises(ValueError, match=f"`{argument}`"):
        config.update(**kwargs)
    assert config == GenerationConfig(), "a rejected update leaves the config unchanged"


@pytest.mark.filterwarnings("ignore:do_sample=False")
def test_valid_combinations():
    GenerationConfig(num_beams=4, num_return_sequences=4, early_stopping="never", length_penalty=-0.5)
    GenerationConfig(do_sample=True, num_return_sequences=3, temperature=0.3)
    GenerationConfig(max_new_tokens=0, eos_token_id=[1, 2], stop_strings="\n\n", top_k=0, min_p=0.0)
    GenerationConfig(temperature=0.0)  # greedy: temperature is irrelevant, as in transformers


def test_update_rejects_unknown_keys_with_a_suggestion():
    config = GenerationConfig()
    with pytest.raises(ValueError, match=r"`temprature`.*`temperature`"):
        config.update(temprature=0.5, top_k=3)
    assert config.top_k == 50, "nothing applied when one key is unknown"
    with pytest.raises(ValueError, match="`max_new_token`.*`max_new_tokens`"):
        config.update(max_new_token=3)
    with pytest.raises(ValueError, match="no parameter `zzzz`$"):
        config.update(zzzz=1)
    config.update(do_sample=True, temperature=0.5, top_k=3)
    assert (config.do_sample, config.temperature, config.top_k) == (True, 0.5, 3)


def test_sampling_flags_without_do_sample_warn_only_when_set_by_the_user(tmp_path):
    with pytest.warns(UserWarning, match="temperature"):
        GenerationConfig(temperature=0.7)
    config = GenerationConfig()
    with pytest.warns(UserWarning, match="top_p"):
        config.update(top_p=0.9)
    (tmp_path / GENERATION_CONFIG_NAME).write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = GenerationConfig.from_pretrained(tmp_path)
        GenerationConfig(do_sample=True, temperature=0.7)
    assert (loaded.temperature, loaded.generation_mode) == (0.6, "greedy")


def test_generation_mode():
    assert GenerationConfig().generation_mode == "greedy"
    assert GenerationConfig(do_sample=True).generation_mode == "sample"
    assert GenerationConfig(num_beams=3).generation_mode == "beam_search"
    assert GenerationConfig(num_beams=3, do_sample=True).generation_mode == "beam_sample"


def test_max_length_resolution_matches_transformers():
    assert GenerationConfig(max_new_tokens=5, max_length=100).max_length_for(7) == 12
    assert GenerationConfig(max_length=30).max_length_for(7) == 30
    assert GenerationConfig().max_length_for(7) == 27
    assert GenerationConfig().max_length_for(7, max_position_embeddings=16) == 16


def test_reads_a_file_written_by_transformers(tmp_path):
    hf = transformers.GenerationConfig(
        do_sample=True, temperature=0.6, top_p=0.9, top_k=20, max_new_tokens=64, eos_token_id=[128001, 128009],
        bos_token_id=128000, pad_token_id=0, repetition_penalty=1.1, num_beams=2, length_penalty=0.8,
        early_stopping="never", min_p=0.05, stop_strings=["<|eot|>"], no_repeat_ngram_size=3,
    )  # fmt: skip
    hf.save_pretrained(tmp_path)
    ours = GenerationConfig.from_pretrained(tmp_path)
    for name in field_names():
        expected = getattr(hf, name)
        if expected is not None:
            assert getattr(ours, name) == expected, name
    assert ours.extra_fields == {}, "transformers_version is metadata, not a setting"


def test_transformers_reads_what_we_write(tmp_path):
    ours = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=0, typical_p=0.5, eos_token_id=[2, 7], pad_token_id=0,
        max_length=40, min_new_tokens=2, num_return_sequences=2, cache_implementation="static",
    )  # fmt: skip
    path = ours.save_pretrained(tmp_path)
    assert path == tmp_path / GENERATION_CONFIG_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [GENERATION_CONFIG_NAME], "no temporary file left behind"
    written = json.loads(path.read_text())
    assert "top_p" not in written and written["top_k"] == 0, "only non-default values are written"
    hf = transformers.GenerationConfig.from_pretrained(tmp_path)
    for name in field_names():
        assert getattr(hf, name) in (getattr(ours, name), None), name
        if name in written:
            assert getattr(hf, name) == getattr(ours, name), name
    assert GenerationConfig.from_pretrained(tmp_path) == ours


def test_unknown_file_keys_are_kept_and_round_trip(tmp_path, caplog):
    data = {"temperature": 0.5, "do_sample": True, "suppress_tokens": [5], "watermarking_config": None}
    data["transformers_version"] = "4.40.0"
    data["_from_model_config"] = True
    (tmp_path / GENERATION_CONFIG_NAME).write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        config = GenerationConfig.from_pretrained(tmp_path / GENERATION_CONFIG_NAME, top_k=7)
    assert "suppress_tokens" in caplog.text and "watermarking_config" not in caplog.text
    assert config.extra_fields == {"suppress_tokens": [5], "watermarking_config": None}
    assert (config.temperature, config.top_k) == (0.5, 7)
    out = tmp_path / "out"
    config.save_pretrained(out)
    assert json.loads((out / GENERATION_CONFIG_NAME).read_text())["suppress_tokens"] == [5]


def test_null_in_a_file_means_default():
    config = GenerationConfig.from_dict({"temperature": None, "top_k": None, "eos_token_id": None, "do_sample": True})
    assert (config.temperature, config.top_k, config.eos_token_id, config.do_sample) == (1.0, 50, None, True)


def test_hybrid_cache_implementation_is_dropped_like_transformers():
    assert GenerationConfig.from_dict({"cache_implementation": "hybrid"}).cache_implementation is None
    assert GenerationConfig.from_dict({"cache_implementation": "static"}).cache_implementation == "static"


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=GENERATION_CONFIG_NAME):
        GenerationConfig.from_pretrained(tmp_path)
    (tmp_path / GENERATION_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        GenerationConfig.from_pretrained(tmp_path)
    (tmp_path / GENERATION_CONFIG_NAME).write_text(json.dumps({"top_p": 2.0}))
    with pytest.raises(ValueError, match="`top_p`"):
        GenerationConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="directory"):
        GenerationConfig().save_pretrained(tmp_path / GENERATION_CONFIG_NAME)


def test_from_model_config_matches_transformers():
    model_config = {
        "model_type": "llama",
        "hidden_size": 64,
        "bos_token_id": 1,
        "eos_token_id": [2, 32000],
        "pad_token_id": None,
        "use_cache": False,
        "max_length": 30,
        "text_config": {"pad_token_id": 3, "bos_token_id": 9},
    }
    hf = transformers.GenerationConfig.from_model_config(dict(model_config))
    ours = GenerationConfig.from_model_config(model_config)
    for name in field_names():
        if getattr(hf, name) is not None:
            assert getattr(ours, name) == getattr(hf, name), name
    assert (ours.bos_token_id, ours.pad_token_id, ours.eos_token_ids) == (1, 3, [2, 32000])


def test_eos_token_ids():
    assert GenerationConfig().eos_token_ids == []
    assert GenerationConfig(eos_token_id=2).eos_token_ids == [2]
    assert GenerationConfig(eos_token_id=[2, 3]).eos_token_ids == [2, 3]
