"""Weight-only quantized layers for CPU inference, and their construction from GGUF blocks.

Weights stay 4- or 8-bit in memory. Two kernels multiply them:

- the native kernel (`native.block_mm`, kernels/blockmm.c), used where it builds (a C compiler and
  AVX2): `BlockLinear` keeps the file's own Q4_0 / Q4_1 / Q8_0 blocks — the same codes and scales,
  reordered eight rows at a time at load (`repack_rows8`) so one integer multiply-add serves eight
  output features — and multiplies them with int16-quantized activation blocks (llama.cpp's
  method, with 8 more bits); a prompt's many rows take a panel of the same integer products.
  The other types (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, and mixed projections) are reordered the same
  way in place (`native.kq_repack`), to products within float rounding of their file layout's
  (each block's integer dot product scaled once, where the file layout's kernel sums eight lanes);
- torch's weight-only kernels otherwise, with bf16 activations (their fp32 CPU paths are reference
  loops, several times slower): `Int4Linear` holds 4-bit codes in groups of 32 with a scale and a
  zero per group, w = (q - 8) * scale + zero — GGUF Q4_0, Q4_1 and Q4_K map onto it *exactly* (only
  the scales and zeros are rounded to bf16); it is also the CUDA path (tinygemm, `gpu=True`), where
  every other type is dequantized to the float dtype; `Int8Linear` holds int8 with one scale per
  output row, for every other GGUF type on a CPU without the native kernels (Q8_0, Q5_x, Q6_K...):
  dequantized, then requantized per row (symmetric).

Also `GGMLEmbedding`, the token embedding kept in its GGUF blocks, rows dequantized on lookup
(exact), and the output projection (`RefinedBlockLinear` / `RefinedInt8Linear`): approximate
logits for the whole vocabulary, with each row's best candidates recomputed exactly.

Quantization swaps modules: `pack_gguf_tensor` makes the quantized tensors of a state dict
(`pack_gguf_tensors` those of wq/wk/wv stacked as one wqkv, w1/w3 as w13, before packing),
`swap_quantized_modules` puts the matching modules into a model built on the meta device.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from ..model import FUSED_PROJECTIONS
from . import native
from .ggml import dequantize

Q = GGMLQuantizationType
GROUP = 32  # Q4_0 / Q4_1 block size, and the int4 kernel's group size


def cpu_int4_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4_shape_ok(out_features: int, in_features: int) -> bool:
    """Whether torch's int4 kernels take a weight of this shape: whole groups of 64 inputs (two
    32-input groups: the smallest K tile pair of tinygemm, and what the CPU kernel wants) and output
    features in tiles of 8 (tinygemm's N tile)."""
    return in_features % (2 * GROUP) == 0 and out_features % 8 == 0


def inner_k_tiles(in_features: int) -> int:
    """tinygemm's innerKTiles: the most 16-input tiles (8, 4 or 2) one load can hold for this K."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


class Int4Linear(nn.Module):
    """A linear layer of 4-bit codes q, w = (q - 8) * scale + zero, with one bf16 scale and zero per
    GROUP inputs of a row: torch's weight-only int4 kernels (tinygemm on CUDA, its `_for_cpu` twin
    on a CPU), bf16 activations, float32 accumulation.

    The kernels want the codes in layouts of their own, which differ between CUDA and CPUs (and
    between CPUs), so the module is loaded with device-neutral `codes` — (N, K/2) uint8, two codes a
    byte, the even input in the high nibble (what `_convert_weight_to_int4pack` reads on CUDA) — and
    `pack` turns them into the kernel's `weight` once the module is on its device (`build_model`
    does, after moving the model). `scales_and_zeros` is (K/GROUP, N, 2) bf16 on every device.

    On CUDA the kernel forms each weight as a bf16 fused multiply-add of (q - 8), scale and zero
    (one rounding); the CPU kernel rounds the same float32 value to bf16, so `dequantized_weight`
    gives the same numbers on both (tests/test_int4.py checks the CPU).
    """

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // GROUP, out_features, 2,
                                                             dtype=torch.bfloat16, device=device))
        self.register_buffer("weight", None)  # the kernel's layout, made by `pack`

    @torch.no_grad()
    def pack(self) -> None:
        """Replace `codes` by the layout of the kernel of the device they are on (once)."""
        if self.weight is not None:
            return
        codes = self.codes.contiguous()
        if codes.is_cuda:
            weight = torch.ops.aten._convert_weight_to_int4pack(codes, inner_k_tiles(self.in_features))
        else:  # the CPU twin reads one int32 code per weight
            unpacked = torch.stack([codes >> 4, codes & 0x0F], dim=-1).view(self.out_features, self.in_features)
            weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpacked.to(torch.int32), 1)
        del self.codes
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            self.pack()
        mm = torch.ops.aten._weight_int4pack_mm if self.weight.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        y = mm(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(), self.weight, GROUP,
               self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


def pack_int4_layers(model: nn.Module) -> None:
    """`Int4Linear.pack` every int4 layer of `model`, on the device it is on now."""
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.pack()


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16), self.weight, self.scales)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class GGMLEmbedding(nn.Module):
    """Embedding rows kept in their GGUF blocks and dequantized on lookup: exact, and small.

    `parts` [(rows, qtype), ...] (a fused projection whose parts differ in type, e.g. wq, wk Q4_K and
    wv Q6_K): the parts' rows stacked, each part's bytes after the last's, in one flat buffer.
    [(rows, qtype, offset), ...]: each part's bytes at `offset` in the buffer — a span of the GGUF
    file's mapping that holds them all, where the file put them (`mapped_parts`): not copied.
    """

    def __init__(self, num_embeddings: int, dim: int, qtype: Q, device=None, parts: list[tuple] | None = None):
        super().__init__()
        self.dim, self.qtype, self.n_rows = dim, Q(qtype), num_embeddings
        mapped = bool(parts) and len(parts[0]) > 2
        self.parts = [(int(p[0]), Q(p[1]), *map(int, p[2:])) for p in parts] \
            if parts and (mapped or len({p[1] for p in parts}) > 1) else None
        if self.parts:
            sizes = [n * dim // GGML_QUANT_SIZES[t][0] * GGML_QUANT_SIZES[t][1] for n, t, *_ in self.parts]
            size = max(p[2] + n for p, n in zip(self.parts, sizes)) if mapped else sum(sizes)
            self.register_buffer("raw", torch.empty(size, dtype=torch.uint8, device=device))
        else:
            block, size = GGML_QUANT_SIZES[self.qtype]
            self.register_buffer("raw", torch.empty(num_embeddings, dim // block * size, dtype=torch.uint8, device=device))

    rows8 = False  # True once the blocks are in a native kernel's 8-row layout (`repack`; a tied embedding's
    # by its output's, `repack_block_layers`)
    _kernel = None  # the kernel type, once asked (a mixed projection's is `native.mixed_type`'s), or repacked

    @property
    def kernel_type(self) -> int:
        """The type id the native kernels know the bytes by: ggml's; + 100 repacked by blockmm.c's
        `repack_rows8`, + native.KQ_R8 by kquant.c's; or a mixed projection's (`native.mixed_type`)."""
        if self._kernel is None:
            self._kernel = native.mixed_type(self.parts) if self.parts else int(self.qtype)
        return self._kernel

    def repack(self) -> None:
        """Put the rows in a native kernel's 8-row layout: a plain Q4_0, Q4_1 or Q8_0 projection in
        blockmm.c's (`repack_rows8`), the other types and mixed projections in kquant.c's
        (`native.kq_repack`: in place, so the file's pages they lie in are replaced, not doubled)."""
        if self.rows8 or self.raw.device.type != "cpu" or not native.available():
            return
        if not self.parts and self.qtype in REPACKED_TYPES:
            if self.raw.shape[0] % 8 == 0:
                self.raw = native.rows8_repack(self.raw, int(self.qtype), self.dim)  # repack_rows8, fast
                self._kernel, self.rows8 = int(self.qtype) + 100, True
        elif (kind := native.kq_repack(self.raw, self.parts or [(self.n_rows, self.qtype)], self.dim)) is not None:
            self._kernel, self.rows8 = kind, True

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Float32 rows (n, dim) for token ids (n,)."""
        if self.rows8 and self.kernel_type < native.KQ_R8:  # blockmm.c's layout
            return native.rows8_dequantize(self.raw, ids.reshape(-1), self.kernel_type, self.dim)
        if self.parts or self.rows8 or (self.qtype in NATIVE_TYPES and self.raw.device.type == "cpu"
                                        and native.available()):  # read in place: no gathered copy of the blocks
            return native.kq_rows(self.raw, ids.reshape(-1), self.kernel_type, self.dim, self.n_rows)
        return dequantize(self.raw.index_select(0, ids.reshape(-1)), self.qtype, (ids.numel(), self.dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.rows(tokens.reshape(-1)).view(*tokens.shape, self.dim)


REPACKED_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0)  # what kernels/blockmm.c multiplies from its own 8-row layout
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)  # float weights as stored (`weights.quantized.float_blocks_state_dict`)
KQUANT_TYPES = (Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K) + FLOAT_TYPES  # what kernels/kquant.c multiplies from the file's blocks
NATIVE_TYPES = REPACKED_TYPES + KQUANT_TYPES


class BlockLinear(GGMLEmbedding):
    """A linear layer whose weight rows stay in their GGUF blocks (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1, Q4_K,
    Q5_K, Q6_K, or parts of several: see `GGMLEmbedding`), multiplied by the native kernel
    (`native.block_mm`: int16 activation blocks, exact integer dot products)."""

    def __init__(self, in_features: int, out_features: int, qtype: Q, device=None, parts=None):
        super().__init__(out_features, in_features, qtype, device=device, parts=parts)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = native.block_mm(x.reshape(-1, self.in_features), self.raw, self.kernel_type, self.out_features)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class RefinedBlockLinear(BlockLinear):
    """The output projection from its GGUF blocks, with each row's best `refine` logits recomputed
    exactly in float32 (see `RefinedInt8Linear`). Tied to the embedding, it shares its bytes."""

    def __init__(self, in_features: int, out_features: int, qtype: Q, refine: int = 32, device=None):
        super().__init__(in_features, out_features, qtype, device=device)
        self.refine = refine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return refine_top(super().forward(x).float(), x, self.rows, self.refine)


def repack_rows8(raw: torch.Tensor, qtype: Q) -> torch.Tensor:
    """Rows of Q4_0 / Q4_1 / Q8_0 GGUF blocks (N, nb * bytes), N a multiple of 8, in the layout of
    kernels/blockmm.c's `tile8`: per group of 8 rows and block, the 8 scales (and mins) as f16,
    then the codes interleaved so one `madd` serves all 8 rows. The same scales and codes, in another
    order, and the same size."""
    bs, head = {Q.Q4_0: (18, 2), Q.Q4_1: (20, 4), Q.Q8_0: (34, 2)}[qtype]
    N = raw.shape[0]
    blocks = raw.reshape(N // 8, 8, -1, bs).transpose(1, 2)  # (G, nb, 8 rows, bs)
    qs = blocks[..., head:]
    if qtype == Q.Q8_0:  # per pair of inputs j: each row's two int8 codes
        packed = qs.reshape(*qs.shape[:3], 16, 2).permute(0, 1, 3, 2, 4)  # (G, nb, j, row, e)
    else:
        codes = torch.stack([qs & 0x0F, qs >> 4], dim=-2).flatten(-2)  # (G, nb, 8, 32): code k of each row
        c = codes.reshape(*codes.shape[:3], 8, 2, 2)  # k = 4t + 2 * half + e -> (.., row, t, half, e)
        packed = (c[..., 0, :] | (c[..., 1, :] << 4)).permute(0, 1, 3, 2, 4)  # (G, nb, t, row, e)
    scales = [blocks[..., 0:2], blocks[..., 2:4]] if qtype == Q.Q4_1 else [blocks[..., 0:2]]
    parts = [sc.flatten(-2) for sc in scales] + [packed.flatten(-3)]  # (G, nb, 16) each, then (G, nb, 128)
    return torch.cat(parts, dim=-1).reshape(N, -1)


def repack_block_layers(model: nn.Module) -> None:
    """Repack every `BlockLinear` of the transformer blocks for the kernel (see `repack_rows8`); done
    after the projections are fused (`pack_gguf_tensors` stacks the file's rows).

    And an output projection of kernels/kquant.c's types (a Q4_K_M's Q6_K): from the file's layout
    their decoding is compute-bound (a 65536 x 2048 Q6_K took 2.2x as long a token). A Q4_0, Q4_1
    or Q8_0 output stays as it is (memory-bound there: ~1.05x repacked). A tied embedding shares the
    bytes, repacked in place, and reads its rows from the new layout (`kq_rows`)."""
    for module in model.layers.modules():
        if type(module) is BlockLinear:
            module.repack()
    out, emb = model.output, model.tok_embeddings
    if type(out) in (BlockLinear, RefinedBlockLinear) and not out.parts and out.qtype in KQUANT_TYPES \
            and out.qtype not in FLOAT_TYPES:
        tied = isinstance(emb, GGMLEmbedding) and emb.raw.data_ptr() == out.raw.data_ptr()
        if tied and (emb.parts or emb.qtype != out.qtype or emb.raw.shape != out.raw.shape):
            return  # the same bytes read otherwise: leave them
        out.repack()
        if tied and out.rows8:
            emb._kernel, emb.rows8 = out.kernel_type, True


def refine_top(logits: torch.Tensor, x: torch.Tensor, rows, k: int) -> torch.Tensor:
    """Recompute the k largest logits of every row exactly: x . (the float32 weight row)."""
    flat, h = logits.view(-1, logits.shape[-1]), x.reshape(-1, x.shape[-1]).float()
    top = flat.topk(k, dim=-1).indices  # (N, k)
    w = rows(top.reshape(-1)).view(*top.shape, h.shape[-1])  # (N, k, D)
    flat.scatter_(1, top, torch.einsum("nd,nkd->nk", h, w))
    return logits


class RefinedInt8Linear(Int8Linear):
    """The output projection: int8 logits for the whole vocabulary, then the `refine` best of every
    row recomputed exactly in float32 from the GGUF blocks.

    The full-precision projection reads the largest matrix of a small model at 4 bytes a weight; int8
    reads 1, but its rounding (and the bf16 activations the kernel wants) would move the logits that
    decide greedy choices and top-k sampling. Recomputing the candidates keeps those exact; the
    tail of the distribution keeps int8 accuracy.
    """

    def __init__(self, in_features: int, out_features: int, qtype: Q, refine: int = 32, device=None):
        super().__init__(in_features, out_features, device=device)
        self.refine = refine
        self.exact = GGMLEmbedding(out_features, in_features, qtype, device=device)  # its .raw: the GGUF rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return refine_top(super().forward(x).float(), x, self.exact.rows, self.refine)


def quantize_int8_rows(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric per-row int8: w ~= q * scale, with scale rounded to bf16 before q is chosen."""
    w = w.float()
    scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)
    q = torch.round(w / scales.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return {"weight": q, "scales": scales}


INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)  # GGUF types whose values `Int4Linear` holds exactly


def int4_codes(blocks: torch.Tensor, qtype: Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 4-bit codes of GGUF blocks (n_blocks, type_size) of a type in INT4_TYPES, one row per
    32-value group (n_groups, 32) in the file's value order, and each group's scale and zero
    (n_groups,) float32 for w = (q - 8) * scale + zero:

        Q4_0  x = d * (q - 8)                  scale d, zero 0
        Q4_1  x = d * q + m                    scale d, zero m + 8d
        Q4_K  x = (d * sc) * q - dmin * mn     per 32-value sub-block: scale d * sc, zero 8 * d * sc - dmin * mn

    The scales are those `ggml.dequantize` forms (the same float32 products), so only the bf16
    rounding of scale and zero separates the kernel's weights from the file's.
    """
    from .ggml import _f16, _scale_min_k4, _unpack

    n = blocks.shape[0]
    if qtype == Q.Q4_K:
        d, dmin, packed_scales, qs = blocks.split([2, 2, 12, 128], dim=-1)
        sc, mn = _scale_min_k4(packed_scales)
        scale = (_f16(d) * sc.float()).reshape(-1)  # (n * 8,)
        zero = 8 * scale - (_f16(dmin) * mn.float()).reshape(-1)
        codes = _unpack(qs.reshape(n, 4, 32), 4).reshape(n * 8, GROUP)  # each 32 bytes: two sub-blocks
        return codes, scale, zero
    d = _f16(blocks[:, :2]).squeeze(1)
    if qtype == Q.Q4_0:
        zero, qs = torch.zeros_like(d), blocks[:, 2:]
    else:  # Q4_1
        zero, qs = _f16(blocks[:, 2:4]).squeeze(1) + 8 * d, blocks[:, 4:]
    codes = torch.stack([qs & 0x0F, qs >> 4], dim=1).reshape(n, GROUP)  # low nibbles first, as ggml
    return codes, d, zero


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """codes (N, K) in 0..15, scales/zeros (N, K/32) -> the buffers of an `Int4Linear`, before `pack`."""
    codes = codes.to(torch.uint8)
    nibbles = (codes[:, 0::2] << 4) | codes[:, 1::2]  # (N, K/2): the even input in the high nibble
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)  # (K/32, N, 2)
    return {"codes": nibbles.contiguous(), "scales_and_zeros": sz}


def int4_from_gguf(data, qtype: Q, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The `Int4Linear` buffers of a GGUF weight (type in INT4_TYPES) of torch shape (out, in)."""
    out_features, in_features = shape
    raw = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, GGML_QUANT_SIZES[qtype][1])
    codes, scale, zero = int4_codes(raw, qtype)
    n_groups = in_features // GROUP
    return pack_int4(codes.reshape(out_features, in_features), scale.view(out_features, n_groups),
                     zero.view(out_features, n_groups))


def _pack_kind(qtype: Q, shape: tuple[int, int], int4: bool, native_ok: bool | None, gpu: bool = False) -> str:
    """The kind `pack_gguf_tensor` gives a weight of this type and shape: "block", "int4", "int8"
    or (gpu) "float"."""
    int4_ok = int4 and qtype in INT4_TYPES and int4_shape_ok(*shape)
    if gpu:
        return "int4" if int4_ok else "float"
    if qtype in NATIVE_TYPES and (native.available() if native_ok is None else native_ok):
        return "block"
    if int4_ok and cpu_int4_supported():
        return "int4"
    return "int8"


def pack_gguf_tensor(data, qtype: Q, shape: tuple[int, int], int4: bool = True, native_ok: bool | None = None,
                     gpu: bool = False, dtype: torch.dtype = torch.bfloat16) -> tuple[str, dict[str, torch.Tensor]]:
    """Quantized buffers for a 2-D GGUF weight of torch shape (out, in): (kind, buffers).

    Kinds: "block:<TYPE>" (the file's blocks, for the native kernel, when it is available and
    `native_ok` is not False), "int4" (torch's int4 kernels: Q4_0, Q4_1, Q4_K), "int8" (requantized
    per row). With `gpu` (the CUDA path): "int4" where the type maps onto it, else "float" — the
    weight dequantized to `dtype` ({"weight": tensor}, a plain `nn.Linear`'s).
    """
    kind = _pack_kind(qtype, shape, int4, native_ok, gpu)
    if kind == "block":
        return f"block:{qtype.name}", {"raw": file_bytes(data).view(shape[0], -1)}
    if kind == "int4":
        return "int4", int4_from_gguf(data, qtype, shape)
    if kind == "float":
        return "float", {"weight": dequantize(data, qtype, shape, dtype=dtype)}
    return "int8", quantize_int8_rows(dequantize(data, qtype, shape))


def pack_gguf_tensors(parts: list[tuple], int4: bool = True, native_ok: bool | None = None, gpu: bool = False
                      ) -> tuple[str, dict[str, torch.Tensor]] | None:
    """The buffers of one quantized layer computing the GGUF weights `parts` — each (data, qtype,
    (out, in)) — side by side (outputs concatenated): wq, wk, wv as wqkv. None when they would not
    all get one kind of quantized layer (then pack them one by one).

    The weights are stacked before they are packed: packed layouts are the kernel's own (torch's
    int4 layout interleaves rows differently on AVX2 and AVX-512, and on CUDA), so packed buffers
    are never cut or glued (`Int4Linear`'s codes are packed only on their device). Every kind
    computes each output feature from its own row, so the fused layer's outputs equal the parts'
    to the bit.
    """
    qtypes = {Q(qtype) for _, qtype, _ in parts}
    in_features = {shape[1] for _, _, shape in parts}
    kinds = {_pack_kind(qtype, shape, int4, native_ok, gpu) for _, qtype, shape in parts}
    if len(in_features) != 1 or len(kinds) != 1 or kinds == {"float"}:
        return None
    kind, (K,), N = kinds.pop(), in_features, sum(shape[0] for _, _, shape in parts)
    if kind == "int8":  # per-row scales: requantizing the stacked rows is requantizing each
        weight = torch.cat([dequantize(data, qtype, shape) for data, qtype, shape in parts])
        return "int8", quantize_int8_rows(weight)
    if kind == "int4":  # per-row codes, scales and zeros (of any of INT4_TYPES), stacked
        buffers = [int4_from_gguf(data, Q(qtype), shape) for data, qtype, shape in parts]
        return "int4", {"codes": torch.cat([b["codes"] for b in buffers]),
                        "scales_and_zeros": torch.cat([b["scales_and_zeros"] for b in buffers], dim=1)}
    if kind == "block" and not qtypes <= set(REPACKED_TYPES) and (span := mapped_parts([d for d, _, _ in parts])):
        raw, offsets = span  # the file's bytes where they lie: no copy (kernels/kquant.c reads them there)
        return "block:" + "+".join(f"{Q(t).name}@{o}" for (_, t, _), o in zip(parts, offsets)), {"raw": raw}
    if len(qtypes) != 1:  # blocks of several types (Q4_K_M: wv Q6_K beside Q4_K): each part's bytes after the last's
        raw = torch.from_numpy(np.concatenate([np.asarray(data).reshape(-1) for data, _, _ in parts]))
        return "block:" + "+".join(Q(qtype).name for _, qtype, _ in parts), {"raw": raw}
    stacked = np.concatenate([np.asarray(data).reshape(shape[0], -1) for data, _, shape in parts])
    return pack_gguf_tensor(stacked, qtypes.pop(), (N, K), int4, native_ok)


def _mapped_root(a: np.ndarray) -> np.ndarray | None:
    """The file mapping (np.memmap, 1-D bytes) an array is a view of, or None."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    return root if isinstance(root, np.memmap) and root.ndim == 1 and root.dtype == np.uint8 else None


def file_bytes(data) -> torch.Tensor:
    """GGUF blocks as a uint8 tensor: the file's own mapped pages when `data` is a view of a GGUF
    file's mapping (`formats.gguf.GGUFFile`: held once, as llama.cpp holds them), else a copy."""
    a = np.asarray(data)
    if _mapped_root(a) is not None and a.flags.c_contiguous and a.flags.writeable:
        return torch.from_numpy(a)
    return torch.from_numpy(np.array(a))


def mapped_parts(datas: list) -> tuple[torch.Tensor, list[int]] | None:
    """The span of one GGUF file's mapping holding every part of a fused projection (views of it,
    each contiguous), and each part's byte offset in it; None when they are not such views."""
    arrays = [np.asarray(d) for d in datas]
    roots = [_mapped_root(a) for a in arrays]
    if roots[0] is None or any(r is not roots[0] for r in roots) or \
            not all(a.flags.c_contiguous and a.flags.writeable for a in arrays):
        return None
    base = roots[0].ctypes.data
    starts = [a.ctypes.data - base for a in arrays]
    lo, hi = min(starts), max(s + a.nbytes for s, a in zip(starts, arrays))
    return torch.from_numpy(roots[0][lo:hi]), [s - lo for s in starts]


def swap_quantized_modules(model: nn.Module, kinds: dict[str, str]) -> None:
    """Replace the `nn.Linear` / `nn.Embedding` named in `kinds` by their quantized counterparts.

    Kinds: "int4", "int8", "block:<TYPE>" (`BlockLinear`; "block:Q4_K+Q4_K+Q6_K" for a fused one of mixed parts,
    "block:Q5_0@0+Q5_0@N+Q8_0@M" for one whose parts lie at those offsets of a mapped span), "ggml:<TYPE>" (an embedding kept in GGUF
    blocks), and the output projection's "refined_block:<TYPE>" (`RefinedBlockLinear`) or
    "refined:<TYPE>" (`RefinedInt8Linear`).
    """
    for name, kind in kinds.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if child in FUSED_PROJECTIONS:  # wqkv / w13: the parts side by side (`pack_gguf_tensors`)
            parts = [getattr(parent, p) for p in FUSED_PROJECTIONS[child]]
            old = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False, device="meta")
        else:
            old = getattr(parent, child)
        kind, _, qtype = kind.partition(":")
        if kind == "ggml":
            new = GGMLEmbedding(old.num_embeddings, old.embedding_dim, Q[qtype], device="meta")
        elif kind == "block":  # several types: a fused projection's parts; "TYPE@OFFSET": mapped (`pack_gguf_tensors`)
            names = [t.partition("@") for t in qtype.split("+")]
            qtypes = [Q[t] for t, _, _ in names]
            shares = [(p.out_features, t, *([int(o)] if o else [])) for p, t, (_, _, o) in zip(parts, qtypes, names)] \
                if len(qtypes) > 1 else None
            new = BlockLinear(old.in_features, old.out_features, qtypes[0], device="meta", parts=shares)
        elif kind == "refined_block":
            new = RefinedBlockLinear(old.in_features, old.out_features, Q[qtype], device="meta")
        elif kind == "refined":
            new = RefinedInt8Linear(old.in_features, old.out_features, Q[qtype], device="meta")
        elif kind == "int4":
            new = Int4Linear(old.in_features, old.out_features, device="meta")
        else:
            new = Int8Linear(old.in_features, old.out_features, device="meta")
        if child in FUSED_PROJECTIONS:
            parent.fuse(new)
        else:
            setattr(parent, child, new)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a (possibly quantized) linear layer stands for (for tests and export)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        return module.weight.float()
    if isinstance(module, Int8Linear):
        return module.weight.float() * module.scales.float().unsqueeze(1)
    if isinstance(module, GGMLEmbedding):
        return module.rows(torch.arange(module.n_rows))
    device = next(module.buffers()).device
    eye = torch.eye(module.in_features, dtype=torch.bfloat16, device=device)
    return module(eye).float().T


__all__ = ["Int4Linear", "pack_int4_layers", "int4_codes", "int4_from_gguf", "INT4_TYPES", "Int8Linear", "GGMLEmbedding", "RefinedInt8Linear", "BlockLinear", "RefinedBlockLinear", "pack_gguf_tensor", "pack_gguf_tensors", "swap_quantized_modules",
           "quantize_int8_rows", "pack_int4", "dequantized_weight", "repack_rows8", "repack_block_layers"]
