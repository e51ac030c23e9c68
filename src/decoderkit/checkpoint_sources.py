"""Where a checkpoint's tensors come from: safetensors files, PyTorch ``.bin`` files, GGUF files.

Each source lists its tensors (names, shapes, dtypes) from headers alone, so `decoderkit.checkpoint` can plan a load
before reading any data, and then produces the tensors in file order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from decoderkit.gguf_file import GGUFFile

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SHOWN = 5  # names listed in an error before "..."


def listing(names: list[str]) -> str:
    """The first few names, comma-separated, and how many there are in all when that is more."""
    return ", ".join(names[:SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > SHOWN else "")


@dataclass(frozen=True)
class Entry:
    """One tensor of a checkpoint, as its header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int

    def meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


class Source:
    """A checkpoint's tensors by their (transformers) names."""

    label: str
    # None when the names are known only while reading (GGUF, whose reader validates its own file up front).
    entries: list[Entry] | None = None
    checkpoint_dtype: torch.dtype | None = None
    # True when each tensor produced is new memory that the model may keep as it is (no mapping, no sharing).
    fresh = False

    def tensors(self, wanted: Callable[[str], bool],
                pinned: bool = False) -> Iterator[tuple[str, torch.Tensor | StoredTensor, int]]:
        """(name, tensor, bytes read) for each wanted name, in file order; each is valid until the next is produced.

        `pinned`: read into page-locked memory (faster copies to a GPU).
        """
        raise NotImplementedError


def _first_float(entries: list[Entry]) -> torch.dtype | None:
    return next((e.dtype for e in entries if e.dtype.is_floating_point), None)


READ_CHUNK = 8 * 1024 * 1024  # bytes read at a time when converting: the only copy of file data held besides the model


class StoredTensor:
    """One tensor of a safetensors file, not read yet: the loader picks how (valid until the next one is produced).

    * `mapped()`: the tensor in safetensors' memory map of the file, nothing copied. The map is private
      (copy-on-write, as `torch.UntypedStorage.from_file(shared=False)` makes it): pages are read from the page cache
      when first touched, and writing to the tensor (training) copies the written pages into this process's memory
      instead of changing the file.
    * `read_into(out)`: read the bytes in chunks of `READ_CHUNK` and convert each into `out` (any dtype, any device),
      so a converting load never holds more of the source dtype than one chunk.
    * `read()`: the whole tensor, read into a buffer reused for the next one (or into new memory).
    """

    def __init__(self, entry: Entry, source: SafetensorsSource, offset: int, fh: Any, handle: Any) -> None:
        self.entry, self.source, self.offset, self.fh, self.handle = entry, source, offset, fh, handle

    def mapped(self) -> torch.Tensor:
        return self.handle.get_tensor(self.entry.name)

    def read_into(self, out: torch.Tensor) -> None:
        entry = self.entry
        flat = out.view(-1)
        size = entry.dtype.itemsize
        per = max(1, READ_CHUNK // size)
        for start in range(0, flat.numel(), per):
            n = min(per, flat.numel() - start)
            raw = self.source.staging(n * size)
            _read_exactly(self.fh, self.offset + start * size, raw, self.source.file_of[entry.name])
            flat[start:start + n].copy_(raw.view(entry.dtype))

    def read(self, keep: bool = False) -> torch.Tensor:
        """`keep`: into new memory the caller may hold on to, instead of the reused buffer."""
        raw = torch.empty(self.entry.nbytes, dtype=torch.uint8) if keep else self.source.staging(self.entry.nbytes)
        _read_exactly(self.fh, self.offset, raw, self.source.file_of[self.entry.name])
        return raw.view(self.entry.dtype).reshape(self.entry.shape)


class SafetensorsSource(Source):
    """safetensors files: safe_open validates each one (header, truncation) before anything is read; each tensor is
    then a `StoredTensor`, memory-mapped where the model keeps it as stored and read with plain file reads otherwise.

    Why not convert out of the memory map: the pages of a mapping count in the process's RSS for as long as the file
    stays mapped (twice the weights at the peak when converting dtype), and copying a 555 MiB file out of
    safetensors' mapping took 1.1 s where read() into the destination tensors took 0.28 s.
    """

    def __init__(self, files: list[Path], weight_map: dict[str, str] | None, label: str) -> None:
        self.files, self.label, self.entries = files, label, []
        self.layout: dict[Path, list[tuple[int, Entry]]] = {}
        self.file_of: dict[str, Path] = {}
        self.pinned = False
        self._staging: torch.Tensor | None = None
        owners: dict[str, Path] = {}
        for file in files:
            with _safe_open(file) as f:
                names = set(f.keys())
            _claim(owners, names, file, label)
            data_start, header = _safetensors_header(file)
            rows = []
            for name in names:
                info = header[name]
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}, which decoderkit does not read")
                begin, end = info["data_offsets"]
                rows.append((data_start + begin, Entry(name, tuple(info["shape"]), dtype, end - begin)))
                self.file_of[name] = file
            rows.sort(key=lambda row: row[0])
            self.layout[file] = rows
            self.entries += [entry for _, entry in rows]
            if weight_map is not None:
                stray = [n for n, f in weight_map.items() if f == file.name and n not in names]
                if stray:
                    raise ValueError(f"{label}: the shard index puts {listing(stray)} in {file.name}, which does "
                                     "not contain them; the index and the shards come from different saves")
        self.checkpoint_dtype = _first_float(self.entries)

    def staging(self, nbytes: int) -> torch.Tensor:
        """A reused read buffer of at least `nbytes` (fresh memory costs a page fault per page on first write)."""
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = None
            self._staging = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return self._staging[:nbytes]

    def tensors(self, wanted: Callable[[str], bool],
                pinned: bool = False) -> Iterator[tuple[str, torch.Tensor | StoredTensor, int]]:
        self.pinned = pinned
        try:
            for file, rows in self.layout.items():
                with open(file, "rb", buffering=0) as fh, _safe_open(file) as handle:
                    for offset, entry in rows:
                        if wanted(entry.name):
                            yield entry.name, StoredTensor(entry, self, offset, fh, handle), entry.nbytes
        finally:
            self._staging = None


def _safe_open(file: Path) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: corrupt or truncated safetensors file ({err}); download or save it again") from None


def _safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(where the data starts, the JSON header) of a file safe_open has already validated."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        return 8 + size, json.loads(fh.read(size))


def _read_exactly(fh: Any, offset: int, out: torch.Tensor, file: Path) -> None:
    view = memoryview(out.numpy())
    fh.seek(offset)
    done = 0
    while done < len(view):  # one read() returns at most ~2 GiB on Linux
        n = fh.readinto(view[done:])
        if not n:
            raise ValueError(f"{file}: truncated while reading (the file changed while loading?)")
        done += n


class TorchBinSource(Source):
    def __init__(self, files: list[Path], label: str) -> None:
        self.files, self.label, self.entries = files, label, []
        owners: dict[str, Path] = {}
        for file in files:
            state = _torch_load(file)
            _claim(owners, state, file, label)
            for name, tensor in state.items():
                self.entries.append(Entry(name, tuple(tensor.shape), tensor.dtype,
                                           tensor.numel() * tensor.element_size()))
        self.checkpoint_dtype = _first_float(self.entries)

    def tensors(self, wanted: Callable[[str], bool],
                pinned: bool = False) -> Iterator[tuple[str, torch.Tensor | StoredTensor, int]]:
        for file in self.files:
            # Memory-mapped: pages are read when copied, and released with the shard's dict.
            state = _torch_load(file)
            for name in list(state):
                tensor = state.pop(name)
                if wanted(name):
                    yield name, tensor, tensor.numel() * tensor.element_size()
            del state


def _claim(owners: dict[str, Path], names: Iterable[str], file: Path, label: str) -> None:
    """Record that `file` holds `names`; ValueError when another shard already holds one of them (which copy would
    be loaded would depend on the reading order)."""
    for name in sorted(names):
        if name in owners:
            raise ValueError(f"{label}: tensor {name} is in two shard files, {owners[name].name} and {file.name}; "
                             "each tensor must be in exactly one shard")
        owners[name] = file


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files written before torch 1.6 (legacy, non-zip format) cannot be memory-mapped.
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{file}: unreadable PyTorch checkpoint ({type(err).__name__}: {err}); only plain tensor "
                         "state dicts are read (torch.load weights_only=True)") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file}: expected a state dict of tensors, got {type(state).__name__}")
    return state


class GGUFSource(Source):
    # native: quantized tensors come out as GGUFBlocks (gguf-native loading) instead of dequantized floats
    native = False
    fresh = True  # dequantized (or copied out of the read-only map) one tensor at a time

    def __init__(self, reader: GGUFFile, config: dict[str, Any], dtype: torch.dtype, label: str) -> None:
        self.reader, self.config, self.dtype, self.label = reader, config, dtype, label

    @property
    def total_bytes(self) -> int:
        return sum(int(t.n_bytes) for t in self.reader.tensors if t.name != "rope_freqs.weight")

    def tensors(self, wanted: Callable[[str], bool],
                pinned: bool = False) -> Iterator[tuple[str, torch.Tensor | StoredTensor, int]]:
        from decoderkit.gguf_model import iter_gguf_tensors

        sizes = iter(int(t.n_bytes) for t in self.reader.tensors if t.name != "rope_freqs.weight")
        for name, tensor in iter_gguf_tensors(self.reader, self.config, self.dtype, native=self.native):
            nbytes = next(sizes, 0)
            if wanted(name):
                yield name, tensor, nbytes


def open_gguf_source(file: Path, dtype: torch.dtype | None, native: bool) -> tuple[GGUFSource, dict[str, Any]]:
    from decoderkit.gguf_model import FLOAT_TYPES, gguf_config, open_gguf

    reader = open_gguf(file)
    # Kept quantized only where there is something quantized. Then the activations default to float32 where our own
    # kernel runs (exact, and as fast as bfloat16 at batch 1 and faster at 16 on AVX2: benchmarks/quantized.py), else
    # to bfloat16, the dtype torch's int8 / int4 CPU kernels are fast in. A float file keeps float32.
    native = native and any(t.tensor_type not in FLOAT_TYPES for t in reader.tensors)
    if dtype is None:
        from decoderkit import kernels

        dtype = torch.bfloat16 if native and not kernels.available() else torch.float32
    config = gguf_config(reader, dtype)
    source = GGUFSource(reader, config, dtype, str(file))
    source.native = native
    return source, config


