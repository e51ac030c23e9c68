"""Speculative decoding on the compiled paths: the packaged verify step (generation/verify_step.py) beside the
packaged decode step (compile="aot"), and compiled plain steps (compile=True).

Oracle: plain greedy decoding (checked against transformers in test_generate.py, and once here directly), and for
the verify step's logits the model's own eager forward over the same cache.
"""

from __future__ import annotations

import pytest
import torch

import decoderkit
from decoderkit.cache import StaticCache
from decoderkit.generation import aot_step, speculative, verify_step
from decoderkit.generation.verify_step import MAX_VERIFY_TOKENS, VerifyStep

oracle = pytest.importorskip("oracle")

FAMILIES = ["llama", "gemma", "gpt_bigcode", "mpt"]
NEW = 30
# The schedule from the acceptance alone, not the clock (see conftest.untimed_schedule)
pytestmark = pytest.mark.usefixtures("untimed_schedule")


def repetitive_prompt(vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(3, vocab, (6,), generator=gen)
    return torch.cat([base, base, base, base[:3]])[None]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("packages")


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    hf = oracle.build(request.param)
    dk = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(hf, tmp_path_factory.mktemp(request.param)),
                                                         dtype=torch.float32)
    return hf, dk.eval()


@pytest.fixture
def calls(monkeypatch):
    """The token count of every call of the packaged verify step, in order."""
    seen = []
    real_call = VerifyStep.__call__
    monkeypatch.setattr(VerifyStep, "__call__", lambda self, tokens, filled: seen.append(tokens.shape[1]) or
                        real_call(self, tokens, filled))
    return seen


@pytest.mark.slow
def test_packaged_speculation_gives_plain_greedy_ids(pair, cache_dir, monkeypatch, calls):
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(cache_dir))
    hf, dk = pair
    prompt = repetitive_prompt(dk.config.vocab_size)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        plain = dk.generate(prompt, **kwargs)
        got = dk.generate(prompt, compile="aot", prompt_lookup_num_tokens=4, return_dict_in_generate=True, **kwargs)
    assert torch.equal(got.sequences, plain), f"\nplain {plain.tolist()}\nspec  {got.sequences.tolist()}"
    # Proposals were kept and rejected, all through the packaged verify step, of different lengths
    assert 0 < got.num_accepted_tokens < got.num_proposed_tokens
    assert sum(calls) - len(calls) == got.num_proposed_tokens and len(set(calls)) > 1, calls
    if dk.config.model_type == "llama":
        expected = hf.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(got.sequences, expected)
    # The two packages are on disk: compile="auto" (the command line's default) takes them, compiling nothing
    names = sorted(p.name.split("-")[0] for p in aot_step.package_dir().glob("*.pt2")
                   if p.name in {aot_step.package_path(dk, aot_step.step_identity(dk), 1, 256).name,
                                 verify_step.verify_package_path(dk, 256).name})
    assert names == ["step", "verify"]
    with torch.no_grad(), pytest.MonkeyPatch.context() as no_compiling:
        no_compiling.setattr(torch._inductor, "aoti_compile_and_package", None)
        calls.clear()
        auto = dk.generate(prompt, compile="auto", prompt_lookup_num_tokens=4, **kwargs)
    assert torch.equal(auto, plain) and calls


@pytest.mark.slow
def test_verify_logits_equal_the_eager_forward(pair, cache_dir, monkeypatch):
    """Every position's logits, at several lengths, against the model's own forward over a copy of the cache; the
    cache then holds the same keys and values as the eager forward wrote."""
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(cache_dir))
    _, dk = pair
    prompt = repetitive_prompt(dk.config.vocab_size)
    L = prompt.shape[1]
    cache = StaticCache(dk.decoder_config, 1, 256, dtype=torch.float32)
    with torch.no_grad():
        dk(prompt, past_key_values=cache, use_cache=True)
        step = VerifyStep(dk, cache)
        gen = torch.Generator().manual_seed(3)
        for T in (2, 5, MAX_VERIFY_TOKENS):
            tokens = torch.randint(3, dk.config.vocab_size, (1, T), generator=gen)
            eager_cache = StaticCache(dk.decoder_config, 1, 256, dtype=torch.float32)
            for layer in range(len(cache.keys)):
                eager_cache.keys[layer].copy_(cache.keys[layer])
                eager_cache.values[layer].copy_(cache.values[layer])
            eager_cache.mark_filled(L)
            want = dk(tokens, position_ids=torch.arange(L, L + T)[None], past_key_values=eager_cache,
                      use_cache=True).logits[0].float()
            got = step(tokens, L)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert cache.get_seq_length() == L + T
            for layer in range(len(cache.keys)):
                torch.testing.assert_close(cache.keys[layer][:, :, : L + T], eager_cache.keys[layer][:, :, : L + T])
                torch.testing.assert_close(cache.values[layer][:, :, : L + T],
                                           eager_cache.values[layer][:, :, : L + T])
            cache.crop(L)
        with pytest.raises(ValueError, match=f"VerifyStep takes 2 to {MAX_VERIFY_TOKENS} tokens, got 1"):
            step(tokens[:, :1], L)
        with pytest.raises(ValueError, match=f"VerifyStep takes 2 to {MAX_VERIFY_TOKENS} tokens, got 17"):
            step(torch.zeros(1, 17, dtype=torch.long), L)
        with pytest.raises(ValueError, match="slots 254..257 are past the cache's 256"):
            step(tokens[:, :4], 254)
    with pytest.raises(ValueError, match="VerifyStep runs one sequence over a static cache"):
        VerifyStep(dk, StaticCache(dk.decoder_config, 2, 256, dtype=torch.float32))


@pytest.mark.slow
def test_compiled_plain_steps_speculate_too(tmp_path, monkeypatch, calls):
    """compile=True: the plain steps are torch.compile'd, the verify forwards the packaged verify step; where the
    model cannot have one, its eager forward. The ids are plain greedy's either way."""
    monkeypatch.setenv("DECODERKIT_CACHE_DIR", str(tmp_path / "cache"))
    hf = oracle.build("mpt")
    dk = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(hf, tmp_path / "m"), dtype=torch.float32).eval()
    prompt = repetitive_prompt(dk.config.vocab_size)
    kwargs = dict(max_new_tokens=NEW, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        plain = dk.generate(prompt, **kwargs)
        got = dk.generate(prompt, compile=True, prompt_lookup_num_tokens=4, return_dict_in_generate=True, **kwargs)
        assert torch.equal(got.sequences, plain)
        assert 0 < got.num_accepted_tokens < got.num_proposed_tokens
        assert sum(calls) - len(calls) == got.num_proposed_tokens
        calls.clear()
        monkeypatch.setattr(speculative, "aot_unsupported", lambda model: "not here")
        again = dk.generate(prompt, compile=True, prompt_lookup_num_tokens=4, return_dict_in_generate=True, **kwargs)
    assert torch.equal(again.sequences, plain) and not calls and again.num_proposed_tokens
