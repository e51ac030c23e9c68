"""Decode attention over a static cache's filled slots only (decoderkit.kernels.attention.static_attention): the op
against attention written out over just those slots, with NaN in every slot past them, and the model's static-cache
decode steps, which run it, against transformers for all four families."""

from __future__ import annotations

import pytest
import torch

import decoderkit
from decoderkit.kernels import attention as kernel
from decoderkit.layers import attention as layers

oracle = pytest.importorskip("oracle")
pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not kernel.available(), reason="no C++ compiler for the attention kernel")


def reference(q, k, v, first, key_mask, slopes, scale):
    """(B, T, H, D) causal attention over slots 0 .. first + T - 1 only, in float64."""
    B, T, H, D = q.shape
    n = first + T
    groups = H // k.shape[1]
    ks = k[:, :, :n].double().repeat_interleave(groups, 1)  # (B, H, n, D)
    vs = v[:, :, :n].double().repeat_interleave(groups, 1)
    scores = q.double().transpose(1, 2) @ ks.transpose(2, 3) * scale  # (B, H, T, n)
    key_pos, q_pos = torch.arange(n), first + torch.arange(T)
    if slopes is not None:
        scores = scores + slopes.double()[None, :, None, None] * (key_pos[None, :] - q_pos[:, None])
    allowed = key_pos[None, :] <= q_pos[:, None]  # (T, n)
    if key_mask is not None:
        allowed = allowed[None] & key_mask[:, None, :n]  # (B, T, n)
        allowed = allowed[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ vs).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 8), (9, 3, 64), (4, 1, 12)])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("alibi", [False, True])
def test_op_reads_only_the_filled_slots(dtype, heads, kv_heads, head_dim, rows, padded, alibi):
    gen = torch.Generator().manual_seed(heads + rows)
    B, S, first = 3, 40, 21
    q = torch.randn(B, rows, heads, head_dim, generator=gen)
    k = torch.randn(B, kv_heads, S, head_dim, generator=gen).to(dtype)
    v = torch.randn(B, kv_heads, S, head_dim, generator=gen).to(dtype)
    k[:, :, first + rows:] = float("nan")  # never written: reading any of these would spread NaN
    v[:, :, first + rows:] = float("nan")
    key_mask = None
    if padded:
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[1, :5] = False  # left padding of row 1's prompt
        key_mask[2, :17] = False
    slopes = torch.rand(heads, generator=gen) if alibi else None
    scale = head_dim**-0.5
    got = kernel.static_attention(q, k, v, torch.arange(first, first + rows), key_mask, slopes, scale)
    want = reference(q, k, v, first, key_mask, slopes, scale)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused_with_the_reason():
    q = torch.randn(2, 1, 4, 8)
    k = torch.randn(2, 2, 10, 8)
    with pytest.raises(RuntimeError, match="outside the cache's 10"):
        kernel.static_attention(q, k, k, torch.tensor([10]), None, None, 1.0)
    with pytest.raises(RuntimeError, match=r"key_mask must be \(B, S\) bool"):
        kernel.static_attention(q, k, k, torch.tensor([3]), torch.ones(2, 9, dtype=torch.bool), None, 1.0)
    with pytest.raises(RuntimeError, match="B as in q"):
        kernel.static_attention(q, k[:1].contiguous(), k[:1].contiguous(), torch.tensor([3]), None, None, 1.0)


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt_bigcode", "mpt"])
def test_static_decode_runs_the_kernel_and_matches_transformers(family, tmp_path, monkeypatch):
    hf = oracle.build(family)
    dk = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(hf, tmp_path)).eval()
    calls = []
    original = layers.static_cache_attention
    monkeypatch.setattr(layers, "static_cache_attention", lambda *a: calls.append(1) or original(*a))
    ids, mask, _ = oracle.left_padded_batch(hf.config.vocab_size, [7, 4, 6])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True,
                  output_logits=True, pad_token_id=0, eos_token_id=None, use_cache=True)
    got = dk.generate(ids, cache_implementation="static", **kwargs)
    want = hf.generate(ids, cache_implementation="static", **kwargs)
    assert len(calls) == 5 * hf.config.num_hidden_layers  # every decode step after the prompt's, in every layer
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        # padding rows' logits are the models' business, real rows must agree
        assert oracle.rel_err(a, b) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt_bigcode", "mpt"])
def test_several_query_rows_run_the_kernel_and_match_the_dynamic_cache(family, tmp_path, monkeypatch):
    """A speculative verify forward: a few tokens at once over a static cache after the prompt. Oracle: the same
    tokens over a dynamic cache (SDPA over exactly the cached keys), itself checked against transformers."""
    from decoderkit.cache import DynamicCache, StaticCache

    hf = oracle.build(family)
    dk = decoderkit.AutoModelForCausalLM.from_pretrained(oracle.save(hf, tmp_path), dtype=torch.float32).eval()
    calls = []
    original = layers.static_cache_attention
    monkeypatch.setattr(layers, "static_cache_attention", lambda *a: calls.append(a[0].shape[2]) or original(*a))
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(1, hf.config.vocab_size, (1, 9), generator=gen)
    with torch.no_grad():
        for T in (2, 5, layers.STATIC_KERNEL_ROWS):
            chunk = torch.randint(1, hf.config.vocab_size, (1, T), generator=gen)
            positions = torch.arange(9, 9 + T)[None]
            static = StaticCache(dk.decoder_config, 1, 64, dtype=torch.float32)
            dynamic = DynamicCache()
            dk(prompt, past_key_values=static, use_cache=True)
            dk(prompt, past_key_values=dynamic, use_cache=True)
            calls.clear()
            got = dk(chunk, position_ids=positions, past_key_values=static, use_cache=True).logits
            assert calls == [T] * hf.config.num_hidden_layers
            want = dk(chunk, position_ids=positions, past_key_values=dynamic, use_cache=True).logits
            assert oracle.rel_err(got, want) < 1e-4
        # With an attention mask (query rows that may be padding) SDPA runs instead
        static = StaticCache(dk.decoder_config, 1, 64, dtype=torch.float32)
        dk(prompt, past_key_values=static, use_cache=True)
        calls.clear()
        dk(chunk[:, :3], attention_mask=torch.ones(1, 12, dtype=torch.long), position_ids=torch.arange(9, 12)[None],
           past_key_values=static, use_cache=True)
        assert calls == []
