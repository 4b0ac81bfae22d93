"""GGUF reader (llama.cpp's single-file format): ``read_gguf`` -> ``GGUFFile``, data memory-mapped.

File layout (ggml ``docs/gguf.md``, versions 2 and 3; all little-endian)::

    magic "GGUF" | uint32 version | uint64 n_tensors | uint64 n_kv
    n_kv x  (string key, uint32 value_type, value)      string = uint64 length + UTF-8 bytes
                                                         array  = uint32 item_type, uint64 n, items
    n_tensors x (string name, uint32 n_dims, uint64 ne[n_dims], uint32 ggml_type, uint64 offset)
    padding to ``general.alignment`` (default 32), then the tensor data; ``offset`` is relative
    to that data section and ``ne[0]`` is the fastest-varying (row) dimension, so a tensor's
    NumPy shape is ``ne[::-1]``: GGUF matrices are ``[out, in]`` as in ``transformers``.

Tensors are dequantised by ``rlhf_jax.gguf_quants``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax.errors import GGUFError
from rlhf_jax.gguf_quants import QUANT_TYPES, dequantize

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (name, NumPy dtype or None for string/array).
_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<u1"), 1: ("INT8", "<i1"), 2: ("UINT16", "<u2"), 3: ("INT16", "<i2"),
    4: ("UINT32", "<u4"), 5: ("INT32", "<i4"), 6: ("FLOAT32", "<f4"), 7: ("BOOL", "<u1"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<u8"), 11: ("INT64", "<i8"),
    12: ("FLOAT64", "<f8"),
}
_FLOAT32, _BOOL, _STRING, _ARRAY = 6, 7, 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: NumPy ``shape`` (``ne`` reversed), ggml ``type_id``, and the
    absolute byte ``offset``/``nbytes`` of its data in the file."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        q = QUANT_TYPES.get(self.type_id)
        return q.name if q else f"type {self.type_id}"


class _Cursor:
    """Sequential little-endian reads from the file's bytes; running off the end is a
    ``GGUFError`` naming the file and what was being read."""

    def __init__(self, data: np.ndarray, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> np.ndarray:
        if n < 0 or self.pos + n > self.data.size:
            raise GGUFError(f"{self.path}: truncated file: {what} at byte {self.pos} needs {n} "
                            f"bytes, the file has {self.data.size}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, dtype: str, what: str) -> Any:
        size = np.dtype(dtype).itemsize
        return self.take(size, what).view(dtype)[0].item()

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("<u8", what), what).tobytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8 ({e})") from None

    def value(self, type_id: int, what: str) -> Any:
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY:
            item_type = self.scalar("<u4", what)
            count = self.scalar("<u8", what)
            if item_type == _STRING:
                return [self.string(f"{what}[{i}]") for i in range(count)]
            if item_type == _ARRAY:
                return [self.value(_ARRAY, f"{what}[{i}]") for i in range(count)]
            dtype = self._dtype(item_type, what)
            items = self.take(count * np.dtype(dtype).itemsize, what).view(dtype)
            return (items != 0).tolist() if item_type == _BOOL else items.tolist()
        dtype = self._dtype(type_id, what)
        value = self.take(np.dtype(dtype).itemsize, what).view(dtype)[0]
        if type_id == _FLOAT32:  # the shortest decimal that is this float32: 1e-05, not 9.99e-06
            return float(str(value))
        return bool(value) if type_id == _BOOL else value.item()

    def _dtype(self, type_id: int, what: str) -> str:
        if type_id not in _VALUE_TYPES or _VALUE_TYPES[type_id][1] is None:
            raise GGUFError(f"{self.path}: {what} has unknown value type {type_id}")
        return _VALUE_TYPES[type_id][1]


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFFile:
    """A parsed GGUF file: ``metadata`` (key -> Python value; arrays are lists; a FLOAT32 scalar is
    the shortest decimal that rounds to it) and ``tensors``
    (name -> ``TensorInfo``, in file order).  The data is memory-mapped, read by ``tensor``."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.ndarray = dataclasses.field(repr=False)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor ``name`` dequantised to float32, in its NumPy shape."""
        info = self.tensors[name]
        raw = self.data[info.offset:info.offset + info.nbytes]
        try:
            return dequantize(raw, info.type_id, info.shape)
        except GGUFError as e:
            raise GGUFError(f"{self.path}: tensor {name!r}: {e}") from None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parses the header, metadata and tensor infos of a GGUF v2/v3 file (data memory-mapped).

    Raises ``FileNotFoundError`` for a missing file and ``GGUFError`` naming the file for a bad
    magic or version, a truncated header, or tensor data that runs past the end of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = np.memmap(path, np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    cur = _Cursor(data, path)
    magic = cur.take(4, "magic").tobytes() if data.size >= 4 else data.tobytes()
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.scalar("<u4", "version")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors = cur.scalar("<u8", "tensor count")
    n_kv = cur.scalar("<u8", "metadata count")
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        metadata[key] = cur.value(cur.scalar("<u4", f"type of {key!r}"), f"metadata {key!r}")
    infos = []
    for i in range(n_tensors):
        name = cur.string(f"tensor name {i}")
        n_dims = cur.scalar("<u4", f"tensor {name!r} rank")
        ne = cur.take(8 * n_dims, f"tensor {name!r} shape").view("<u8").tolist()
        type_id = cur.scalar("<u4", f"tensor {name!r} type")
        offset = cur.scalar("<u8", f"tensor {name!r} offset")
        infos.append((name, tuple(int(x) for x in reversed(ne)), type_id, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment < 1:
        raise GGUFError(f"{path}: metadata 'general.alignment' = {alignment!r} must be a positive int")
    start = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_id, offset in infos:
        q = QUANT_TYPES.get(type_id)
        n = int(np.prod(shape, dtype=np.int64))
        nbytes = n // q.block * q.nbytes if q else 0
        end = start + offset + nbytes
        if end > data.size:
            raise GGUFError(f"{path}: truncated file: tensor {name!r} ({'x'.join(map(str, shape))} "
                            f"{q.name if q else type_id}) ends at byte {end}, the file has {data.size}")
        tensors[name] = TensorInfo(name, shape, type_id, start + offset, nbytes)
    return GGUFFile(path, version, metadata, tensors, data)
