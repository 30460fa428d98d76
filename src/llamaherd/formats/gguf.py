"""A fast reader of the GGUF container (header, metadata, tensor table) over a memory map.

`gguf.GGUFReader` builds a numpy view for every part of every metadata value — for a Llama 3
vocabulary (128k tokens and 280k merges) that is millions of views and seconds of start-up. Here
each string array is decoded in one pass over the bytes, and tensors are returned as zero-copy
uint8 views of the map. The `gguf` package still provides the type tables, and the tests check
this reader against `GGUFReader` on the real model file.

Layout (GGUF v2/v3, little-endian): magic "GGUF", u32 version, u64 tensor count, u64 metadata
count; metadata as (string key, u32 type, value); tensor infos as (string name, u32 n_dims,
u64 dims[n_dims] (fastest-varying first), u32 ggml type, u64 offset); then, aligned to
`general.alignment` (default 32), the tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError
from . import GGUF_MAGIC

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: slowest-varying first
    data: np.ndarray  # raw bytes, uint8 (rows, bytes per row), a view of the memory map


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise FormatError(f"{self.path} is truncated (it ends inside the GGUF header)")

    def scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        self.need(size)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self.need(n)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        out, buf, pos, end = [], self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                break
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                break
            out.append(bytes(buf[pos:pos + n]).decode("utf-8", errors="replace"))
            pos += n
        else:
            self.pos = pos
            return out
        raise FormatError(f"{self.path} is truncated (it ends inside the GGUF header)")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.scalar("I"), self.scalar("Q")
            if item == _STRING:
                return self.strings(count)
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
                self.need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype, count, self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            if item == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
        raise FormatError(f"{self.path} has an unknown GGUF metadata type {kind} (corrupt file?)")


class GGUFFile:
    """Metadata (`.metadata`, a dict of Python values) and tensors (`.tensors`) of a GGUF file."""

    def __init__(self, path: str | Path, writable: bool = False):
        """`writable`: map the file copy-on-write, for a model's weights (`weights.gguf.load_gguf`):
        the file is never written (a page written, by the kernels' repacking at load, becomes this
        process's own), and tensors made from them without a
        copy (`quantize.linear`: a block model's weights) are writable arrays. Linux charges such a
        mapping against memory for the whole file, so readers of metadata map it read-only."""
        self.path = Path(path)
        try:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="c" if writable else "r")
        except FileNotFoundError:
            raise FormatError(f"{self.path} does not exist") from None
        except (ValueError, OSError) as e:  # e.g. an empty file cannot be mapped
            raise FormatError(f"{self.path} is not a valid GGUF file: {e}") from None
        cur = _Cursor(memoryview(self._map), self.path)
        cur.need(4)
        if bytes(cur.buf[:4]) != GGUF_MAGIC:
            raise FormatError(f"{self.path} is not a GGUF file (bad magic)")
        cur.pos = 4
        version = cur.scalar("I")
        if version not in (2, 3):
            raise FormatError(f"{self.path} is not a valid GGUF file (unsupported version {version})")
        n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise FormatError(f"{self.path} is not a valid GGUF file (implausible header counts)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar("I")
            if n_dims > 8:
                raise FormatError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (corrupt file?)")
            dims = [cur.scalar("Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
        align = int(self.metadata.get("general.alignment", 32))
        start = (cur.pos + align - 1) // align * align
        self.tensors = [self._tensor(start, *info) for info in infos]

    def _tensor(self, start: int, name: str, dims: list[int], type_id: int, offset: int) -> GGUFTensor:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise FormatError(f"{self.path}: tensor {name!r} has unknown GGUF type {type_id}") from None
        block, size = GGML_QUANT_SIZES[qtype]
        shape = tuple(reversed([int(d) for d in dims])) or (1,)
        row = shape[-1]
        if row % block:
            raise FormatError(f"{self.path}: tensor {name!r} rows of {row} values do not fill {qtype.name} blocks")
        row_bytes = row // block * size
        n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        begin, end = start + offset, start + offset + n_rows * row_bytes
        if end > len(self._map):
            raise FormatError(f"{self.path} is truncated: tensor {name!r} ends at byte {end}, "
                              f"the file has {len(self._map)}")
        return GGUFTensor(name, qtype, shape, self._map[begin:end].reshape(n_rows, row_bytes))
