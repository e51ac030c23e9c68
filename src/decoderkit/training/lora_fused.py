"""LoRA adapters on projections a family stores fused (GPTBigCode's `c_attn`, MPT's `Wqkv`), in PEFT's format.

Our q, k and v are separate linears; transformers holds one linear whose rows are a family-specific arrangement of
their rows (concatenated, or interleaved per head), which the family's fuse / split transforms know. Adapters
(A_j, B_j) with scaling s_j on some of them are exactly one LoRA on the fused weight, of rank R = sum r_j:

    A = [A_q; A_v]                                    (R, E): the adapted members' A stacked
    B = fuse([s_q/s B_q, 0], [0, 0], [0, s_v/s B_v])  (rows of q, k, v; block-diagonal before the family's row order)

so that s * B @ A = fuse(s_q B_q A_q, 0, s_v B_v A_v), with s the exported scaling (alpha / R, or alpha / sqrt(R)
for rsLoRA). Members sharing one A (what loading a PEFT adapter gives) export without stacking, at their own rank.
Importing splits B with the family's split; block-structured factors (our own export) come back at their ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoraFactors:
    """One adapter's factors: delta W = scaling * B @ A, with scaling = alpha / r (alpha / sqrt(r) for rsLoRA)."""

    A: torch.Tensor  # (r, in_features)
    B: torch.Tensor  # (out_features, r)
    alpha: float

    @property
    def r(self) -> int:
        return self.A.shape[0]


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / (math.sqrt(r) if use_rslora else r)


def alpha_for(scaling: float, r: int, use_rslora: bool) -> float:
    """The lora_alpha that gives `scaling` at rank `r`."""
    return scaling * (math.sqrt(r) if use_rslora else r)


def _translate(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors -> the family's names (adapter-relative: no base prefix for a bare model); {} if untranslatable."""
    from decoderkit.families import get_family

    family = get_family(model.decoder_config.model_type)
    head = getattr(model, "head", "causal_lm")
    try:
        out = family.ours_to_hf(state, model.decoder_config, head)
    except (KeyError, TypeError, RuntimeError, AttributeError, ValueError):
        # Fusing needs every member of the group; a partial group cannot be translated.
        return {}
    renamed = {}
    for name, value in out.items():
        if head == "base":
            name = name.removeprefix(family.hf_prefix("base") + ".")
        elif head == "token_classification" and family.hf_head_names.get("classifier") and name.startswith("score."):
            name = "classifier" + name[len("score"):]
        renamed[name] = value
    return renamed


def is_linear(module: nn.Module) -> bool:
    """A float `nn.Linear` or a packed int8 / int4 one: the modules LoRA adapts."""
    from decoderkit.layers.quantized import QuantizedLinear

    return isinstance(module, (nn.Linear, QuantizedLinear))


def weight_shape(module: nn.Module) -> torch.Size:
    """(out, in) of a linear of either kind (a packed one has no float `weight`)."""
    return torch.Size((module.out_features, module.in_features))


def hf_name(model: nn.Module, name: str, shape: torch.Size) -> str | None:
    """The transformers name of our parameter `name`, or None when the family stores it fused with others."""
    out = _translate(model, {name: torch.empty(shape, device="meta")})
    return next(iter(out)) if len(out) == 1 else None


def hf_linear_names(model: nn.Module) -> list[str]:
    """transformers' module names of every linear of the model (fused projections once)."""
    probe = {f"{n}.weight": torch.empty(weight_shape(m), device="meta")
             for n, m in model.named_modules() if is_linear(m)}
    return [n.removesuffix(".weight") for n in _translate(model, probe)]


def fused_groups(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """{transformers module: our member linears, all of them in order} for the linears among `names` that the family
    stores fused. Raises ValueError naming a linear whose fused projection cannot be formed."""
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for name in names:
        module = model.get_submodule(name)
        if name in seen or hf_name(model, f"{name}.weight", weight_shape(module)) is not None:
            continue
        parent = name.rsplit(".", 1)[0]
        members = [f"{parent}.{leaf}" for leaf, m in model.get_submodule(parent).named_children()
                   if is_linear(m) and hf_name(model, f"{parent}.{leaf}.weight", weight_shape(m)) is None]
        probe = {f"{m}.weight": torch.empty(weight_shape(model.get_submodule(m)), device="meta") for m in members}
        out = _translate(model, probe)
        if len(out) != 1:
            raise ValueError(f"{name}: {model.config.model_type} stores it fused with other projections in a way a "
                             "PEFT adapter cannot express; choose other target_modules, or merge_and_unload() and "
                             "save_pretrained() the merged model")
        groups[next(iter(out)).removesuffix(".weight")] = members
        seen.update(members)
    return groups


def _fuse(model: nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """The family's fused arrangement of per-member row blocks (any number of columns)."""
    (fused,) = _translate(model, {f"{m}.weight": t for m, t in rows.items()}).values()
    return fused


def export_fused(model: nn.Module, members: list[str], adapters: Mapping[str, LoraFactors],
                 use_rslora: bool) -> LoraFactors:
    """One LoRA on the fused projection equal to the members' adapters (absent members: no update)."""
    adapted = [m for m in members if m in adapters]
    first = adapters[adapted[0]]
    scaling = lora_scaling(first.alpha, first.r, use_rslora)
    same = len(adapted) == len(members) and all(
        adapters[m].r == first.r and adapters[m].alpha == first.alpha and torch.equal(adapters[m].A, first.A)
        for m in adapted)
    if same:
        B = _fuse(model, {m: adapters[m].B for m in members})
        return LoraFactors(first.A, B, first.alpha)
    rank = sum(adapters[m].r for m in adapted)
    A = torch.cat([adapters[m].A for m in adapted], 0)
    blocks, column = {}, 0
    for m in members:
        rows = model.get_submodule(m).out_features
        block = torch.zeros(rows, rank, dtype=first.B.dtype, device=first.B.device)
        if m in adapters:
            factors = adapters[m]
            ratio = lora_scaling(factors.alpha, factors.r, use_rslora) / scaling
            block[:, column:column + factors.r] = factors.B * ratio if ratio != 1.0 else factors.B
            column += factors.r
        blocks[m] = block
    return LoraFactors(A, _fuse(model, blocks), alpha_for(scaling, rank, use_rslora))


def import_fused(model: nn.Module, hf_module: str, factors: LoraFactors, use_rslora: bool) -> dict[str, LoraFactors]:
    """Our members' adapters equal to a LoRA on the fused projection `hf_module` (transformers' module name)."""
    from decoderkit.families import get_family

    family = get_family(model.decoder_config.model_type)
    split = family.hf_to_ours(f"{hf_module}.weight", factors.B, model.decoder_config)
    pieces = {n.removesuffix(".weight"): t for n, t in split}
    scaling = lora_scaling(factors.alpha, factors.r, use_rslora)
    support = {m: (p != 0).any(0).nonzero().squeeze(1) for m, p in pieces.items()}
    used = torch.cat([c for c in support.values()])
    if used.numel() and used.unique().numel() == used.numel():
        # Block-structured (each column belongs to one member): each member's own rank, unused members dropped.
        return {m: LoraFactors(factors.A[cols].clone(), pieces[m][:, cols].contiguous(),
                               alpha_for(scaling, cols.numel(), use_rslora))
                for m, cols in support.items() if cols.numel()}
    return {m: LoraFactors(factors.A.clone(), p.contiguous(), factors.alpha) for m, p in pieces.items()}
