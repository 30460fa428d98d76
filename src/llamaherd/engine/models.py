"""`Engine`: loaded models and their schedulers, behind an asyncio interface.

- A model is loaded on first use (in a worker thread; concurrent requests for it wait for the one
  load) and gets one `Scheduler`, which every request for it shares.
- After its last request a model stays loaded for `keep_alive` seconds (the request's, else the
  server's default; negative: forever; 0: unload now). A reaper unloads expired idle models.
- Loading a model beyond `max_loaded` models, or beyond `max_memory` bytes, first unloads the
  least recently used idle ones (waiting for one to become idle if none is).
- Requests waiting for a KV-cache row count against `max_queue`; beyond it, `QueueFull` (503).

The context policy (a request's `num_ctx`):
- Unset: `context_length` (HERD_CONTEXT_LENGTH). Above the limit — the model's trained context,
  `max_context` (HERD_MAX_CONTEXT) and what `max_memory` leaves after the weights — it is clamped
  to the limit, with a log line, and the reply's statistics give the context used (`num_ctx`).
- A prompt that does not fit (with a quarter of the context left for the reply) makes the context
  grow to fit it, up to the limit, before it is refused; nothing is cut silently. (A chat longer
  than the limit still drops its oldest messages, as `Llama.fit_chat` does.)
- Memory: a KV-cache row costs what it holds (`kvcache`). Before a request runs, its context
  (prompt + what it may generate, at most num_ctx positions) is reserved against `max_memory`:
  one that can never fit is refused (400), one that fits once others finish gets 503.

Prompts are made here, because they need the model's tokenizer and template: chat messages
(with tools), Ollama's generate prompt (system, template, raw, suffix, context), or token ids.
Embeddings are the mean over the prompt's tokens of the final normalised hidden states
(`Transformer.hidden_states`), L2-normalised; scores are teacher-forced log-probabilities.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import HerdError
from ..generate import SamplingOptions
from ..chat import tools as toolfmt
from ..chat.tools import check_messages
from .scheduler import Job, Scheduler, token_logprob
from .types import (Delta, Done, EmbedRequest, EmbedResult, GenerateRequest, ModelNotFound, QueueFull,
                    RunningModel, ScoreRequest, ScoreResult, Unsupported)

log = logging.getLogger("llamaherd.engine")

# Fill-in-the-middle special tokens (StarCoder / Code Llama style, prefix-suffix-middle order).
FIM_TOKENS = [("<fim_prefix>", "<fim_suffix>", "<fim_middle>"), ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")]


@dataclass
class ModelRef:
    """A model as the store resolves it: where its weights are and its stored defaults."""

    name: str
    path: Path
    digest: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # default options (Modelfile PARAMETER)
    system: str | None = None
    template: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)  # conversation every chat starts with
    details: dict[str, Any] = field(default_factory=dict)
    adapters: list[Path] = field(default_factory=list)  # LoRA adapters (Modelfile ADAPTER), merged at load


@dataclass
class EngineConfig:
    num_parallel: int = 16  # KV-cache rows per model: requests decoded together
    max_queue: int = 512  # requests waiting for a row, over all models, before 503
    max_loaded: int = 3  # models loaded at once (Ollama's default on CPU)
    max_memory: int | None = None  # bytes of weights + KV cache over all models; None: no limit
    keep_alive: float = 300.0  # seconds an idle model stays loaded; < 0: forever
    context_length: int = 4096  # default num_ctx (clipped to the model's)
    max_context: int | None = None  # the largest num_ctx a request gets; None: the model's trained context
    device: str | None = None  # None: cuda if available, else cpu


@dataclass
class Loaded:
    ref: ModelRef
    llm: Any  # a `loader.LoadedModel`
    scheduler: Scheduler
    load_duration: int  # ns
    size: int  # bytes of weights
    keep_alive: float
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    expires_at: float = math.inf  # time.time() at which an idle model is unloaded
    lltok: Any = None  # llguidance tokenizer, made on first structured output
    kv_reserved: int = 0  # bytes of KV cache reserved by the requests in flight (`Engine._admit`)
    num_ctx: int = 0  # the context of the latest request (what /api/ps shows)

    def memory(self) -> int:
        return self.size + self.scheduler.kv_bytes()


def _weights_bytes(model: torch.nn.Module) -> int:
    """The bytes the model's tensors hold, each byte once: tied weights share one tensor, and a
    fused projection mapped from a GGUF file spans the parts between its own (the file's order puts
    wo between wq/wk/wv, w2 between w1/w3), so the union of the [start, end) ranges is summed."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                   for t in list(model.parameters()) + list(model.buffers()) if t.numel())
    total, reach = 0, 0
    for start, end in spans:
        start = max(start, reach)
        if end > start:
            total += end - start
            reach = end
    return total


def max_token_chars(tok) -> int:
    """The most bytes any one token of `tok` stands for. A text of n characters is at least n
    bytes, so it is at least n / max_token_chars tokens: a prompt longer than that many contexts
    is refused before it is tokenized (10 MB took 9.6 s to tokenize, to then be refused)."""
    cached = getattr(tok, "_herd_max_token_chars", None)
    if cached is None:
        cached = max([len(tok.token_bytes(i)) for i in range(tok.n_words)] + [1])
        try:
            tok._herd_max_token_chars = cached
        except AttributeError:  # a tokenizer with __slots__: computed each time (~20 ms)
            pass
    return cached


def check_chars(tok, text: str, tokens: int, what: str = "the prompt") -> None:
    """`HerdError` if `text` is surely more than `tokens` tokens, judged by its length alone."""
    if len(text) > tokens * max_token_chars(tok):
        raise HerdError(f"{what} is {len(text):,} characters, more than fit in {tokens:,} tokens "
                        "(shorten it or raise num_ctx)")


def _trim_by_chars(tok, messages: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """Drop the oldest non-system messages that surely cannot fit in `tokens` with the rest
    (judged by characters, before any tokenizing; `Llama.fit_chat` then drops by tokens)."""
    limit = tokens * max_token_chars(tok)

    def size(m) -> int:
        content = m.get("content")
        return len(content) if isinstance(content, str) else len(str(content or ""))

    total = sum(size(m) for m in messages)
    messages = list(messages)
    while total > limit:
        droppable = [i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"]
        if not droppable:
            raise HerdError(f"the last message is {size(messages[-1]):,} characters with the system prompt, "
                            f"more than fit in {tokens:,} tokens (raise num_ctx or shorten it)")
        total -= size(messages.pop(droppable[0]))
    return messages


class Generation:
    """A running generation: iterate it for `Delta`s and a last `Done`; `cancel()` to stop it."""

    def __init__(self, engine: "Engine", loaded: Loaded, prompt: list[int], load_duration: int,
                 keep_alive: float | None):
        self.engine = engine
        self.loaded = loaded
        self.prompt = prompt
        self.load_duration = load_duration
        self.keep_alive = keep_alive
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job: Job | None = None
        self.num_ctx = 0  # the context the request runs with (after clamping or growing)
        self.reserved = 0  # bytes of KV cache reserved for it
        self._released = False

    @property
    def model(self) -> str:
        return self.loaded.ref.name

    async def __aiter__(self) -> AsyncIterator[Delta | Done]:
        try:
            while True:
                event = await self.queue.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Done):
                    event.load_duration = self.load_duration
                    self.cancel()  # releases the model now, whether or not the consumer iterates on
                    yield event
                    return
                yield event
        finally:
            self.cancel()

    def put(self, events: list[Any]) -> None:
        """Hand events over from the scheduler's thread (through the event loop)."""
        for event in events:
            self.queue.put_nowait(event)

    def token_bytes(self, token: int) -> bytes:
        return self.loaded.llm.tokenizer.token_bytes(token)

    def cancel(self) -> None:
        """Stop generating (idempotent); the KV-cache row is freed on the scheduler's next turn."""
        if self.job is not None and not self.job.finished:
            self.loaded.scheduler.cancel(self.job)
        if not self._released:
            self._released = True
            self.loaded.kv_reserved -= self.reserved
            self.engine._release(self.loaded, self.keep_alive)


class Engine:
    """Loads models by name (through `resolve`) and runs requests on them.

    Args:
        resolve: model name -> `ModelRef`; raises `ModelNotFound` (or `HerdError` for a bad name).
        config: limits and defaults.
        loader: path -> `LoadedModel` (default `LoadedModel.load`); tests may give their own.
    """

    def __init__(self, resolve: Callable[[str], ModelRef], config: EngineConfig | None = None,
                 loader: Callable[[Path], Any] | None = None):
        self.resolve = resolve
        self.config = config or EngineConfig()
        self._loader = loader
        self._models: dict[str, Loaded] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self._idle = asyncio.Event()  # set whenever a model's last request ends
        self._reaper: asyncio.Task | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap())

    async def close(self) -> None:
        if self._reaper:
            self._reaper.cancel()
        for name in list(self._models):
            await self._unload(name)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.time()
            for name, m in list(self._models.items()):
                if m.in_flight == 0 and m.scheduler.n_active == 0 and m.expires_at <= now:
                    log.info("unloading %s (keep_alive expired)", name)
                    await self._unload(name)

    def _load(self, ref: ModelRef) -> Any:
        if self._loader is not None:
            return self._loader(ref.path)
        from .loader import LoadedModel, default_device

        if ref.adapters:  # merged into float weights, as `herd run` does (no quantized fast path)
            from ..export import load_with_adapters

            return load_with_adapters(ref.path, ref.adapters, self.config.device or default_device(), LoadedModel)
        return LoadedModel.load(ref.path, device=self.config.device)

    async def _resolve(self, name: Any) -> ModelRef:
        if not isinstance(name, str) or not name:
            raise HerdError("model is required")
        return await asyncio.to_thread(self.resolve, name)

    async def _acquire(self, name: str, keep_alive: float | None) -> tuple[Loaded, int]:
        """The loaded model (loading it if needed), marked in use; and the load time in ns (0 if
        it was loaded already)."""
        ref = await self._resolve(name)
        load_ns = 0
        while True:
            loaded = self._models.get(ref.name)
            if loaded is not None and loaded.ref.digest == ref.digest:
                break
            if loaded is not None:  # the name now points at other weights (re-created): reload
                await self._wait_idle_and_unload(ref.name)
                continue
            pending = self._loading.get(ref.name)
            if pending is not None:
                await asyncio.shield(pending)
                continue
            future = asyncio.get_running_loop().create_future()
            self._loading[ref.name] = future
            try:
                await self._make_room()
                start = time.perf_counter_ns()
                llm = await asyncio.to_thread(self._load, ref)
                load_ns = time.perf_counter_ns() - start
                max_ctx = llm.args.max_seq_len
                scheduler = Scheduler(llm.runner, n_rows=self.config.num_parallel, max_ctx=max_ctx, name=ref.name)
                loaded = Loaded(ref, llm, scheduler, load_ns, _weights_bytes(llm.model),
                                keep_alive=self.config.keep_alive,
                                num_ctx=min(self.config.context_length, max_ctx))
                self._models[ref.name] = loaded
                future.set_result(None)
            except BaseException as e:
                future.set_exception(e)
                future.exception()  # retrieved: waiters retry (and fail on their own)
                raise
            finally:
                del self._loading[ref.name]
            break
        loaded.in_flight += 1
        loaded.last_used = time.monotonic()
        # Each request sets how long the model stays after it; one without keep_alive gets the
        # server's default again (as Ollama), not what an earlier request asked for.
        loaded.keep_alive = self.config.keep_alive if keep_alive is None else keep_alive
        loaded.expires_at = math.inf
        return loaded, load_ns

    def _release(self, loaded: Loaded, keep_alive: float | None) -> None:
        loaded.in_flight -= 1
        loaded.last_used = time.monotonic()
        loaded.keep_alive = self.config.keep_alive if keep_alive is None else keep_alive
        if loaded.in_flight == 0:
            ka = loaded.keep_alive
            loaded.expires_at = math.inf if ka < 0 else time.time() + ka
            self._idle.set()

    async def _make_room(self) -> None:
        """Unload least recently used idle models until one more fits."""
        while True:
            models = list(self._models.values())
            over_count = len(models) + len(self._loading) > self.config.max_loaded
            over_memory = (self.config.max_memory is not None and models
                           and sum(m.memory() for m in models) >= self.config.max_memory)
            if not (over_count or over_memory) or not models:
                return
            idle = [m for m in models if m.in_flight == 0 and m.scheduler.n_active == 0]
            if idle:
                victim = min(idle, key=lambda m: m.last_used)
                log.info("unloading %s (least recently used)", victim.ref.name)
                await self._unload(victim.ref.name)
                continue
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=1.0)

    async def _wait_idle_and_unload(self, name: str) -> None:
        while (m := self._models.get(name)) is not None and (m.in_flight or m.scheduler.n_active):
            self._idle.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=1.0)
        await self._unload(name)

    async def _unload(self, name: str) -> None:
        loaded = self._models.pop(name, None)
        if loaded is not None:
            await asyncio.to_thread(loaded.scheduler.close)

    # -- the interface the server uses ------------------------------------------------------

    async def load(self, model: str, keep_alive: float | None = None) -> tuple[str, int]:
        """Load `model` (if it is not) and set its keep-alive; keep_alive 0 unloads it instead.
        Returns the model's name and the load time in ns."""
        if keep_alive == 0:
            await self.unload(model)
            return (await self._resolve(model)).name, 0
        loaded, load_ns = await self._acquire(model, keep_alive)
        self._release(loaded, keep_alive)
        return loaded.ref.name, load_ns

    async def unload(self, model: str) -> None:
        """Unload `model` once its requests are done (nothing if it is not loaded)."""
        ref = await self._resolve(model)
        if ref.name in self._models:
            await self._wait_idle_and_unload(ref.name)

    def running(self) -> list[RunningModel]:
        out = []
        for m in sorted(self._models.values(), key=lambda m: -m.last_used):
            expires = m.expires_at if m.in_flight == 0 else (
                math.inf if m.keep_alive < 0 else time.time() + m.keep_alive)
            on_gpu = m.llm.model.norm.weight.device.type != "cpu"
            out.append(RunningModel(m.ref.name, m.ref.digest, m.memory(), expires, m.num_ctx or m.llm.args.max_seq_len,
                                    m.ref.details, size_vram=m.memory() if on_gpu else 0))
        return out

    def _queued(self) -> int:
        """Requests beyond the KV-cache rows, over all models: they wait. Counted from the requests
        the engine has accepted (`in_flight`), not from the scheduler's queue: a request is in
        flight from its acceptance, while its prompt is still being prepared in a thread, so a
        burst cannot slip past the limit before any of it reaches the scheduler."""
        return sum(max(0, m.in_flight - m.scheduler.n_rows) for m in self._models.values())

    async def generate(self, req: GenerateRequest) -> Generation:
        """Start a generation. Errors in the request (bad options, a prompt too long, an unknown
        model, a full queue) are raised here, before anything is streamed."""
        loaded, load_ns = await self._acquire(req.model, req.keep_alive)
        gen = Generation(self, loaded, [], load_ns, req.keep_alive)
        try:
            if self._queued() > self.config.max_queue:  # this request counts itself (no await since _acquire)
                raise QueueFull(f"server busy: {self.config.max_queue} requests are already waiting, "
                                "retry later")
            loop = asyncio.get_running_loop()

            held: list[Delta] = []  # a whole reply's pieces until its end (req.stream False)

            def emit(event: Any) -> None:  # on the scheduler's thread
                if not req.stream and isinstance(event, Delta):
                    held.append(event)
                    return
                events = [*held, event]
                held.clear()
                loop.call_soon_threadsafe(gen.put, events)

            job = await asyncio.to_thread(self._make_job, loaded, req, emit)
            gen.prompt, gen.num_ctx = job.prompt, job.opts.num_ctx
            await self._admit(loaded, job, gen)
            gen.job = job
            loaded.num_ctx = job.opts.num_ctx
            loaded.scheduler.submit(job)
        except BaseException:
            gen.cancel()
            raise
        return gen

    def context_limit(self, loaded: Loaded) -> int:
        """The largest context a request on `loaded` may have: the model's trained context,
        `max_context`, and what `max_memory` leaves after the loaded models' weights."""
        limit = loaded.llm.args.max_seq_len
        if self.config.max_context is not None:
            limit = min(limit, self.config.max_context)
        if self.config.max_memory is not None:
            free = self.config.max_memory - sum(m.size for m in self._models.values())
            limit = min(limit, max(1, free // loaded.llm.runner.bytes_per_position))
        return limit

    def options(self, loaded: Loaded, options: dict[str, Any]) -> SamplingOptions:
        """The request's options over the model's stored ones, checked against the model; a
        num_ctx above `context_limit` is clamped to it (as Ollama clamps to the trained context).
        A large num_predict is fine: generation ends at the context's end anyway."""
        if not isinstance(options, dict):
            raise HerdError("options must be an object")
        merged = {**loaded.ref.params, **options}
        opts = SamplingOptions.from_dict(merged)
        limit = self.context_limit(loaded)
        if opts.num_ctx is None:
            opts.num_ctx = min(self.config.context_length, limit)
        elif opts.num_ctx > limit:
            log.warning("%s: num_ctx %d clamped to %d (the model's context length %d, HERD_MAX_CONTEXT %s, "
                        "memory)", loaded.ref.name, opts.num_ctx, limit, loaded.llm.args.max_seq_len,
                        self.config.max_context or "unset")
            opts.num_ctx = limit
        # torch.Generator.manual_seed takes 64 bits; a larger seed used to fail on the scheduler
        # thread, after the request was accepted, instead of being a 400 here.
        if opts.seed is not None and not -(1 << 63) <= opts.seed < (1 << 64):
            raise HerdError(f"option seed must fit in 64 bits, got {opts.seed}")
        return opts

    def _make_job(self, loaded: Loaded, req: GenerateRequest, emit) -> Job:
        llm, ref = loaded.llm, loaded.ref
        tok = llm.tokenizer
        opts = self.options(loaded, req.options)
        template = req.template if req.template is not None else ref.template
        if req.messages is not None:
            messages = check_messages(req.messages)
            if ref.messages:
                messages = list(ref.messages) + messages
            if ref.system and not any(m["role"] == "system" for m in messages):
                messages.insert(0, {"role": "system", "content": ref.system})
            tools = toolfmt.check_tools(req.tools) if req.tools else None
            messages = _trim_by_chars(tok, messages, opts.num_ctx - opts.num_ctx // 4)  # fit_chat's budget
            messages, template_tools = toolfmt.prepare_messages(
                messages, tools, template if template is not None else tok.chat_template)
            prompt = llm.encode_chat(messages, template, tools=template_tools)
            if not self._grow(loaded, opts, len(prompt)):  # longer than the largest context: drop old turns
                prompt = llm.fit_chat(messages, opts.num_ctx, template, tools=template_tools)
        elif isinstance(req.prompt, list):
            prompt = self._check_ids(llm, req.prompt)
            self._grow(loaded, opts, len(prompt))
        elif isinstance(req.prompt, str):
            check_chars(tok, req.prompt + (req.suffix or "") + (req.system or ""), opts.num_ctx)
            prompt = self._text_prompt(llm, ref, req, template)
            self._grow(loaded, opts, len(prompt))
        else:
            raise HerdError("prompt must be a string or a list of token ids")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise HerdError("top_logprobs must be between 0 and 20")
        constraint = None
        if req.format not in (None, ""):
            from . import grammar

            compiled = grammar.compile_format(req.format)
            if loaded.lltok is None:
                loaded.lltok = grammar.grammar_tokenizer(tok)
            constraint = grammar.Constraint(loaded.lltok, compiled, llm.args.vocab_size)
        return Job(prompt, opts, tok.stop_ids, tok, emit, logprobs=req.logprobs, constraint=constraint)

    def _grow(self, loaded: Loaded, opts: SamplingOptions, n_prompt: int) -> bool:
        """Make `opts.num_ctx` hold a prompt of n_prompt tokens and a quarter of the context for the
        reply, growing it up to `context_limit`; False if even that is too small (num_ctx is then
        the limit, and the prompt is cut by whole turns or refused by the caller, never silently)."""
        room = opts.num_ctx // 4
        if n_prompt + room <= opts.num_ctx:
            return True
        limit = self.context_limit(loaded)
        grown = max(opts.num_ctx, min(limit, n_prompt + room))
        if grown != opts.num_ctx:
            log.info("%s: context grown from %d to %d for a prompt of %d tokens", loaded.ref.name,
                     opts.num_ctx, grown, n_prompt)
            opts.num_ctx = grown
        return n_prompt + room <= grown

    async def _admit(self, loaded: Loaded, job: Job, gen: Generation) -> None:
        """Reserve the job's KV cache against `max_memory`: its prompt and what it may generate,
        at most num_ctx positions. Refused (400) if it can never fit, 503 if it fits once others end."""
        bpp = loaded.llm.runner.bytes_per_position
        need = min(job.opts.num_ctx, len(job.prompt) + job.budget) * bpp
        limit = self.config.max_memory
        if limit is not None:
            weights = sum(m.size for m in self._models.values())
            if weights + need > limit:
                raise HerdError(f"this request needs {need >> 20} MiB of KV cache for {need // bpp} positions, "
                                f"more than HERD_MAX_MEMORY leaves after the weights ({max(0, limit - weights) >> 20} "
                                "MiB): lower num_ctx or num_predict, or shorten the prompt")

            def used() -> int:
                return weights + sum(m.kv_reserved + m.scheduler.kept_bytes() for m in self._models.values())

            if used() + need > limit:  # prompt prefixes kept for reuse give way first
                for m in self._models.values():
                    if m.scheduler.kept_bytes():
                        await asyncio.wrap_future(m.scheduler.call(m.scheduler.forget_kept))
            if used() + need > limit:
                raise QueueFull(f"server busy: not enough memory free for this request's context "
                                f"({need >> 20} MiB of KV cache) under HERD_MAX_MEMORY, retry later")
        gen.reserved = need
        loaded.kv_reserved += need

    @staticmethod
    def _check_ids(llm, ids: list) -> list[int]:
        vocab = llm.args.vocab_size
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
            raise HerdError(f"a token-id prompt must be a non-empty list of integers in [0, {vocab})")
        return list(ids)

    @staticmethod
    def _text_prompt(llm, ref: ModelRef, req: GenerateRequest, template: str | None) -> list[int]:
        tok = llm.tokenizer
        if req.suffix:
            fim = next((t for t in FIM_TOKENS if all(s in tok.special_tokens for s in t)), None)
            if fim is None:
                raise Unsupported(f"model '{ref.name}' does not support insert (suffix): it has no "
                                  "fill-in-the-middle tokens")
            pre, suf, mid = (tok.special_tokens[s] for s in fim)
            ids = [pre, *tok.encode(req.prompt), suf, *tok.encode(req.suffix), mid]
            return ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + ids
        if req.raw:
            ids = llm.encode(req.prompt)
        else:
            system = req.system if req.system is not None else ref.system
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": req.prompt}]
            ids = llm.encode_chat(messages, template)
        if req.context:
            ctx = Engine._check_ids(llm, req.context)
            if tok.bos_id is not None and ids[:1] == [tok.bos_id]:
                ids = ids[1:]
            ids = ctx + ids
        return ids

    async def score(self, req: ScoreRequest) -> ScoreResult:
        """Log-probabilities of each prompt token given the ones before it (teacher forcing)."""
        loaded, load_ns = await self._acquire(req.model, req.keep_alive)
        try:
            llm = loaded.llm
            if isinstance(req.prompt, list):
                ids = self._check_ids(llm, req.prompt)
            elif isinstance(req.prompt, str):
                check_chars(llm.tokenizer, req.prompt, llm.args.max_seq_len)
                ids = await asyncio.to_thread(llm.encode, req.prompt)  # not on the event loop
            else:
                raise HerdError("prompt must be a string or a list of token ids")
            if not ids:
                raise HerdError("the prompt is empty")
            if len(ids) > llm.args.max_seq_len:
                raise HerdError(f"the prompt is {len(ids)} tokens, more than the model's context length "
                                f"{llm.args.max_seq_len}")
            if not 0 <= req.top <= 20:
                raise HerdError("logprobs must be between 0 and 20")

            def run() -> list:
                logits = llm.logits(ids)  # (T, V) float32, teacher-forced
                return [None] + [token_logprob(logits[i - 1], ids[i], req.top) for i in range(1, len(ids))]

            logprobs = await asyncio.wrap_future(loaded.scheduler.call(run))
            return ScoreResult(ids, logprobs, load_ns, llm.tokenizer.token_bytes)
        finally:
            self._release(loaded, req.keep_alive)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        """One embedding per input: mean-pooled final hidden states, L2-normalised."""
        loaded, load_ns = await self._acquire(req.model, req.keep_alive)
        try:
            llm = loaded.llm
            opts = self.options(loaded, req.options)
            if not req.inputs:
                raise HerdError("input must not be empty")
            batches = []
            for i, item in enumerate(req.inputs):
                if isinstance(item, str):
                    chars = opts.num_ctx * max_token_chars(llm.tokenizer)
                    if len(item) > chars:  # surely over the context: cut it before tokenizing
                        if not req.truncate:
                            check_chars(llm.tokenizer, item, opts.num_ctx, f"input[{i}]")
                        item = item[:chars]
                    ids = await asyncio.to_thread(llm.encode, item)  # not on the event loop
                elif isinstance(item, list):
                    ids = self._check_ids(llm, item)
                else:
                    raise HerdError(f"input[{i}] must be a string or a list of token ids")
                if not ids:
                    raise HerdError(f"input[{i}] is empty")
                if len(ids) > opts.num_ctx:
                    if not req.truncate:
                        raise HerdError(f"input[{i}] is {len(ids)} tokens, which exceeds the context length "
                                        f"{opts.num_ctx}")
                    ids = ids[:opts.num_ctx]
                batches.append(ids)
            if req.dimensions is not None and not 1 <= req.dimensions <= llm.args.dim:
                raise HerdError(f"dimensions must be between 1 and {llm.args.dim}")

            def run(ids: list[int]) -> list[float]:
                v = llm.runner.embed(ids).mean(dim=0)
                if req.dimensions is not None:
                    v = v[:req.dimensions]
                return torch.nn.functional.normalize(v, dim=0).cpu().tolist()

            # One input per scheduler call, each awaited before the next: decoding streams take a
            # step between two inputs, and a cancelled request (its client gone) stops at once.
            vectors = []
            for ids in batches:
                vectors.append(await asyncio.wrap_future(loaded.scheduler.call(functools.partial(run, ids))))
            return EmbedResult(vectors, sum(len(b) for b in batches), load_ns)
        finally:
            self._release(loaded, req.keep_alive)


def store_resolver(store) -> Callable[[str], ModelRef]:
    """Resolve names through a `llamaherd.store.Store` (its name validation guards the disk)."""
    from ..store import ModelNotFound as StoreNotFound

    def resolve(name: str) -> ModelRef:
        try:
            m = store.resolve(name)
        except StoreNotFound:
            raise ModelNotFound(name) from None
        return ModelRef(m.name, Path(m.path), m.digest, dict(m.params), m.system, m.template,
                        list(m.messages), dict(m.details), [Path(a) for a in m.adapters])

    return resolve
