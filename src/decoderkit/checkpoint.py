"""Reading and writing Hugging Face model directories (and reading GGUF files).

Loading builds the model on the meta device and materialises each parameter straight from the memory-mapped file in
the target dtype, so no random initialisation is done and then thrown away, and peak memory stays near the size of
the weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from decoderkit.config import DecoderConfig, read_config_json
from decoderkit.families import get_family

if TYPE_CHECKING:
    from decoderkit.model import PreTrainedDecoder

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
HEAD_ROLES = ("lm_head", "score", "qa_outputs", "classifier")
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def resolve_dtype(dtype: Any, config: DecoderConfig | None = None) -> torch.dtype | None:
    """A torch dtype from a torch dtype, its name, or "auto" (the checkpoint's own dtype); None means float32."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name == "auto":
            saved = config.dtype if config is not None else None
            return resolve_dtype(saved) if saved not in (None, "auto") else torch.float32
        if name in DTYPES:
            return DTYPES[name]
    raise ValueError(f"unknown dtype {dtype!r}; allowed: a torch dtype, 'auto', or one of {sorted(DTYPES)}")


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '10KiB' / 1234 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r} is not a size such as '5GB', '500MB' or an integer of bytes")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


# ---------------------------------------------------------------------------------------------- locating files
def resolve_model_path(name: str | os.PathLike) -> Path:
    """A local directory or file as given, else a hub repo id looked up in the local Hugging Face cache."""
    path = Path(name)
    if path.exists():
        return path
    text = os.fspath(name)
    if text.endswith(".gguf") or os.sep in text.strip("/").replace("/", os.sep, 1) and text.count("/") > 1:
        raise FileNotFoundError(f"{text}: no such file or directory")
    if re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", text) is None:
        raise FileNotFoundError(f"{text}: no such file or directory, and not a hub repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except LocalEntryNotFoundError:
        if offline:
            raise FileNotFoundError(
                f"{text}: not a local path, and not in the Hugging Face cache while HF_HUB_OFFLINE is set; fetch it "
                f"first with `huggingface-cli download {text}` on a machine with network access"
            ) from None
    except Exception as err:  # a malformed id and similar
        raise FileNotFoundError(f"{text}: not a local path and not a usable hub repo id ({err})") from None
    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:
        raise FileNotFoundError(
            f"{text}: not a local path, not in the local Hugging Face cache, and the download failed ({err})"
        ) from None


def weight_files(directory: Path) -> tuple[list[Path], str]:
    """The weight files of a directory and their format ('safetensors' or 'bin')."""
    for index_name, fmt in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: invalid shard index ({err})") from None
            files = sorted({directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
            return files, fmt
    if (directory / "model.safetensors").exists():
        return [directory / "model.safetensors"], "safetensors"
    if (directory / "pytorch_model.bin").exists():
        return [directory / "pytorch_model.bin"], "bin"
    raise FileNotFoundError(
        f"{directory}: no weights found; expected model.safetensors, {SAFE_INDEX}, pytorch_model.bin or {BIN_INDEX}"
    )


def iter_checkpoint(files: list[Path], fmt: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one tensor in memory at a time for safetensors (memory-mapped)."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        if fmt == "safetensors":
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except (SafetensorError, OSError) as err:
                raise ValueError(f"{file}: corrupt or truncated safetensors file ({err})") from None
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:
                raise ValueError(f"{file}: unreadable PyTorch checkpoint ({err})") from None
            yield from state.items()


# ---------------------------------------------------------------------------------------------- loading
def load_pretrained(
    cls: type[PreTrainedDecoder], path: str | os.PathLike, *, dtype: Any = None, attn_implementation: str | None = None,
    device: str | torch.device | None = None, config: DecoderConfig | None = None, progress: bool | None = None,
    **overrides: Any,
) -> PreTrainedDecoder:
    """Build `cls` from a checkpoint; see `PreTrainedDecoder.from_pretrained`."""
    from decoderkit.model import prepare_config

    location = resolve_model_path(path)
    gguf = None
    if location.is_file() and location.suffix == ".gguf":
        from decoderkit.gguf_model import read_gguf

        gguf = read_gguf(location)
        hf_config = gguf.config
    elif location.is_dir():
        hf_config = read_config_json(location)
    else:
        raise ValueError(f"{location}: expected a model directory (with config.json) or a .gguf file")
    if config is None:
        config = DecoderConfig.from_hf_dict({**hf_config, **overrides})
    config = prepare_config(config, attn_implementation, {})
    # transformers 5 defaults to "auto" too: the checkpoint's own dtype.
    target = resolve_dtype(dtype if dtype is not None else "auto", config) or torch.float32
    device = torch.device(device or "cpu")

    with torch.device("meta"):
        model = cls(config)
    if gguf is not None:
        source = gguf.state_dict.items()
        label = str(location)
    else:
        files, fmt = weight_files(location)
        source = iter_checkpoint(files, fmt)
        label = str(location)
    state = _collect_state(model, config, source, target, device, label, progress)
    _assign(model, state, device, target, label)
    model.eval()
    _attach_generation_config(model, location if gguf is None else None, hf_config)
    return model


def _collect_state(model: PreTrainedDecoder, config: DecoderConfig, source, dtype: torch.dtype,
                   device: torch.device, label: str, progress: bool | None) -> dict[str, torch.Tensor]:
    family = get_family(config.model_type)
    expected = dict(model.state_dict(keep_vars=True))
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    bar = _progress(progress, label)
    for hf_name, tensor in source:
        for name, value in family.hf_to_ours(hf_name, tensor, config):
            if name.split(".")[0] == "classifier":
                name = "score" + name[len("classifier"):]
            if name not in expected:
                if name.split(".")[0] not in HEAD_ROLES:
                    unexpected.append(hf_name)
                continue
            want = tuple(expected[name].shape)
            if tuple(value.shape) != want:
                raise ValueError(f"{label}: {hf_name} has shape {tuple(value.shape)}; the config expects {want}")
            state[name] = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
            if bar is not None:
                bar.update(value.numel() * value.element_size())
    if bar is not None:
        bar.close()
    if unexpected:
        raise ValueError(f"{label}: {len(unexpected)} unexpected weights for a {config.model_type} model: "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return state


def _progress(enabled: bool | None, label: str):
    import sys

    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc=f"loading {os.path.basename(label)}", unit="B", unit_scale=True, leave=False)


def _assign(model: PreTrainedDecoder, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
            label: str) -> None:
    tied = model.config.tie_word_embeddings and hasattr(model, "lm_head")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    if tied:
        state.pop("lm_head.weight", None)
    missing = [n for n in names if n not in state and not (tied and n == "lm_head.weight")]
    missing_base = [n for n in missing if n.split(".")[0] not in HEAD_ROLES]
    if missing_base:
        raise ValueError(f"{label}: {len(missing_base)} weights missing from the checkpoint: {missing_base[:5]}"
                         f"{' ...' if len(missing_base) > 5 else ''}")
    model.load_state_dict(state, strict=False, assign=True)
    if missing:
        logger.warning("%s: %s not in the checkpoint; newly initialised (train them before use): %s",
                       label, "these head weights are", missing)
        for name in missing:
            module_name, _, param_name = name.rpartition(".")
            module = model.get_submodule(module_name)
            fresh = torch.empty(getattr(module, param_name).shape, device=device, dtype=dtype)
            if param_name == "bias":
                fresh.zero_()
            else:
                fresh.normal_(0.0, model.config.initializer_range)
            setattr(module, param_name, torch.nn.Parameter(fresh))
    model.tie_weights()
    model.model.rebuild_buffers(device)


def _attach_generation_config(model: PreTrainedDecoder, directory: Path | None, hf_config: dict[str, Any]) -> None:
    try:
        from decoderkit.generation.config import GenerationConfig
    except ImportError:
        return
    gen_file = directory / "generation_config.json" if directory is not None else None
    if gen_file is not None and gen_file.exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    else:
        model.generation_config = GenerationConfig.from_model_config(hf_config)


# ---------------------------------------------------------------------------------------------- saving
def save_pretrained(model: PreTrainedDecoder, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
    """Write config.json, generation_config.json and safetensors shards (+ index) atomically."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target}: exists and is not a directory")
    config = model.config
    family = get_family(config.model_type)
    state = {k: v for k, v in model.state_dict().items() if k in dict(model.named_parameters(remove_duplicate=False))}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    hf_state = family.ours_to_hf(state, config, model.head)
    if model.head == "base":
        prefix = family.hf_prefix("base") + "."
        hf_state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in hf_state.items()}
    elif model.head == "token_classification" and family.hf_head_names.get("classifier"):
        hf_state = {("classifier" + k[len("score"):] if k.startswith("score.") else k): v for k, v in hf_state.items()}

    hf_config = family.config_to_hf(config)
    hf_config["architectures"] = [family.architecture(model.head)]
    hf_config["dtype"] = str(model.dtype).removeprefix("torch.")
    hf_config.pop("torch_dtype", None)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(hf_state):
        tensor = hf_state[name].detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        names = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for file, shard in zip(names, shards):
            save_file(shard, staging / file, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in hf_state.values())},
                     "weight_map": {n: f for f, s in zip(names, shards) for n in s}}
            (staging / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(staging)
        else:
            gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                   if getattr(config, k) is not None}
            (staging / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, target: Path) -> None:
    """Move the finished files into place; stale weight files of an earlier save are removed."""
    if not target.exists():
        os.replace(staging, target)
        return
    for old in target.iterdir():
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json", old.name):
            old.unlink()
    for file in staging.iterdir():
        os.replace(file, target / file.name)
