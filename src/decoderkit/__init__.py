"""decoderkit: run, serve and fine-tune decoder-only language models from Hugging Face checkpoints and GGUF files."""

import decoderkit._openmp  # noqa: F401  (before torch: see the module)
from decoderkit.auto import (
    FAMILY_CLASSES,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from decoderkit.cache import DynamicCache, StaticCache
from decoderkit.config import DecoderConfig
from decoderkit.layers.quantized import QuantizationConfig
from decoderkit.model import (
    DecoderForCausalLM,
    DecoderForQuestionAnswering,
    DecoderForSequenceClassification,
    DecoderForTokenClassification,
    DecoderModel,
)

__version__ = "0.1.0"

globals().update(FAMILY_CLASSES)


def __getattr__(name: str):
    # The tokenizer pulls in `tokenizers` and jinja2; import it only when asked for.
    if name == "AutoTokenizer":
        from decoderkit.tokenizer import AutoTokenizer

        return AutoTokenizer
    raise AttributeError(f"module 'decoderkit' has no attribute {name!r}")


__all__ = [
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForQuestionAnswering",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoTokenizer",
    "DecoderConfig",
    "DecoderForCausalLM",
    "DecoderForQuestionAnswering",
    "DecoderForSequenceClassification",
    "DecoderForTokenClassification",
    "DecoderModel",
    "DynamicCache",
    "QuantizationConfig",
    "StaticCache",
    *FAMILY_CLASSES,
]
