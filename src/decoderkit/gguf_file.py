"""A lean reader of GGUF files: the header and metadata parsed in bulk, tensor data left memory-mapped.

`gguf.GGUFReader` builds a numpy memmap view for every part of every metadata value (two per token string, one per
score), which for a 49k-token vocabulary with 49k merges costs ~150 MB of Python objects and seconds of parsing, and
the `gguf` package (0.19) has no option to skip or defer that. This reader walks the key/value section once with
`struct` over the memory map (numeric arrays in one `numpy.frombuffer` each) and produces the same interface the rest
of decoderkit reads: ``tensors`` as `gguf.ReaderTensor` records whose ``data`` is a view of the map (quantized
tensors as ``(rows, bytes per row)`` uint8, like gguf's), and ``get_field(key).contents()`` / ``fields``.

Every malformation (short file, lengths past the end, unknown value or tensor types, tensors past the end of the file,
duplicate names, a bad alignment) is one `ValueError` saying "truncated or corrupt GGUF file" and naming the path.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, ReaderTensor

__all__ = ["GGUFField", "GGUFFile", "corrupt_gguf_error"]

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    GGUFValueType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    GGUFValueType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    GGUFValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    GGUFValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    GGUFValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    GGUFValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    GGUFValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    GGUFValueType.BOOL: (struct.Struct("<?"), np.dtype("bool")),
    GGUFValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    GGUFValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    GGUFValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
# Element types whose tensors gguf exposes as typed arrays; every other (quantized) type is raw bytes per row.
_PLAIN_TENSORS = {
    GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


def corrupt_gguf_error(path: str | os.PathLike, detail: str) -> ValueError:
    """The one error every GGUF entry point raises for a file that does not parse."""
    return ValueError(f"{path}: truncated or corrupt GGUF file ({detail})")


class _Lazy(NamedTuple):
    """A value decoded later: (None, decode)."""

    value: Any
    decode: Callable[[], Any]


class _Malformed(Exception):
    """Raised inside the parser; `GGUFFile` turns it into `corrupt_gguf_error`."""


class GGUFField:
    """One metadata entry: its name, its value types (``[ARRAY, element type]`` for arrays) and its value.

    An array of strings (a vocabulary's tokens and merges) is decoded on the first `contents()` call: loading a model
    never needs the strings, only to step over them.
    """

    __slots__ = ("name", "types", "_value", "_decode")

    def __init__(self, name: str, types: list[GGUFValueType], value: Any = None,
                 decode: Callable[[], Any] | None = None) -> None:
        self.name, self.types, self._value, self._decode = name, types, value, decode

    def contents(self) -> Any:
        """The value as Python data (a list for arrays), as `gguf.ReaderField.contents()` returns it."""
        if self._decode is not None:
            self._value, self._decode = self._decode(), None
        return self._value

    def __repr__(self) -> str:
        return f"GGUFField({self.name!r}, {[t.name for t in self.types]})"


class GGUFFile:
    """An open GGUF file: ``fields`` (metadata by key), ``tensors`` (memory-mapped), ``path`` and ``data`` (the map).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated or corrupt, or is a big-endian or unsupported-version GGUF file.
    """

    byte_order = "I"  # as gguf.GGUFReader: host order (big-endian files are refused)

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        if size < 24:  # magic, version, tensor count, key/value count
            raise corrupt_gguf_error(self.path, f"{size} bytes, shorter than a GGUF header")
        # np.memmap (not a bare mmap) so that `data.filename` and `data._mmap` work as they do on gguf's reader
        self.data = np.memmap(self.path, mode="r")
        self._buf = memoryview(self.data._mmap)  # type: ignore[attr-defined]
        self.fields: dict[str, GGUFField] = {}
        self.tensors: list[ReaderTensor] = []
        try:
            self._parse(size)
        except _Malformed as err:
            raise corrupt_gguf_error(self.path, str(err)) from None
        except (struct.error, UnicodeDecodeError, OverflowError, IndexError) as err:
            raise corrupt_gguf_error(self.path, f"{type(err).__name__}: {err}") from None

    def get_field(self, key: str) -> GGUFField | None:
        return self.fields.get(key)

    @property
    def metadata(self) -> dict[str, Any]:
        """Every key's value, as `get_field(key).contents()` gives it."""
        return {name: field.contents() for name, field in self.fields.items()}

    # ------------------------------------------------------------------------------------------------ parsing
    def _parse(self, size: int) -> None:
        buf = self._buf
        if bytes(buf[:4]) != _MAGIC:
            raise _Malformed(f"not a GGUF file: the magic is {bytes(buf[:4])!r}, expected {_MAGIC!r}")
        (version,) = _U32.unpack_from(buf, 4)
        if version & 0xFFFF == 0 and version:
            raise ValueError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in _SUPPORTED_VERSIONS:
            raise _Malformed(f"GGUF version {version}; decoderkit reads versions 2 and 3")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        self._size, self._pos = size, 24
        # Each key/value takes at least 12 bytes and each tensor record at least 24: absurd counts fail here, not
        # after a long loop.
        if n_kv * 12 + n_tensors * 24 > size:
            raise _Malformed(f"the header announces {n_kv} metadata keys and {n_tensors} tensors, more than "
                             f"{size} bytes can hold")
        for _ in range(n_kv):
            key = self._string(strict=True)
            vtype = self._u32()
            types, value = self._value(vtype)
            if key in self.fields:
                raise _Malformed(f"metadata key {key!r} appears twice")
            self.fields[key] = GGUFField(key, types, *value) if isinstance(value, _Lazy) else GGUFField(key, types,
                                                                                                         value)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = _DEFAULT_ALIGNMENT
        if (field := self.fields.get("general.alignment")) is not None:
            alignment = field.contents()
            if field.types != [GGUFValueType.UINT32] or alignment <= 0 or alignment & (alignment - 1):
                raise _Malformed(f"general.alignment is {alignment!r}; it must be a uint32 power of two")
        start = -(-self._pos // alignment) * alignment
        self._build_tensors(infos, start)

    def _take(self, n: int) -> int:
        """Advance over `n` bytes, returning where they start; _Malformed when they run past the end."""
        at = self._pos
        if n < 0 or at + n > self._size:
            raise _Malformed(f"a length of {n} bytes at byte {at} runs past the end of the {self._size}-byte file")
        self._pos = at + n
        return at

    def _u32(self) -> int:
        return _U32.unpack_from(self._buf, self._take(4))[0]

    def _u64(self) -> int:
        return _U64.unpack_from(self._buf, self._take(8))[0]

    def _string(self, strict: bool = False) -> str:
        n = self._u64()
        at = self._take(n)
        # llama.cpp stores whatever bytes a vocabulary had; a malformed token must not fail the load
        return str(self._buf[at:at + n], "utf-8", "strict" if strict else "replace")

    def _value(self, vtype: int) -> tuple[list[GGUFValueType], Any]:
        if vtype == GGUFValueType.STRING:
            return [GGUFValueType.STRING], self._string()
        if vtype in _SCALARS:
            packer = _SCALARS[vtype][0]
            return [GGUFValueType(vtype)], packer.unpack_from(self._buf, self._take(packer.size))[0]
        if vtype != GGUFValueType.ARRAY:
            raise _Malformed(f"unknown metadata value type {vtype} at byte {self._pos - 4}")
        etype, count = self._u32(), self._u64()
        if etype in _SCALARS:
            dtype = _SCALARS[etype][1]
            at = self._take(count * dtype.itemsize)
            return [GGUFValueType.ARRAY, GGUFValueType(etype)], np.frombuffer(
                self._buf, dtype=dtype, count=count, offset=at).tolist()
        if etype == GGUFValueType.STRING:
            if count * 8 > self._size - self._pos:
                raise _Malformed(f"an array of {count} strings at byte {self._pos} cannot fit in the file")
            start = self._pos
            self._pos = self._skip_strings(start, count)
            return [GGUFValueType.ARRAY, GGUFValueType.STRING], _Lazy(None, lambda: self._strings(start, count))
        if etype == GGUFValueType.ARRAY:
            inner = [self._value(GGUFValueType.ARRAY) for _ in range(count)]
            values = [GGUFField("", [], *v).contents() if isinstance(v, _Lazy) else v for _, v in inner]
            return [GGUFValueType.ARRAY, *(inner[0][0] if inner else [GGUFValueType.ARRAY])], values
        raise _Malformed(f"unknown array element type {etype} at byte {self._pos - 12}")

    def _skip_strings(self, pos: int, count: int) -> int:
        """Where `count` length-prefixed strings starting at `pos` end (checking each against the file's end)."""
        # One iteration per token and per merge of a vocabulary: locals only.
        buf, size, unpack = self._buf, self._size, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                raise _Malformed(f"a string at byte {pos} runs past the end of the {size}-byte file")
            pos += 8 + unpack(buf, pos)[0]
            if pos > size:
                raise _Malformed(f"a string ending at byte {pos} runs past the end of the {size}-byte file")
        return pos

    def _strings(self, pos: int, count: int) -> list[str]:
        """Decode strings `_skip_strings` has already checked."""
        mapping, unpack = self.data._mmap, _U64.unpack_from  # type: ignore[attr-defined]
        out = []
        append = out.append
        for _ in range(count):
            (n,) = unpack(mapping, pos)
            # llama.cpp stores whatever bytes a vocabulary had; a malformed token must not fail the load
            append(mapping[pos + 8:pos + 8 + n].decode("utf-8", "replace"))
            pos += 8 + n
        return out

    def _tensor_info(self) -> tuple[str, list[int], int, int]:
        name = self._string(strict=True)
        n_dims = self._u32()
        if n_dims > 8:
            raise _Malformed(f"tensor {name!r} has {n_dims} dimensions")
        dims = [self._u64() for _ in range(n_dims)]
        return name, dims, self._u32(), self._u64()

    def _build_tensors(self, infos: list[tuple[str, list[int], int, int]], start: int) -> None:
        seen: set[str] = set()
        array = self.data.view(np.ndarray)  # plain views: no memmap subclass bookkeeping per tensor
        for name, dims, raw_type, offset in infos:
            if name in seen:
                raise _Malformed(f"tensor {name!r} appears twice")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise _Malformed(f"tensor {name!r} has unknown type {raw_type}") from None
            if qtype not in GGML_QUANT_SIZES:
                raise _Malformed(f"tensor {name!r} has type {qtype.name}, which has no block size")
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_elements = math.prod(dims)  # Python ints: a corrupt dimension must not wrap around
            shape = tuple(reversed(dims))  # GGUF lists dimensions innermost first
            if dims and dims[0] % block:
                raise _Malformed(f"tensor {name!r}: a row of {dims[0]} is not a multiple of {qtype.name}'s block "
                                 f"size {block}")
            n_bytes = n_elements * type_size // block
            at = start + offset
            if at + n_bytes > self._size:
                raise _Malformed(f"tensor {name!r} ({n_bytes} bytes at byte {at}) runs past the end of the "
                                 f"{self._size}-byte file")
            item = _PLAIN_TENSORS.get(qtype)
            if item is None:
                if not shape:
                    raise _Malformed(f"tensor {name!r} of type {qtype.name} has no dimensions")
                item, shape = np.uint8, (*shape[:-1], shape[-1] // block * type_size)
            data = array[at:at + n_bytes].view(item).reshape(shape)
            self.tensors.append(ReaderTensor(
                name=name, tensor_type=qtype, shape=np.array(dims, dtype=np.uint64), n_elements=n_elements,
                n_bytes=n_bytes, data_offset=at, data=data, field=None,  # type: ignore[arg-type]
            ))
