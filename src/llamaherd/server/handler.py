"""The one handler both APIs call, over an engine interface and the model store.

Routes translate their wire types into an engine request (`engine.types.GenerateRequest`, ...),
call `Handler`, and translate what comes back. The handler adds what is neither wire format nor
batching: holding back a reply that may be a tool call and parsing it, the request's total
duration, token texts for log-probabilities, and model management over the store.

`EngineAPI` is what the handler needs from an engine; `llamaherd.engine.models.Engine` is the
real one, and tests may pass a fake.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..chat import tools as toolfmt
from ..engine.types import (Delta, Done, EmbedRequest, EmbedResult, GenerateRequest, RunningModel, ScoreRequest,
                            ScoreResult, TokenLogprob)
from ..errors import HerdError
from ..settings import parse_keep_alive  # noqa: F401  (the routes import it from here)


class GenerationAPI(Protocol):
    model: str  # the model's resolved name
    prompt: list[int]  # prompt token ids
    load_duration: int  # ns

    def __aiter__(self) -> AsyncIterator[Delta | Done]: ...
    def cancel(self) -> None: ...
    def token_bytes(self, token: int) -> bytes: ...


class EngineAPI(Protocol):
    async def generate(self, req: GenerateRequest) -> GenerationAPI: ...
    async def score(self, req: ScoreRequest) -> ScoreResult: ...
    async def embed(self, req: EmbedRequest) -> EmbedResult: ...
    async def load(self, model: str, keep_alive: float | None = None) -> tuple[str, int]: ...
    async def unload(self, model: str) -> None: ...
    def running(self) -> list[RunningModel]: ...


@dataclass
class TokenInfo:
    """A token with its text, for log-probabilities in responses."""

    text: str
    bytes: bytes
    logprob: float
    top: list["TokenInfo"] = field(default_factory=list)


@dataclass
class Text:
    """Reply text (may be empty when only log-probabilities come) and its tokens' log-probabilities."""

    text: str
    logprobs: list[TokenInfo] = field(default_factory=list)


@dataclass
class Final:
    done: Done
    tool_calls: list[dict[str, Any]] | None
    total_duration: int  # ns, from the request's arrival
    num_ctx: int | None = None  # the context the request ran with (clamped or grown)
    safety: dict[str, Any] | None = None  # moderation: the guard's verdict, code-shield findings


class Reply:
    """A generation as the routes see it: `Text`s then one `Final`."""

    def __init__(self, gen: GenerationAPI, tools: list[dict[str, Any]] | None, start: int, want_logprobs: bool,
                 stop_logprob: bool = False):
        self.gen = gen
        self.tools = tools
        self.start = start
        self.want_logprobs = want_logprobs
        self.stop_logprob = stop_logprob

    @property
    def model(self) -> str:
        return self.gen.model

    @property
    def prompt(self) -> list[int]:
        return self.gen.prompt

    def token_info(self, lp: TokenLogprob) -> TokenInfo:
        def info(token: int, logprob: float, top=()) -> TokenInfo:
            raw = self.gen.token_bytes(token)
            return TokenInfo(raw.decode("utf-8", "replace"), raw, logprob, list(top))

        return info(lp.token, lp.logprob, [info(t, p) for t, p in lp.top])

    async def events(self) -> AsyncIterator[Text | Final]:
        held, held_lp = "", []
        holding = bool(self.tools)
        try:
            async for event in self.gen:
                if isinstance(event, Done):
                    calls = None
                    if held or held_lp:
                        calls = toolfmt.parse_tool_calls(held, self.tools or [])
                        if calls is None:
                            yield Text(held, held_lp)
                    yield Final(event, calls, time.perf_counter_ns() - self.start,
                                getattr(self.gen, "num_ctx", None) or None, getattr(self.gen, "safety", None))
                    return
                if event.logprobs and not event.tokens and not self.stop_logprob:
                    continue  # a stop token's log-probability: only /v1/completions shows it
                lps = [self.token_info(lp) for lp in event.logprobs or ()] if self.want_logprobs else []
                if holding:
                    held += event.text
                    held_lp += lps
                    if toolfmt.could_be_call(held):
                        continue
                    holding = False
                    text, lps, held, held_lp = held, held_lp, "", []
                else:
                    text = event.text
                if text or lps:
                    yield Text(text, lps)
        finally:
            self.gen.cancel()

    def cancel(self) -> None:
        self.gen.cancel()


class Handler:
    """Generation, scoring, embeddings and model management, whichever API asks.

    Args:
        engine: runs the models (`EngineAPI`).
        store: the model store (`llamaherd.store.Store`); None: model management answers 501.
    """

    def __init__(self, engine: EngineAPI, store: Any = None, moderator: Any = None):
        self.engine = engine
        self.store = store
        self.moderator = moderator  # llamaherd.safety.moderation.Moderator: guard and code shield

    # -- running models -------------------------------------------------------------------

    async def generate(self, req: GenerateRequest, stop_logprob: bool = False, moderation: str | None = None) -> Reply:
        """Start a generation; request errors raise here, before anything is streamed.

        `moderation` is the request's X-Herd-Moderation header: its own moderation settings
        (`llamaherd.safety.moderation`; stricter than the server's unless the server allows weaker).

        With `stop_logprob`, a generation that ends on a stop token reports that token's
        log-probability too (as vLLM's completions do): lm-evaluation-harness reads the last
        entry as the generated token's and slices it off; without it, the continuation's own
        last token was sliced away instead and scored 0, silently."""
        start = time.perf_counter_ns()
        if req.messages is not None:
            req.messages = toolfmt.check_messages(req.messages)
        tools = req.tools or None
        if tools is not None:
            tools = toolfmt.check_tools(tools)
            req.tools = tools
        moderator = self.moderator
        if moderation is not None:
            from ..safety.moderation import request_moderator

            moderator = request_moderator(moderator, moderation)
        if moderator is not None:  # checks before and after generation (llamaherd.safety)
            gen = await moderator.generate(self.engine, req)
        else:
            gen = await self.engine.generate(req)
        return Reply(gen, tools, start, req.logprobs is not None, stop_logprob)

    async def score(self, req: ScoreRequest) -> ScoreResult:
        return await self.engine.score(req)

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        return await self.engine.embed(req)

    async def load(self, model: str, keep_alive: float | None) -> tuple[str, str]:
        """Load (or, with keep_alive 0, unload) a model; returns its name and "load" or "unload"."""
        name, _ = await self.engine.load(model, keep_alive)
        return name, "unload" if keep_alive == 0 else "load"

    def running(self) -> list[RunningModel]:
        return self.engine.running()

    # -- the store --------------------------------------------------------------------------

    def _store(self):
        if self.store is None:
            raise HerdError("this server has no model store")
        return self.store

    async def list_models(self) -> list:
        return await asyncio.to_thread(self._store().list)

    async def show(self, model: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._store().show, model)

    async def copy(self, source: str, destination: str) -> None:
        await asyncio.to_thread(self._store().copy, source, destination)

    async def delete(self, model: str) -> None:
        store = self._store()
        await asyncio.to_thread(store.resolve, model)  # not found -> error before unloading anything
        await self.engine.unload(model)
        await asyncio.to_thread(store.remove, model)

    async def check_pullable(self, model: str) -> None:
        """A 400 for an invalid name, a 404 for one no source has: before a pull's stream starts."""
        from ..store import parse_name

        parse_name(model)
        source = getattr(self._store(), "source", None)
        if source is not None:
            await asyncio.to_thread(source, model)

    async def pull(self, model: str) -> AsyncIterator[dict[str, Any]]:
        """Pull a model; yields Ollama progress objects, the last `{"status": "success"}`."""
        store = self._store()
        async for event in _progress_of(lambda progress: store.pull(model, progress)):
            yield event

    async def check_creatable(self, model: str, definition: Any) -> None:
        """A 4xx before a create's stream starts for what can be known at once (see `Store.check_create`)."""
        check = getattr(self._store(), "check_create", None)
        if check is not None:
            await asyncio.to_thread(check, model, definition)

    async def create(self, model: str, definition: Any, quantize: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Create `model` from a `store.modelfile.Modelfile` (FROM a stored model or blob: never a
        path on the server's disk); `quantize` (q8_0, q4_0, q4_k): store its weights so quantized."""
        store = self._store()
        extra = {"quantize": quantize} if quantize else {}
        async for event in _progress_of(lambda progress: store.create(model, definition, None, progress, **extra)):
            yield event


async def _progress_of(work: Callable[[Callable[[dict], None]], Any]) -> AsyncIterator[dict[str, Any]]:
    """Run `work(progress)` in a thread; yield the progress events it reports, then re-raise its error."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    def progress(event: dict) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, dict(event))

    async def run() -> None:
        try:
            await asyncio.to_thread(work, progress)
        finally:
            queue.put_nowait(end)

    task = asyncio.create_task(run())
    try:
        while (event := await queue.get()) is not end:
            yield event
        await task  # raises the work's error, if any
    finally:
        if not task.done():
            task.cancel()  # the thread finishes on its own; its events go nowhere
