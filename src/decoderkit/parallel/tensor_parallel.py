"""Tensor-parallel inference: one model split across the ranks of a process group, Megatron-style.

Every decoder layer holds 1/N of the attention heads and 1/N of the MLP's hidden units: q/k/v and gate/up are
column-parallel (each rank keeps its rows; the input is replicated, so no communication), o and down are row-parallel
(each rank keeps the matching columns; one all-reduce sums the partial outputs). The token embedding and the LM head
are vocab-parallel (each rank keeps a slice of the vocabulary; the embedding all-reduces the looked-up rows, the head
all-gathers the logits). Norms, position tables and task heads other than the LM head are replicated. So a layer
costs two all-reduces of the hidden state, and every rank ends each forward with the same full logits.

Key/value heads are split when the world size divides them and replicated (each rank keeps the one head its query
heads share) when the world size is a multiple of them: multi-query attention keeps its single head on every rank.
ALiBi slopes are those of the rank's own heads; rope is the same for every head.

The sharded modules are plain `nn.Linear` / `nn.Embedding` of the local sizes whose forward adds the collective (the
functional collectives of `torch.distributed`, which `torch.compile` traces), rather than DTensor parameters: the
decode step and the paged server read the projections' weights and shapes directly, and DTensor's per-op dispatch
costs more than the layer at batch 1 on CPU (benchmarks/tensor_parallel.py measures both). Fused q/k/v checkpoints
(GPTBigCode, MPT) need nothing here: the families split them on load, and `decoderkit.parallel.loading` reads each
rank's rows of the fused tensor through the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from decoderkit.config import DecoderConfig
from decoderkit.layers.alibi import alibi_slopes

COLUMN, ROW, VOCAB, REPLICATE = "column", "row", "vocab", "replicate"

# Our parameter names (every family uses them) -> how each is split. Anything else is replicated.
TP_PLAN: dict[str, str] = {
    "self_attn.q_proj": COLUMN,
    "self_attn.k_proj": COLUMN,
    "self_attn.v_proj": COLUMN,
    "self_attn.o_proj": ROW,
    "mlp.gate_proj": COLUMN,
    "mlp.up_proj": COLUMN,
    "mlp.down_proj": ROW,
    "embed_tokens": VOCAB,
    "lm_head": VOCAB,
}


@dataclass(frozen=True)
class Partition:
    """Which slice of each split dimension one rank holds."""

    rank: int
    world_size: int
    num_heads: int  # local query heads
    num_kv_heads: int  # local key/value heads
    kv_head_start: int
    vocab_per_rank: int  # the last rank's slice may be shorter (or empty); logits are gathered padded, then cut
    intermediate_per_rank: int
    head_dim: int
    vocab_size: int

    @property
    def head_start(self) -> int:
        return self.rank * self.num_heads

    @property
    def vocab_start(self) -> int:
        return min(self.rank * self.vocab_per_rank, self.vocab_size)

    @property
    def vocab_end(self) -> int:
        return min(self.vocab_start + self.vocab_per_rank, self.vocab_size)

    def rows(self, kind: str) -> tuple[int, int]:
        """[start, end) of the split axis of a parameter of this kind ('q', 'kv', 'mlp' or 'vocab')."""
        if kind == "q":
            return self.head_start * self.head_dim, (self.head_start + self.num_heads) * self.head_dim
        if kind == "kv":
            return self.kv_head_start * self.head_dim, (self.kv_head_start + self.num_kv_heads) * self.head_dim
        if kind == "mlp":
            start = self.rank * self.intermediate_per_rank
            return start, start + self.intermediate_per_rank
        if kind == "vocab":
            return self.vocab_start, self.vocab_end
        raise ValueError(f"unknown split kind {kind!r}")


def partition(config: DecoderConfig, rank: int, world_size: int) -> Partition:
    """The slice of `config`'s model that `rank` of `world_size` holds; ValueError naming sizes that do not split."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"tensor-parallel rank {rank} of world size {world_size} is not a valid position")
    heads, kv, ffn = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    problems = []
    if heads % world_size:
        problems.append(f"num_attention_heads={heads}")
    if ffn % world_size:
        problems.append(f"intermediate_size={ffn}")
    if kv % world_size and world_size % kv:
        problems.append(f"num_key_value_heads={kv} (neither a multiple nor a divisor of the world size)")
    if problems:
        raise ValueError(
            f"{config.model_type}: tensor-parallel size {world_size} does not split this model: "
            f"{', '.join(problems)}; use a size that divides num_attention_heads={heads} and intermediate_size={ffn} "
            f"(hidden_size={config.hidden_size})")
    if config.add_cross_attention:
        raise ValueError("tensor parallelism does not support models with cross-attention layers")
    local_heads = heads // world_size
    if kv % world_size == 0:
        local_kv, kv_start = kv // world_size, rank * (kv // world_size)
    else:  # fewer kv heads than ranks: each rank's query heads all share one kv head, kept whole on the rank
        local_kv, kv_start = 1, rank * local_heads // (heads // kv)
    return Partition(rank=rank, world_size=world_size, num_heads=local_heads, num_kv_heads=local_kv,
                     kv_head_start=kv_start, vocab_per_rank=-(-config.vocab_size // world_size),
                     intermediate_per_rank=ffn // world_size, head_dim=config.head_dim,
                     vocab_size=config.vocab_size)


# --------------------------------------------------------------------------------------------------- sharded modules
class RowParallelLinear(nn.Linear):
    """y = all_reduce(x_local @ W_local^T) + b: the input's last axis is split across ranks, the bias is whole."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: dist.ProcessGroup) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = funcol.all_reduce(F.linear(x, self.weight), "sum", self.group)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Embedding):
    """Rows [start, end) of the table; other ids look up zeros, and the all-reduce fills them in from their owner."""

    def __init__(self, rows: int, dim: int, start: int, end: int, group: dist.ProcessGroup,
                 padding_idx: int | None = None) -> None:
        local_pad = padding_idx - start if padding_idx is not None and start <= padding_idx < end else None
        super().__init__(rows, dim, padding_idx=local_pad, device="meta")
        self.start, self.end, self.group = start, end, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        x = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return funcol.all_reduce(x, "sum", self.group)


class VocabParallelHead(nn.Linear):
    """Logits for rows [start, end) of the vocabulary, all-gathered: every rank returns the full (..., V) logits."""

    def __init__(self, in_features: int, rows: int, per_rank: int, vocab_size: int, bias: bool,
                 group: dist.ProcessGroup) -> None:
        super().__init__(in_features, rows, bias=bias, device="meta")
        self.per_rank, self.vocab_size, self.group = per_rank, vocab_size, group
        self.world_size = dist.get_world_size(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gather_vocab(F.linear(x, self.weight, self.bias), self.per_rank, self.vocab_size, self.world_size,
                            self.group)


def gather_vocab(local: torch.Tensor, per_rank: int, vocab_size: int, world_size: int,
                 group: dist.ProcessGroup) -> torch.Tensor:
    """The full (..., V) logits from every rank's (..., rows) slice of the vocabulary."""
    if local.shape[-1] < per_rank:
        local = F.pad(local, (0, per_rank - local.shape[-1]))
    lead = local.shape[:-1]
    flat = local.reshape(-1, per_rank)  # (M, per_rank)
    gathered = funcol.all_gather_single(flat, 0, group)  # (N * M, per_rank), rank-major
    full = gathered.view(world_size, -1, per_rank).transpose(0, 1).reshape(*lead, -1)
    return full[..., :vocab_size]


# --------------------------------------------------------------------------------------------------- applying the plan
def _column(linear: nn.Linear, rows: int) -> nn.Linear:
    return nn.Linear(linear.in_features, rows, bias=linear.bias is not None, device="meta",
                     dtype=linear.weight.dtype)


def shard_model(model: nn.Module, group: dist.ProcessGroup | None = None) -> Partition:
    """Replace `model`'s projections, embedding and LM head by this rank's shards, in place, on the meta device.

    The model must be built on the meta device (the weights are loaded afterwards, slice by slice, by
    `decoderkit.parallel.loading`). Attention modules are told their local head counts; `model.decoder_config` becomes
    the rank's view (its local head counts, which the caches size themselves by) and `model.tp` holds the whole
    model's config and the partition.
    """
    group = group or dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    config: DecoderConfig = model.decoder_config
    part = partition(config, rank, world)
    for name, module in list(model.named_modules()):
        if any(p.device.type != "meta" for p in module.parameters(recurse=False)):
            raise ValueError(f"shard_model expects a model on the meta device; {name} holds real weights")
    stack = model.model
    dtype = stack.embed_tokens.weight.dtype
    for layer in stack.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _column(attn.q_proj, part.num_heads * part.head_dim)
        attn.k_proj = _column(attn.k_proj, part.num_kv_heads * part.head_dim)
        attn.v_proj = _column(attn.v_proj, part.num_kv_heads * part.head_dim)
        attn.o_proj = RowParallelLinear(part.num_heads * part.head_dim, attn.o_proj.out_features,
                                        attn.o_proj.bias is not None, group)
        attn.num_heads, attn.num_kv_heads = part.num_heads, part.num_kv_heads
        for proj in ("gate_proj", "up_proj"):
            if hasattr(mlp, proj):
                setattr(mlp, proj, _column(getattr(mlp, proj), part.intermediate_per_rank))
        mlp.down_proj = RowParallelLinear(part.intermediate_per_rank, mlp.down_proj.out_features,
                                          mlp.down_proj.bias is not None, group)
    start, end = part.vocab_start, part.vocab_end
    old = stack.embed_tokens
    stack.embed_tokens = VocabParallelEmbedding(end - start, old.embedding_dim, start, end, group, old.padding_idx)
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        head = model.lm_head
        model.lm_head = VocabParallelHead(head.in_features, end - start, part.vocab_per_rank, part.vocab_size,
                                          head.bias is not None, group)
    model.to(dtype)
    model.tp = TensorParallelInfo(config=config, partition=part, group=group)
    model.decoder_config = config.replace(num_attention_heads=part.num_heads, num_key_value_heads=part.num_kv_heads)
    stack.config = model.decoder_config
    model.tie_weights()
    return part


@dataclass
class TensorParallelInfo:
    """What a tensor-parallel model knows beyond its rank's weights."""

    config: DecoderConfig  # the whole model's
    partition: Partition
    group: dist.ProcessGroup


def rebuild_local_buffers(model: nn.Module, device: torch.device | str) -> None:
    """The derived buffers for this rank's heads: ALiBi slopes are those of the whole model, cut to the local heads."""
    stack, info = model.model, model.tp
    with torch.device(device):
        if stack.rotary is not None:
            stack.rebuild_buffers(device)
        if info.config.position_embedding == "alibi":
            slopes = alibi_slopes(info.config.num_attention_heads, info.config.alibi_bias_max)
            part = info.partition
            stack.alibi_slopes = slopes[part.head_start: part.head_start + part.num_heads].contiguous()


def local_slice(name: str, part: Partition) -> tuple[int | None, tuple[int, int]] | None:
    """For one of our parameter names: (split axis, [start, end)) of this rank's slice, or None when replicated."""
    module, _, kind = name.rpartition(".")
    for suffix, style in TP_PLAN.items():
        if module == suffix or module.endswith("." + suffix):
            if style == VOCAB:
                return 0, part.rows("vocab")
            if style == ROW:
                if kind == "bias":
                    return None
                split = "q" if suffix.startswith("self_attn") else "mlp"
                return 1, part.rows(split)
            split = {"self_attn.q_proj": "q", "self_attn.k_proj": "kv", "self_attn.v_proj": "kv"}.get(suffix, "mlp")
            return 0, part.rows(split)
    return None
