"""Tiny transformers models used as the oracle: built, perturbed away from their init, saved to disk."""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

BASE: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gemma": dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2),
    "gpt_bigcode": dict(vocab_size=97, n_embd=32, n_inner=48, n_layer=2, n_head=4, n_positions=64, multi_query=True,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_pdrop=0.0, resid_pdrop=0.0,
                        embd_pdrop=0.0),
    "mpt": dict(vocab_size=97, d_model=32, n_heads=4, n_layers=2, max_seq_len=64, pad_token_id=0, bos_token_id=1,
                eos_token_id=2),
}

HF_CLASSES = {
    "causal_lm": transformers.AutoModelForCausalLM,
    "base": transformers.AutoModel,
    "sequence_classification": transformers.AutoModelForSequenceClassification,
    "token_classification": transformers.AutoModelForTokenClassification,
    "question_answering": transformers.AutoModelForQuestionAnswering,
}


def hf_config(model_type: str, **overrides: Any) -> transformers.PreTrainedConfig:
    return transformers.AutoConfig.for_model(model_type, **{**BASE[model_type], **overrides})


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter away from its init (norm weights off 1, biases off 0) so no term hides."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def build(model_type: str, head: str = "causal_lm", attn_implementation: str = "eager", seed: int = 0,
          **overrides: Any) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = hf_config(model_type, **overrides)
    model = HF_CLASSES[head].from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    perturb(model, seed)
    return model.eval()


def save(model: transformers.PreTrainedModel, directory: str | os.PathLike) -> str:
    model.save_pretrained(directory)
    return os.fspath(directory)


def left_padded_batch(vocab: int, lengths: list[int], pad_id: int = 0, seed: int = 1):
    """Random ids (avoiding the pad id), left-padded; returns input_ids, attention_mask, position_ids."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[i, T - n:] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, position_ids


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    a, b = a.detach(), b.detach()
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12))
