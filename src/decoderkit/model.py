"""The task heads over the decoder, and what every head shares: loading, saving, initialisation."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from decoderkit.cache import Cache
from decoderkit.compat import (
    TransformersCompatMixin,
    check_config_overrides,
    resolve_device_map,
    split_from_pretrained_kwargs,
)
from decoderkit.config import ATTN_IMPLEMENTATIONS, DecoderConfig, FamilyConfig, as_decoder_config
from decoderkit.decoder import DecoderStack
from decoderkit.layers.attention import Attention, flash_attention_available
from decoderkit.loss import causal_lm_loss, chunked_causal_lm_loss
from decoderkit.outputs import ModelOutput


class PreTrainedDecoder(TransformersCompatMixin, nn.Module):
    """Shared machinery of every head: loading, saving, initialisation, gradient checkpointing."""

    head: ClassVar[str] = "base"

    def __init__(self, config: DecoderConfig | FamilyConfig) -> None:
        super().__init__()
        from decoderkit.families import get_family

        config = as_decoder_config(config)
        # Two views of one configuration: the layers read the neutral one; `config` is transformers' (see FamilyConfig)
        self.decoder_config = config
        self.config = get_family(config.model_type).make_config(config)
        self.model = DecoderStack(config)

    @property
    def name_or_path(self) -> str | None:
        """Where from_pretrained found the weights (a hub id, or an absolute path), as transformers' `name_or_path`;
        a saved LoRA adapter names it as its base so that PEFT can load the adapter on its own."""
        return self.config.name_or_path or None

    @name_or_path.setter
    def name_or_path(self, value: str | None) -> None:
        self.config.name_or_path = value or ""

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_config(
        cls, config: DecoderConfig | dict[str, Any], *, dtype: Any = None, torch_dtype: Any = None,
        attn_implementation: str | None = None, device: str | torch.device | None = None, **overrides: Any,
    ) -> PreTrainedDecoder:
        """A randomly initialised model (each family's initialisation) from a DecoderConfig or config.json dict."""
        from decoderkit.checkpoint import resolve_dtype

        config = prepare_config(config, attn_implementation, overrides)
        target = resolve_dtype(dtype if dtype is not None else torch_dtype, config) or torch.float32
        with torch.device(device or "cpu"):
            model = cls(config)
        model.init_weights()
        return model.to(target)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> PreTrainedDecoder:
        """Load a Hugging Face model directory, a hub id in the local cache, or a `.gguf` file.

        Keywords (`decoderkit.compat.FROM_PRETRAINED_KEYWORDS`): `dtype` (alias `torch_dtype`; "auto" or None keeps
        the checkpoint's), `attn_implementation`, `device`, `device_map` ("auto", "cpu", "cuda:0", an index, or a
        dict of module name -> device; one process runs a model on one device, so a map naming several is an
        error), `quantization` (None: a GGUF file's quantized tensors stay packed on CPU, an HF checkpoint stays
        float; "none": all float; "int8", "int4" or a `QuantizationConfig`: weights quantized as they are read;
        `dtype` then names the activation dtype), `activations` (how quantized layers multiply: None or "float", exact,
        "bfloat16", x and weights rounded to bfloat16 with float32 sums, faster on batches and prompts, or "int8",
        rounded to int8 per run of 32 inputs as llama.cpp does, faster and less accurate, see
        `decoderkit.layers.quantized.set_activations`), `config`, `progress`, `gguf_file`, `revision`,
        `cache_dir`, `local_files_only`, `tp_plan` ("auto": tensor-parallel over the ranks of the torch.distributed
        process group started by `torchrun --nproc-per-node N`, as transformers does; each rank reads and keeps only
        its shard of the weights, see `decoderkit.parallel`). Any config field overrides config.json's (`num_labels=3`,
        `use_cache=False`).
        transformers' `trust_remote_code`, `low_cpu_mem_usage`, `use_safetensors`, `token`, ... are accepted with no
        effect (`ACCEPTED_WITHOUT_EFFECT` says why); `force_download`, `max_memory`, `subfolder`, ... raise. Any
        other keyword is a TypeError naming the allowed ones.
        """
        from decoderkit.checkpoint import load_pretrained

        options, overrides = split_from_pretrained_kwargs(kwargs)
        dtype = options.pop("dtype", None)
        torch_dtype = options.pop("torch_dtype", None)
        options["device"] = resolve_device_map(options.pop("device_map", None), options.get("device"))
        tp_plan = options.pop("tp_plan", None)
        if tp_plan is not None:
            from decoderkit.parallel.loading import load_tensor_parallel

            return load_tensor_parallel(cls, path, tp_plan=tp_plan, dtype=dtype if dtype is not None else torch_dtype,
                                        **options, **overrides)
        return load_pretrained(cls, path, dtype=dtype if dtype is not None else torch_dtype, **options, **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                        safe_serialization: bool = True) -> None:
        """Write a directory transformers loads as the same model (config.json, safetensors shards, index)."""
        from decoderkit.saving import save_pretrained

        if getattr(self, "tp", None) is not None:
            raise ValueError("save_pretrained: this model is one tensor-parallel rank's shard; save the checkpoint it "
                             "was loaded from instead")

        save_pretrained(self, save_directory, max_shard_size=max_shard_size)

    # ------------------------------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self) -> None:
        """transformers' initialisation for the family: N(0, initializer_range) for projections and embeddings."""
        cfg = self.decoder_config
        std = cfg.initializer_range
        self.tie_weights()
        embedding_weights = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in embedding_weights:
                continue  # a tied output head is initialised as the embedding it shares
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, std)
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
            elif hasattr(module, "weight_offset"):
                module.weight.fill_(0.0 if cfg.norm_init_zero else 1.0)
        if cfg.scaled_output_init:
            # GPT-2-style: residual projections shrink with depth so the residual stream's variance stays bounded.
            scaled = std / (2 * cfg.num_hidden_layers) ** 0.5
            for layer in self.model.layers:
                layer.self_attn.o_proj.weight.normal_(0.0, scaled)
                layer.mlp.down_proj.weight.normal_(0.0, scaled)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the output projection with the input embedding when the config says so."""

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (with quantized weights too: their scales, and every norm, are in it)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer's activations in the backward pass instead of storing them."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    def set_attn_implementation(self, name: str) -> None:
        check_attn_implementation(name)
        self.decoder_config.attn_implementation = name
        for module in self.modules():
            if isinstance(module, Attention):
                module.implementation = name

    def _base(self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
              output_attentions, output_hidden_states, cache_position, **extra) -> ModelOutput:
        # As transformers: an unset flag follows the config (`config.output_hidden_states = True` applies to calls)
        if output_attentions is None:
            output_attentions = bool(self.config.output_attentions)
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                          output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                          cache_position=cache_position, **extra)


def check_attn_implementation(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={name!r} is not supported; allowed: {list(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2" and not flash_attention_available():
        raise ValueError("attn_implementation='flash_attention_2' needs a CUDA device and the flash_attn package; "
                         "use 'sdpa' (default) or 'eager' here")


def check_overrides(config: DecoderConfig | FamilyConfig | dict[str, Any], overrides: dict[str, Any]) -> None:
    """TypeError for a from_pretrained keyword that is no field of the checkpoint's transformers config."""
    from decoderkit.families import family_for

    if not isinstance(config, dict):
        config = as_decoder_config(config).to_hf_dict()
    family = family_for(config)
    check_config_overrides(family.transformers_config(config), family.hf_attribute_map, overrides)


def prepare_config(config: DecoderConfig | FamilyConfig | dict[str, Any], attn_implementation: str | None,
                   overrides: dict[str, Any]) -> DecoderConfig:
    """A DecoderConfig from any form, with the attention backend checked and HF-style overrides applied."""
    if isinstance(config, FamilyConfig):
        config = config.to_dict()
    if isinstance(config, dict) and "num_labels" in overrides:
        # As transformers' num_labels setter: a different count replaces the saved label names
        labels = config.get("id2label")
        if labels is not None and len(labels) != overrides["num_labels"]:
            config = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
    if isinstance(config, dict):
        config = DecoderConfig.from_hf_dict({**config, **overrides})
    elif overrides:
        config = DecoderConfig.from_hf_dict({**config.to_hf_dict(), **overrides}).replace(
            attn_implementation=config.attn_implementation)
    else:
        config = config.replace()
    if attn_implementation is not None:
        check_attn_implementation(attn_implementation)
        config = config.replace(attn_implementation=attn_implementation)
    else:
        check_attn_implementation(config.attn_implementation)
    return config


class DecoderModel(PreTrainedDecoder):
    """The bare decoder: `last_hidden_state` after the final norm."""

    head = "base"

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None, output_attentions: bool | None = None,
        output_hidden_states: bool | None = None, cache_position: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None, return_dict: bool | None = None,
    ) -> ModelOutput | tuple:
        extra = {}
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids
        if encoder_hidden_states is not None:
            extra.update(encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask)
        out = self._base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache_position, **extra)
        return self._output(out, return_dict)


class DecoderForCausalLM(PreTrainedDecoder):
    """Decoder with a language-modelling head (tied to the embedding when the config says so)."""

    head = "causal_lm"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        # A quantized head shares its table with the embedding when it is built (decoderkit.quantization)
        if self.decoder_config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None, use_cache: bool | None = None,
        output_attentions: bool | None = None, output_hidden_states: bool | None = None,
        cache_position: torch.Tensor | None = None, logits_to_keep: int | torch.Tensor = 0,
        token_type_ids: torch.Tensor | None = None, encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None, num_items_in_batch: int | torch.Tensor | None = None,
        return_dict: bool | None = None, skip_logits: bool = False,
    ) -> ModelOutput | tuple:
        """transformers' causal-LM forward. `skip_logits=True` (with `labels`) returns the loss alone, computed a
        chunk of positions at a time so the full-vocabulary logits never exist at once (see `decoderkit.loss`);
        `logits` is then None. The trainer uses it; the loss and its gradients are the same."""
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)}; expected input_ids' {tuple(input_ids.shape)}")
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True returns only the loss, so it needs labels")
        extra = {}
        if token_type_ids is not None:
            extra["token_type_ids"] = token_type_ids
        if encoder_hidden_states is not None:
            extra.update(encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask)
        out = self._base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache_position, **extra)
        h = out.last_hidden_state
        if skip_logits:
            loss = chunked_causal_lm_loss(h, self.lm_head, labels, self.decoder_config.vocab_size,
                                          num_items_in_batch)
            return self._output(ModelOutput(loss=loss, logits=None, past_key_values=out.past_key_values,
                                            hidden_states=out.hidden_states, attentions=out.attentions), return_dict)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return self._output(ModelOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions), return_dict)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generate continuations with transformers' `generate` arguments (see `decoderkit.generation`)."""
        from decoderkit.generation.generate import generate

        return generate(self, *args, **kwargs)


class DecoderForSequenceClassification(PreTrainedDecoder):
    """Scores each sequence from its last non-padding token."""

    head = "sequence_classification"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None, use_cache: bool | None = None,
        output_attentions: bool | None = None, output_hidden_states: bool | None = None,
        cache_position: torch.Tensor | None = None, return_dict: bool | None = None, **extra: Any,
    ) -> ModelOutput | tuple:
        out = self._base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache_position, **extra)
        logits = self.score(out.last_hidden_state)
        batch = logits.shape[0]
        pad = self.decoder_config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("cannot find the last token of each sequence: a batch larger than 1 needs "
                             "config.pad_token_id to be set")
        if pad is None or input_ids is None:
            last = torch.full((batch,), -1, dtype=torch.long, device=logits.device)
        else:
            # The last non-pad index: with left padding that is the final position, with right padding the last token.
            idx = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
            last = (idx * (input_ids != pad).to(logits.device, torch.int32)).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]
        loss = self._loss(pooled, labels) if labels is not None else None
        return self._output(ModelOutput(loss=loss, logits=pooled, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions), return_dict)

    def _loss(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = self.decoder_config.num_labels
        labels = labels.to(pooled.device)
        problem = self.decoder_config.problem_type
        if problem is None:
            if n == 1:
                problem = "regression"
            elif labels.dtype in (torch.long, torch.int):
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
            self.config.problem_type = problem
        if problem == "regression":
            return F.mse_loss(pooled.squeeze(), labels.squeeze()) if n == 1 else F.mse_loss(pooled, labels)
        if problem == "single_label_classification":
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n) and int(labels.min()) != -100:
                raise ValueError(f"labels must be in [0, {n - 1}] (num_labels={n}), got values in "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            return F.cross_entropy(pooled.view(-1, n), labels.view(-1))
        if problem == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))
        raise ValueError(f"problem_type {problem!r} is not supported; allowed: regression, "
                         "single_label_classification, multi_label_classification")


class DecoderForTokenClassification(PreTrainedDecoder):
    """Per-token labels (NER-style)."""

    head = "token_classification"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=config.token_classifier_bias)

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None, use_cache: bool | None = None,
        output_attentions: bool | None = None, output_hidden_states: bool | None = None,
        cache_position: torch.Tensor | None = None, return_dict: bool | None = None, **extra: Any,
    ) -> ModelOutput | tuple:
        out = self._base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache_position, **extra)
        logits = self.score(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            n = self.decoder_config.num_labels
            valid = labels[labels != -100]
            if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= n):
                raise ValueError(f"labels must be in [0, {n - 1}] or -100 (num_labels={n}), got values in "
                                 f"[{int(valid.min())}, {int(valid.max())}]")
            loss = F.cross_entropy(logits.float().view(-1, n), labels.view(-1).to(logits.device))
        return self._output(ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions), return_dict)


class DecoderForQuestionAnswering(PreTrainedDecoder):
    """Extractive QA: start and end logits for each token."""

    head = "question_answering"

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None, past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None, use_cache: bool | None = False,
        output_attentions: bool | None = None, output_hidden_states: bool | None = None,
        cache_position: torch.Tensor | None = None, return_dict: bool | None = None, **extra: Any,
    ) -> ModelOutput | tuple:
        out = self._base(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         output_attentions, output_hidden_states, cache_position, **extra)
        start, end = self.qa_outputs(out.last_hidden_state).split(1, dim=-1)
        start, end = start.squeeze(-1).contiguous(), end.squeeze(-1).contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            # Positions outside the input are clamped to an ignored index, as transformers does.
            ignored = start.size(1)
            s = start_positions.reshape(-1).clamp(0, ignored).to(start.device)
            e = end_positions.reshape(-1).clamp(0, ignored).to(end.device)
            loss = (F.cross_entropy(start, s, ignore_index=ignored) + F.cross_entropy(end, e, ignore_index=ignored)) / 2
        return self._output(ModelOutput(loss=loss, start_logits=start, end_logits=end,
                                        hidden_states=out.hidden_states, attentions=out.attentions), return_dict)


HEAD_CLASSES: dict[str, type[PreTrainedDecoder]] = {
    cls.head: cls
    for cls in (DecoderModel, DecoderForCausalLM, DecoderForSequenceClassification, DecoderForTokenClassification,
                DecoderForQuestionAnswering)
}
