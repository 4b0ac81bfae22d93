"""GGUF import (llama.cpp's single-file format): a NumPy reader, dequantisers, ``load_gguf``.

File layout (ggml ``docs/gguf.md``, versions 2 and 3; all little-endian)::

    magic "GGUF" | uint32 version | uint64 n_tensors | uint64 n_kv
    n_kv x  (string key, uint32 value_type, value)      string = uint64 length + UTF-8 bytes
                                                         array  = uint32 item_type, uint64 n, items
    n_tensors x (string name, uint32 n_dims, uint64 ne[n_dims], uint32 ggml_type, uint64 offset)
    padding to ``general.alignment`` (default 32), then the tensor data; ``offset`` is relative
    to that data section and ``ne[0]`` is the fastest-varying (row) dimension, so a tensor's
    NumPy shape is ``ne[::-1]``: GGUF matrices are ``[out, in]`` as in ``transformers``.

Quantised types split each row into blocks of 32 (or 256 for the k-quants) values with their own
scale(s); the dequantisers below transcribe ggml's ``dequantize_row_*`` (``ggml-quants.c``) as
whole-array NumPy expressions.  Tensor names (llama.cpp ``gguf-py/gguf/tensor_mapping.py``) are
renamed to ``transformers``' names and fed through ``rlhf_jax.hf``'s one name map, so a GGUF file
loads into exactly the parameter tree ``load_pretrained`` builds.

llama.cpp's ``convert_hf_to_gguf.py`` permutes the rows of ``attn_q``/``attn_k`` of ``llama``
models within each head from rotate-half to adjacent-pair RoPE order; ``load_gguf`` undoes it
(``transformers``' ``_reverse_permute_weights``; the same permutation as llama2.c's).  Qwen2 and
Qwen3 files are not permuted.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax.errors import GGUFError
from rlhf_jax.hf import _abstract_params, _read_params, config_from_hf
from rlhf_jax.llama2c import _halves_layout
from rlhf_jax.model import Params, Transformer, init_params

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# general.architecture values load_gguf accepts.  Gemma 2/3 files are refused: llama.cpp stores
# their norms as 1 + w and leaves the soft-caps, query scale, local RoPE base and layer pattern
# to constants of its code that the file does not carry.
ARCHITECTURES = ("llama", "qwen2", "qwen3")
_PERMUTED_ARCHS = ("llama",)  # whose q/k rows llama.cpp permutes


# ------------------------------------------------------------------------------ dequantisers


def _f16(b: np.ndarray) -> np.ndarray:
    """``[n, 2]`` uint8 -> ``[n, 1]`` float32 (a block's fp16 scale)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[n, k]`` uint8 -> ``[n, 2k]``: all low nibbles, then all high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def _dq_f32(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f4").astype(np.float32)


def _dq_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view("<f2").astype(np.float32)


def _dq_bf16(raw: np.ndarray) -> np.ndarray:
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def _dq_q8_0(raw: np.ndarray) -> np.ndarray:
    """Block of 32: fp16 ``d``, int8 ``q[32]``; ``x = d * q``."""
    b = raw.reshape(-1, 34)
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def _dq_q4_0(raw: np.ndarray) -> np.ndarray:
    """Block of 32: fp16 ``d``, 16 bytes of nibbles; ``x = d * (q - 8)``."""
    b = raw.reshape(-1, 18)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]) - 8.0)


def _dq_q4_1(raw: np.ndarray) -> np.ndarray:
    """Block of 32: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; ``x = d * q + m``."""
    b = raw.reshape(-1, 20)
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """``[..., k]`` uint8 -> ``[..., n, k]``: bit ``i`` of each byte, shifted to 16 (the fifth bit
    of a 5-bit value), for ``i < n``."""
    return ((qh[..., None, :] >> np.arange(n, dtype=np.uint8)[:, None]) & 1) << 4


def _dq_q5_0(raw: np.ndarray) -> np.ndarray:
    """Block of 32: fp16 ``d``, uint32 ``qh`` (bit j: the fifth bit of value j), 16 bytes of
    nibbles; ``x = d * (q - 16)``."""
    b = raw.reshape(-1, 22)
    qh = b[:, 2:6].copy().view("<u4")
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.float32) * 16
    return _f16(b[:, :2]) * (_nibbles(b[:, 6:]) + high - 16.0)


def _dq_q5_1(raw: np.ndarray) -> np.ndarray:
    """Block of 32: fp16 ``d``, fp16 ``m``, uint32 ``qh``, 16 bytes of nibbles; ``x = d * q + m``."""
    b = raw.reshape(-1, 24)
    qh = b[:, 4:8].copy().view("<u4")
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.float32) * 16
    return _f16(b[:, :2]) * (_nibbles(b[:, 8:]) + high) + _f16(b[:, 2:4])


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for all 8 sub-blocks: 12 packed bytes -> 6-bit scales and mins."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> ``[n, 8, 32]``: each 32 bytes give sub-block 2i (low nibbles) and 2i+1 (high)."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(-1, 8, 32)


def _dq_q4_k(raw: np.ndarray) -> np.ndarray:
    """Super-block of 256 = 8 sub-blocks of 32: fp16 ``d``, fp16 ``dmin``, 12 bytes of packed
    6-bit scales ``sc[8]`` and mins ``m[8]`` (``get_scale_min_k4``), 128 bytes of nibbles (each
    32 bytes give sub-block 2i from the low and 2i+1 from the high nibbles);
    ``x = d * sc[j] * q - dmin * m[j]``."""
    b = raw.reshape(-1, 144)
    sc, mn = _k4_scales(b[:, 4:16])
    q = _k_nibbles(b[:, 16:]).astype(np.float32)
    x = (_f16(b[:, 0:2]) * sc)[:, :, None] * q - (_f16(b[:, 2:4]) * mn)[:, :, None]
    return x.reshape(-1, 256)


def _dq_q5_k(raw: np.ndarray) -> np.ndarray:
    """Q4_K plus ``qh[32]`` (after the scales): bit j of ``qh[l]`` is the fifth bit of value l of
    sub-block j."""
    b = raw.reshape(-1, 176)
    sc, mn = _k4_scales(b[:, 4:16])
    q = (_k_nibbles(b[:, 48:]) | _high_bits(b[:, 16:48], 8)).astype(np.float32)
    x = (_f16(b[:, 0:2]) * sc)[:, :, None] * q - (_f16(b[:, 2:4]) * mn)[:, :, None]
    return x.reshape(-1, 256)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """``[n, 64]`` bytes of 2-bit values -> ``[n, 2, 4, 2, 16]`` (half, shift j, group, l): value
    ``128 h + 32 j + 16 g + l`` is bits ``2j..2j+1`` of ``qs[32 h + 16 g + l]`` (Q2_K/Q3_K)."""
    q = qs.reshape(-1, 2, 1, 2, 16)
    return (q >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1, 1)) & 3


def _dq_q2_k(raw: np.ndarray) -> np.ndarray:
    """Super-block of 256 = 16 sub-blocks of 16: ``scales[16]`` (low nibble scale, high nibble
    min), 2-bit ``qs[64]``, fp16 ``d``, fp16 ``dmin``; ``x = d * sc * q - dmin * m``."""
    b = raw.reshape(-1, 84)
    s = b[:, :16].reshape(-1, 2, 4, 2, 1)
    d, dmin = _f16(b[:, 80:82]).reshape(-1, 1, 1, 1, 1), _f16(b[:, 82:84]).reshape(-1, 1, 1, 1, 1)
    q = _crumbs(b[:, 16:80]).astype(np.float32)
    return (d * (s & 0x0F) * q - dmin * (s >> 4)).reshape(-1, 256)


def _dq_q3_k(raw: np.ndarray) -> np.ndarray:
    """Super-block of 256 = 16 sub-blocks of 16: ``hmask[32]``, 2-bit ``qs[64]``, 12 bytes of
    packed 6-bit scales, fp16 ``d``; ``x = d * (sc - 32) * (q - (0 if hmask bit else 4))`` where
    value ``128 h + 32 j + 16 g + l`` takes bit ``4 h + j`` of ``hmask[16 g + l]``."""
    b = raw.reshape(-1, 110)
    s = b[:, 96:108]
    lo, hi = s[:, 0:8], s[:, 8:12]
    sc = np.concatenate([
        (lo[:, 0:4] & 0x0F) | ((hi & 3) << 4), (lo[:, 4:8] & 0x0F) | (((hi >> 2) & 3) << 4),
        (lo[:, 0:4] >> 4) | (((hi >> 4) & 3) << 4), (lo[:, 4:8] >> 4) | (((hi >> 6) & 3) << 4),
    ], axis=1).astype(np.float32) - 32.0
    hm = b[:, :32].reshape(-1, 1, 1, 2, 16)
    bit = (hm >> np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1, 1)) & 1  # [n, h, j, g, l]
    q = _crumbs(b[:, 32:96]).astype(np.float32) - ((1 - bit) << 2)  # uint8 4 or 0
    d = _f16(b[:, 108:110]).reshape(-1, 1, 1, 1, 1)
    return (d * sc.reshape(-1, 2, 4, 2, 1) * q).reshape(-1, 256)


def _dq_q6_k(raw: np.ndarray) -> np.ndarray:
    """Super-block of 256 = 16 sub-blocks of 16: ``ql[128]`` low nibbles, ``qh[64]`` high 2-bit
    pairs, int8 ``sc[16]``, fp16 ``d``; ``x = d * sc[j] * (q - 32)`` with the 6-bit ``q`` laid out
    as in ``dequantize_row_q6_K`` (two halves of 128; in each, four rows of 32 from ``ql[l]``,
    ``ql[l+32]`` low/high nibbles and ``qh[l]`` bits 0-1, 2-3, 4-5, 6-7)."""
    b = raw.reshape(-1, 210)
    ql = b[:, :128].reshape(-1, 2, 2, 32)  # [n, half, ql[l] | ql[l+32], l]
    qh = b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 4, 2, 1)
    d = _f16(b[:, 208:210]).reshape(-1, 1, 1, 1, 1)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [n, half, 4, 32]: rows k = 0..3
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.float32) - 32.0
    return (d * sc * q.reshape(-1, 2, 4, 2, 16)).reshape(-1, 256)


@dataclasses.dataclass(frozen=True)
class QuantType:
    """One ggml tensor type: ``block`` values take ``nbytes`` bytes; ``dequant`` maps the raw
    ``uint8`` bytes of whole blocks to float32 (``None``: known but not supported here)."""

    name: str
    block: int
    nbytes: int
    dequant: Callable[[np.ndarray], np.ndarray] | None = None


# ggml_type ids and block sizes (ggml.h, gguf-py GGML_QUANT_SIZES).  Unsupported types are listed
# so that the error names them.
QUANT_TYPES: dict[int, QuantType] = {q_id: QuantType(*spec) for q_id, spec in {
    0: ("F32", 1, 4, _dq_f32), 1: ("F16", 1, 2, _dq_f16), 2: ("Q4_0", 32, 18, _dq_q4_0),
    3: ("Q4_1", 32, 20, _dq_q4_1), 6: ("Q5_0", 32, 22, _dq_q5_0), 7: ("Q5_1", 32, 24, _dq_q5_1),
    8: ("Q8_0", 32, 34, _dq_q8_0), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84, _dq_q2_k),
    11: ("Q3_K", 256, 110, _dq_q3_k), 12: ("Q4_K", 256, 144, _dq_q4_k),
    13: ("Q5_K", 256, 176, _dq_q5_k), 14: ("Q6_K", 256, 210, _dq_q6_k),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2, _dq_bf16), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}.items()}
SUPPORTED_QUANTS = tuple(q.name for q in QUANT_TYPES.values() if q.dequant is not None)


def dequantize(raw: np.ndarray, type_id: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of ``shape`` from the raw bytes (``uint8``) of a tensor of ggml type
    ``type_id``.  Raises ``GGUFError`` for an unsupported type or a size that does not match."""
    q = QUANT_TYPES.get(type_id)
    if q is None or q.dequant is None:
        name = f"{q.name} (ggml type {type_id})" if q else f"unknown ggml type {type_id}"
        raise GGUFError(f"{name} is not supported (supported: {', '.join(SUPPORTED_QUANTS)})")
    n = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % q.block:
        raise GGUFError(f"{q.name}: row length {shape[-1]} is not a multiple of the block size {q.block}")
    if raw.size != n // q.block * q.nbytes:
        raise GGUFError(f"{q.name}: {raw.size} bytes for {n} values, expected {n // q.block * q.nbytes}")
    return q.dequant(np.ascontiguousarray(raw, np.uint8)).reshape(shape)


# ------------------------------------------------------------------------------------ reader

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


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata key/value pairs of a GGUF file (``general.*``, ``llama.*``,
    ``tokenizer.ggml.*``, ``tokenizer.chat_template``, ...); arrays are Python lists."""
    return read_gguf(path).metadata


# ------------------------------------------------------------------------------------ import

# GGUF tensor names -> transformers' (llama.cpp gguf-py tensor_mapping.py, MODEL_TENSOR names).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _hf_name(name: str) -> str | None:
    """transformers' name for a GGUF tensor name, or None when there is none."""
    if m := _BLOCK_RE.fullmatch(name):
        block, kind = _BLOCK_NAMES.get(m[2]), m[3]
        return f"model.layers.{m[1]}.{block}.{kind}" if block else None
    stem, _, kind = name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{kind}" if stem in _TOP_NAMES and kind in ("weight", "bias") else None


def gguf_hf_config(file: GGUFFile) -> dict[str, Any]:
    """The ``transformers`` ``config.json`` dict a GGUF file's metadata describes (its keys are
    ``{arch}.block_count``, ``{arch}.attention.head_count``, ...; llama.cpp ``constants.py``).

    Raises ``GGUFError`` naming the file for an architecture other than ``ARCHITECTURES``, a
    missing key, or RoPE scaling (not implemented by our model)."""
    meta = file.metadata
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{file.path}: general.architecture {arch!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if full in meta:
            return meta[full]
        if default is ...:
            raise GGUFError(f"{file.path}: metadata {full!r} is missing")
        return default

    scaling = key("rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (scaling == "linear" and key("rope.scaling.factor", 1.0) != 1.0):
        raise GGUFError(f"{file.path}: metadata '{arch}.rope.scaling.type' = {scaling!r} is not "
                        "supported (RoPE scaling is not implemented)")
    if "token_embd.weight" not in file.tensors:
        raise GGUFError(f"{file.path}: tensor 'token_embd.weight' is missing")
    d_model, n_heads = key("embedding_length"), key("attention.head_count")
    return {
        "model_type": arch,
        "vocab_size": file.tensors["token_embd.weight"].shape[0],
        "hidden_size": d_model,
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": key("attention.head_count_kv", n_heads),
        "head_dim": key("attention.key_length", key("rope.dimension_count", d_model // n_heads)),
        "intermediate_size": key("feed_forward_length"),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        # llama.cpp writes output.weight only when the head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in file.tensors,
        "hidden_act": "silu",
    }


class _GGUFTensors:
    """``rlhf_jax.hf._read_params``' tensor source (``where``, ``read``, ``file_for``) over a GGUF
    file, by ``transformers`` name: dequantises, and un-permutes q/k rows where llama.cpp
    permuted them."""

    def __init__(self, file: GGUFFile, n_heads: int, n_kv_heads: int):
        self.file = file
        self.heads = {"q_proj": n_heads, "k_proj": n_kv_heads}
        self.permuted = file.metadata["general.architecture"] in _PERMUTED_ARCHS
        self.where: dict[str, str] = {}
        unknown = []
        for name in file.tensors:
            hf = _hf_name(name)
            if hf is None:
                unknown.append(name)
            else:
                self.where[hf] = name
        if unknown:
            shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
            raise GGUFError(f"{file.path}: tensors {shown} have no place in our "
                            f"{file.metadata['general.architecture']} model")

    def file_for(self, name: str) -> Path:
        return self.file.path

    def read(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        gguf_name = self.where[name]
        actual = self.file.tensors[gguf_name].shape
        if actual != shape:
            raise GGUFError(f"{self.file.path}: tensor {gguf_name!r} has shape {actual}, expected {shape}")
        arr = self.file.tensor(gguf_name)
        proj = name.split(".")[-2]
        if self.permuted and proj in self.heads:
            # llama.cpp's permute reshapes [h, 2, hd/2] -> [h, hd/2, 2]; this is its inverse.
            arr = _halves_layout(arr.reshape(shape[0], -1), self.heads[proj]).reshape(shape)
        return arr


def load_gguf(
    path: str | os.PathLike,
    *,
    dtype: str = "float32",
    head: str = "lm",
    key: jax.Array | None = None,
) -> tuple[Transformer, Params]:
    """Loads a GGUF model file (``general.architecture`` in ``ARCHITECTURES``) as our
    ``arch="llama"`` model, with the parameter tree ``rlhf_jax.load_pretrained`` builds.

    Every tensor is dequantised to float32 (types ``SUPPORTED_QUANTS``); ``dtype`` is the compute
    dtype.  ``head="scalar"`` replaces the LM head with a fresh scalar head initialised from
    ``key`` exactly as ``init_params`` does (InstructGPT §3.5).  The tokenizer is
    ``Tokenizer.from_gguf(path)``.

    Raises ``FileNotFoundError`` and ``GGUFError`` (a ``ValueError``) naming the file and what is
    wrong: bad magic, truncated data, an unsupported architecture or quant type (named), a missing
    or misshapen tensor.
    """
    file = read_gguf(path)
    if head == "scalar" and key is None:
        raise ValueError(f"{file.path}: head='scalar' needs key= to initialise the score head")
    hf = gguf_hf_config(file)
    try:
        config = config_from_hf(hf, dtype=dtype, head=head, source=file.path)
    except ValueError as e:
        raise GGUFError(str(e)) from None
    model = Transformer(config)
    tensors = _GGUFTensors(file, config.n_heads, config.kv_heads)
    params = _read_params(tensors, config, _abstract_params(model), skip=lambda n: n == "score.weight")
    if head == "scalar":
        # Under jit, everything but the score head's initialisation is dead code.
        params["score_head"] = jax.jit(lambda k: init_params(model, k)["score_head"])(key)
    return model, params
