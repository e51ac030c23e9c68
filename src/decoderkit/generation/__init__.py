"""Generation building blocks: config, logits processors, stopping criteria and beam search bookkeeping."""

from decoderkit.generation.beam_search import BeamSearchOutput, BeamSearchState
from decoderkit.generation.config import GENERATION_CONFIG_NAME, GenerationConfig
from decoderkit.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    PresenceFrequencyPenaltyLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
    build_logits_processors,
)
from decoderkit.generation.stopping import (
    EosTokenCriteria,
    MaxLengthCriteria,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    build_stopping_criteria,
)

__all__ = [
    "BeamSearchOutput",
    "BeamSearchState",
    "GENERATION_CONFIG_NAME",
    "GenerationConfig",
    "LogitsProcessor",
    "LogitsProcessorList",
    "MinLengthLogitsProcessor",
    "MinNewTokensLengthLogitsProcessor",
    "MinPLogitsWarper",
    "NoRepeatNGramLogitsProcessor",
    "PresenceFrequencyPenaltyLogitsProcessor",
    "RepetitionPenaltyLogitsProcessor",
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "TypicalLogitsWarper",
    "build_logits_processors",
    "EosTokenCriteria",
    "MaxLengthCriteria",
    "StoppingCriteria",
    "StoppingCriteriaList",
    "StopStringCriteria",
    "build_stopping_criteria",
]
