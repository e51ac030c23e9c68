"""transformers-style entry points: `AutoModelForCausalLM` and friends, and the per-family class names."""

from __future__ import annotations

import os
from typing import Any

from decoderkit.config import DecoderConfig
from decoderkit.families import FAMILIES, get_family
from decoderkit.model import (
    HEAD_CLASSES,
    DecoderForCausalLM,
    DecoderForQuestionAnswering,
    DecoderForSequenceClassification,
    DecoderForTokenClassification,
    DecoderModel,
    PreTrainedDecoder,
)


class _AutoHead:
    """Dispatches `from_pretrained` / `from_config` to the head class; the family comes from the checkpoint."""

    head_class: type[PreTrainedDecoder] = DecoderModel

    def __init__(self) -> None:
        raise TypeError(f"{type(self).__name__} is not instantiated; use .from_pretrained(...) or .from_config(...)")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> PreTrainedDecoder:
        return cls.head_class.from_pretrained(path, **kwargs)

    @classmethod
    def from_config(cls, config: DecoderConfig | dict[str, Any], **kwargs: Any) -> PreTrainedDecoder:
        return cls.head_class.from_config(config, **kwargs)


class AutoModel(_AutoHead):
    """The bare decoder (`last_hidden_state`)."""

    head_class = DecoderModel


class AutoModelForCausalLM(_AutoHead):
    head_class = DecoderForCausalLM


class AutoModelForSequenceClassification(_AutoHead):
    head_class = DecoderForSequenceClassification


class AutoModelForTokenClassification(_AutoHead):
    head_class = DecoderForTokenClassification


class AutoModelForQuestionAnswering(_AutoHead):
    head_class = DecoderForQuestionAnswering


def _family_class(model_type: str, head: str) -> type[PreTrainedDecoder]:
    """A subclass named like transformers' (LlamaForCausalLM) that checks the checkpoint is of its family."""
    base = HEAD_CLASSES[head]
    family = get_family(model_type)

    def check(config: DecoderConfig) -> None:
        if config.model_type != model_type:
            raise ValueError(f"{family.architecture(head)} expects a {model_type} checkpoint, got model_type "
                             f"{config.model_type!r}; use decoderkit.{_AUTO_NAMES[head]} for any family")

    def __init__(self: PreTrainedDecoder, config: DecoderConfig) -> None:
        check(config)
        base.__init__(self, config)

    return type(family.architecture(head), (base,), {"__init__": __init__, "__doc__": base.__doc__,
                                                     "__module__": __name__})


_AUTO_NAMES = {
    "base": "AutoModel", "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
}

FAMILY_CLASSES: dict[str, type[PreTrainedDecoder]] = {}
for _model_type, _family in FAMILIES.items():
    for _head in HEAD_CLASSES:
        _cls = _family_class(_model_type, _head)
        FAMILY_CLASSES[_cls.__name__] = _cls
globals().update(FAMILY_CLASSES)
