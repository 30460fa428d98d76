"""The native kernels, built on first use, called through ctypes: the block-quantized matmuls
(kernels/blockmm.c, kernels/kquant.c: int16 activations; float32 ones for float weights) and a
whole decode step or prompt chunk over every transformer block (kernels/decode.c).

Why native code: at batch 1 a 135M model's matmuls are small enough that torch's packed int4/int8
CPU kernels are bound by their own arithmetic (bf16 dequantization), not by memory; ggml-style
integer dot products on the file's own blocks do the same work faster (all of SmolLM2-135M's
linear layers: 9.9 vs 12.9 ms at batch 1, 50 vs 85 ms at batch 16, on this project's machine).

It is compiled with the machine's C compiler for the machine's own instruction set and cached
under the llamaherd cache folder, keyed by the source's hash and the compiler flags, so later
starts only load it (a few ms). The shared library links the OpenMP runtime that torch ships, so
both share one thread pool and `torch.set_num_threads` governs both. No compiler, or a build that
fails: `available()` is False and the torch kernels are used instead (set HERD_NATIVE=0 to choose
them anyway).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("llamaherd.native")
KERNELS = Path(__file__).with_name("kernels")
SOURCES = [KERNELS / "blockmm.c", KERNELS / "decode.c", KERNELS / "kquant.c"]  # compiled together; they include simd.h, panel.h
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cache_dir() -> Path:
    """`$HERD_CACHE/kernels`, else ~/.cache/llamaherd/kernels (`settings` is below every layer)."""
    from .. import settings

    return settings.cache() / "kernels"


def _torch_omp() -> list[str]:
    """Link flags for the OpenMP runtime bundled with torch (so there is one runtime, not two)."""
    lib = Path(torch.__file__).parent / "lib"
    if (lib / "libgomp.so.1").exists():
        return [f"-L{lib}", "-l:libgomp.so.1", f"-Wl,-rpath,{lib}"]
    return []


def _build() -> ctypes.CDLL | None:
    from .. import settings

    if not settings.native() or not torch.backends.cpu.get_cpu_capability():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.info("no C compiler: using torch's quantized kernels")
        return None
    flags = FLAGS + _torch_omp()
    code = b"".join(p.read_bytes() for p in [*SOURCES, *sorted(KERNELS.glob("*.h"))])
    key = hashlib.sha256(code + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"herd-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("building the native kernel failed, using torch's kernels:\n%s", proc.stderr[-2000:])
                return None
            os.replace(out, target)  # atomic: a concurrent build ends with the same file
    lib = ctypes.CDLL(str(target))
    if not lib.block_mm_simd():  # built without AVX2/FMA/F16C: torch's kernels are faster
        return None
    lib.herd_set_threads.argtypes = [ctypes.c_int]
    lib.block_mm.restype = None
    lib.block_mm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.block_mm_has_panel.argtypes = [ctypes.c_int]
    lib.kq_has_panel.argtypes = [ctypes.c_int]
    lib.block_dequantize.restype = None
    lib.block_dequantize.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.rows8_repack.restype = None
    lib.rows8_repack.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.rows8_dequantize.restype = None
    lib.rows8_dequantize.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.block_mm_dense.restype = None
    lib.block_mm_dense.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.kq_mixed.restype = ctypes.c_int
    lib.kq_mixed.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.kq_rows_dequantize.restype = None
    lib.kq_rows_dequantize.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    lib.kq_repack.restype = ctypes.c_int
    lib.kq_repack.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 2 + [ctypes.c_int]
    lib.kq_force_scalar.restype = None
    lib.kq_force_scalar.argtypes = [ctypes.c_int]
    lib.herd_decode_scratch.restype = ctypes.c_int64
    lib.herd_decode_scratch.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.herd_decode.restype = None
    lib.herd_decode.argtypes = ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 4
                                + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p])
    lib.herd_final_norm.restype = None
    lib.herd_final_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    return lib


@cache
def library() -> ctypes.CDLL | None:
    try:
        return _build()
    except OSError as e:  # an unwritable cache, a library that does not load
        log.warning("native kernel unavailable (%s): using torch's kernels", e)
        return None


def available() -> bool:
    return library() is not None


_thread = threading.local()


def _match_torch_threads() -> None:
    """Give this thread's OpenMP team torch's thread count (see herd_set_threads in blockmm.c):
    torch.set_num_threads, called on the main thread, governs the kernels on every thread."""
    n = torch.get_num_threads()
    if getattr(_thread, "n", None) != n:
        library().herd_set_threads(n)
        _thread.n = n


def _check_cpu(raw: torch.Tensor) -> None:
    """The kernels read blocks in the CPU's memory: elsewhere, a clear error (not a device pointer in C)."""
    if raw.device.type != "cpu":
        raise ValueError("the native kernels read blocks on the CPU (a model repacked for them stays there)")


def block_mm(x: torch.Tensor, raw: torch.Tensor, qtype: int, n: int | None = None) -> torch.Tensor:
    """x (M, K) @ W^T, W (N, K) given by its GGUF blocks: raw (N, K/32 * block bytes) uint8 of type
    Q4_0, Q4_1 or Q8_0 (ggml type ids 2, 3, 8), or of kernels/kquant.c's types (then `n` = N where
    raw is a mixed projection's flat bytes). Returns (M, N) float32.

    The activations are quantized to int16 blocks inside (see kernels/blockmm.c).
    """
    _match_torch_threads()
    x = x.float().contiguous()
    M, K = x.shape
    N = raw.shape[0] if n is None else n
    y = torch.empty(M, N, dtype=torch.float32)
    _check_cpu(raw)
    scratch = torch.empty(2 * M * K + 8 * M * (K // 32), dtype=torch.uint8)  # int16 codes, scales, sums
    library().block_mm(x.data_ptr(), raw.data_ptr(), scratch.data_ptr(), y.data_ptr(), M, N, K, qtype)
    return y


def has_panel(qtype: int) -> bool:
    """Whether many rows of this kernel type go through blockmm.c's int16 panel (Q4_0, Q4_1, Q8_0
    repacked eight rows at a time), a prompt's too, to decoding's bits."""
    return bool(library().block_mm_has_panel(qtype))


def kq_has_panel(qtype: int) -> bool:
    """Whether many rows of this kernel type go through kquant.c's int16 panel (its types repacked
    eight rows at a time, mixed projections of them too), a prompt's too, to decoding's bits."""
    return bool(library().kq_has_panel(qtype))


def block_mm_dense(x: torch.Tensor, raw: torch.Tensor, qtype: int, n: int | None = None) -> torch.Tensor:
    """As `block_mm`, in float32: the weights expanded exactly, the activations not rounded (see
    kernels/blockmm.c). Faster from a few dozen rows on; N must be a multiple of 16 (any N for
    kernels/kquant.c's types). Not for Q4_0 / Q4_1 / Q8_0 repacked eight rows at a time: their
    many rows go through `block_mm`'s int16 panel, faster than this."""
    if has_panel(qtype):
        raise ValueError(f"kernel type {qtype}: repacked Q4_0/Q4_1/Q8_0 rows have no float32 path (use block_mm)")
    _match_torch_threads()
    x = x.float().contiguous()
    M, K = x.shape
    N = raw.shape[0] if n is None else n
    y = torch.empty(M, N, dtype=torch.float32)
    library().block_mm_dense(x.data_ptr(), raw.data_ptr(), y.data_ptr(), M, N, K, qtype)
    return y


def block_dequantize(raw: torch.Tensor, qtype: int, K: int) -> torch.Tensor:
    """The float32 weight (N, K) of N rows of GGUF blocks (Q4_0, Q4_1 or Q8_0), bit-exact with
    gguf's dequantization (and `ggml.dequantize`), ~20x as fast as the latter."""
    _match_torch_threads()
    if qtype in KQUANT_TYPES:
        return kq_rows(raw, None, qtype, K, raw.shape[0])
    out = torch.empty(raw.shape[0], K, dtype=torch.float32)
    library().block_dequantize(raw.data_ptr(), out.data_ptr(), raw.shape[0], K, qtype)
    return out


# -- the other block types (kernels/kquant.c): block_mm and block_mm_dense hand them over --------

KQUANT_TYPES = (6, 7, 12, 13, 14, 0, 1, 30)  # Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, and F32, F16, BF16 (ggml's type ids)


def mixed_type(parts: list[tuple]) -> int:
    """The kernel type of a fused projection whose parts, each (rows, ggml type) or (rows, ggml type,
    byte offset), differ in type or lie where a file holds them: their rows stacked, each part's
    bytes at its offset from the projection's first byte, or else after the last part's
    (kernels/kquant.c `kq_mixed`)."""
    rows = (ctypes.c_int64 * len(parts))(*(p[0] for p in parts))
    types = (ctypes.c_int32 * len(parts))(*(int(p[1]) for p in parts))
    offsets = (ctypes.c_int64 * len(parts))(*(p[2] for p in parts)) if len(parts[0]) > 2 else None
    kind = library().kq_mixed(len(parts), rows, types, offsets)
    if kind < 0:
        raise ValueError(f"no native kernel for a projection of parts {parts}")
    return kind


KQ_R8 = 200  # kernel type KQ_R8 + t: rows of ggml type t repacked eight at a time by `kq_repack`
KQ_REPACKABLE = (2, 3, 6, 7, 8, 12, 13, 14)  # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K


def kq_repack(raw: torch.Tensor, parts: list[tuple], K: int) -> int | None:
    """Repack a kernels/kquant.c projection's rows eight at a time, in place (kquant.c `kq_repack`:
    the same bytes in another order, so the file's pages they were read from are replaced, not
    doubled). `parts`: its parts as `mixed_type` takes them, or one (rows, ggml type) for a plain
    projection. Returns its new kernel type, or None (nothing changed) when a part's rows are not
    a multiple of 8 or its type is not one of KQ_REPACKABLE."""
    if any(p[0] % 8 or int(p[1]) not in KQ_REPACKABLE for p in parts) or not raw.is_contiguous():
        return None
    mixed = len(parts) > 1 or len(parts[0]) > 2  # a plain projection is one (rows, type)
    _match_torch_threads()
    if library().kq_repack(raw.data_ptr(), sum(p[0] for p in parts), K,
                           mixed_type(parts) if mixed else int(parts[0][1])) < 0:
        return None
    repacked = [(p[0], KQ_R8 + int(p[1]), *p[2:]) for p in parts]
    return mixed_type(repacked) if mixed else KQ_R8 + int(parts[0][1])


def kq_rows(raw: torch.Tensor, ids: torch.Tensor | None, kernel_type: int, K: int, n_rows: int) -> torch.Tensor:
    """Rows `ids` (None: all `n_rows`) of a kquant.c projection as float32 (n, K), bit-exact with
    gguf's dequantization."""
    _check_cpu(raw)
    _match_torch_threads()
    raw = raw.contiguous()
    if ids is not None:
        ids = ids.to(torch.int64).contiguous()
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < n_rows):
            raise IndexError(f"row ids outside 0..{n_rows - 1}")
    n = n_rows if ids is None else ids.numel()
    out = torch.empty(n, K, dtype=torch.float32)
    library().kq_rows_dequantize(raw.data_ptr(), None if ids is None else ids.data_ptr(), n, out.data_ptr(), K,
                                 kernel_type)
    return out


def rows8_repack(raw: torch.Tensor, qtype: int, K: int) -> torch.Tensor:
    """`linear.repack_rows8` in C: rows of GGUF blocks (N a multiple of 8) in tile8's layout, in
    place (the same bytes reordered: a file's pages are replaced, not doubled). Returns raw."""
    if not raw.is_contiguous():
        raise ValueError("rows8_repack needs contiguous rows")
    library().rows8_repack(raw.data_ptr(), raw.data_ptr(), raw.shape[0], K, qtype)
    return raw


def rows8_dequantize(packed: torch.Tensor, ids: torch.Tensor, kernel_type: int, K: int) -> torch.Tensor:
    """Rows `ids` of weights repacked eight rows at a time (linear.repack_rows8; kernel_type: ggml's
    type id + 100) as float32 (n, K), bit-exact with gguf's dequantization of the original rows."""
    ids = ids.to(torch.int64).contiguous()
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < packed.shape[0]):
        raise IndexError(f"row ids outside 0..{packed.shape[0] - 1}")
    out = torch.empty(ids.numel(), K, dtype=torch.float32)
    library().rows8_dequantize(packed.data_ptr(), ids.data_ptr(), ids.numel(), out.data_ptr(), K, kernel_type)
    return out


# -- the whole decode step (kernels/decode.c) -------------------------------------------------

class _Layer(ctypes.Structure):
    _fields_ = [("attention_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("wqkv", ctypes.c_void_p), ("wo", ctypes.c_void_p), ("w13", ctypes.c_void_p), ("w2", ctypes.c_void_p),
                ("wqkv_type", ctypes.c_int32), ("wo_type", ctypes.c_int32), ("w13_type", ctypes.c_int32),
                ("w2_type", ctypes.c_int32), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p)]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int64), ("dim", ctypes.c_int64), ("n_heads", ctypes.c_int64),
                ("n_kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("hidden", ctypes.c_int64),
                ("max_seq", ctypes.c_int64), ("eps", ctypes.c_float), ("kv_type", ctypes.c_int32),
                ("layers", ctypes.POINTER(_Layer)), ("norm", ctypes.c_void_p), ("output", ctypes.c_void_p),
                ("output_type", ctypes.c_int32), ("vocab", ctypes.c_int64)]


# The KV cache's element types kernels/decode.c stores and reads (llama.cpp's --cache-type-k/v), by
# ggml's type ids; q8_0 is a uint8 tensor of ggml Q8_0 blocks, head_dim / 32 * 34 bytes a position.
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


def kv_cache_type(cache) -> str:
    """The element type of a KV cache made by `engine.kvcache` (see KV_TYPES)."""
    return {torch.float32: "f32", torch.float16: "f16", torch.uint8: "q8_0"}[cache.k.dtype]


# One description of the model's blocks per KV cache: a new cache (`setup_cache`) gets a new one.
# Keyed weakly by the first layer's cache; the description holds raw pointers only, so the
# tensors it points to are kept alive by the model and its caches, not by it.
_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _describe(model) -> _Model:
    """The ctypes description of `model`'s blocks for kernels/decode.c. The caller has checked that
    it applies (`engine.runner.make_runner`): every matmul of every block a fused layer of GGUF
    blocks (`linear.BlockLinear`: `.raw`, `.kernel_type`), the norms float32 on the CPU, the KV cache
    one of KV_TYPES there."""
    args = model.args
    layers = (_Layer * args.n_layers)()
    for out, layer in zip(layers, model.layers):
        attn, ffn = layer.attention, layer.feed_forward
        mats = [attn.wqkv, attn.wo, ffn.w13, ffn.w2]
        norms, kv = [layer.attention_norm.weight, layer.ffn_norm.weight], [attn.cache.k, attn.cache.v]
        if any(t.dtype != torch.float32 for t in norms) or any(t.dtype not in (torch.float32, torch.float16, torch.uint8)
                                                                for t in kv) \
                or any(not t.is_contiguous() or t.device.type != "cpu" for t in norms + kv):
            raise ValueError("the native decoder needs float32 norms and an f32, f16 or q8_0 KV cache on the CPU")
        out.attention_norm, out.ffn_norm, out.k, out.v = (t.data_ptr() for t in norms + kv)
        out.wqkv, out.wo, out.w13, out.w2 = (w.raw.data_ptr() for w in mats)
        out.wqkv_type, out.wo_type, out.w13_type, out.w2_type = (w.kernel_type for w in mats)
    desc = _Model(args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim,
                  model.cache_len, args.norm_eps, KV_TYPES[kv_cache_type(model.layers[0].attention.cache)], layers)
    desc._layers = layers  # keep the array alive with the description
    if _output_folds(model):
        desc.norm, desc.output = model.norm.weight.data_ptr(), model.output.raw.data_ptr()
        desc.output_type, desc.vocab = model.output.kernel_type, model.output.out_features
    return desc


def _output_folds(model) -> bool:
    """Whether a decode step's final norm and output projection run inside kernels/decode.c's call
    (one parallel region a token, not a second one for the output): the output a plain `BlockLinear`
    (or its refined form: the refinement stays in torch), the norm float32, and the kernel's copy of
    torch's norm (`aten_rms_norm`) giving torch's bits on this machine."""
    from .linear import BlockLinear, RefinedBlockLinear

    out, norm = model.output, model.norm
    return (type(out) in (BlockLinear, RefinedBlockLinear) and out.raw.device.type == "cpu" and out.raw.is_contiguous()
            and norm.weight.dtype == torch.float32 and norm.weight.is_contiguous()
            and _norm_matches_torch(model.args.dim, model.args.norm_eps))


@cache
def _norm_matches_torch(dim: int, eps: float) -> bool:
    """Whether kernels/decode.c's `aten_rms_norm` equals torch's F.rms_norm to the bit on rows of
    this width (it replays ATen's summation order for AVX2; another torch or instruction set may sum
    in another order: then torch's norm is kept)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, dim, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    w = torch.rand(dim, generator=g) * 2
    out = torch.zeros_like(x)
    library().herd_final_norm(x.data_ptr(), w.data_ptr(), out.data_ptr(), 64, dim, eps)
    same = torch.equal(out, torch.nn.functional.rms_norm(x, (dim,), w, eps=eps))
    if not same:  # correct either way, but a token pays a second parallel region: say so once
        log.info("torch's RMS norm sums in another order here: the output projection runs after the native call")
    return same


def shapes_supported(args) -> bool:
    """Whether kernels/decode.c handles a model of these dimensions (the prompt matmuls compute 16
    output features at a time; the SIMD loops take 8 or 32 inputs at a time)."""
    return not (args.head_dim % 8 or args.dim % 32 or args.hidden_dim % 32
                or (args.n_heads + 2 * args.n_kv_heads) * args.head_dim % 16)


def decoder(model) -> _Model:
    """The native description of `model` with its current KV cache (see `_describe`)."""
    cache = model.layers[0].attention.cache
    if cache is None:
        raise ValueError("the native decoder needs the KV cache set up (setup_cache)")
    if cache not in _decoders:
        _decoders[cache] = _describe(model)
    return _decoders[cache]


def _run(model, tokens: list[int], positions: list[int], rows: list[int], dense: bool,
         logits: torch.Tensor | None = None, keep: list[int] | None = None) -> torch.Tensor:
    """The final hidden states (B, dim) of kernels/decode.c run over `tokens` at `positions`, keys
    and values written into KV-cache `rows`. With `logits` (B, vocab) given (and the output folded
    in: `_output_folds`), the states come back normalised and the output projection fills `logits`.
    With `keep` (ascending indices of the rows wanted, a prompt's last), every row's keys and values
    are stored but only the kept rows' states (len(keep), dim) come back, the last block computed
    for them alone: the same bits, ~1/n_layers less work."""
    desc = decoder(model)
    n_out = len(tokens) if keep is None else len(keep)
    if logits is not None and not (desc.output and logits.dtype == torch.float32 and logits.is_contiguous()
                                   and tuple(logits.shape) == (n_out, desc.vocab)):
        raise ValueError("logits must be a contiguous float32 (rows out, vocab) tensor, and the output folded in")
    n_rows, _, n_positions, _ = model.layers[0].attention.cache.k.shape
    if not (0 <= min(positions) <= max(positions) < n_positions and 0 <= min(rows) <= max(rows) < n_rows):
        raise IndexError(f"decode at positions {positions} of rows {rows}: outside the KV cache")
    _match_torch_threads()
    x = model.tok_embeddings(torch.tensor(tokens)).float().contiguous()  # (B, dim), updated in place
    if max(positions) >= model.rope.shape[0]:
        raise IndexError(f"position {max(positions)} is beyond the RoPE table ({model.rope.shape[0]} positions)")
    # Every tensor whose address goes to C is named here, so that it lives until the call returns.
    rows_t, pos_t, rope = torch.tensor(rows), torch.tensor(positions), model.rope.contiguous()
    keep_t = None if keep is None else torch.tensor(keep, dtype=torch.int64)
    if keep_t is not None and not (keep_t.numel() and 0 <= keep[0] and keep[-1] < len(tokens)
                                   and bool((keep_t[1:] > keep_t[:-1]).all())):
        raise ValueError("keep must be ascending row indices of the call")
    scratch = torch.empty(library().herd_decode_scratch(ctypes.byref(desc), len(tokens), max(positions)),
                          dtype=torch.uint8)
    library().herd_decode(ctypes.byref(desc), x.data_ptr(), len(tokens), rows_t.data_ptr(), pos_t.data_ptr(),
                          rope.data_ptr(), scratch.data_ptr(), int(dense), None if logits is None else logits.data_ptr(),
                          n_out, None if keep_t is None else keep_t.data_ptr())
    return x if keep is None else x[:n_out]


@torch.inference_mode()
def decode(model, tokens: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
    """The next-token logits (B, V) of one decode step run by kernels/decode.c — tokens fed at
    `positions`, keys and values written into KV-cache `rows`. Each row is computed exactly as if
    it ran alone (so consecutive tokens of one row check guesses exactly).

    Where the output folds in (`_output_folds`) the final norm and the output projection run in the
    same native call, to the same bits as `model.output(model.norm(...))`; a refined output's
    refinement (`linear.refine_top`) follows in torch."""
    from .linear import RefinedBlockLinear, refine_top

    if not decoder(model).output:
        return model.output(model.norm(_run(model, tokens, positions, rows, dense=False)))
    out = model.output
    logits = torch.empty(len(tokens), out.out_features, dtype=torch.float32)
    h = _run(model, tokens, positions, rows, dense=False, logits=logits)
    return refine_top(logits, h, out.rows, out.refine) if type(out) is RefinedBlockLinear else logits


PROMPT_ROWS = 256  # prompt tokens a call at most: enough to keep the prompt matmuls busy, little scratch
DENSE_ROWS = 64  # the prompt (dense) path's unit (and the native runner's reuse unit)


@torch.inference_mode()
def prefill(model, tokens: list[int], start_pos: int, row: int = 0) -> torch.Tensor:
    """Run a prompt through kernels/decode.c into KV-cache `row` from `start_pos`; the logits (V,)
    after its last token.

    Positions in whole aligned blocks of DENSE_ROWS go through the prompt (dense) path, the
    prompt's last, partial block (and a short prompt) through decoding's. For Q4_0, Q4_1 and Q8_0
    layers, and the other block types repacked at load, both are int16 matmuls to the same bits
    (kernels/blockmm.c, kernels/kquant.c). Both compute every token as if it ran alone, so a prompt
    resumed after a cached prefix that ends on a block boundary gets the numbers it gets from
    scratch, to the bit.
    """
    return prefill_many(model, [(tokens, start_pos, row)])[0]


@torch.inference_mode()
def prefill_many(model, prompts: list[tuple[list[int], int, int]], dense: bool = False) -> torch.Tensor:
    """`prefill` for several prompts at once, each (tokens, start position, KV-cache row), their rows
    sharing the calls (several short prompts cost little more than one); the logits (n, V) after
    each one's last token. Every token gets the numbers it gets alone.

    dense: every token through the prompt path, the partial blocks too. For many prompts at once
    (scoring), where the calls have many rows whatever each prompt's length; a token's numbers
    then depend on neither the batch nor where its prompt is split (for a layer in the file's
    layout, float32 there, they differ in the int16 rounding from a tail's without it).
    """
    # prompt-path rows, then decoding's: (tokens, positions, cache rows, prompt index) as flat lists
    # of ints (a tuple a token would keep Python's garbage collector busy over long prompts)
    dense_rows, tail = ([], [], [], []), ([], [], [], [])
    for i, (tokens, start, row) in enumerate(prompts):
        end = start + len(tokens)
        split = len(tokens) if dense else min(max(end // DENSE_ROWS * DENSE_ROWS - start, 0), len(tokens))
        for group, a, b in ((dense_rows, 0, split), (tail, split, len(tokens))):
            group[0].extend(tokens[a:b])
            group[1].extend(range(start + a, start + b))
            group[2].extend([row] * (b - a))
            group[3].extend([i] * (b - a))
    last = {}
    for group, is_dense in ((dense_rows, True), (tail, False)):  # a prompt's later rows attend to its earlier ones
        for at in range(0, len(group[0]), PROMPT_ROWS):
            tokens, positions, rows, owners = (part[at:at + PROMPT_ROWS] for part in group)
            # only each prompt's last row of the call is wanted (the last one seen is the prompt's last)
            keep = [k for k in range(len(owners)) if k + 1 == len(owners) or owners[k + 1] != owners[k]]
            x = _run(model, tokens, positions, rows, dense=is_dense, keep=keep)
            last.update(zip((owners[k] for k in keep), x))
    return model.output(model.norm(torch.stack([last[i] for i in range(len(prompts))])))
