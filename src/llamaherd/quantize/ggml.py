"""GGUF (ggml) tensor dequantization in torch.

One small function per ggml type turns a batch of raw blocks, `(n_blocks, type_size)` uint8, into
`(n_blocks, block_size)` float32. Each one follows the reference numpy code in `gguf.quants`
operation by operation, in float32 and in the same order (e.g. `d * q - dm`, never a fused
multiply-add), so the results are bit-identical to `gguf.quants.dequantize` (NaN payloads aside:
torch and numpy quiet NaNs differently); tests/test_dequant.py checks every type against it.

Block layouts are those of ggml-common.h. Notation: `d` is a block's fp16 scale, `m`/`dmin` its
fp16 minimum, `q` the small integers it scales. K-quants group 256 values into a super-block with
per-sub-block 4- or 6-bit scales that are themselves scaled by `d`.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import FormatError

Q = GGMLQuantizationType

# Dequantize this many output values at a time: big enough for torch's threads, small enough that
# the integer and float temporaries of one chunk stay in cache instead of costing a few times the
# size of the whole tensor.
_CHUNK_VALUES = 1 << 18


def _f16(x: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian fp16 -> (n, 1) float32."""
    # A column slice of the blocks is strided: copy its 2 bytes a block to reinterpret them.
    return x.contiguous().view(torch.float16).float()


def _unpack(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each byte of `x` (..., k) into 8 // bits fields, low bits first: (..., 8 // bits, k).

    This is ggml's packing: field s of byte j belongs to element `s * k + j`, so a reshape of the
    result puts the elements in order.
    """
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8).unsqueeze(-1)  # (8 // bits, 1)
    return (x.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)


# --- plain floats: a "block" is one value --------------------------------------------------------

def _dequantize_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32)  # dequantize() copies it into the output


def _dequantize_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float16).float()


def _dequantize_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bf16 is the top half of an fp32, so this is exact (NaN payloads included).
    return blocks.view(torch.bfloat16).float()


# --- 32-value blocks -----------------------------------------------------------------------------

def _dequantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """d: fp16, qs: 16 bytes of 4-bit values (low nibbles are values 0..15, high ones 16..31)."""
    n = blocks.shape[0]
    d, qs = blocks.split([2, 16], dim=-1)
    q = _unpack(qs, 4).reshape(n, 32).view(torch.int8) - 8
    return _f16(d) * q.float()


def _dequantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """d, m: fp16, qs: 16 bytes of 4-bit values; x = d * q + m."""
    n = blocks.shape[0]
    d, m, qs = blocks.split([2, 2, 16], dim=-1)
    q = _unpack(qs, 4).reshape(n, 32).float()
    return _f16(d) * q + _f16(m)


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """5-bit values: low 4 bits as in Q4; bit 4 of value j is bit j of the uint32 qh."""
    n = qs.shape[0]
    ql = _unpack(qs, 4).reshape(n, 32)
    # Bit j of the uint32 is bit j % 8 of byte j // 8, so unpacking the 4 bytes keeps the order.
    qh = _unpack(qh.unsqueeze(-1), 1).reshape(n, 32)
    return ql | (qh << 4)


def _dequantize_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    """d: fp16, qh: 4 bytes of high bits, qs: 16 bytes of low nibbles; x = d * (q - 16)."""
    d, qh, qs = blocks.split([2, 4, 16], dim=-1)
    q = _q5(qh, qs).view(torch.int8) - 16
    return _f16(d) * q.float()


def _dequantize_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    """d, m: fp16, qh: 4 bytes of high bits, qs: 16 bytes of low nibbles; x = d * q + m."""
    d, m, qh, qs = blocks.split([2, 2, 4, 16], dim=-1)
    return _f16(d) * _q5(qh, qs).float() + _f16(m)


def _dequantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """d: fp16, qs: 32 int8; x = q * d."""
    d, qs = blocks.split([2, 32], dim=-1)
    return qs.view(torch.int8).float() * _f16(d)


# --- K-quants: 256-value super-blocks ------------------------------------------------------------

def _dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks of 16; per sub-block 4-bit scale and min (one byte), 2-bit values."""
    n = blocks.shape[0]
    scales, qs, d, dmin = blocks.split([16, 64, 2, 2], dim=-1)
    dl = (_f16(d) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(dmin) * (scales >> 4).float()).reshape(n, 16, 1)
    # Each 32-byte half holds 4 rows of 32 values, one per 2-bit field.
    q = _unpack(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, 256)


def _dequantize_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks of 16; 6-bit signed scales, values of 2 low bits plus a high bit in hmask."""
    n = blocks.shape[0]
    hmask, qs, scales, d = blocks.split([32, 64, 12, 2], dim=-1)
    # The 16 scales: low 4 bits are the nibbles of bytes 0..7 (all low nibbles first), high 2 bits
    # the 2-bit fields of bytes 8..11.
    lo = _unpack(scales[:, :8], 4).reshape(n, 16)
    hi = _unpack(scales[:, 8:], 2).reshape(n, 16)
    sc = ((lo | (hi << 4)).view(torch.int8) - 32).float()
    dl = (_f16(d) * sc).reshape(n, 16, 1)
    ql = _unpack(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16).view(torch.int8)
    qh = _unpack(hmask, 1).reshape(n, 16, 16).view(torch.int8)
    # A set hmask bit means "no offset": q = ql - 4 * (1 - bit).
    q = (ql - ((qh ^ 1) << 2)).float()
    return (dl * q).reshape(n, 256)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack the 12 bytes of eight 6-bit scales and eight 6-bit mins of Q4_K/Q5_K: two (n, 8).

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the high 2 bits of scales 4-7; bytes 4-7 likewise
    for the mins; bytes 8-11 hold the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high).
    """
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """8 sub-blocks of 32; 6-bit scales and mins, 4-bit values; x = d * sc * q - dmin * m."""
    n = blocks.shape[0]
    d, dmin, scales, qs = blocks.split([2, 2, 12, 128], dim=-1)
    sc, mn = _scale_min_k4(scales)
    dl = (_f16(d) * sc.float()).reshape(n, 8, 1)
    ml = (_f16(dmin) * mn.float()).reshape(n, 8, 1)
    # Each 32 bytes hold two sub-blocks: low nibbles, then high nibbles.
    q = _unpack(qs.reshape(n, 4, 32), 4).reshape(n, 8, 32).float()
    return (dl * q - ml).reshape(n, 256)


def _dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K plus a fifth bit per value: bit s of qh[j] belongs to sub-block s, position j."""
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = blocks.split([2, 2, 12, 32, 128], dim=-1)
    sc, mn = _scale_min_k4(scales)
    dl = (_f16(d) * sc.float()).reshape(n, 8, 1)
    ml = (_f16(dmin) * mn.float()).reshape(n, 8, 1)
    ql = _unpack(qs.reshape(n, 4, 32), 4).reshape(n, 8, 32)
    qh = _unpack(qh, 1)  # (n, 8, 32)
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).reshape(n, 256)


def _dequantize_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks of 16; int8 scales, 6-bit values (4 low bits in ql, 2 high bits in qh)."""
    n = blocks.shape[0]
    ql, qh, scales, d = blocks.split([128, 64, 16, 2], dim=-1)
    dl = (_f16(d) * scales.view(torch.int8).float()).reshape(n, 16, 1)
    # Each half of the super-block (128 values) takes 64 bytes of ql and 32 bytes of qh.
    lo = _unpack(ql.reshape(n, 2, 64), 4).reshape(n, 8, 32)
    hi = _unpack(qh.reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = ((lo | (hi << 4)).view(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, 256)


_DEQUANTIZE: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.F32: _dequantize_f32,
    Q.F16: _dequantize_f16,
    Q.BF16: _dequantize_bf16,
    Q.Q4_0: _dequantize_q4_0,
    Q.Q4_1: _dequantize_q4_1,
    Q.Q5_0: _dequantize_q5_0,
    Q.Q5_1: _dequantize_q5_1,
    Q.Q8_0: _dequantize_q8_0,
    Q.Q2_K: _dequantize_q2_k,
    Q.Q3_K: _dequantize_q3_k,
    Q.Q4_K: _dequantize_q4_k,
    Q.Q5_K: _dequantize_q5_k,
    Q.Q6_K: _dequantize_q6_k,
}

SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_DEQUANTIZE)


def _as_qtype(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    try:
        return GGMLQuantizationType(int(qtype))
    except ValueError:
        raise FormatError(f"unknown GGUF tensor type {qtype}") from None


def block_info(qtype: GGMLQuantizationType | int) -> tuple[int, int]:
    """Return `(block_size, type_size)`: values per block and bytes per block of a ggml type.

    Plain float types are blocks of one value (F32 is (1, 4)).
    """
    return GGML_QUANT_SIZES[_as_qtype(qtype)]


def _as_bytes(data) -> torch.Tensor:
    """A flat uint8 tensor over the bytes of `data`, without copying where possible."""
    if isinstance(data, torch.Tensor):
        return data.detach().contiguous().reshape(-1).view(torch.uint8)
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    arr = np.ascontiguousarray(data)
    if not arr.dtype.isnative:  # big-endian float arrays: the bytes must be little-endian
        arr = arr.astype(arr.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        # GGUFReader's memmaps are read-only; we only ever read them, so sharing memory is safe.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr.reshape(-1).view(np.uint8))


def dequantize(data, qtype: GGMLQuantizationType | int, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize the raw data of one GGUF tensor, bit-exact with `gguf.quants.dequantize`.

    Args:
        data: the tensor's bytes: a uint8 torch tensor or numpy array of any shape (such as
            `GGUFReader`'s `tensor.data` memmap), or for plain float types an array already typed
            float32 / float16 / uint16-for-bf16.
        qtype: the ggml type, e.g. `GGMLQuantizationType.Q4_1`.
        shape: the logical torch shape, row-major: a GGUF tensor of shape [ne0, ne1] is (ne1, ne0).
        dtype: the dtype of the result; values are computed in float32 and then cast.

    Returns:
        A new tensor of `shape` and `dtype` that does not share memory with `data`.

    Raises:
        FormatError: for an unsupported type, or a shape that does not match the type's blocks or
            the number of bytes.
    """
    qtype = _as_qtype(qtype)
    fn = _DEQUANTIZE.get(qtype)
    if fn is None:
        raise FormatError(f"unsupported GGUF tensor type {qtype.name}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    # ggml quantizes each row on its own, so a block never spans two rows.
    row = shape[-1] if shape else 1
    if row % block_size:
        raise FormatError(f"{qtype.name} tensor of shape {shape}: rows of {row} values "
                          f"are not a multiple of the block size {block_size}")
    raw = _as_bytes(data)
    n_blocks = numel // block_size
    if raw.numel() != n_blocks * type_size:
        raise FormatError(f"{qtype.name} tensor of shape {shape} needs {n_blocks * type_size} "
                          f"bytes, got {raw.numel()}")

    blocks = raw.view(n_blocks, type_size)
    out = torch.empty(n_blocks, block_size, dtype=dtype)
    step = max(1, _CHUNK_VALUES // block_size)
    for i in range(0, n_blocks, step):
        out[i:i + step] = fn(blocks[i:i + step])  # the copy casts to `dtype`
    return out.view(shape)
