"""The flash_attention_2 backend against sdpa on every family: caches (static and dynamic), padding, decoding,
packed sequences and generate().

On CPU the flash_attn package is tests/flash_attn_double.py (checked first against the documented formula); with a
GPU and flash_attn installed the `flash_backend` fixture runs the same tests on the real kernel as well.
"""

from __future__ import annotations

import math

import pytest
import torch
from flash_attn_double import flash_attn_func, flash_attn_varlen_func
from oracle import build, left_padded_batch, rel_err, save

from decoderkit import AutoModelForCausalLM, DynamicCache, StaticCache

FAMILIES = ["llama", "gemma", "gpt_bigcode", "mpt"]


# ------------------------------------------------------------------------------------------- the double itself
def _reference(q, k, v, scale, causal=False, slopes=None, window=(-1, -1)):
    """One sequence, one query and head at a time, straight from flash_attn's docstring."""
    Tq, H, D = q.shape
    Tk, Hk, _ = k.shape
    out = torch.zeros(Tq, H, D, dtype=torch.float64)
    for h in range(H):
        kv = h // (H // Hk)
        for i in range(Tq):
            aligned = i + Tk - Tq
            lo = aligned - window[0] if window[0] >= 0 else 0
            hi = aligned if causal else (aligned + window[1] if window[1] >= 0 else Tk - 1)
            keys = [j for j in range(Tk) if lo <= j <= hi]
            if not keys:
                continue
            scores = [float(q[i, h].double() @ k[j, kv].double()) * scale
                      - (float(slopes[h]) * abs(aligned - j) if slopes is not None else 0.0) for j in keys]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            for w, j in zip(weights, keys):
                out[i, h] += w / sum(weights) * v[j, kv].double()
    return out


def test_double_causal_mask_is_bottom_right_aligned():
    """With zero queries every allowed key weighs the same, and v = identity reads the weights out."""
    def weights(Tq, Tk):
        q = torch.zeros(1, Tq, 1, Tk)
        k = torch.randn(1, Tk, 1, Tk)
        return flash_attn_func(q, k, torch.eye(Tk)[None, :, None, :], causal=True)[0, :, 0]

    # The kernel's own examples: seqlen_q=2, seqlen_k=5 keeps 1 1 1 1 0 / 1 1 1 1 1; 5 and 2 keep
    # 0 0 / 0 0 / 0 0 / 1 0 / 1 1 (rows that keep nothing are zeros).
    assert torch.equal(weights(2, 5), torch.tensor([[0.25] * 4 + [0.0], [0.2] * 5]))
    assert torch.equal(weights(5, 2), torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 0.0], [0.5, 0.5]]))


def test_double_matches_the_documented_formula():
    gen = torch.Generator().manual_seed(0)
    B, Tq, Tk, H, Hk, D = 2, 3, 5, 4, 2, 8
    q, k, v = (torch.randn(B, T, h, D, generator=gen) for T, h in ((Tq, H), (Tk, Hk), (Tk, Hk)))
    slopes = torch.rand(H, generator=gen)
    for kwargs in (dict(causal=True), dict(causal=True, slopes=slopes), dict(window=(1, 1)), dict()):
        got = flash_attn_func(q, k, v, softmax_scale=0.3, causal=kwargs.get("causal", False),
                              window_size=kwargs.get("window", (-1, -1)), alibi_slopes=kwargs.get("slopes"))
        for b in range(B):
            assert rel_err(got[b], _reference(q[b], k[b], v[b], 0.3, **kwargs)) <= 1e-6, kwargs
    # softmax_scale defaults to 1 / sqrt(D); a single key and query head (MQA) serves every query head
    got = flash_attn_func(q, k[:, :, :1], v[:, :, :1], causal=True)
    assert rel_err(got[0], _reference(q[0], k[0, :, :1], v[0, :, :1], D ** -0.5, causal=True)) <= 1e-6

    # varlen: each sequence aligns on its own lengths; a sequence without queries is allowed
    cu_q = torch.tensor([0, 2, 2, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    q, k, v = torch.randn(5, H, D, generator=gen), torch.randn(9, Hk, D, generator=gen), torch.randn(9, Hk, D)
    got = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 4, causal=True, alibi_slopes=slopes)
    for a, b, c, d in ((0, 2, 0, 4), (2, 5, 6, 9)):
        ref = _reference(q[a:b], k[c:d], v[c:d], D ** -0.5, causal=True, slopes=slopes)
        assert rel_err(got[a:b], ref) <= 1e-6
    with pytest.raises(ValueError, match="int32"):
        flash_attn_varlen_func(q, k, v, cu_q.long(), cu_k, 3, 4)
    with pytest.raises(ValueError, match="max_seqlen_k=3 is below a sequence of 4"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 3)


# ------------------------------------------------------------------------------------------- the backend
@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    hf = build(request.param, "causal_lm")
    return save(hf, tmp_path_factory.mktemp(request.param))


def _load(checkpoint, backend):
    return AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa").to(backend.device,
                                                                                          backend.dtype)


def _both(model, run):
    """run() under sdpa, then under flash_attention_2."""
    model.set_attn_implementation("sdpa")
    expected = run()
    model.set_attn_implementation("flash_attention_2")
    return expected, run()


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("cache_kind", ["none", "dynamic", "static"])
def test_forward_through_caches_matches_sdpa(checkpoint, flash_backend, cache_kind, padded):
    """A prompt of 4, a chunk of 2, then token by token: the chunk and the single tokens sit at the end of the keys
    written so far, not of a static cache's buffer. The shorter row's first chunk is all padding."""
    model = _load(checkpoint, flash_backend)
    ids, mask, pos = (t.to(flash_backend.device) for t in left_padded_batch(97, [9, 5] if padded else [9, 9]))
    bounds = [(0, 9)] if cache_kind == "none" else [(0, 4), (4, 6), (6, 7), (7, 8), (8, 9)]

    @torch.no_grad()
    def run():
        cache = {"none": None, "dynamic": DynamicCache(),
                 "static": StaticCache(model.config, 2, 16, device=flash_backend.device, dtype=model.dtype)}[cache_kind]
        logits = []
        for a, b in bounds:
            out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b] if padded else None,
                        position_ids=pos[:, a:b], past_key_values=cache, use_cache=cache is not None)
            logits.append(out.logits)
        return torch.cat(logits, 1)

    expected, got = _both(model, run)
    keep = mask.bool()
    assert rel_err(got[keep], expected[keep]) <= flash_backend.tol


def test_packed_sequences_stay_apart(checkpoint, flash_backend):
    """Position ids that restart (no mask, no cache) pack documents, which must not see each other."""
    model = _load(checkpoint, flash_backend)
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(5)).to(flash_backend.device)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]], device=ids.device)

    @torch.no_grad()
    def run():
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits

    expected, got = _both(model, run)
    assert rel_err(got, expected) <= flash_backend.tol
    with torch.no_grad():
        for row, start, end in ((0, 4, 7), (0, 7, 10), (1, 6, 10)):
            alone = model(input_ids=ids[row:row + 1, start:end], use_cache=False).logits[0]
            assert rel_err(got[row, start:end], alone) <= flash_backend.tol


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_greedy_generate_matches_sdpa(checkpoint, flash_backend, cache_kind, padded):
    """The README's `generate(..., cache_implementation="static")`, on flash_attention_2."""
    model = _load(checkpoint, flash_backend)
    ids, mask, _ = (t.to(flash_backend.device) for t in left_padded_batch(97, [7, 4] if padded else [7, 7]))

    def run():
        # use_cache explicitly: MPT's config turns it off by default
        return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=True,
                              cache_implementation=cache_kind, return_dict_in_generate=True, output_logits=True)

    expected, got = _both(model, run)
    assert isinstance(got.past_key_values, StaticCache if cache_kind == "static" else DynamicCache)
    assert torch.equal(got.sequences, expected.sequences)
    assert rel_err(torch.stack(got.logits), torch.stack(expected.logits)) <= flash_backend.tol


def test_cross_attention_honours_the_encoder_mask(tmp_path, flash_backend):
    model = AutoModelForCausalLM.from_pretrained(
        save(build("gpt_bigcode", "causal_lm", add_cross_attention=True, multi_query=False), tmp_path / "x"),
        attn_implementation="sdpa").to(flash_backend.device, flash_backend.dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (2, 5), generator=gen).to(flash_backend.device)
    enc = torch.randn(2, 7, 32, generator=gen).to(flash_backend.device, flash_backend.dtype)
    enc_mask = torch.ones(2, 7, dtype=torch.long, device=flash_backend.device)
    enc_mask[1, :3] = 0

    @torch.no_grad()
    def run():
        return model(input_ids=ids, encoder_hidden_states=enc, encoder_attention_mask=enc_mask).logits

    expected, got = _both(model, run)
    assert rel_err(got, expected) <= flash_backend.tol


def test_beam_search_on_a_static_cache_matches_sdpa(checkpoint, flash_backend):
    """Beams reorder the static cache between steps; flash must keep reading only the written slots."""
    model = _load(checkpoint, flash_backend)
    ids, mask, _ = (t.to(flash_backend.device) for t in left_padded_batch(97, [6, 3]))

    def run():
        return model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=3,
                              use_cache=True, cache_implementation="static", return_dict_in_generate=True,
                              output_scores=True)

    expected, got = _both(model, run)
    assert torch.equal(got.sequences, expected.sequences)
    assert rel_err(got.sequences_scores, expected.sequences_scores) <= flash_backend.tol
