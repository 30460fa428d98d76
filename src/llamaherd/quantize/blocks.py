"""Float weights into GGUF blocks: what `herd run DIR --quantize q4_k` and the test files use.

    quantize(w, Q.Q4_K) -> (N, row bytes) uint8: the blocks `gguf.quants.dequantize` reads back

Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are gguf-py's own quantizers (bit-exact with ggml's reference
ones), run over row chunks. gguf-py has none for the K-quants, so Q4_K, Q5_K and Q6_K are here, in
torch: per sub-block the plain min/max (or max |w|) fit, its scale and minimum rounded to 6 bits
(Q6_K: int8) against the super-block's f16 scales, then the codes chosen against those rounded
scales. Simpler than llama.cpp's iterative search (a little more error for the same bits), and
the same format, so our kernels and llama.cpp read the result alike.

`scheme_type` says which type a tensor gets in a scheme (q8_0, q4_0, q4_k = llama.cpp's Q4_K_M
mix), with llama.cpp's rules: Q6_K for the output projection (or a tied embedding) and for wv / w2
in a third of the layers, and for rows that are not a multiple of 256 the 32-block type of about
the same size (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from ..errors import HerdError

Q = GGMLQuantizationType
_VALUES_A_CHUNK = 1 << 22  # values quantized at a time: bounds the float temporaries, big enough for torch

SCHEMES = ("q8_0", "q4_0", "q4_k")  # what `quantize=` accepts (q4_k_m is another name for q4_k)


def check_scheme(scheme: str) -> str:
    """The scheme's canonical name, or a HerdError naming the ones there are."""
    name = scheme.lower().replace("-", "_")
    name = "q4_k" if name == "q4_k_m" else name
    if name not in SCHEMES:
        raise HerdError(f"unknown quantization {scheme!r}: use one of {', '.join(SCHEMES)}")
    return name


def _f16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> its f16 rounding, as float32 (what the block will hold)."""
    return x.to(torch.float16).float()


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(n,) float32 -> (n, 2) uint8, little-endian f16."""
    return x.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def _fit_min_max(sub: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (…, 32): scale and minimum (≥ 0) with w ≈ scale * q - minimum, q in 0..levels."""
    lo = sub.amin(-1).clamp(max=0)
    return (sub.amax(-1) - lo) / levels, -lo


def _six_bits(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per super-block (n, 8) values ≥ 0 -> their f16 unit (n,) and 6-bit multiples (n, 8)."""
    unit = _f16(v.amax(-1) / 63)
    safe = torch.where(unit > 0, unit, torch.ones_like(unit))
    return unit, torch.where(unit[:, None] > 0, torch.round(v / safe[:, None]), 0).clamp(0, 63).to(torch.uint8)


def _pack_scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (n, 8) -> the 12 bytes Q4_K / Q5_K keep them in (see ggml.py)."""
    lo_sc, hi_sc, lo_mn, hi_mn = sc[:, :4], sc[:, 4:], mn[:, :4], mn[:, 4:]
    return torch.cat([lo_sc | ((hi_sc >> 4) << 6), lo_mn | ((hi_mn >> 4) << 6), (hi_sc & 15) | ((hi_mn & 15) << 4)],
                     dim=-1)


def _codes_k(blocks: torch.Tensor, levels: int):
    """Q4_K / Q5_K: super-blocks (n, 256) -> d, dmin (n,), 6-bit scales, mins (n, 8), codes (n, 8, 32)."""
    sub = blocks.view(-1, 8, 32)
    scale, minimum = _fit_min_max(sub, levels)
    d, sc = _six_bits(scale)
    dmin, mn = _six_bits(minimum)
    dl, ml = d[:, None] * sc.float(), dmin[:, None] * mn.float()  # as the reader computes them
    safe = torch.where(dl > 0, dl, torch.ones_like(dl))
    q = torch.where(dl[..., None] > 0, torch.round((sub + ml[..., None]) / safe[..., None]), 0)
    return d, dmin, sc, mn, q.clamp(0, levels).to(torch.uint8)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, mn, q = _codes_k(blocks, 15)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).flatten(1)  # sub-blocks 2i, 2i+1: low, high nibbles of 32 bytes
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, mn), qs], dim=-1)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, sc, mn, q = _codes_k(blocks, 31)
    low, high = q & 15, q >> 4  # (n, 8, 32)
    qh = (high << torch.arange(8, dtype=torch.uint8)[:, None]).sum(1, dtype=torch.uint8)  # bit j: sub-block j
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).flatten(1)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, mn), qh, qs], dim=-1)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """16 sub-blocks of 16, int8 scales against one f16 d, codes -32..31 stored + 32."""
    sub = blocks.view(-1, 16, 16)
    scale = sub.abs().amax(-1) / 31  # (n, 16), ≥ 0: codes -31..31
    d = _f16(scale.amax(-1) / 127)
    safe = torch.where(d > 0, d, torch.ones_like(d))
    sc = torch.where(d[:, None] > 0, torch.round(scale / safe[:, None]), 0).clamp(-128, 127)
    dl = d[:, None] * sc  # as the reader computes it
    safe = torch.where(dl != 0, dl, torch.ones_like(dl))
    q = (torch.where(dl[..., None] != 0, torch.round(sub / safe[..., None]), 0).clamp(-32, 31) + 32).to(torch.uint8)
    q = q.view(-1, 2, 4, 32)  # (n, half, row r, 32): value 128 h + 32 r + l
    ql = torch.cat([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4), (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], dim=-1)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    sc8 = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql.flatten(1), qh.flatten(1), sc8, _f16_bytes(d)], dim=-1)


_OURS = {Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
_GGUF_PY = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)


def quantize(w: torch.Tensor | np.ndarray, qtype: Q) -> torch.Tensor:
    """A float weight (N, K) as GGUF blocks of `qtype`: (N, K / block * block bytes) uint8.

    Raises:
        HerdError: a type we cannot make, or rows that are not whole blocks.
    """
    qtype = Q(qtype)
    if qtype not in _OURS and qtype not in _GGUF_PY:
        raise HerdError(f"cannot quantize to {qtype.name}")
    w = torch.as_tensor(w).detach().float()
    N, K = w.shape
    block, size = GGML_QUANT_SIZES[qtype]
    if K % block:
        raise HerdError(f"{qtype.name} needs rows of a multiple of {block} values, not {K}")
    out = torch.empty(N, K // block * size, dtype=torch.uint8)
    rows = max(1, _VALUES_A_CHUNK // K)
    for i in range(0, N, rows):
        chunk = w[i:i + rows]
        if qtype in _OURS:
            out[i:i + len(chunk)] = _OURS[qtype](chunk.reshape(-1, block)).reshape(len(chunk), -1)
        else:
            out[i:i + len(chunk)] = torch.from_numpy(quants.quantize(chunk.numpy(), qtype))
    return out


# -- schemes --------------------------------------------------------------------------------------

_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}  # llama.cpp's, for rows not of 256


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def scheme_type(scheme: str, name: str, in_features: int, n_layers: int) -> Q:
    """The ggml type a weight of Meta name `name` (e.g. "layers.3.attention.wv", "output",
    "tok_embeddings") with rows of `in_features` gets in `scheme` (q8_0, q4_0, q4_k)."""
    scheme = check_scheme(scheme)
    if scheme == "q8_0":
        return Q.Q8_0
    if name == "output":
        qtype = Q.Q6_K
    elif scheme == "q4_0":
        qtype = Q.Q4_0
    else:  # Q4_K_M
        qtype = Q.Q4_K
        parts = name.split(".")
        if parts[0] == "layers" and parts[-1] in ("wv", "w2") and _more_bits(int(parts[1]), n_layers):
            qtype = Q.Q6_K
    if in_features % GGML_QUANT_SIZES[qtype][0]:
        qtype = _FALLBACK[qtype]
    return qtype


__all__ = ["quantize", "scheme_type", "check_scheme", "SCHEMES"]
