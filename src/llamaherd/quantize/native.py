"""The native block-quantized matmul (kernels/blockmm.c), built on first use, called through ctypes.

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
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("llamaherd.native")
SOURCE = Path(__file__).with_name("kernels") / "blockmm.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _cache_dir() -> Path:
    from ..fetch import cache_dir

    return cache_dir() / "kernels"


def _torch_omp() -> list[str]:
    """Link flags for the OpenMP runtime bundled with torch (so there is one runtime, not two)."""
    lib = Path(torch.__file__).parent / "lib"
    if (lib / "libgomp.so.1").exists():
        return [f"-L{lib}", "-l:libgomp.so.1", f"-Wl,-rpath,{lib}"]
    return []


def _build() -> ctypes.CDLL | None:
    if os.environ.get("HERD_NATIVE", "1") == "0" or not torch.backends.cpu.get_cpu_capability():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.info("no C compiler: using torch's quantized kernels")
        return None
    flags = FLAGS + _torch_omp()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"blockmm-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("building the native kernel failed, using torch's kernels:\n%s", proc.stderr[-2000:])
                return None
            os.replace(out, target)  # atomic: a concurrent build ends with the same file
    lib = ctypes.CDLL(str(target))
    if not lib.block_mm_simd():  # built without AVX2/FMA/F16C: torch's kernels are faster
        return None
    lib.block_mm.restype = None
    lib.block_mm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
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


def block_mm(x: torch.Tensor, raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """x (M, K) @ W^T, W (N, K) given by its GGUF blocks: raw (N, K/32 * block bytes) uint8 of type
    Q4_0, Q4_1 or Q8_0 (ggml type ids 2, 3, 8). Returns (M, N) float32.

    The activations are quantized to int16 blocks inside (see kernels/blockmm.c).
    """
    x = x.float().contiguous()
    M, K = x.shape
    y = torch.empty(M, raw.shape[0], dtype=torch.float32)
    scratch = torch.empty(2 * M * K + 8 * M * (K // 32), dtype=torch.uint8)  # int16 codes, scales, sums
    library().block_mm(x.data_ptr(), raw.data_ptr(), scratch.data_ptr(), y.data_ptr(), M, raw.shape[0], K, qtype)
    return y
