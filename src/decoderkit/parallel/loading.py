"""Loading a tensor-parallel model: each rank reads only its slice of each tensor.

The model is first planned on the meta device by the ordinary loader (`load_pretrained(device="meta")`: every name and
shape checked, nothing read), then sharded (`shard_model`), then filled: for each checkpoint tensor, the family's
own name translation is run on the tensor's *row indices* instead of its data, which says which checkpoint rows each
of our tensors is made of (a fused q/k/v splits its rows, GPTBigCode's interleaved layout picks every third block
of head rows); the rank's slice of those rows (and, for row-parallel weights, of the columns) is then read with
safetensors' `get_slice`, one contiguous run at a time, or from a GGUF file's memory map (those rows, and for
row-parallel weights those blocks of each row; llama's q/k un-permute is a row reordering, run on the indices too).
No rank reads or holds another rank's share. Quantized layers (`decoderkit.parallel.quantized`) get their slice
through the one-process converters: quantized from floats, or a GGUF file's blocks repacked.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from decoderkit.parallel.tensor_parallel import local_slice, rebuild_local_buffers, shard_model

if TYPE_CHECKING:
    from decoderkit.model import PreTrainedDecoder
    from decoderkit.parallel.quantized import QuantizedShards

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
                         device: str | torch.device | None = None, quantization: Any = None, dtype: Any = None,
                         **kwargs: Any) -> PreTrainedDecoder:
    """This rank's shard of the model at `path`; see `PreTrainedDecoder.from_pretrained(tp_plan=...)`.

    `quantization` is what one process takes (None, "none", "int8", "int4", a QuantizationConfig); a GGUF file's
    quantized tensors stay packed by default on CPU, as in one process."""
    from decoderkit.checkpoint import expected_tensors, load_pretrained, resolve_model_path
    from decoderkit.layers.quantized import resolve_quantization

    if tp_plan not in TP_PLANS:
        raise ValueError(f"tp_plan={tp_plan!r} is not supported; allowed: {list(TP_PLANS)}")
    quantize = resolve_quantization(quantization)
    device = process_group_device(device)
    location = resolve_model_path(path, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                                  local_files_only=kwargs.get("local_files_only", False))
    if kwargs.get("gguf_file") is not None:
        location = location / kwargs.pop("gguf_file")
    if quantize not in (None, "none") and device.type != "cpu":
        raise ValueError(f"quantization={quantization!r} runs on CPU only (torch's int8 / int4 CPU kernels); "
                         f"tensor-parallel ranks on {device.type} load float weights (quantization='none')")
    source = open_shard_source(location)
    native = source.native and quantize is None and device.type == "cpu"
    if dtype in (None, "auto") and native:
        from decoderkit import kernels

        dtype = None if kernels.available() else "bfloat16"  # one process's default for a packed GGUF file
    model = load_pretrained(cls, location, device="meta", dtype=dtype, **kwargs)
    model.name_or_path = str(location.absolute())
    global_config = model.decoder_config
    check_same_checkpoint(global_config.to_hf_dict(), source.signature())
    target = model.model.norm.weight.dtype
    forms = None
    if native or quantize not in (None, "none"):
        from decoderkit.parallel.quantized import whole_model_forms

        types = source.our_types(model) if native else None
        forms = whole_model_forms(model, target, quantize if not native else None, types)
    part = shard_model(model)
    float_shapes = expected_tensors(model)
    shards = None
    if forms is not None:
        from decoderkit.parallel.quantized import quantize_shards

        shards = quantize_shards(model, *forms, dtype=target)
    state = read_shards(model, source, device, float_shapes, shards)
    missing = [name for name in expected_tensors(model) if name not in state]
    model.load_state_dict(state, strict=False, assign=True)
    _init_missing_heads(model, missing, device, global_config.initializer_range)
    model.tie_weights()
    rebuild_local_buffers(model, device)
    if part.world_size > 1:
        dist.barrier()
    return model.eval()


def open_shard_source(location: Path) -> SafetensorsShards | GGUFShards:
    """What each rank reads its slices from: a safetensors directory or a GGUF file."""
    if location.is_file() and location.suffix == ".gguf":
        return GGUFShards(location)
    if location.is_file():
        raise ValueError(f"{location}: tensor parallelism loads a Hugging Face safetensors directory or a .gguf file")
    return SafetensorsShards(_safetensors_files(location))


def _safetensors_files(location: Path) -> list[Path]:
    from decoderkit.checkpoint import weight_files

    files, fmt, _ = weight_files(location)
    if fmt != "safetensors":
        raise ValueError(f"{location}: tensor parallelism reads safetensors checkpoints (each rank reads its slices "
                         "with get_slice); this one holds PyTorch .bin files: save it again with save_pretrained")
    return files


def checkpoint_fingerprint(hf_config: dict[str, Any], signature: list[str]) -> str:
    """SHA-256 of the config and every tensor's name, shape and dtype: equal on ranks that load the same model."""
    digest = hashlib.sha256(json.dumps(hf_config, sort_keys=True, default=str).encode())
    for entry in signature:
        digest.update(f"{entry};".encode())
    return digest.hexdigest()


def check_same_checkpoint(hf_config: dict[str, Any], signature: tuple[str, list[str]]) -> None:
    """ValueError on every rank when the ranks are about to load different checkpoints."""
    where, entries = signature
    mine = checkpoint_fingerprint(hf_config, entries)
    prints: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(prints, (mine, where))
    if len({p[0] for p in prints}) > 1:
        rows = "; ".join(f"rank {r}: {where} ({fp[:12]})" for r, (fp, where) in enumerate(prints))
        raise ValueError(f"the tensor-parallel ranks load different checkpoints (config or tensor names/shapes "
                         f"differ): {rows}")


class SafetensorsShards:
    """Slices of the tensors of safetensors files, read with `get_slice`."""

    native = False

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.label = str(files[0].parent)

    def signature(self) -> tuple[str, list[str]]:
        from safetensors import safe_open

        entries = []
        for file in self.files:
            with safe_open(file, framework="pt") as f:
                for name in sorted(f.keys()):
                    sl = f.get_slice(name)
                    entries.append(f"{name}:{sl.get_shape()}:{sl.get_dtype()}")
        return self.label, entries

    def tensors(self) -> Iterator[tuple[str, list[int], Any]]:
        """(HF name, shape, read(rows, columns, packed)) for every tensor."""
        from safetensors import safe_open

        for file in self.files:
            with safe_open(file, framework="pt") as f:
                for hf_name in f.keys():
                    sl = f.get_slice(hf_name)
                    shape = sl.get_shape()
                    yield hf_name, shape, functools.partial(_read_safetensors, sl, len(shape))


class GGUFShards:
    """Slices of a GGUF file's tensors: only the rows (and, split by inputs, the blocks) of this rank are read from
    the memory map; a tensor that stays quantized comes back as its packed blocks."""

    def __init__(self, path: Path) -> None:
        from decoderkit.gguf_model import FLOAT_TYPES, gguf_config, open_gguf

        self.path, self.label = path, str(path)
        self.reader = open_gguf(path)
        self.config = gguf_config(self.reader)
        self.native = any(t.tensor_type not in FLOAT_TYPES for t in self.reader.tensors)

    def signature(self) -> tuple[str, list[str]]:
        return self.label, [f"{t.name}:{t.shape.tolist()}:{t.tensor_type.name}" for t in self.reader.tensors]

    def _names(self) -> dict[str, str]:
        from decoderkit.gguf_model import GGUFMetadata, _architecture, _gguf_to_hf_names

        meta = GGUFMetadata(self.reader)
        self.arch = _architecture(meta)
        return _gguf_to_hf_names(meta.arch, self.config[self.arch.gguf_layers_key])

    def our_types(self, model: PreTrainedDecoder) -> dict[str, Any]:
        """Our parameter name -> the file's tensor type, as the one-process loader chooses layer forms by."""
        from decoderkit.checkpoint import _Plan, expected_tensors
        from decoderkit.families import get_family
        from decoderkit.gguf_model import gguf_tensor_types

        config = model.decoder_config
        plan = _Plan(model, get_family(config.model_type), config, expected_tensors(model), self.label)
        return {ours: qtype for hf, (qtype, shape) in gguf_tensor_types(self.reader, self.config).items()
                for ours, _ in plan.translate(hf, torch.empty(shape, device="meta"))}

    def tensors(self) -> Iterator[tuple[str, list[int], Any]]:
        import gguf

        names = self._names()
        for tensor in self.reader.tensors:
            if tensor.name not in names:
                continue
            shape = [int(d) for d in reversed(tensor.shape.tolist())]
            if len(shape) == 1:
                whole = self._fixed(tensor, torch.from_numpy(
                    gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).copy()))
                yield names[tensor.name], shape, lambda rows, columns, packed, w=whole: w[rows]
                continue
            # The family's fix of a matrix (llama's q/k un-permute) is a reordering of its rows: run it on their
            # indices, then read those rows of the file
            order = self._fixed(tensor, torch.arange(shape[0]))
            if not torch.equal(order.sort().values, torch.arange(shape[0])):
                raise ValueError(f"{self.path}: {tensor.name}: the family changes this tensor's values on load, "
                                 "which a tensor-parallel rank cannot apply to its slice")
            yield names[tensor.name], shape, lambda rows, columns, packed, t=tensor, o=order: self._read(
                t, o[rows], columns, packed)

    def _fixed(self, tensor: Any, value: torch.Tensor) -> torch.Tensor:
        return self.arch.fix_gguf_tensor(tensor.name, value, self.config)

    def _read(self, tensor: Any, rows: torch.Tensor, columns: slice | None, packed: bool) -> Any:
        import gguf
        import numpy as np

        from decoderkit.gguf_model import FLOAT_TYPES, gguf_blocks

        qtype = tensor.tensor_type
        cols = int(tensor.shape[0])
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        start, stop = (0, cols) if columns is None else (columns.start, columns.stop)
        if start % block or stop % block:
            raise ValueError(f"{self.path}: {tensor.name} ({qtype.name}, blocks of {block} inputs): a tensor-parallel "
                             f"rank's inputs [{start}, {stop}) are not whole blocks; use a tensor-parallel size that "
                             f"leaves a multiple of {block} inputs per rank")
        data = tensor.data[rows.numpy()]  # only these rows of the memory map are read
        if qtype not in FLOAT_TYPES:
            data = data[:, start // block * size: stop // block * size]
        else:
            data = data[:, start:stop]
        if packed and qtype not in FLOAT_TYPES:
            view = SimpleNamespace(name=tensor.name, tensor_type=qtype, data=np.ascontiguousarray(data),
                                   shape=np.array([stop - start, len(rows)]))
            return gguf_blocks(view, self.label)
        values = gguf.quants.dequantize(np.ascontiguousarray(data), qtype).reshape(len(rows), stop - start)
        return torch.from_numpy(np.array(values, dtype=np.float32))


def read_shards(model: PreTrainedDecoder, source: SafetensorsShards | GGUFShards, device: torch.device,
                expected: dict[str, torch.Tensor], shards: QuantizedShards | None = None) -> dict[str, torch.Tensor]:
    """This rank's slice of each of the model's tensors (`expected`: their local float shapes), read from `source`;
    a quantized layer's slice goes through its converter (`shards`)."""
    from decoderkit.checkpoint import _Plan
    from decoderkit.families import get_family

    info = model.tp
    config, part = info.config, info.partition
    plan = _Plan(model, get_family(config.model_type), config, expected, source.label)
    dtype = model.model.norm.weight.dtype
    state: dict[str, torch.Tensor] = {}
    for hf_name, shape, read in source.tensors():
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
            quantized = shards is not None and name in shards.converters
            packed = quantized and not (name.removesuffix(".weight") in shards.row_parallel
                                        and shards.forms[name.removesuffix(".weight")] == (8, 0))
            value = read(rows, columns, packed)
            if tuple(value.shape) != tuple(want.shape):
                raise ValueError(f"{source.label}: {hf_name} gives {name} the shape {tuple(value.shape)} on rank "
                                 f"{part.rank}; the shard expects {tuple(want.shape)}")
            if quantized:
                state.update({k: v.to(device) for k, v in shards.entries(name, value).items()})
                continue
            if hasattr(value, "dequantize"):
                value = value.dequantize()
            target = dtype if value.is_floating_point() else value.dtype
            state[name] = value.to(device=device, dtype=target)
    if shards is not None:
        shards.rename_bias(state)
    return state


def _read_safetensors(sl: Any, ndim: int, rows: torch.Tensor, columns: slice | None, packed: bool) -> torch.Tensor:
    return _read_rows(sl, rows, columns, ndim)


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
