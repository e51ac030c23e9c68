"""Writing Hugging Face model directories: config.json, generation_config.json and safetensors shards, atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from decoderkit.checkpoint import SAFE_INDEX, SAFE_SINGLE, WEIGHT_FILE, expected_tensors, parse_size
from decoderkit.families import get_family
from decoderkit.fileio import current_umask, save_safetensors

if TYPE_CHECKING:
    from decoderkit.model import PreTrainedDecoder


logger = logging.getLogger(__name__)


def save_pretrained(
    model: PreTrainedDecoder, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> None:
    """Write config.json, generation_config.json and safetensors shards (+ index) that transformers loads.

    Everything is written into a temporary directory first and moved into place only when complete, so a failure
    leaves no partial checkpoint and an existing one untouched. Files of an earlier save in the target that the new
    one does not overwrite (other shards, .bin weights) are removed; other files (tokenizer, README) are kept.
    """
    from decoderkit.layers.quantized import QUANTIZED_MODULES

    if any(isinstance(m, QUANTIZED_MODULES) for m in model.modules()):
        raise ValueError("this model holds quantized (int8 / int4) weights, which a Hugging Face checkpoint cannot "
                         "hold; load it with quantization='none' to save it")
    limit = parse_size(max_shard_size)
    target = Path(save_directory).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target}: exists and is not a directory")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model's parameters are on the meta device and hold no data; load it with "
                         "device='cpu' (or 'cuda') to save it")
    hf_state = _hf_state_dict(model)
    hf_config = _hf_config(model)

    # Shards are planned from sizes alone so that each is moved to the CPU only while it is written.
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(hf_state):
        nbytes = hf_state[name].numel() * hf_state[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = [SAFE_SINGLE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    target.parent.mkdir(parents=True, exist_ok=True)
    # Inside an existing target (same filesystem, and no write permission on its parent needed), else beside it.
    staging = Path(tempfile.mkdtemp(prefix=".decoderkit-save-", dir=target if target.exists() else target.parent))
    try:
        _write_checkpoint(model, staging, hf_state, hf_config, shards, files)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _hf_state_dict(model: PreTrainedDecoder) -> dict[str, torch.Tensor]:
    config = model.decoder_config
    family = get_family(config.model_type)
    state = expected_tensors(model)  # one entry per tensor: a tied lm_head is left out, as transformers saves it
    if not config.tie_word_embeddings and "lm_head.weight" not in state and hasattr(model, "lm_head"):
        # Tied by hand although the config says untied: write a copy, or transformers would initialise it randomly.
        state["lm_head.weight"] = model.lm_head.weight.clone()
    state = {k: v.detach() for k, v in state.items()}
    hf_state = family.ours_to_hf(state, config, model.head)
    if model.head == "base":
        # transformers saves its bare models (LlamaModel, ...) without the attribute prefix.
        prefix = family.hf_prefix("base") + "."
        hf_state = {k.removeprefix(prefix): v for k, v in hf_state.items()}
    elif model.head == "token_classification" and "classifier" in family.hf_head_names:
        hf_state = {("classifier" + k[len("score"):] if k.startswith("score.") else k): v for k, v in hf_state.items()}
    if model.head not in family.hf_heads:
        logger.warning("transformers has no %s; decoderkit will load this checkpoint, transformers will not",
                       family.architecture(model.head))
    return hf_state


def _hf_config(model: PreTrainedDecoder) -> dict[str, Any]:
    family = get_family(model.decoder_config.model_type)
    # transformers' view, with what the user changed in it (`model.config.use_cache = False` is saved)
    hf_config = model.config.to_diff_dict()
    hf_config.pop("transformers_version", None)
    hf_config["architectures"] = [family.architecture(model.head)]
    hf_config["dtype"] = str(model.dtype).removeprefix("torch.")
    hf_config.pop("torch_dtype", None)
    return hf_config


def _write_checkpoint(model: PreTrainedDecoder, directory: Path, hf_state: dict[str, torch.Tensor],
                      hf_config: dict[str, Any], shards: list[list[str]], files: list[str]) -> None:
    from decoderkit.generation.config import GenerationConfig

    for file, names in zip(files, shards):
        shard = {n: hf_state[n].contiguous().cpu() for n in names}
        save_safetensors(shard, directory / file, metadata={"format": "pt"})
        del shard
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, s in zip(files, shards) for n in s}}
        (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is None:
        generation = GenerationConfig.from_model_config(hf_config)
    generation.save_pretrained(directory)


def _publish(staging: Path, target: Path) -> None:
    """Move a finished save into place: the whole directory when new, else file by file (each move atomic).

    Only renames happen here (the writing, which can fail, is over). Weights move first, then the index, then the
    configs; stale weight files of an earlier save go last, so a single-file save replacing a sharded one is never
    seen without weights. A reader that looks during these few renames may see old and new files side by side.
    """
    if not target.exists():
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; a saved model is as readable as any new dir
        os.rename(staging, target)
        return
    new = {p.name for p in staging.iterdir()}
    order = sorted(new, key=lambda n: (not n.endswith(".safetensors"), n.endswith(".json") and n != SAFE_INDEX))
    for name in order:
        os.replace(staging / name, target / name)
    for old in target.iterdir():
        if old.name not in new and WEIGHT_FILE.fullmatch(old.name) and old.is_file():
            old.unlink()

