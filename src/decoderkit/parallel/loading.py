"""Loading a tensor-parallel model: each rank reads only its slice of each tensor.

The model is first planned on the meta device by the ordinary loader (`load_pretrained(device="meta")`: every name and
shape checked, nothing read), then sharded (`shard_model`), then filled: for each checkpoint tensor, the family's
own name translation is run on the tensor's *row indices* instead of its data, which says which checkpoint rows each
of our tensors is made of (a fused q/k/v splits its rows, GPTBigCode's interleaved layout picks every third block
of head rows); the rank's slice of those rows (and, for row-parallel weights, of the columns) is then read with
safetensors' `get_slice`, one contiguous run at a time. No rank reads or holds another rank's share.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from decoderkit.parallel.tensor_parallel import local_slice, rebuild_local_buffers, shard_model

if TYPE_CHECKING:
    from decoderkit.model import PreTrainedDecoder

TP_PLANS = ("auto",)


def process_group_device(device: str | torch.device | None) -> torch.device:
    """Join the process group (torchrun's env:// rendezvous when none is set up yet) and return this rank's device."""
    from decoderkit.training.distributed import init_distributed, launched_by_torchrun

    if not dist.is_initialized():
        if not launched_by_torchrun():
            raise RuntimeError(
                "tp_plan='auto' needs a torch.distributed process group: run the script under "
                "`torchrun --nproc-per-node N`, initialise one with torch.distributed.init_process_group, or use "
                "`decoderkit generate|bench|serve --tensor-parallel N`, which starts the ranks itself")
        return init_distributed(device).device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device if device not in (None, "auto") else "cpu")


def load_tensor_parallel(cls: type[PreTrainedDecoder], path: str | os.PathLike, *, tp_plan: str = "auto",
                         device: str | torch.device | None = None, quantization: Any = None,
                         **kwargs: Any) -> PreTrainedDecoder:
    """This rank's shard of the model at `path`; see `PreTrainedDecoder.from_pretrained(tp_plan=...)`."""
    from decoderkit.checkpoint import expected_tensors, load_pretrained, resolve_model_path

    if tp_plan not in TP_PLANS:
        raise ValueError(f"tp_plan={tp_plan!r} is not supported; allowed: {list(TP_PLANS)}")
    if quantization not in (None, "none"):
        raise ValueError(f"tensor parallelism runs float weights; quantization={quantization!r} cannot be combined "
                         "with tp_plan")
    device = process_group_device(device)
    location = resolve_model_path(path, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                                  local_files_only=kwargs.get("local_files_only", False))
    if kwargs.get("gguf_file") is not None or location.is_file():
        raise ValueError(f"{location}: tensor parallelism loads Hugging Face safetensors directories; convert a GGUF "
                         "file first (`decoderkit convert`)")
    model = load_pretrained(cls, location, device="meta", **kwargs)
    model.name_or_path = str(location.absolute())
    global_config = model.decoder_config
    files = _safetensors_files(location)
    check_same_checkpoint(global_config.to_hf_dict(), files)
    part = shard_model(model)
    state = read_shards(model, files, device)
    missing = [name for name in expected_tensors(model) if name not in state]
    model.load_state_dict(state, strict=False, assign=True)
    _init_missing_heads(model, missing, device, global_config.initializer_range)
    model.tie_weights()
    rebuild_local_buffers(model, device)
    if part.world_size > 1:
        dist.barrier()
    return model.eval()


def _safetensors_files(location: Path) -> list[Path]:
    from decoderkit.checkpoint import weight_files

    files, fmt, _ = weight_files(location)
    if fmt != "safetensors":
        raise ValueError(f"{location}: tensor parallelism reads safetensors checkpoints (each rank reads its slices "
                         "with get_slice); this one holds PyTorch .bin files: save it again with save_pretrained")
    return files


def checkpoint_fingerprint(hf_config: dict[str, Any], files: list[Path]) -> str:
    """SHA-256 of the config and every tensor's name, shape and dtype: equal on ranks that load the same model."""
    from safetensors import safe_open

    digest = hashlib.sha256(json.dumps(hf_config, sort_keys=True, default=str).encode())
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in sorted(f.keys()):
                sl = f.get_slice(name)
                digest.update(f"{name}:{sl.get_shape()}:{sl.get_dtype()};".encode())
    return digest.hexdigest()


def check_same_checkpoint(hf_config: dict[str, Any], files: list[Path]) -> None:
    """ValueError on every rank when the ranks are about to load different checkpoints."""
    mine = checkpoint_fingerprint(hf_config, files)
    prints: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(prints, (mine, str(files[0].parent)))
    if len({p[0] for p in prints}) > 1:
        rows = "; ".join(f"rank {r}: {where} ({fp[:12]})" for r, (fp, where) in enumerate(prints))
        raise ValueError(f"the tensor-parallel ranks load different checkpoints (config or tensor names/shapes "
                         f"differ): {rows}")


def read_shards(model: PreTrainedDecoder, files: list[Path], device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's slice of each of the model's tensors, read from the safetensors files."""
    from safetensors import safe_open

    from decoderkit.checkpoint import _Plan, expected_tensors
    from decoderkit.families import get_family

    info = model.tp
    config, part = info.config, info.partition
    expected = expected_tensors(model)
    plan = _Plan(model, get_family(config.model_type), config, expected, str(files[0].parent))
    dtype = model.model.norm.weight.dtype
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                sl = f.get_slice(hf_name)
                shape = sl.get_shape()
                if not shape:
                    continue
                for name, rows in plan.translate(hf_name, torch.arange(shape[0])):
                    want = expected.get(name)
                    if want is None or name in state:
                        continue
                    spec = local_slice(name, part)
                    columns = None
                    if spec is not None:
                        axis, (start, end) = spec
                        if axis == 0:
                            rows = rows[start:end]
                        else:
                            columns = slice(start, end)
                    value = _read_rows(sl, rows, columns, len(shape))
                    if tuple(value.shape) != tuple(want.shape):
                        raise ValueError(f"{file}: {hf_name} gives {name} the shape {tuple(value.shape)} on rank "
                                         f"{part.rank}; the shard expects {tuple(want.shape)}")
                    target = dtype if value.is_floating_point() else value.dtype
                    state[name] = value.to(device=device, dtype=target)
    return state


def _read_rows(sl: Any, rows: torch.Tensor, columns: slice | None, ndim: int) -> torch.Tensor:
    """Rows `rows` (ascending runs) of a safetensors slice, optionally a column range, read run by run."""
    if rows.numel() == 0:
        shape = list(sl.get_shape())
        shape[0] = 0
        if columns is not None:
            shape[1] = columns.stop - columns.start
        return torch.empty(shape)
    breaks = (torch.nonzero(rows.diff() != 1).flatten() + 1).tolist()
    pieces = []
    for chunk in torch.tensor_split(rows, breaks):
        first, last = int(chunk[0]), int(chunk[-1]) + 1
        index = (slice(first, last),) if columns is None else (slice(first, last), columns)
        pieces.append(sl[index] if ndim > 1 or columns is None else sl[first:last])
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _init_missing_heads(model: PreTrainedDecoder, missing: list[str], device: torch.device, std: float) -> None:
    """Task-head weights the checkpoint lacks, newly initialised (the same on every rank: they are replicated)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in missing:
            module_name, _, param = name.rpartition(".")
            module = model.get_submodule(module_name)
            meta = getattr(module, param)
            if not meta.is_meta:
                continue
            fresh = torch.zeros(meta.shape, dtype=meta.dtype)
            if param != "bias":
                fresh.normal_(0.0, std, generator=generator)
            setattr(module, param, torch.nn.Parameter(fresh.to(device)))
