"""What every family module provides: config translation and weight-name translation.

Our own parameter names follow the Llama layout (`model.layers.N.self_attn.q_proj.weight`, ...) for every family, so
LoRA targets and PEFT adapters use the names people know. Each family maps its Hugging Face names onto them, splitting
fused projections on load and fusing them again on save.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from decoderkit.config import PRETRAINED_DEFAULTS, DecoderConfig, FamilyConfig, family_config_class

if TYPE_CHECKING:
    from decoderkit.gguf_model import GGUFMetadata

HEADS = ("base", "causal_lm", "sequence_classification", "token_classification", "question_answering")

# Buffers that old checkpoints carry and that we recompute.
IGNORED_CHECKPOINT_KEYS = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias|\.?bias_mask)$")


class Family:
    """A family's translation tables. Subclasses set the names and implement the config mapping."""

    model_type: str = ""
    hf_base_prefix: str = "model"
    # Class name prefix transformers uses ("Llama" -> LlamaForCausalLM).
    class_prefix: str = ""
    # transformers' module name of each head, when it is not ours.
    hf_head_names: dict[str, str] = {}
    # Heads transformers itself implements for this family (the others are ours alone).
    hf_heads: tuple[str, ...] = HEADS

    # llama.cpp's `general.architecture` for this family's GGUF files ("" when there is none) and the config key that
    # holds the layer count in the dict `config_from_gguf` returns.
    gguf_architecture: str = ""
    gguf_layers_key: str = "num_hidden_layers"

    # transformers' config class for the family, as data: its fields with their defaults (None where transformers
    # derives the value from others, see `complete_hf_config`), its attribute aliases, and the fields that hold a
    # sub-config (a dict of that sub-config's defaults).
    hf_defaults: dict[str, Any] = {}
    hf_attribute_map: dict[str, str] = {}
    hf_sub_configs: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------------------------------------ config
    def config_from_hf(self, hf: dict[str, Any]) -> DecoderConfig:
        raise NotImplementedError

    def config_to_hf(self, config: DecoderConfig) -> dict[str, Any]:
        raise NotImplementedError

    def complete_hf_config(self, hf: dict[str, Any]) -> None:
        """Fill in, in place, the values transformers' config class derives from others (head_dim, ...)."""

    def transformers_config(self, hf: dict[str, Any]) -> dict[str, Any]:
        """The fields transformers' config class holds for this config.json dict (`to_dict()` order)."""
        raw = copy.deepcopy(hf)
        if "torch_dtype" in raw:
            dtype = raw.pop("torch_dtype")
            raw["dtype"] = raw.get("dtype") or dtype
        raw.pop("transformers_version", None)
        num_labels = raw.pop("num_labels", None)
        if num_labels is not None and not isinstance(raw.get("id2label"), dict):
            raw["id2label"] = {i: f"LABEL_{i}" for i in range(num_labels)}
            raw["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
        for name, defaults in self.hf_sub_configs.items():
            raw[name] = {**copy.deepcopy(defaults), **(raw.get(name) or {})}
        for fields in (raw, *(raw[name] for name in self.hf_sub_configs)):
            if isinstance(fields.get("id2label"), dict):  # JSON's string keys, as integers again
                fields["id2label"] = {int(k): v for k, v in fields["id2label"].items()}
        fields = {"transformers_version": hf.get("transformers_version")} if "transformers_version" in hf else {}
        base = {k: v for k, v in PRETRAINED_DEFAULTS.items() if k not in ("_name_or_path", "output_attentions")}
        fields.update(copy.deepcopy(base))
        fields.update(copy.deepcopy(self.hf_defaults))
        fields.update(_name_or_path="", model_type=self.model_type)
        fields.update(raw)
        fields.setdefault("output_attentions", False)
        self.complete_hf_config(fields)
        return fields

    def make_config(self, config: DecoderConfig) -> FamilyConfig:
        """transformers' view (`model.config`) of a model built from `config`, kept in step with it."""
        # The version that wrote config.json, where transformers' to_dict() gives its own: the same for a checkpoint
        # that transformers saved
        version = config.hf_config.get("transformers_version")
        fields = self.transformers_config({**config.to_hf_dict(), **({"transformers_version": version} if version
                                                                      else {})})
        if config.dtype is not None:
            fields["dtype"] = config.dtype
        for name in self.hf_sub_configs:
            fields[name] = FamilyConfig(fields[name])
        return family_config_class(self.class_prefix + "Config")(fields, self.hf_attribute_map, neutral=config)

    def architecture(self, head: str) -> str:
        suffix = {
            "base": "Model",
            "causal_lm": "ForCausalLM",
            "sequence_classification": "ForSequenceClassification",
            "token_classification": "ForTokenClassification",
            "question_answering": "ForQuestionAnswering",
        }[head]
        return self.class_prefix + suffix

    def hf_prefix(self, head: str) -> str:
        return self.hf_base_prefix

    # ------------------------------------------------------------------------------------------------ GGUF
    def config_from_gguf(self, meta: GGUFMetadata) -> dict[str, Any]:
        """A transformers config.json dict from a GGUF file's metadata (see `decoderkit.gguf_model`)."""
        raise NotImplementedError(f"{self.model_type} has no GGUF support")

    def gguf_parameters(self) -> tuple[str, ...]:
        """transformers' parameter names of a causal LM, `{bid}` for the layer index; the gguf package maps them."""
        raise NotImplementedError(f"{self.model_type} has no GGUF support")

    def fix_gguf_tensor(self, gguf_name: str, weight: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        """Undo what llama.cpp's converter changed in a tensor (q/k row order, norm offsets, ...)."""
        return weight

    def config_to_gguf(self, hf: dict[str, Any]) -> dict[str, Any]:
        """GGUF metadata for a transformers config.json dict: the inverse of `config_from_gguf`.

        Keys are gguf `Keys` templates (`{arch}` is filled in by the writer); ints are written as uint32, floats as
        float32, as llama.cpp's converter writes them. Raises ValueError for settings llama.cpp cannot represent.
        """
        raise NotImplementedError(f"{self.model_type} has no GGUF support")

    def gguf_extra_tensors(self, hf: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Tensors llama.cpp wants that are config values in transformers (llama3's `rope_freqs`), by GGUF name."""
        return {}

    def fix_tensor_for_gguf(self, gguf_name: str, weight: torch.Tensor, hf: dict[str, Any]) -> torch.Tensor:
        """Apply what llama.cpp's converter changes in a tensor: the inverse of `fix_gguf_tensor`."""
        return weight

    # ------------------------------------------------------------------------------------------------ weights
    def base_hf_to_ours(self, name: str, tensor: torch.Tensor, config: DecoderConfig) -> list[tuple[str, torch.Tensor]]:
        """Translate one base-model tensor (name without any prefix) into ours (also without prefix)."""
        return [(name, tensor)]

    def base_ours_to_hf(self, state: dict[str, torch.Tensor], config: DecoderConfig) -> dict[str, torch.Tensor]:
        """Translate our base-model tensors (names without prefix) into the family's."""
        return dict(state)

    def hf_to_ours(self, name: str, tensor: torch.Tensor, config: DecoderConfig) -> list[tuple[str, torch.Tensor]]:
        """Map one checkpoint tensor to our names, whatever head the checkpoint was saved from.

        Returns an empty list for buffers we recompute. Head tensors keep their role ("lm_head", "score", ...).
        """
        if IGNORED_CHECKPOINT_KEYS.search(name):
            return []
        for head_ours, head_hf in (*self.hf_head_names.items(), ("score", "score"), ("qa_outputs", "qa_outputs"),
                                   ("lm_head", "lm_head")):
            if name.startswith(head_hf + "."):
                return [(head_ours + name[len(head_hf):], tensor)]
        for prefix in ("model.", "transformer."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        return [("model." + n, t) for n, t in self.base_hf_to_ours(name, tensor, config)]

    def ours_to_hf(self, state: dict[str, torch.Tensor], config: DecoderConfig, head: str) -> dict[str, torch.Tensor]:
        """Our full state dict -> the family's names for the given head, fused where the family fuses."""
        base = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        out = {f"{self.hf_prefix(head)}.{k}": v for k, v in self.base_ours_to_hf(base, config).items()}
        reverse = {ours: hf for ours, hf in self.hf_head_names.items()}
        for key, value in state.items():
            if key.startswith("model."):
                continue
            role, rest = key.split(".", 1)
            out[f"{reverse.get(role, role)}.{rest}"] = value
        return out


class NameMap:
    """Two-way prefix renames between a family's names and ours; `{i}` stands for a layer index."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        def compile_(template: str) -> re.Pattern[str]:
            return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)"))

        self._to_ours = [(compile_(hf), ours) for hf, ours in pairs]
        self._to_hf = [(compile_(ours), hf) for hf, ours in pairs]

    @staticmethod
    def _apply(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
        for pattern, template in table:
            m = pattern.match(name)
            if m:
                layer = m.group(1) if m.groups() else ""
                return template.replace("{i}", layer) + name[m.end():]
        return None

    def to_ours(self, name: str) -> str | None:
        return self._apply(name, self._to_ours)

    def to_hf(self, name: str) -> str | None:
        return self._apply(name, self._to_hf)


def split_rows(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [t.contiguous() for t in torch.split(tensor, sizes, dim=0)]


def layer_groups(state: dict[str, torch.Tensor]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield (layer prefix 'layers.N.', {rest: tensor}) for our per-layer tensors."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"(layers\.\d+\.)(.*)", key)
        if m:
            groups.setdefault(m.group(1), {})[m.group(2)] = value
    yield from groups.items()


def standardize_rope(hf: dict[str, Any], max_position_embeddings: int) -> dict[str, Any]:
    """transformers 5's `rope_parameters` from either spelling (`rope_parameters`, or `rope_scaling` + `rope_theta`)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_type", params.get("type", "default"))  # transformers keeps the old "type" key too
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        # Phi3-style configs keep the pretraining length outside the rope dict; transformers prefers that copy.
        if "original_max_position_embeddings" in hf:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    return params


def common_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Fields every transformers config shares: token ids, labels, cache use, dtype."""
    id2label = hf.get("id2label")
    num_labels = len(id2label) if id2label else hf.get("num_labels", 2)
    if hf.get("classifier_dropout") is not None:
        classifier_dropout = hf["classifier_dropout"]
    elif hf.get("hidden_dropout") is not None:
        classifier_dropout = hf["hidden_dropout"]
    else:
        classifier_dropout = 0.1
    return dict(
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        num_labels=num_labels,
        problem_type=hf.get("problem_type"),
        classifier_dropout=classifier_dropout,
        dtype=hf.get("dtype", hf.get("torch_dtype")),
        hf_config=hf,
    )


def common_to_hf(config: DecoderConfig) -> dict[str, Any]:
    out = {k: v for k, v in config.hf_config.items() if k not in ("torch_dtype", "transformers_version")}
    out.update(
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=config.use_cache,
        model_type=config.model_type,
    )
    if config.problem_type is not None:
        out["problem_type"] = config.problem_type
    if config.num_labels != 2 or "id2label" in out:
        labels = out.get("id2label") or {}
        if len(labels) != config.num_labels:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(config.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(config.num_labels)}
    if config.dtype is not None:
        out["dtype"] = config.dtype
    return out

