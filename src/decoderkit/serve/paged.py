"""The paged KV cache and the model's forward pass over it.

The KV cache is a pool of fixed-size blocks shared by all requests (`BlockPool`); a request holds a block table and
gets a new block only when its sequence crosses a block boundary. `PagedRunner` is the model's forward pass written
against that pool, using the model's own modules (norms, projections, rotary, MLP); per-request outputs do not depend
on which other requests share the step, up to the floating-point rounding of batched matrix products.

Attention reads keys and values in place through the block tables (`decoderkit.kernels.attention`, on CPU), for
decode tokens and prefill chunks alike, so a step's cost does not include copying every request's context: short
segments one query vector at a time, prefill chunks through the kernel's tiled path (blocks of keys against blocks
of queries), or torch's flash kernel where the build lacks that path. Where
that kernel is missing, and where the model's own attention takes the eager math (asked for, or ALiBi in half
precision, which the server reproduces bit for bit), each request's keys are gathered from the pool instead.

A step of short segments only (decode tokens, speculative checks, prompts or chunks shorter than
`PREFILL_MIN_TOKENS`) is `step_forward`, a function of tensors that `serve.paged_step` packages with AOTInductor; the
engine runs such steps through the package where one is built (`PagedRunner.decode_step`).

Long prefill chunks of a bf16 / fp16 model run in fp32 on a CPU without native instructions for that dtype (one
layer's weights upcast at a time): there half-precision matrix products are several times slower than fp32 ones.
Whether a segment is upcast depends only on its own length, so a request's numbers still do not depend on what
shares its step.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from decoderkit.kernels import attention as paged_kernel
from decoderkit.layers.attention import AttentionInputs, eager_attention
from decoderkit.layers.rope import apply_rotary
from decoderkit.serve.blocks import BlockPool

# scaled_dot_product_attention shares each key/value head across its query heads itself from torch 2.5 on.
_SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

__all__ = ["BlockPool", "PagedRunner", "Segment", "native_half_matmul"]

# Segments this long or longer are prefill chunks: upcast (see the module docstring; upcasting a layer's weights
# costs about as much as a few rows of half-precision products on such CPUs) and attended by the kernel's tiled path
# (or torch's flash kernel, see `PagedRunner._paged_batch`). Shorter ones (decode tokens, speculative verify rows)
# use the per-vector paged kernel.
PREFILL_MIN_TOKENS = 16


def paged_kernel_available() -> bool:
    return paged_kernel.available()


def _eager_math(implementation: str, alibi: bool, dtype: torch.dtype) -> bool:
    """Whether the model's own attention (`Attention.forward`) takes the eager math here: asked for, or ALiBi in half
    precision, whose fp32 bias SDPA would round to half precision. The server follows it to give the same numbers."""
    return implementation == "eager" or (implementation == "sdpa" and alibi and dtype != torch.float32)


def native_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` matrices at full speed: bfloat16 with AVX512_BF16 or AMX, float16 with
    AMX-FP16. Elsewhere (AVX2, such as the 2-core EPYC the server was measured on) torch converts half-precision
    operands in every matmul: a 16-request decode step ran twice as slow as in float32."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return dtype == torch.float16 and torch.cpu._is_amx_fp16_supported()


def _upcast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A shallow copy of module whose floating-point parameters (not buffers: quantized codes stay) are in dtype.

    A copy rather than casting in place: the model itself is left as it is for any other thread using it."""
    clone = copy.copy(module)
    clone.__dict__["_parameters"] = {name: None if p is None else p.to(dtype) if p.is_floating_point() else p
                                     for name, p in module._parameters.items()}
    clone.__dict__["_modules"] = {name: None if m is None else _upcast(m, dtype) for name, m in module._modules.items()}
    return clone


# Attention of a step's tokens in one layer: (attn module, q (H, N, D), k and v (H_kv, N, D), the layer's key and
# value buffers, with the step's keys already written) -> (N, H, D)
Attend = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _embed(stack: Any, ids: torch.Tensor, pos: torch.Tensor, seq_len: torch.Tensor,
           dtype: torch.dtype | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The step's flat token axis embedded (1, N, d) (in `dtype` if given) and its rope (cos, sin) or None."""
    x = stack.embed(ids[None])
    if dtype is not None:
        x = x.to(dtype)
    if stack.config.position_embedding == "learned":
        x = x + stack.embed_positions(pos[None]).to(x.dtype)
    rope = stack.rotary(pos[None], x.dtype, seq_len=seq_len[None]) if stack.rotary is not None else None
    return x, rope


def _layer(layer: Any, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, write_slots: torch.Tensor,
           k_buf: torch.Tensor, v_buf: torch.Tensor, attend: Attend) -> torch.Tensor:
    """One decoder layer over the step's tokens x (1, N, d): their keys and values written to the pool's buffers
    (rows, H_kv, D) at `write_slots`, attention by `attend`."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q = attn._project(attn.q_proj, h, attn.num_heads)[0]  # (H, N, D)
    k = attn._project(attn.k_proj, h, attn.num_kv_heads)[0]  # (H_kv, N, D)
    v = attn._project(attn.v_proj, h, attn.num_kv_heads)[0]
    if rope is not None:
        q, k = apply_rotary(q[None], *rope)[0], apply_rotary(k[None], *rope)[0]
    k_buf.index_copy_(0, write_slots, k.transpose(0, 1).to(k_buf.dtype))
    v_buf.index_copy_(0, write_slots, v.transpose(0, 1).to(v_buf.dtype))
    out = attend(attn, q, k, v, k_buf, v_buf)
    x = x + attn.o_proj(out.view(1, x.shape[1], -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def step_forward(model: Any, ids: torch.Tensor, positions: torch.Tensor, write_slots: torch.Tensor,
                 tables: torch.Tensor, row_starts: torch.Tensor, starts: torch.Tensor, rows: torch.Tensor,
                 keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], block_size: int) -> torch.Tensor:
    """`PagedRunner.forward` of S segments attended by the paged kernel, written with tensors only (what
    `serve.paged_step` packages): the step's token ids (T,) at `positions` (T,), their pool rows `write_slots` (T,),
    the segments' block tables (S, B), `row_starts` (S + 1,) (segment s owns tokens row_starts[s] ..
    row_starts[s + 1] - 1) and first positions `starts` (S,), each layer's key and value buffers; the logits (R, V)
    after the tokens `rows` (R,), in the model's dtype. Needs the paged kernel."""
    stack = model.model
    alibi = stack.config.position_embedding == "alibi"
    slopes = stack.alibi_slopes.float().contiguous() if alibi else None
    x, rope = _embed(stack, ids, positions, positions + 1, None)

    def attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor,
               v_buf: torch.Tensor) -> torch.Tensor:
        return paged_kernel.paged_attention(q.transpose(0, 1).float().contiguous(), k_buf, v_buf, tables,
                                            row_starts, starts, slopes, attn.scale, block_size).to(q.dtype)

    for layer, k_buf, v_buf in zip(stack.layers, keys, values):
        x = _layer(layer, x, rope, write_slots, k_buf, v_buf, attend)
    return model.lm_head(stack.norm(x[0].index_select(0, rows)))


@dataclass
class Segment:
    """New tokens of one sequence for one forward step: `ids` sit at positions start, start+1, ..."""

    start: int
    ids: list[int]
    block_table: list[int]

    @property
    def end(self) -> int:
        return self.start + len(self.ids)


def logit_rows(segments: Sequence[Segment], tails: Sequence[int] | None) -> list[int]:
    """The rows of a step's flat token axis whose logits `PagedRunner.forward` returns: each segment's last token,
    or with `tails` each one's last tails[i] tokens."""
    ends = list(itertools.accumulate(len(s.ids) for s in segments))
    return [r for end, t in zip(ends, tails) for r in range(end - t, end)] if tails else [e - 1 for e in ends]


def block_tables(pool: BlockPool, segments: Sequence[Segment]) -> torch.Tensor:
    """The blocks each segment's sequence uses up to its end, one row per segment (S, B) int64, padded with block 0
    (the null block) to the longest."""
    used = [s.block_table[: pool.blocks_for(s.end)] for s in segments]
    tables = torch.zeros(len(used), max(map(len, used), default=0), dtype=torch.long)
    for row, blocks in enumerate(used):
        tables[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
    return tables


@dataclass
class _AttentionGroup:
    tokens: torch.Tensor  # (G, Tq) indices into the flat token axis
    slots: torch.Tensor  # (G, K) buffer rows of every key each sequence attends to (padded with row 0: the null block)
    mask: torch.Tensor  # (G, 1, Tq, K) bool, True = attend
    alibi: torch.Tensor | None  # (G, H, 1, K) fp32: slope * (j - last key of the row's sequence), as the model's bias
    chunk: torch.Tensor | None = None  # for a prefill chunk taking the split path: buffer rows of its earlier keys


@dataclass
class _KernelCall:
    """One call of a paged-attention op over some of a step's segments, built once for all layers."""

    op: Callable[..., torch.Tensor]  # paged_kernel.paged_attention or prefill_attention
    tables: torch.Tensor  # (S, B) int64 block tables, padded with block 0
    row_starts: torch.Tensor  # (S + 1,) int64: segment s owns query rows row_starts[s] .. row_starts[s + 1] - 1
    positions: torch.Tensor  # (S,) int64: each segment's start
    rows: torch.Tensor | None  # the step's token indices of these segments; None: all of them, in order


@dataclass
class _PagedBatch:
    """How a step's attention runs: kernel calls, and prefill chunks for flash (tokens, earlier key rows)."""

    calls: list[_KernelCall]
    slopes: torch.Tensor | None  # (H,) fp32 ALiBi slopes
    chunks: list[tuple[torch.Tensor, torch.Tensor | slice]]


def _chunk_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_buf: torch.Tensor,
                     v_buf: torch.Tensor, earlier: torch.Tensor | slice, scale: float) -> torch.Tensor:
    """Causal attention of one prefill chunk: q (1, H, Tq, D) over its own keys k_new, v_new (H_kv, Tq, D) and over
    the sequence's earlier keys at buffer rows `earlier` (indices, or a slice of consecutive rows), without a dense
    mask.

    The two parts run as two flash-attention calls, the chunk's own causally (the kernel skips the masked half) and
    the earlier keys unmasked, with the query heads of each key head folded into one axis (no copies of the keys per
    query head); their outputs are merged by their log-sum-exps, which is exactly softmax over the union."""
    _, h, tq, d = q.shape
    h_kv = k_new.shape[0]
    rep = h // h_kv
    own_k = k_new[None].repeat_interleave(rep, 1) if rep > 1 else k_new[None]
    own_v = v_new[None].repeat_interleave(rep, 1) if rep > 1 else v_new[None]
    out, lse = _flash(q, own_k, own_v, 0.0, True, scale=scale)[:2]
    if isinstance(earlier, slice):
        k_old, v_old = k_buf[earlier], v_buf[earlier]
    else:
        k_old, v_old = k_buf.index_select(0, earlier), v_buf.index_select(0, earlier)
    if k_old.shape[0] == 0:
        return out
    k_old = k_old.to(q.dtype).permute(1, 0, 2)[None]  # (1, H_kv, P, D)
    v_old = v_old.to(q.dtype).permute(1, 0, 2)[None]
    out_old, lse_old = _flash(q.reshape(1, h_kv, rep * tq, d), k_old, v_old, 0.0, False, scale=scale)[:2]
    out_old, lse_old = out_old.reshape(1, h, tq, d), lse_old.reshape(1, h, tq)
    top = torch.maximum(lse, lse_old)
    w_new, w_old = (lse - top).exp()[..., None], (lse_old - top).exp()[..., None]
    return ((out.float() * w_new + out_old.float() * w_old) / (w_new + w_old)).to(q.dtype)


class PagedRunner:
    """The causal LM's forward pass over a `BlockPool`: any mix of prefill chunks and decode tokens in one batch.

    Args:
        model: a `DecoderForCausalLM`.
        pool: the block pool holding its keys and values.
        prefill_dtype: the dtype that segments of at least `PREFILL_MIN_TOKENS` tokens compute in; "auto": float32
            for a bf16 / fp16 model on a CPU without native matrix products in that dtype, else the model's dtype.
            None: always the model's own dtype (its numbers, bit for bit where attention is exact).
        paged_kernel: read keys and values in place with the compiled kernel; None: where it is available (CPU,
            float32 / bfloat16 pool, a C++ compiler).
    """

    def __init__(self, model: Any, pool: BlockPool, prefill_dtype: torch.dtype | str | None = "auto",
                 paged_kernel: bool | None = None) -> None:
        self.model = model
        self.stack = model.model
        self.pool = pool
        self.device = pool.keys.device
        if prefill_dtype == "auto":
            half = model.dtype in (torch.bfloat16, torch.float16)
            prefill_dtype = (torch.float32 if half and self.device.type == "cpu" and not native_half_matmul(model.dtype)
                             else None)
        elif prefill_dtype is not None and not isinstance(prefill_dtype, torch.dtype):
            raise ValueError(f"prefill_dtype must be 'auto', None or a torch.dtype, got {prefill_dtype!r}")
        self.prefill_dtype = prefill_dtype if prefill_dtype != model.dtype else None
        supported = self.device.type == "cpu" and pool.keys.dtype in (torch.float32, torch.bfloat16)
        if paged_kernel is None:
            paged_kernel = supported and paged_kernel_available()
        elif paged_kernel and not (supported and paged_kernel_available()):
            raise ValueError("paged_kernel=True needs a CPU pool in float32 or bfloat16 and a C++ compiler")
        self.paged_kernel = paged_kernel
        # The packaged decode step (`serve.paged_step.PagedDecodeStep`), given by the engine where one is built
        self.decode_step: Any = None

    @torch.inference_mode()
    def forward(self, segments: Sequence[Segment], all_positions: bool = False,
                tails: Sequence[int] | None = None) -> torch.Tensor:
        """Write the segments' keys and values into the pool; return the logits after each one's last token (S, V),
        with `tails` after each one's last tails[i] tokens (sum(tails), V), or with `all_positions` after every token
        of the step, in segment order (N, V), in the model's dtype."""
        if self.decode_step is not None and not all_positions and self.decode_step.takes(segments, tails):
            return self.decode_step(segments, tails)
        upcast = [self.prefill_dtype is not None and len(s.ids) >= PREFILL_MIN_TOKENS for s in segments]
        if not any(upcast):
            return self._forward(segments, all_positions, tails, None)
        if all(upcast):
            return self._forward(segments, all_positions, tails, self.prefill_dtype).to(self.model.dtype)
        parts: list[torch.Tensor | None] = [None] * len(segments)
        for up in (True, False):
            members = [i for i, u in enumerate(upcast) if u == up]
            logits = self._forward([segments[i] for i in members], all_positions,
                                   [tails[i] for i in members] if tails else None, self.prefill_dtype if up else None)
            sizes = [len(segments[i].ids) if all_positions else tails[i] if tails else 1 for i in members]
            for i, rows in zip(members, logits.to(self.model.dtype).split(sizes)):
                parts[i] = rows
        return torch.cat(parts)  # type: ignore[arg-type]

    def _forward(self, segments: Sequence[Segment], all_positions: bool, tails: Sequence[int] | None,
                 dtype: torch.dtype | None) -> torch.Tensor:
        stack, pool, dev = self.stack, self.pool, self.device
        ids = torch.tensor([t for s in segments for t in s.ids], dtype=torch.long, device=dev)
        pos = torch.cat([torch.arange(s.start, s.end) for s in segments]).to(dev)
        ctx_slots = [pool.slots(s.block_table, s.end) for s in segments]
        write_slots = torch.cat([slots[s.start:] for s, slots in zip(segments, ctx_slots)]).to(dev)
        # Each token's own sequence length picks the length-dependent rope factors (longrope, dynamic), so a
        # request's numbers do not depend on what shares the step
        seq_len = torch.cat([torch.full((len(s.ids),), s.end) for s in segments]).to(dev)
        x, rope = _embed(stack, ids, pos, seq_len, dtype)
        exact = _eager_math(stack.config.attn_implementation, stack.config.position_embedding == "alibi", x.dtype)
        if self.paged_kernel and not exact:
            paged = self._paged_batch(segments, ctx_slots)

            def attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor,
                       v_buf: torch.Tensor) -> torch.Tensor:
                return self._paged_attention(attn, q, k, v, k_buf, v_buf, paged)
        else:
            groups = self._groups(segments, ctx_slots)

            def attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor,
                       v_buf: torch.Tensor) -> torch.Tensor:
                return self._gathered_attention(attn, q, k, v, k_buf, v_buf, groups)
        for model_layer, k_buf, v_buf in zip(stack.layers, pool.keys, pool.values):
            layer = _upcast(model_layer, dtype) if dtype is not None else model_layer
            x = _layer(layer, x, rope, write_slots, k_buf, v_buf, attend)
        norm = _upcast(stack.norm, dtype) if dtype is not None else stack.norm
        head = _upcast(self.model.lm_head, dtype) if dtype is not None else self.model.lm_head
        if all_positions:
            return head(norm(x[0]))
        return head(norm(x[0, torch.tensor(logit_rows(segments, tails), device=dev)]))

    def _paged_batch(self, segments: Sequence[Segment], ctx_slots: list[torch.Tensor]) -> _PagedBatch:
        offsets = [0, *itertools.accumulate(len(s.ids) for s in segments)]
        config = self.stack.config
        # Prefill chunks (segments from PREFILL_MIN_TOKENS) go to the kernel's tiled path where this build has it
        # (`prefill_tiled`: blocks of keys against blocks of queries, ALiBi included), else to torch's flash kernel
        # where it applies (no bias: not ALiBi): on such shapes either runs at two to three times the per-vector
        # kernel's rate, which for flash pays many times over for reading the chunk's earlier keys out of the pool
        # once per layer (O(context) bytes against O(chunk * context) products). Short segments (decode tokens,
        # speculative verify rows) keep the per-vector kernel, whose rows do not depend on their number.
        tiled = self.device.type == "cpu" and paged_kernel.prefill_tiled(config.head_dim)
        flash = (not tiled and self.device.type == "cpu" and config.position_embedding != "alibi"
                 and config.attn_implementation == "sdpa")
        long = [len(s.ids) >= PREFILL_MIN_TOKENS for s in segments]
        chunks = []
        for i, s in enumerate(segments):
            if not (flash and long[i]):
                continue
            blocks = s.block_table[: self.pool.blocks_for(s.start)]
            earlier: torch.Tensor | slice
            if not blocks or blocks == list(range(blocks[0], blocks[0] + len(blocks))):
                # One run of consecutive blocks (a freshly admitted prompt usually gets one): a view, no copy
                first = blocks[0] * self.pool.block_size if blocks else 0
                earlier = slice(first, first + s.start)
            else:
                earlier = ctx_slots[i][: s.start].to(self.device)
            chunks.append((torch.arange(offsets[i], offsets[i + 1], device=self.device), earlier))
        every = range(len(segments))
        groups = [(paged_kernel.prefill_attention, [i for i in every if tiled and long[i]]),
                  (paged_kernel.paged_attention, [i for i in every if not (long[i] and (tiled or flash))])]
        calls = []
        for op, members in groups:
            if not members:
                continue
            rows = None
            if len(members) < len(segments):
                rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in members]).to(self.device)
            calls.append(_KernelCall(
                op, block_tables(self.pool, [segments[i] for i in members]),
                torch.tensor([0, *itertools.accumulate(len(segments[i].ids) for i in members)], dtype=torch.long),
                torch.tensor([segments[i].start for i in members], dtype=torch.long), rows))
        slopes = self.stack.alibi_slopes.float().cpu().contiguous() if config.position_embedding == "alibi" else None
        return _PagedBatch(calls, slopes, chunks)

    def _paged_attention(self, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor,
                         v_buf: torch.Tensor, paged: _PagedBatch) -> torch.Tensor:
        """Attention (N, H, D) of the step's tokens: the paged kernel's calls in place (the per-vector path, and
        the tiled one for prefill chunks), or prefill chunks by flash."""
        queries = q.transpose(0, 1)  # (N, H, D)

        def run(call: _KernelCall) -> torch.Tensor:
            rows = queries if call.rows is None else queries[call.rows]
            return call.op(rows.float().contiguous(), k_buf, v_buf, call.tables, call.row_starts, call.positions,
                           paged.slopes, attn.scale, self.pool.block_size).to(q.dtype)

        if len(paged.calls) == 1 and paged.calls[0].rows is None:  # one call for every token of the step
            return run(paged.calls[0])
        out = q.new_empty(queries.shape)
        for call in paged.calls:
            out[call.rows] = run(call)
        for tokens, earlier in paged.chunks:
            og = _chunk_attention(q[:, tokens][None], k[:, tokens], v[:, tokens], k_buf, v_buf, earlier, attn.scale)
            out[tokens] = og[0].transpose(0, 1)
        return out

    def _gathered_attention(self, attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor,
                            v_buf: torch.Tensor, groups: list[_AttentionGroup]) -> torch.Tensor:
        """Attention with each group's keys gathered from the pool (the path without the paged kernel)."""
        out = q.new_empty(q.shape[1], attn.num_heads, attn.head_dim)
        for g in groups:
            G, Tq = g.tokens.shape
            qg = q[:, g.tokens].transpose(0, 1)  # (G, H, Tq, D)
            if g.chunk is not None and not _eager_math(attn.implementation, g.alibi is not None, q.dtype):
                og = _chunk_attention(qg, k[:, g.tokens[0]], v[:, g.tokens[0]], k_buf, v_buf, g.chunk, attn.scale)
            else:
                og = self._padded_attention(attn, qg, k_buf, v_buf, g)
            out[g.tokens.reshape(-1)] = og.transpose(1, 2).reshape(G * Tq, attn.num_heads, attn.head_dim)
        return out

    @staticmethod
    def _padded_attention(attn: Any, qg: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                          g: _AttentionGroup) -> torch.Tensor:
        """Attention of a group over its keys gathered from the pool, padded to the longest and masked."""
        G = qg.shape[0]
        rows = g.slots.view(-1)  # index_select: a plain gather, cheaper than advanced indexing
        kg = k_buf.index_select(0, rows).view(G, -1, *k_buf.shape[1:]).permute(0, 2, 1, 3).to(qg.dtype)
        vg = v_buf.index_select(0, rows).view(G, -1, *v_buf.shape[1:]).permute(0, 2, 1, 3).to(qg.dtype)
        gqa = attn.num_heads != attn.num_kv_heads
        if gqa and not _SDPA_GQA:
            groups_per_kv = attn.num_heads // attn.num_kv_heads
            kg, vg = kg.repeat_interleave(groups_per_kv, 1), vg.repeat_interleave(groups_per_kv, 1)
        if _eager_math(attn.implementation, g.alibi is not None, qg.dtype):
            inputs = AttentionInputs(mask=g.mask, causal=True, alibi=g.alibi)
            return eager_attention(qg, kg, vg, inputs, attn.scale, 0.0, False)[0]
        mask = g.mask
        if g.alibi is not None:
            mask = g.alibi.to(qg.dtype).masked_fill(~mask, torch.finfo(qg.dtype).min)
        extra = {"enable_gqa": True} if gqa and _SDPA_GQA else {}
        return F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=attn.scale, **extra)

    def _groups(self, segments: Sequence[Segment], ctx_slots: list[torch.Tensor]) -> list[_AttentionGroup]:
        # Single-token segments (decoding) share one padded batch; each longer segment (a prefill chunk) gets its own,
        # so a long prompt does not pad every decoding sequence to its length.
        offsets = [0, *itertools.accumulate(len(s.ids) for s in segments)]
        singles = [i for i, s in enumerate(segments) if len(s.ids) == 1]
        batches = ([singles] if singles else []) + [[i] for i, s in enumerate(segments) if len(s.ids) > 1]
        config = self.stack.config
        # The split path needs flash attention's log-sum-exp, which only the CPU kernel returns to Python.
        split = (self.device.type == "cpu" and config.position_embedding != "alibi"
                 and config.attn_implementation == "sdpa")
        groups = []
        for members in batches:
            if split and len(segments[members[0]].ids) > 1:
                i = members[0]
                tokens = torch.arange(offsets[i], offsets[i + 1])[None]
                groups.append(_AttentionGroup(tokens.to(self.device), None, None, None,  # type: ignore[arg-type]
                                              ctx_slots[i][: segments[i].start].to(self.device)))
                continue
            k_len = max(segments[i].end for i in members)
            tokens = torch.stack([torch.arange(offsets[i], offsets[i + 1]) for i in members])
            slots = torch.zeros(len(members), k_len, dtype=torch.long)
            for row, i in enumerate(members):
                slots[row, : segments[i].end] = ctx_slots[i]
            q_pos = torch.stack([torch.arange(segments[i].start, segments[i].end) for i in members])  # (G, Tq)
            key_pos = torch.arange(k_len)
            allowed = key_pos[None, None, :] <= q_pos[:, :, None]  # causal; also hides the padding past each end
            alibi = None
            if self.stack.config.position_embedding == "alibi":
                slopes = self.stack.alibi_slopes.float().cpu()
                last = torch.tensor([segments[i].end - 1 for i in members])
                # Relative to the sequence's last key, as the model's bias (alibi_bias) is: the same fp32 numbers
                alibi = slopes[None, :, None, None] * (key_pos[None, None, None, :] - last[:, None, None, None])
                alibi = alibi.to(self.device)
            groups.append(_AttentionGroup(tokens.to(self.device), slots.to(self.device),
                                          allowed[:, None].to(self.device), alibi))
        return groups
