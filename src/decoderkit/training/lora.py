"""LoRA adapters (Hu et al., 2021) on any `nn.Linear` of a decoderkit model, saved and loaded in PEFT's format.

`apply_lora` turns the matched linears into `LoraLinear` in place: the frozen weight keeps its name (so checkpoints and
`save_pretrained` see the same model), and `lora_A` / `lora_B` are added beside it, exactly where PEFT puts them.
A packed int8 / int4 linear (a quantized load) becomes a `QuantizedLora` the same way: float32 adapters over the
frozen packed base, which passes input gradients through its dequantized weight.
The adapter directory (`adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<transformers module name>.lora_A.weight`) loads with `PeftModel.from_pretrained` on the
transformers model of the same checkpoint.

Our module names follow Llama for every family. Saving maps them to the family's own names; GPTBigCode (`c_attn`)
and MPT (`Wqkv`) fuse q, k and v into one projection, and adapters on our separate q/k/v are saved as the one LoRA
on the fused projection they amount to, and read back from it (see `decoderkit.training.lora_fused`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from decoderkit.layers.quantized import Int4Linear, Int8Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Output heads are never adapted by "all-linear", as in PEFT: they are trained whole via modules_to_save.
HEAD_MODULES = ("lm_head", "score", "qa_outputs", "classifier")
TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "token_classification": "TOKEN_CLS",
              "question_answering": "QUESTION_ANS", "base": "FEATURE_EXTRACTION"}


@dataclass
class LoraConfig:
    """Which linears get adapters and how big they are; field names and meanings are PEFT's.

    `target_modules`: a list of module names matched as suffixes (`"q_proj"` matches every layer's q_proj), a
    string taken as a regular expression that must match the whole module name, or `"all-linear"` (every linear in
    the decoder layers). `modules_to_save`: modules trained in full and saved with the adapter (a classifier head).
    `rank_pattern` / `alpha_pattern`: per-module r and lora_alpha, keys matched as PEFT does (a regular expression
    matching the end of the module name at a dot).
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: Sequence[str] | str = ("q_proj", "v_proj")
    modules_to_save: Sequence[str] | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name the linears to adapt (e.g. ['q_proj', 'v_proj'])")

    @property
    def scaling(self) -> float:
        # rsLoRA divides by sqrt(r) so that the update's scale does not shrink as the rank grows.
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """r and lora_alpha of the module called `name`."""
        return (_pattern_value(self.rank_pattern, name, self.r),
                _pattern_value(self.alpha_pattern, name, self.lora_alpha))

    def matches(self, name: str) -> bool:
        """Whether the module called `name` is a target."""
        targets = self.target_modules
        if targets == "all-linear":
            return ".layers." in f".{name}" and name.split(".")[0] not in HEAD_MODULES
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


class _Adapters:
    """The low-rank side path both adapted kinds share: ``scaling * B(A(dropout(x)))`` added to the base output."""

    r: int
    lora_alpha: float
    scaling: float
    merged: bool
    in_features: int
    out_features: int
    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module

    def _add_adapters(self, r: int, alpha: float, dropout: float, use_rslora: bool, device: torch.device,
                      dtype: torch.dtype) -> None:
        """Fresh adapters: A Kaiming-uniform, B zero (so the output is unchanged until training moves B), as PEFT
        initialises them."""
        factory = {"device": device, "dtype": dtype}
        self.r = r
        self.lora_alpha = alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def _with_update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        # Summed in the adapters' (wider) dtype, then rounded once, exactly as PEFT does.
        return (out + update * self.scaling).to(out.dtype)

    def _drop_adapters(self) -> None:
        for name in ("lora_A", "lora_B", "lora_dropout"):
            delattr(self, name)
        for name in ("r", "lora_alpha", "scaling", "merged"):
            self.__dict__.pop(name, None)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, computed in fp32 (a bf16 product would lose the small update against W)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


class LoraLinear(_Adapters, nn.Linear):
    """`nn.Linear` plus a low-rank update: y = x W^T + b + scaling * B(A(dropout(x))).

    Made from an existing linear by `LoraLinear.wrap` (in place: `weight` and `bias` stay the same parameters), and
    turned back into a plain linear by `unwrap`. While `merged`, the update lives inside `weight` and the side path
    is skipped.
    """

    @classmethod
    def wrap(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
             use_rslora: bool = False) -> LoraLinear:
        """Turn `linear` into a LoraLinear with fresh adapters."""
        if isinstance(linear, LORA_MODULES):
            raise ValueError("this linear already has a LoRA adapter")
        linear.__class__ = cls
        self: LoraLinear = linear  # type: ignore[assignment]
        # Adapters of a half-precision base train in float32, as PEFT's (autocast_adapter_dtype): bf16 weights
        # cannot hold the optimizer's small updates.
        dtype = torch.float32 if linear.weight.dtype in (torch.bfloat16, torch.float16) else linear.weight.dtype
        self._add_adapters(r, alpha, dropout, use_rslora, linear.weight.device, dtype)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return self._with_update(x, out)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
            self.merged = False

    def unwrap(self) -> nn.Linear:
        """Back to a plain nn.Linear holding the current `weight` (merge first to keep the update)."""
        self._drop_adapters()
        self.__class__ = nn.Linear
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


class QuantizedLora(_Adapters):
    """Float32 adapters over a frozen packed int8 / int4 base (QLoRA-style): y = base(x) + scaling * B(A(x)).

    The base's packed weight never changes: its layer passes the input gradient through its dequantized weight, one
    layer at a time, in the backward pass (`decoderkit.layers.quantized`). The adapters cannot be merged into packed
    weights: save them (`save_adapter`), or load the base with ``quantization='none'``, `load_adapter` and merge
    there.
    """

    base_class: type

    @classmethod
    def wrap(cls, layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
             use_rslora: bool = False) -> QuantizedLora:
        """Turn the packed `layer` (an Int8Linear or Int4Linear) into its adapted kind, in place."""
        if isinstance(layer, LORA_MODULES):
            raise ValueError("this linear already has a LoRA adapter")
        adapted = _ADAPTED_KINDS[type(layer)]
        layer.__class__ = adapted
        self: QuantizedLora = layer  # type: ignore[assignment]
        device = next(t.device for t in layer.buffers())
        self._add_adapters(r, alpha, dropout, use_rslora, device, torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_update(x, super().forward(x))  # type: ignore[misc]

    def merge(self) -> None:
        raise ValueError(f"LoRA adapters over packed {self.base_class.__name__} weights cannot be merged into them: "
                         "save the adapter (save_adapter), then load the base with quantization='none', "
                         "load_adapter() and merge_and_unload() there")

    def unmerge(self) -> None:
        """Nothing to do: adapters over packed weights are never merged."""

    def unwrap(self) -> nn.Module:
        """Back to the plain packed layer (the adapters are dropped)."""
        self._drop_adapters()
        self.__class__ = self.base_class
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"  # type: ignore[misc]


class LoraInt8Linear(QuantizedLora, Int8Linear):
    """LoRA adapters over a frozen `Int8Linear`."""

    base_class = Int8Linear


class LoraInt4Linear(QuantizedLora, Int4Linear):
    """LoRA adapters over a frozen `Int4Linear`."""

    base_class = Int4Linear


_ADAPTED_KINDS: dict[type, type] = {Int8Linear: LoraInt8Linear, Int4Linear: LoraInt4Linear}
LORA_MODULES = (LoraLinear, QuantizedLora)


# ---------------------------------------------------------------------------------------------------- apply / merge
def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear | QuantizedLora]]:
    """(name, module) for every LoRA-adapted linear (float or packed)."""
    for name, module in model.named_modules():
        if isinstance(module, LORA_MODULES):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return any(True for _ in lora_modules(model))


def _listing_names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Add adapters to the linears `config` targets and freeze everything else (except `modules_to_save`).

    Raises ValueError when nothing matches, listing the linear names the model has. Returns the same model.
    """
    if has_lora(model):
        raise ValueError("the model already has LoRA adapters; merge_and_unload() it first to add new ones")
    from decoderkit.layers.quantized import QUANTIZED_MODULES, QuantizedLinear
    from decoderkit.training.lora_fused import is_linear

    linears = [(n, m) for n, m in model.named_modules() if is_linear(m)]
    targets = [(n, m) for n, m in linears if config.matches(n)]
    if not targets:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(f"target_modules {config.target_modules!r} matched no nn.Linear; this model's linears are "
                         f"named {leaves}")
    saved = _modules_to_save(model, config.modules_to_save)
    packed_saved = [f"{s}.{n}".removesuffix(".") for s in saved
                    for n, m in model.get_submodule(s).named_modules() if isinstance(m, QUANTIZED_MODULES)]
    if packed_saved:
        raise ValueError(f"modules_to_save: {_listing_names(packed_saved)} holds packed (int8 / int4) weights, which "
                         "cannot be trained in full; adapt it with LoRA instead (target_modules), or load the model "
                         "with quantization='none'")
    for name, linear in targets:
        kind = QuantizedLora if isinstance(linear, QuantizedLinear) else LoraLinear
        kind.wrap(linear, *config.rank_and_alpha(name), config.lora_dropout, config.use_rslora)
    for name, param in model.named_parameters():
        param.requires_grad = ".lora_A." in name or ".lora_B." in name or any(
            name.startswith(m + ".") for m in saved)
    model.lora_config = config
    return model


def _modules_to_save(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    found = []
    for wanted in names or ():
        matches = [n for n, _ in model.named_modules() if n == wanted or n.endswith("." + wanted)]
        if not matches:
            raise ValueError(f"modules_to_save: the model has no module named {wanted!r}")
        found += matches
    return found


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (outputs unchanged, the side path skipped)."""
    for _, module in lora_modules(model):
        module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take the adapters back out of the base weights."""
    for _, module in lora_modules(model):
        module.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and return the model with plain linears only (ready for `save_pretrained`)."""
    for _, module in list(lora_modules(model)):
        module.merge()
        module.unwrap()
    for param in model.parameters():
        param.requires_grad = True
    model.__dict__.pop("lora_config", None)
    return model


# ---------------------------------------------------------------------------------------------------- PEFT format
def _hf_param_name(model: nn.Module, name: str, shape: torch.Size) -> str | None:
    """The transformers name of our parameter `name` in this family, or None when it has no name of its own there
    (one of q/k/v, which GPTBigCode and MPT store fused)."""
    from decoderkit.training.lora_fused import hf_name

    return hf_name(model, name, shape)


def check_exportable(model: nn.Module) -> None:
    """Raise ValueError if the model's adapters could not be saved in PEFT's format (call it before training)."""
    from decoderkit.training.lora_fused import fused_groups

    fused_groups(model, [n for n, _ in lora_modules(model)])


def _export_adapters(model: nn.Module, modules: Mapping[str, LoraLinear | QuantizedLora],
                     state_dict: Mapping[str, torch.Tensor] | None, use_rslora: bool) -> dict[str, Any]:
    """{transformers module name: LoraFactors} of every adapter; adapters on fused members become one."""
    from decoderkit.training.lora_fused import LoraFactors, export_fused, fused_groups

    def factors(name: str) -> LoraFactors:
        module = modules[name]
        A, B = (state_dict[f"{name}.{p}.weight"] if state_dict is not None else getattr(module, p).weight
                for p in ("lora_A", "lora_B"))
        return LoraFactors(A.detach().cpu(), B.detach().cpu(), module.lora_alpha)

    groups = fused_groups(model, list(modules))
    fused = {m for members in groups.values() for m in members}
    out = {_hf_module_name(model, n, m): factors(n) for n, m in modules.items() if n not in fused}
    for hf, members in groups.items():
        out[hf] = export_fused(model, members, {m: factors(m) for m in members if m in modules}, use_rslora)
    return out


def _patterns(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """PEFT rank/alpha patterns for the modules whose value differs from `default`: by leaf name where that is
    unambiguous among the adapted modules, else by the whole (escaped) module name."""
    by_leaf: dict[str, set[Any]] = {}
    for name, value in values.items():
        by_leaf.setdefault(name.rsplit(".", 1)[-1], set()).add(value)
    out: dict[str, Any] = {}
    for name, value in sorted(values.items()):
        if value == default:
            continue
        leaf = name.rsplit(".", 1)[-1]
        out[leaf if len(by_leaf[leaf]) == 1 else re.escape(name)] = value
    return out


def _hf_module_name(model: nn.Module, name: str, module: nn.Module) -> str:
    from decoderkit.training.lora_fused import weight_shape

    hf = _hf_param_name(model, f"{name}.weight", weight_shape(module))
    if hf is None:
        raise ValueError(f"{name}: this {model.config.model_type} linear has no transformers name of its own")
    return hf.removesuffix(".weight")


def save_adapter(model: nn.Module, directory: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` in PEFT's format.

    `state_dict` (a full state dict with our names) replaces the module's own tensors, e.g. when the model is
    sharded across processes. `base_model_name_or_path` (default: the path or hub id the model was loaded from) is
    what PEFT's `AutoPeftModel*.from_pretrained` loads the base from. Adapters on q/k/v of a family that fuses
    them are written as the one LoRA on the fused projection they amount to; ranks and alphas other than the most
    common go in PEFT's `rank_pattern` and `alpha_pattern`.
    """
    from decoderkit.fileio import save_safetensors

    config: LoraConfig | None = getattr(model, "lora_config", None)
    modules = dict(lora_modules(model))
    if config is None or not modules:
        raise ValueError("the model has no LoRA adapters to save (apply_lora or load_adapter first)")
    if any(m.merged for m in modules.values()):
        raise ValueError("the adapters are merged into the base weights; unmerge_lora() before saving the adapter")
    tensors: dict[str, torch.Tensor] = {}
    exported = _export_adapters(model, modules, state_dict, config.use_rslora)
    for hf, factors in exported.items():
        tensors[f"{PEFT_PREFIX}{hf}.lora_A.weight"] = factors.A.contiguous()
        tensors[f"{PEFT_PREFIX}{hf}.lora_B.weight"] = factors.B.contiguous()
    hf_modules = list(exported)
    # The most common rank and alpha are the config's; the others go in PEFT's rank / alpha patterns.
    rank, alpha = Counter((f.r, f.alpha) for f in exported.values()).most_common(1)[0][0]
    saved_modules = []
    for wanted in _modules_to_save(model, config.modules_to_save):
        for pname, param in model.get_submodule(wanted).named_parameters():
            full = f"{wanted}.{pname}"
            hf = _hf_param_name(model, full, param.shape)
            value = state_dict[full] if state_dict is not None else param
            tensors[f"{PEFT_PREFIX}{hf}"] = value.detach().cpu().contiguous()
            saved_modules.append(hf.rsplit(".", 1)[0].rsplit(".", 1)[-1])

    leaves = sorted({h.rsplit(".", 1)[-1] for h in hf_modules})
    # Leaf names are what people write; they are exact only if they select no other linear of the transformers model.
    from decoderkit.training.lora_fused import hf_linear_names

    others = set(hf_linear_names(model)) - set(hf_modules)
    clash = any(h.rsplit(".", 1)[-1] in leaves for h in others)
    target_modules: list[str] = sorted(hf_modules) if clash else leaves
    base = base_model_name_or_path or getattr(model, "name_or_path", None)
    adapter_config = {
        "peft_type": "LORA", "task_type": TASK_TYPES.get(getattr(model, "head", "causal_lm")),
        "base_model_name_or_path": base, "r": rank, "lora_alpha": alpha,
        "lora_dropout": config.lora_dropout, "target_modules": target_modules,
        "modules_to_save": sorted(set(saved_modules)) or None, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": config.use_rslora, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": _patterns({h: f.r for h, f in exported.items()}, rank),
        "alpha_pattern": _patterns({h: f.alpha for h, f in exported.items()}, alpha),
        "revision": None,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # Each file goes in under a temporary name so a reader never sees a half-written adapter.
    tmp_weights = out / f".{ADAPTER_WEIGHTS}.tmp"
    save_safetensors(tensors, tmp_weights, metadata={"format": "pt"})
    os.replace(tmp_weights, out / ADAPTER_WEIGHTS)
    tmp_config = out / f".{ADAPTER_CONFIG}.tmp"
    tmp_config.write_text(json.dumps(adapter_config, indent=2) + "\n")
    os.replace(tmp_config, out / ADAPTER_CONFIG)
    return out


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the adapter saved in `directory` (by decoderkit or PEFT) to `model`, which must be the adapter's base.

    Raises FileNotFoundError for a missing file and ValueError for an adapter this model cannot hold (a different
    family or shape, options decoderkit does not implement such as DoRA). An adapter on a projection the family
    fuses (GPTBigCode's c_attn, MPT's Wqkv) becomes adapters on our q/k/v with the same update.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{directory}: no {file.name}; not a PEFT LoRA adapter directory")
    raw = json.loads(config_file.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
    for option, neutral in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"),
                            ("layers_to_transform", None)):
        if raw.get(option) not in (neutral, None):
            raise ValueError(f"{config_file}: {option}={raw[option]!r} is not supported by decoderkit's LoRA")
    tensors = load_file(weights_file)

    from decoderkit.training.lora_fused import LoraFactors, fused_groups, import_fused, is_linear, weight_shape

    linears = {n: m for n, m in model.named_modules() if is_linear(m)}
    reverse: dict[str, str] = {}
    for name, module in linears.items():
        hf = _hf_param_name(model, f"{name}.weight", weight_shape(module))
        if hf is not None:
            reverse[hf.removesuffix(".weight")] = name
    groups = fused_groups(model, [n for n in linears if n not in reverse.values()])
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{weights_file}: unexpected key {key!r} (PEFT keys start with {PEFT_PREFIX!r})")
        key = key[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            saved[key] = value
            continue
        if m.group(1) not in reverse and m.group(1) not in groups:
            raise ValueError(f"{weights_file}: the adapter targets {m.group(1)!r}, which this "
                             f"{model.config.model_type} model has no linear for")
        factors.setdefault(m.group(1), {})[m.group(2)] = value
    if not factors:
        raise ValueError(f"{weights_file}: holds no LoRA weights")
    use_rslora = bool(raw.get("use_rslora", False))
    r, alpha = int(raw["r"]), float(raw["lora_alpha"])
    ours: dict[str, LoraFactors] = {}
    # Check every shape before touching the model, so a mismatched adapter leaves it as it was.
    for hf, parts in factors.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{weights_file}: {hf} has {sorted(parts)} but needs both lora_A and lora_B")
        rank = int(_pattern_value(raw.get("rank_pattern") or {}, hf, r))
        members = [reverse[hf]] if hf in reverse else groups[hf]
        in_features = linears[members[0]].in_features
        out_features = sum(linears[n].out_features for n in members)
        label = f"{reverse[hf]}.lora_" if hf in reverse else f"{hf}.lora_"
        for part, want in (("A", (rank, in_features)), ("B", (out_features, rank))):
            if tuple(parts[f"lora_{part}"].shape) != want:
                raise ValueError(f"{weights_file}: {label}{part}.weight has shape {tuple(parts[f'lora_{part}'].shape)}"
                                 f"; this model expects {want} (rank {rank})")
        found = LoraFactors(parts["lora_A"], parts["lora_B"],
                            float(_pattern_value(raw.get("alpha_pattern") or {}, hf, alpha)))
        ours.update({reverse[hf]: found} if hf in reverse else import_fused(model, hf, found, use_rslora))
    head_names = {hf: n for n, p in model.named_parameters() if (hf := _hf_param_name(model, n, p.shape))}
    modules_to_save = sorted({head_names[k].rsplit(".", 1)[0] for k in saved if k in head_names})
    unknown = [k for k in saved if k not in head_names]
    if unknown:
        raise ValueError(f"{weights_file}: weights this model has no place for: {unknown[:5]}")
    for hf, value in saved.items():
        want = tuple(dict(model.named_parameters())[head_names[hf]].shape)
        if tuple(value.shape) != want:
            raise ValueError(f"{weights_file}: {hf} has shape {tuple(value.shape)}; this model expects {want}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=float(raw.get("lora_dropout") or 0.0),
                        target_modules="|".join(re.escape(t) for t in sorted(ours)),
                        modules_to_save=modules_to_save or None, use_rslora=use_rslora,
                        rank_pattern={re.escape(n): f.r for n, f in ours.items() if f.r != r},
                        alpha_pattern={re.escape(n): f.alpha for n, f in ours.items() if f.alpha != alpha})
    apply_lora(model, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, found in ours.items():
            params[f"{name}.lora_A.weight"].copy_(found.A)
            params[f"{name}.lora_B.weight"].copy_(found.B)
        for hf, value in saved.items():
            params[head_names[hf]].copy_(value)
    return model
