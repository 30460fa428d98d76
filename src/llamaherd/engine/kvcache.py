"""KV-cache memory that follows use: a row costs memory for the positions it holds, not the capacity.

The scheduler's cache is one tensor per layer of `n_rows` rows × `capacity` positions (the layout
the attention code and the native kernel index). Grown for every row at once with `torch.zeros`,
one long request made every row pay for its context: a 4,000-token prompt took a 16-row server
from 0.5 to 3.4 GB, kept for as long as the model stayed loaded.

On the CPU the cache is instead mapped from anonymous memory (`mmap`): the kernel gives a page
(4 KB) only when it is first written, so each row holds memory for the positions it has written,
in pages — one long request commits one row's worth. When a row is given back, the pages past
the prefix it keeps for reuse are returned to the system (`MADV_DONTNEED`; they read as zeros
again). Nothing is read that was not written first (attention reads positions 0..pos of its own
row), so the lazily zero pages are never a correctness matter, only a memory one.

`bytes_per_position` is what one position of one row costs over all layers: the unit of the
engine's memory accounting (`Engine`'s admission against HERD_MAX_MEMORY).

Element types (`kv_cache_type`, llama.cpp's --cache-type-k/v, Ollama's OLLAMA_KV_CACHE_TYPE):
"f32"; "f16" (half the memory and the bandwidth a long context's attention reads; a 16-bit float
model keeps its own dtype); "q8_0", ggml's Q8_0 blocks (34 bytes per 32 values, a uint8 tensor
(rows, K, capacity, Dh / 32 * 34)), which only kernels/decode.c reads and writes.
"""

from __future__ import annotations

import math
import mmap

import torch

PAGE = mmap.PAGESIZE


KV_CACHE_TYPES = ("f32", "f16", "q8_0")


def cache_dtype(model, kv_type: str) -> torch.dtype:
    """The tensor dtype of a `kv_type` cache for `model`."""
    if kv_type == "q8_0":
        return torch.uint8
    if kv_type == "f16":
        return model.norm.weight.dtype if model.norm.weight.element_size() == 2 else torch.float16
    return torch.float32


def position_width(head_dim: int, kv_type: str) -> int:
    """Elements of one position of one KV head: head_dim, or its Q8_0 blocks' bytes."""
    return head_dim // 32 * 34 if kv_type == "q8_0" else head_dim


def bytes_per_position(model, kv_type: str | None = None) -> int:
    """KV-cache bytes of one position of one row, keys and values of every layer, for a `kv_type`
    cache (default: the model's cache as it is, else f32)."""
    args = model.args
    cache = model.layers[0].attention.cache
    if kv_type is None and cache is not None:
        return args.n_layers * 2 * args.n_kv_heads * cache.k.shape[-1] * cache.k.element_size()
    kv_type = kv_type or "f32"
    size = torch.empty((), dtype=cache_dtype(model, kv_type)).element_size()
    return args.n_layers * 2 * args.n_kv_heads * position_width(args.head_dim, kv_type) * size


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, mmap.mmap]:
    """A zero tensor on anonymous private memory, committed page by page as it is written, and its
    mapping (for `release`). The tensor keeps the mapping alive."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(nbytes, PAGE), flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape)).view(shape), buf


def setup_lazy_cache(model, n_rows: int, capacity: int, kv_type: str = "f32") -> None:
    """`model.setup_cache(n_rows, capacity)` on lazily committed memory (CPU only), of `kv_type`."""
    from ..model import KVCache

    args = model.args
    dtype = cache_dtype(model, kv_type)
    shape = (n_rows, args.n_kv_heads, capacity, position_width(args.head_dim, kv_type))
    for layer in model.layers:
        cache = KVCache(0, 0, args.n_kv_heads, args.head_dim, dtype, model.norm.weight.device)
        cache.k, kbuf = lazy_zeros(shape, dtype)  # assigning a registered buffer's name replaces it
        cache.v, vbuf = lazy_zeros(shape, dtype)
        cache.mappings = (kbuf, vbuf)
        layer.attention.cache = cache
    if model.rope.shape[0] < capacity:
        model.init_rope(capacity)


def is_lazy(model) -> bool:
    cache = model.layers[0].attention.cache
    return cache is not None and getattr(cache, "mappings", None) is not None


def release(model, row: int, keep: int) -> None:
    """Give back the memory of `row`'s positions from `keep` on (whole pages only) to the system;
    they read as zeros afterwards. A no-op for a cache that is not lazy."""
    if not is_lazy(model):
        return
    cache = model.layers[0].attention.cache
    _, n_heads, capacity, width = cache.k.shape
    size = cache.k.element_size() * width  # bytes per position of one head
    for layer in model.layers:
        for buf in layer.attention.cache.mappings:
            for head in range(n_heads):
                span = (row * n_heads + head) * capacity * size  # this head's positions of this row
                start = -(-(span + keep * size) // PAGE) * PAGE
                end = span + capacity * size
                if end - start >= PAGE:
                    buf.madvise(mmap.MADV_DONTNEED, start, (end - start) // PAGE * PAGE)
