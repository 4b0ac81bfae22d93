"""ggml's tensor types and their NumPy dequantisers: ``QUANT_TYPES``, ``dequantize``.

Quantised types split each row into blocks of 32 (or 256 for the k-quants) values with their own
scale(s); the dequantisers below transcribe ggml's ``dequantize_row_*`` (``ggml-quants.c``) as
whole-array NumPy expressions.  The file format around them is ``rlhf_jax.gguf_reader``'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from rlhf_jax.errors import GGUFError



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
