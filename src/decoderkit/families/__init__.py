"""The registry of model families: the only place that maps a `model_type` to its translation tables."""

from __future__ import annotations

from typing import Any

from decoderkit.families.base import HEADS, Family
from decoderkit.families.gemma import GemmaFamily
from decoderkit.families.gpt_bigcode import GPTBigCodeFamily
from decoderkit.families.llama import LlamaFamily
from decoderkit.families.mpt import MptFamily

FAMILIES: dict[str, Family] = {f.model_type: f for f in (LlamaFamily(), GemmaFamily(), GPTBigCodeFamily(), MptFamily())}


def get_family(model_type: str) -> Family:
    """The family for a `model_type`, or a ValueError listing the supported ones."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported model types: {sorted(FAMILIES)}"
        ) from None


def family_for(hf_config: dict[str, Any]) -> Family:
    if "model_type" not in hf_config:
        raise ValueError(f"config.json has no model_type; supported model types: {sorted(FAMILIES)}")
    return get_family(hf_config["model_type"])


__all__ = ["FAMILIES", "HEADS", "Family", "family_for", "get_family"]
