"""The one-import switch (#12): a transformers user script, unchanged but for its import line, prints the same with
decoderkit as with transformers, for every family.

The script reads the config (its own field names, transformers' aliases, `to_dict()`), unpacks `return_dict=False`
outputs, resizes the vocabulary, and continues a generation from the `past_key_values` an earlier call returned. It
runs twice in fresh interpreters, once importing transformers, once decoderkit; the printed lines must be equal.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from oracle import build, save

import decoderkit

FAMILIES = ["llama", "gemma", "gpt_bigcode", "mpt"]

SCRIPT = '''
import json
import sys

import torch
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
for path in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    print(type(config).__name__, config.model_type, config.architectures, config.vocab_size, config.hidden_size,
          config.num_hidden_layers, config.num_attention_heads, config.num_labels, config.return_dict)
    for name in ("n_embd", "n_head", "n_positions", "d_model", "n_layers", "max_seq_len", "rope_scaling",
                 "max_position_embeddings", "head_dim", "num_key_value_heads", "use_cache", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id", "pad_token_id", "dtype"):
        print(name, getattr(config, name, "(none)"))
    print(json.dumps(config.to_dict(), sort_keys=True, default=str))
    print(config.to_json_string())

    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        loss, logits, *rest = model(ids, labels=ids, use_cache=True, return_dict=False)
        logits_again, *cache = model(ids, return_dict=False)  # the cache only where config.use_cache says so
    print(type(loss).__name__, f"{loss.item():.3f}", tuple(logits.shape), [type(r).__name__ for r in rest],
          [type(c).__name__ for c in cache], torch.equal(logits, logits_again), logits[:, -1].argmax(-1).tolist())

    print(model.num_parameters(), model.num_parameters(exclude_embeddings=True))
    embeddings = model.resize_token_embeddings(config.vocab_size + 3, pad_to_multiple_of=8)
    print(isinstance(embeddings, torch.nn.Embedding), tuple(embeddings.weight.shape), model.config.vocab_size,
          model.get_output_embeddings().weight.shape[0],
          model.get_output_embeddings().weight is model.get_input_embeddings().weight, model.num_parameters())

    out = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, return_dict_in_generate=True)
    print(out.sequences.tolist())
    followup = torch.cat([out.sequences, torch.tensor([[21, 22], [23, 24]])], dim=-1)
    more = model.generate(followup, past_key_values=out.past_key_values, max_new_tokens=4, do_sample=False)
    print(more.tolist())
'''


def run_script(text: str, paths: list[str]) -> str:
    src = str(Path(decoderkit.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", text, *paths], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
def test_transformers_script_runs_unchanged_but_the_import(tmp_path):
    paths = [str(Path(save(build(mt), tmp_path / mt)).absolute()) for mt in FAMILIES]
    theirs = run_script(SCRIPT, paths)
    ours = run_script(SCRIPT.replace("from transformers import", "from decoderkit import"), paths)
    assert theirs.count("\n") > 40
    for a, b in zip(theirs.splitlines(), ours.splitlines(), strict=True):
        assert b == a
