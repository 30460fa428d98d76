"""Runners: one object per loaded model and backend, chosen once at load (`make_runner`).

The batch loop (`scheduler.Scheduler`) and the single-stream loop (`generate.generate`) ask a
runner for the few things they need, and nothing else touches the model:

    allocate(n_rows, capacity)  a KV cache of n_rows sequences x capacity positions (kept if it grows)
    fork(src, dsts, n)          copy a row's first n positions into other rows (samples share a prompt)
    prefill(prompts)            run prompt pieces (tokens, start position, row); logits after each
    decode(tokens, positions, rows)  one token per row (or consecutive tokens of one row): logits
    logits(tokens) / embed(tokens)   teacher-forced logits, and hidden states, without the cache
    reuse_unit                  the piece of a prompt a kept prefix must end on (see Scheduler)
    speculates                  whether guessed tokens can be checked in one step, exactly

Two backends:

- `NativeRunner`: models whose block matmuls are all GGUF blocks on a CPU run kernels/decode.c
  (`quantize.native`): every row of a step computed exactly as if alone, prompts in blocks of rows;
- `TorchRunner`: every other model (float weights, torch's int4/int8 kernels, CUDA) runs the torch
  modules; its decode step is row-exact too (`decode.decode_step`), or, compiled, one static-shape
  step over all rows (`static.StaticStep`: a CUDA graph on CUDA).
"""

from __future__ import annotations

import logging

import torch

from ..quantize import native
from . import kvcache
from .decode import decode_step
from .static import GraphedStep, StaticStep, step_inputs

log = logging.getLogger("llamaherd.engine")

PREFILL_CHUNK = 512  # prompt tokens per call of the scheduler's prefill (and per forward on a GPU)
CPU_PREFILL_CHUNK = 64  # per forward on a CPU: a chat's earlier turns are reused in units this small


class Runner:
    """What the loops need from a model (see the module's docstring)."""

    reuse_unit: int
    speculates: bool = False
    kv_cache_types = ("f32", "f16")  # the KV-cache element types this runner reads (see kvcache)

    def __init__(self, model, kv_cache_type: str | None = None):
        """Args:
            kv_cache_type: "f32", "f16" or "q8_0" (default HERD_KV_CACHE_TYPE); one this runner
                cannot read becomes "f16", with a warning (as Ollama does).
        """
        from .. import settings

        self.model = model
        self.device = model.device
        self.args = model.args
        kv_type = kv_cache_type or settings.kv_cache_type(default=self.default_kv_cache_type)
        if kv_type not in kvcache.KV_CACHE_TYPES:
            raise ValueError(f"kv_cache_type must be one of {', '.join(kvcache.KV_CACHE_TYPES)}, got {kv_type!r}")
        if kv_type not in self.kv_cache_types:
            log.warning("a %s KV cache needs the native CPU kernels; using f16", kv_type)
            kv_type = "f16"
        self.kv_cache_type = kv_type

    # When neither the caller nor HERD_KV_CACHE_TYPE names one. Not f16 (yet): with it SmolLM2's
    # native path left the float32 reference's greedy tokens at one test prompt (test_generate).
    default_kv_cache_type = "f32"

    # -- the KV cache -----------------------------------------------------------------------

    @property
    def n_rows(self) -> int:
        cache = self.model.layers[0].attention.cache
        return 0 if cache is None else cache.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.model.cache_len

    def allocate(self, n_rows: int, capacity: int, lengths: list[int] | None = None) -> bool:
        """Make the KV cache hold n_rows rows of at least `capacity` positions. Growing keeps what
        the rows hold (the first `lengths[row]` positions of each row, default all); another number
        of rows (or no cache yet) starts empty. Returns whether it starts empty (then no row holds
        anyone's keys). On the CPU the cache is lazily committed memory (`kvcache`): a row costs
        memory for the positions it has written, not the capacity."""
        cache = self.model.layers[0].attention.cache
        same = cache is not None and self.n_rows == n_rows \
            and cache.k.dtype == kvcache.cache_dtype(self.model, self.kv_cache_type)
        if same and self.capacity >= capacity:
            return False
        old = [(layer.attention.cache.k, layer.attention.cache.v) for layer in self.model.layers] if same else None
        if self.device.type == "cpu":
            kvcache.setup_lazy_cache(self.model, n_rows, capacity, self.kv_cache_type)
        else:
            self.model.setup_cache(n_rows, capacity, dtype=kvcache.cache_dtype(self.model, self.kv_cache_type))
        if old is None:
            return True
        for layer, (k, v) in zip(self.model.layers, old):
            for row, n in enumerate(lengths or [k.shape[2]] * n_rows):  # the rest stays uncommitted
                n = min(n, k.shape[2])
                if n:
                    layer.attention.cache.k[row, :, :n] = k[row, :, :n]
                    layer.attention.cache.v[row, :, :n] = v[row, :, :n]
        return False

    def release(self) -> None:
        """Drop the KV cache."""
        self.model.clear_cache()

    def release_row(self, row: int, keep: int) -> None:
        """Give back the memory of `row`'s positions from `keep` on (a lazily committed cache)."""
        kvcache.release(self.model, row, keep)

    def fork(self, src: int, dsts: list[int], n: int) -> None:
        """Copy the first `n` positions of row `src` into rows `dsts`: K samples of one prompt
        share its prefill (`Scheduler.submit(job, forks=...)`). A copy holds the same bits a prefill
        of the prompt into that row would, so each sample is what it would be alone. Every per-row
        tensor of the cache is copied (keys, values, and whatever a quantized cache keeps per
        position): all are laid out (row, head, position, ...)."""
        for layer in self.model.layers:
            for buf in layer.attention.cache.buffers():
                for dst in dsts:  # plain slice copies: an index_put over a list costs ~5x as much
                    buf[dst, :, :n] = buf[src, :, :n]

    @property
    def bytes_per_position(self) -> int:
        """KV-cache bytes of one position of one row (every layer's keys and values)."""
        return kvcache.bytes_per_position(self.model, self.kv_cache_type)

    def kv_bytes(self, lengths: list[int] | None = None) -> int:
        """Bytes the KV cache holds: the positions rows hold (`lengths`) where it is lazily
        committed, else all of it."""
        cache = self.model.layers[0].attention.cache
        if cache is None:
            return 0
        if lengths is not None and kvcache.is_lazy(self.model):
            return sum(lengths) * self.bytes_per_position
        return len(self.model.layers) * 2 * cache.k.numel() * cache.k.element_size()

    # -- steps ------------------------------------------------------------------------------

    def prefill(self, prompts: list[tuple[list[int], int, int]], dense: bool = False) -> torch.Tensor:
        """Run each (tokens, start position, KV-cache row) into its row; the float32 logits (n, V)
        after each one's last token. Each prompt's numbers are those it gets alone.

        dense: many prompts at once (scoring): the native runner then runs every token through its
        prompt matmuls (`native.prefill_many`), so a prompt's numbers do not depend on where it
        is split either (a shared prefix prefilled once gives the bits of a whole prompt).
        The torch runner ignores it."""
        raise NotImplementedError

    def decode(self, tokens: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        """Feed tokens[i] at positions[i] of row rows[i]; the float32 logits (B, V) on the CPU."""
        raise NotImplementedError

    @torch.inference_mode()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        """Teacher-forced float32 logits (T, V) of a token sequence, without the KV cache."""
        with self._no_cache():
            return self.model(torch.tensor([tokens], device=self.device))[0].float()

    @torch.inference_mode()
    def embed(self, tokens: list[int]) -> torch.Tensor:
        """The final normalised hidden states (T, D), float32, without the KV cache."""
        with self._no_cache():
            return self.model.hidden_states(torch.tensor([tokens], device=self.device))[0].float()

    def _no_cache(self):
        return _CacheSetAside(self.model)


class _CacheSetAside:
    """Run the model's training forward (no KV cache), then give the cache back."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.caches = [layer.attention.cache for layer in self.model.layers]
        self.model.clear_cache()

    def __exit__(self, *exc):
        for layer, cache in zip(self.model.layers, self.caches):
            layer.attention.cache = cache


class NativeRunner(Runner):
    """GGUF-block models on a CPU: kernels/decode.c for prompts and steps."""

    reuse_unit = native.DENSE_ROWS  # where the prompt path's blocks end
    speculates = True  # rows of one step are computed as if alone, so a checked guess is exact

    def __init__(self, model, kv_cache_type: str | None = None):
        # Q8_0 stores a head's values in blocks of 32
        self.kv_cache_types = ("f32", "f16", "q8_0") if model.args.head_dim % 32 == 0 else ("f32", "f16")
        super().__init__(model, kv_cache_type)

    def prefill(self, prompts, dense=False):
        return native.prefill_many(self.model, prompts, dense=dense).float()

    def decode(self, tokens, positions, rows):
        return native.decode(self.model, tokens, positions, rows).float()


class TorchRunner(Runner):
    """The torch modules, on a CPU or a GPU. Prompts run in pieces that end on multiples of
    `reuse_unit`, so a prompt resumed after a kept prefix is computed exactly as from scratch."""

    @property
    def default_kv_cache_type(self) -> str:
        """A 16-bit model's default cache is its own dtype ("f16"), a float32 model's f32."""
        return "f16" if self.model.norm.weight.element_size() == 2 else "f32"

    def __init__(self, model, kv_cache_type: str | None = None, compile: bool | None = None):
        """Args:
            compile: decode with a `torch.compile`d step of static shapes over every row of the
                cache (`static_step`: the server's B slots, or `herd run`'s one row; on CUDA a CUDA
                graph); default HERD_COMPILE, else on CUDA only.
        """
        from .. import settings

        super().__init__(model, kv_cache_type)
        self.reuse_unit = PREFILL_CHUNK if self.device.type == "cuda" else CPU_PREFILL_CHUNK
        self.compile = settings.compile(cuda=self.device.type == "cuda") if compile is None else compile
        self.compile_backend = "inductor"  # tests choose "aot_eager": the same capture, no C++ to build
        self._step = None
        if self.device.type == "cuda":
            model.fuse_projections()  # a GPU step is launch-bound at batch 1: fewer, wider matmuls
            torch.cuda.empty_cache()  # the parts' blocks: too small for the next, wider weight

    @torch.inference_mode()
    def prefill(self, prompts, dense=False):
        out = []
        for tokens, start, row in prompts:
            rows = torch.tensor([row], device=self.device)
            end, pos = start + len(tokens), start
            while pos < end:
                stop = min(end, (pos // self.reuse_unit + 1) * self.reuse_unit)
                x = torch.tensor([tokens[pos - start:stop - start]], device=self.device)
                logits = self.model(x, torch.arange(pos, stop, device=self.device)[None], rows=rows,
                                    n_keys=stop, last_only=True)
                pos = stop
            out.append(logits[0, -1])
        return torch.stack(out).float()

    def decode(self, tokens, positions, rows):
        if self.compile and len(set(rows)) == len(rows):  # one token per row (not checked guesses)
            try:
                return self.static_step(tokens, positions, rows)
            except Exception:  # noqa: BLE001 — no compiler, a GPU inductor cannot build for...
                # The eager step still answers (the same keys and values: a failed step wrote
                # nothing else); the model keeps serving, more slowly.
                log.warning("the compiled decode step failed: decoding eagerly from now on", exc_info=True)
                self.compile, self._step = False, None
        return decode_step(self.model, tokens, positions, rows).float().cpu()

    @torch.inference_mode()
    def static_step(self, tokens: list[int], positions: list[int], rows: list[int]) -> torch.Tensor:
        """The float32 logits (len(rows), V) of tokens[i] fed at positions[i] of row rows[i] (rows
        distinct), by `static.StaticStep` over all the cache's rows, compiled once (fullgraph: no
        Python between its ops; on CUDA one CUDA graph replayed per step, `static.GraphedStep`).
        Shapes are static — every row, the whole cache — so it compiles again only when the cache
        grows. Equal to the eager step within float tolerance (tests/test_compiled.py)."""
        if self._step is None:
            # One compile per cache shape: the cache doubles up to the model's context (~10 sizes, and
            # more for other batch sizes), past dynamo's default of 8 recompiles of one function.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            step = torch.compile(StaticStep(self.model), fullgraph=True, dynamic=False, backend=self.compile_backend)
            self._step = GraphedStep(step) if self.device.type == "cuda" else step
        inputs = step_inputs(self.n_rows, tokens, positions, rows, self.device)
        if isinstance(self._step, GraphedStep):
            logits = self._step(self.model.layers[0].attention.cache.k, inputs)
        else:
            logits = self._step(inputs)
        if rows == list(range(rows[0], rows[0] + len(rows))):  # a slice: no index to copy to the device
            logits = logits[rows[0]:rows[0] + len(rows)]
        else:
            logits = logits[torch.tensor(rows, device=self.device)]
        if self.device.type != "cuda":
            return logits.float()
        # Pinned memory takes the logits (B x V floats) a few times faster than a pageable copy;
        # torch's host allocator keeps the blocks, so a step does not pay for pinning them.
        host = torch.empty(logits.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(logits.float(), non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host

    def release(self) -> None:
        if isinstance(self._step, GraphedStep):
            self._step.reset()  # its graph writes into the cache being dropped
        super().release()


def native_applies(model) -> bool:
    """Whether kernels/decode.c runs `model`: every matmul of every block a fused layer of GGUF
    blocks (none wrapped), float32 norms on a CPU, dimensions it handles, and the kernels built."""
    from ..model import FusedSlice
    from ..quantize.linear import BlockLinear

    def blocks(layer) -> bool:
        attn, ffn = layer.attention, layer.feed_forward
        return (FusedSlice.intact(attn.wqkv, attn.wq, attn.wk, attn.wv) and FusedSlice.intact(ffn.w13, ffn.w1, ffn.w3)
                and all(type(m) is BlockLinear for m in (attn.wqkv, attn.wo, ffn.w13, ffn.w2)))

    return (model.device.type == "cpu" and model.norm.weight.dtype == torch.float32
            and native.shapes_supported(model.args) and all(blocks(layer) for layer in model.layers)
            and native.available())  # asked last: a float model must not build the library


def make_runner(model, kv_cache_type: str | None = None) -> Runner:
    """The runner for `model`, chosen once: native where it applies (`native_applies`), else the
    torch modules. kv_cache_type: see `Runner`."""
    return (NativeRunner if native_applies(model) else TorchRunner)(model, kv_cache_type)
