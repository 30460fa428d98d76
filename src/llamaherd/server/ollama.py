"""Ollama's API (docs/api.md): thin routes from its wire types to the handler and back.

Streaming endpoints answer NDJSON by default and one JSON object with `"stream": false`.
`GET /` answers "Ollama is running", as clients that probe for Ollama expect.

`/api/version` answers `OLLAMA_API_VERSION`, the Ollama release whose API this server matches
(clients check a minimum Ollama version before using a feature: structured outputs 0.5, tool
streaming 0.8, logprobs 0.12, /v1/responses 0.13.3), and llamaherd's own version beside it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .. import __version__
from ..engine import types as et
from ..errors import HerdError
from . import schemas as s
from .handler import Final, Handler, Reply, Text, TokenInfo, parse_keep_alive
from .http import (ClientGone, dump, error_response, expiry_rfc3339, ndjson_line, ndjson_stream, now_rfc3339,
                   parse_body, redact, unless_disconnected)


async def progress_response(request: Request, events, stream: bool):
    """A pull's or a create's progress: streamed as NDJSON, or only its last event as one object."""
    if stream:
        return ndjson_stream(events)

    async def last_event() -> dict[str, Any]:
        last: dict[str, Any] = {}
        async for last in events:
            pass
        return last

    return JSONResponse(await unless_disconnected(request, last_event()))


OLLAMA_API_VERSION = "0.13.5"
# Shown in /api/show's template when the chat template has no tools section: the server still
# takes tools (Meta's JSON tool calling in the prompt), and clients such as litellm decide whether
# a model supports tools by looking for "tools" in the template.
TOOLS_NOTE = ("{#- llamaherd: tools are supported: without a tools section in this template, tool definitions "
              "go into the first user message (Llama 3.1 JSON tool calling) #}")
FIM_TOKENS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
              ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))


def handler_of(request: Request) -> Handler:
    return request.app.state.handler


def details_of(d: dict[str, Any], parent: str = "") -> s.ModelDetails:
    family = d.get("family") or d.get("architecture") or ""
    return s.ModelDetails(parent_model=parent, format=d.get("format", "") or "", family=family,
                          families=[family] if family else None,
                          parameter_size=str(d.get("parameter_size", "") or ""),
                          quantization_level=str(d.get("quantization", "") or d.get("quantization_level", "") or ""))


def _logprobs(infos: list[TokenInfo]) -> list[s.LogprobOut]:
    return [s.LogprobOut(token=i.text, logprob=i.logprob, bytes=list(i.bytes),
                         top_logprobs=[s.TokenLogprobOut(token=t.text, logprob=t.logprob, bytes=list(t.bytes))
                                       for t in i.top])
            for i in infos]


def _stats(final: Final) -> dict[str, Any]:
    d = final.done
    return dict(done_reason=d.reason, total_duration=final.total_duration, load_duration=d.load_duration,
                prompt_eval_count=d.prompt_eval_count, prompt_eval_duration=d.prompt_eval_duration,
                eval_count=d.eval_count, eval_duration=d.eval_duration, num_ctx=final.num_ctx,
                safety=final.safety)


def _logprob_request(logprobs: bool | None, top: int | None) -> int | None:
    if top is not None and not 0 <= top <= 20:
        raise HerdError("top_logprobs must be between 0 and 20")
    return (top or 0) if logprobs or top else None


def _options(options: s.Options | None) -> dict[str, Any]:
    return options.sampling() if options is not None else {}


async def _respond(request: Request, reply: Reply, stream: bool, chunk, final) -> Response:
    """Stream `chunk(text_event)` objects then `final(final_event, text)`, or collect them into one."""
    if stream:
        async def chunks() -> AsyncIterator[Any]:
            async for event in reply.events():
                if isinstance(event, Text):
                    yield chunk(event)
                    continue
                last = final(event, None, None)
                if isinstance(last, s.ChatResponse) and last.message.tool_calls:
                    # As Ollama: the calls come on a `done: false` chunk, then the statistics.
                    yield s.ChatResponse(model=last.model, created_at=last.created_at, message=last.message)
                    last.message = s.ChatMessageOut()
                yield last
        return ndjson_stream(chunks())

    async def collect():
        text, logprobs = [], []
        async for event in reply.events():
            if isinstance(event, Text):
                text.append(event.text)
                logprobs.extend(event.logprobs)
            else:
                return final(event, "".join(text), logprobs)

    return JSONResponse(dump(await unless_disconnected(request, collect())))


def _load_reply(model: str, reason: str, chat: bool) -> JSONResponse:
    kind = s.ChatResponse if chat else s.GenerateResponse
    return JSONResponse(dump(kind(model=model, created_at=now_rfc3339(), done=True, done_reason=reason)))


def routes() -> APIRouter:
    router = APIRouter()

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root():
        return PlainTextResponse("Ollama is running")

    @router.api_route("/api/version", methods=["GET", "HEAD"])
    async def version():
        return dump(s.VersionResponse(version=OLLAMA_API_VERSION, llamaherd=__version__))

    @router.post("/api/generate")
    async def generate(request: Request):
        body = await parse_body(request, s.GenerateRequest)
        h = handler_of(request)
        keep_alive = parse_keep_alive(body.keep_alive)
        if body.images:
            raise et.Unsupported("images are not supported: the models here are text-only")
        if body.template is not None and not request.app.state.settings.allow_request_templates:
            raise HerdError("templates in requests are not allowed by this server (set "
                            "HERD_ALLOW_REQUEST_TEMPLATES=1 to allow them, or create a model with the template)")
        if not body.prompt and not body.suffix:
            name, reason = await h.load(body.model, keep_alive)
            return _load_reply(name, reason, chat=False)
        reply = await h.generate(et.GenerateRequest(
            model=body.model, prompt=body.prompt, system=body.system, template=body.template, raw=body.raw,
            suffix=body.suffix, context=body.context, options=_options(body.options), format=body.format or None,
            logprobs=_logprob_request(body.logprobs, body.top_logprobs), keep_alive=keep_alive,
            stream=body.stream),
            moderation=request.headers.get("x-herd-moderation"))
        model = reply.model

        def chunk(e: Text):
            return s.GenerateResponse(model=model, created_at=now_rfc3339(), response=e.text,
                                      logprobs=_logprobs(e.logprobs) if e.logprobs else None)

        def final(e: Final, text: str | None, logprobs):
            return s.GenerateResponse(model=model, created_at=now_rfc3339(), response=text or "", done=True,
                                      context=e.done.context, logprobs=_logprobs(logprobs) if logprobs else None,
                                      **_stats(e))

        return await _respond(request, reply, body.stream, chunk, final)

    @router.post("/api/chat")
    async def chat(request: Request):
        body = await parse_body(request, s.ChatRequest)
        h = handler_of(request)
        keep_alive = parse_keep_alive(body.keep_alive)
        # No messages, or an empty list, loads the model (unloads with keep_alive 0), as Ollama's
        # docs say: the official client's `chat(model)` sends `"messages": []` for that.
        if not body.messages:
            name, reason = await h.load(body.model, keep_alive)
            return _load_reply(name, reason, chat=True)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        reply = await h.generate(et.GenerateRequest(
            model=body.model, messages=messages, tools=[t.model_dump() for t in body.tools] if body.tools else None,
            options=_options(body.options), format=body.format or None,
            logprobs=_logprob_request(body.logprobs, body.top_logprobs), keep_alive=keep_alive,
            stream=body.stream),
            moderation=request.headers.get("x-herd-moderation"))
        model = reply.model

        def chunk(e: Text):
            return s.ChatResponse(model=model, created_at=now_rfc3339(), message=s.ChatMessageOut(content=e.text),
                                  logprobs=_logprobs(e.logprobs) if e.logprobs else None)

        def final(e: Final, text: str | None, logprobs):
            calls = [s.ToolCall(function=s.ToolCallFunction(index=i, **c["function"]))
                     for i, c in enumerate(e.tool_calls)] if e.tool_calls else None
            return s.ChatResponse(model=model, created_at=now_rfc3339(), done=True,
                                  message=s.ChatMessageOut(content=text or "", tool_calls=calls),
                                  logprobs=_logprobs(logprobs) if logprobs else None, **_stats(e))

        return await _respond(request, reply, body.stream, chunk, final)

    @router.post("/api/embed")
    async def embed(request: Request):
        body = await parse_body(request, s.EmbedRequest)
        start = time.perf_counter_ns()
        inputs = [body.input] if isinstance(body.input, str) else list(body.input)
        result = await unless_disconnected(request, handler_of(request).embed(et.EmbedRequest(
            model=body.model, inputs=inputs, truncate=body.truncate, options=_options(body.options),
            keep_alive=parse_keep_alive(body.keep_alive), dimensions=body.dimensions)))
        return dump(s.EmbedResponse(model=body.model, embeddings=result.embeddings,
                                    total_duration=time.perf_counter_ns() - start,
                                    load_duration=result.load_duration, prompt_eval_count=result.prompt_eval_count))

    @router.post("/api/embeddings")
    async def embeddings(request: Request):
        body = await parse_body(request, s.EmbeddingsRequest)
        if not body.prompt:
            return dump(s.EmbeddingsResponse(embedding=[]))
        result = await unless_disconnected(request, handler_of(request).embed(et.EmbedRequest(
            model=body.model, inputs=[body.prompt], options=_options(body.options),
            keep_alive=parse_keep_alive(body.keep_alive))))
        return dump(s.EmbeddingsResponse(embedding=result.embeddings[0]))

    @router.api_route("/api/tags", methods=["GET", "HEAD"])
    async def tags(request: Request):
        models = await handler_of(request).list_models()
        return dump(s.ListResponse(models=[
            s.ListedModel(name=m.name, model=m.name, modified_at=now_rfc3339(m.modified), size=m.size,
                          digest=m.digest.removeprefix("sha256:"), details=details_of(m.details),
                          error=redact(m.error) if getattr(m, "error", None) else None)
            for m in models]))

    @router.api_route("/api/ps", methods=["GET", "HEAD"])
    async def ps(request: Request):
        return dump(s.ProcessResponse(models=[
            s.RunningModelOut(name=m.name, model=m.name, size=m.size, digest=m.digest.removeprefix("sha256:"),
                              details=details_of(m.details), expires_at=expiry_rfc3339(m.expires_at),
                              size_vram=m.size_vram, context_length=m.context_length)
            for m in handler_of(request).running()]))

    @router.post("/api/show")
    async def show(request: Request):
        body = await parse_body(request, s.ModelRequest)
        h = handler_of(request)
        info = await h.show(body.model_name())
        d = info.get("details", {})
        params = "\n".join(f"{k:<30}{v}" for k, vs in info.get("parameters", {}).items()
                           for v in (vs if isinstance(vs, list) else [vs]))
        meta = await asyncio.to_thread(gguf_metadata, info.get("path"))
        template = info.get("template") or ""
        if "tools" not in template.lower():
            template = f"{template}{TOOLS_NOTE}" if template else ""
        name = info.get("name") or body.model_name()
        modified = next((m.modified for m in await h.list_models() if m.name in (name, f"{name}:latest")), None)
        return dump(s.ShowResponse(
            modelfile=info.get("modelfile", ""), parameters=params, template=template,
            system=info.get("system"), license=info.get("license"), details=details_of(d),
            model_info=model_info(d, meta, body.verbose), capabilities=capabilities(meta),
            modified_at=now_rfc3339(modified) if modified is not None else None))

    @router.post("/api/pull")
    async def pull(request: Request):
        body = await parse_body(request, s.ModelRequest)
        name = body.model_name()
        h = handler_of(request)
        await h.check_pullable(name)  # a bad name or one no source has: 400/404 before streaming, as Ollama
        events = h.pull(name)
        return await progress_response(request, events, body.stream)

    @router.delete("/api/delete")
    async def delete(request: Request):
        body = await parse_body(request, s.ModelRequest)
        await handler_of(request).delete(body.model_name())
        return Response(status_code=200)

    @router.post("/api/copy")
    async def copy(request: Request):
        body = await parse_body(request, s.CopyRequest)
        await handler_of(request).copy(body.source, body.destination)
        return Response(status_code=200)

    @router.post("/api/create")
    async def create(request: Request):
        body = await parse_body(request, s.CreateRequest)
        h, definition = handler_of(request), definition_of(body)
        await h.check_creatable(body.model, definition)
        events = h.create(body.model, definition, quantize=body.quantize)
        return await progress_response(request, events, body.stream)

    @router.head("/api/blobs/{digest}")
    async def blob_exists(request: Request, digest: str):
        store = handler_of(request)._store()
        check_digest(digest)
        return Response(status_code=200 if store.blobs.has(digest) else 404)

    @router.post("/api/blobs/{digest}")
    async def blob_upload(request: Request, digest: str):
        await receive_blob(request, digest)
        return Response(status_code=201)

    return router


# -- /api/show --------------------------------------------------------------------------------

def gguf_metadata(path: str | None) -> dict[str, Any] | None:
    """The GGUF header's metadata of a model's weights, or None for other formats."""
    from pathlib import Path

    if not path or not Path(path).is_file():
        return None
    from ..errors import FormatError
    from ..formats.gguf import GGUFFile

    try:
        return GGUFFile(path).metadata
    except (FormatError, OSError):
        return None


def model_info(details: dict[str, Any], meta: dict[str, Any] | None, verbose: bool) -> dict[str, Any]:
    """Ollama's `model_info`: the GGUF metadata under its own keys (`llama.attention.head_count`,
    `general.file_type`, `tokenizer.ggml.*`, ...) — arrays (the vocabulary) empty unless verbose,
    the chat template left to `template` — or, for a model that is not GGUF, the same keys made
    from its details."""
    arch = (meta or {}).get("general.architecture") or details.get("architecture") or "llama"
    out: dict[str, Any] = {"general.architecture": arch}
    if meta is not None:
        for key, value in meta.items():
            if key == "tokenizer.chat_template":
                continue
            if hasattr(value, "tolist"):  # numpy arrays and scalars, as JSON values
                value = value.tolist()
            out[key] = value if verbose or not isinstance(value, (list, tuple)) else []
    else:
        for key, gguf_key in (("context_length", "context_length"), ("embedding_length", "embedding_length"),
                              ("block_count", "block_count"), ("head_count", "attention.head_count"),
                              ("head_count_kv", "attention.head_count_kv")):
            if details.get(key) is not None:
                out[f"{arch}.{gguf_key}"] = details[key]
    if details.get("parameter_count") is not None:
        out.setdefault("general.parameter_count", details["parameter_count"])
    return out


def capabilities(meta: dict[str, Any] | None) -> list[str]:
    """What the model can do, as Ollama lists it: completion and tools (any template: see
    TOOLS_NOTE), insert when its vocabulary has fill-in-the-middle tokens. Not embedding: that
    names embedding models, and these are chat models (/api/embed still pools their states)."""
    caps = ["completion", "tools"]
    tokens = set((meta or {}).get("tokenizer.ggml.tokens") or ())
    if any(all(t in tokens for t in fim) for fim in FIM_TOKENS):
        caps.append("insert")
    return caps


# -- /api/create and blobs ---------------------------------------------------------------------

def check_digest(digest: str) -> str:
    from ..store.blobs import check_digest as check

    return check(digest)


async def receive_blob(request: Request, digest: str) -> None:
    """Stream an upload into the store, verifying its sha256 before it becomes a blob.

    An upload is an ordinary blob once kept: collected when no model uses it. It is written to a
    `.upload-*` file beside the blobs (removed on failure, and at the next start if the server is
    killed), and bounded by HERD_MAX_BODY (the Guard counts the bytes; this checks the disk)."""
    import asyncio
    import hashlib
    import os
    import shutil

    from ..store.store import StorageError

    check_digest(digest)
    store = handler_of(request)._store()
    length = request.headers.get("content-length")
    fd, tmp = await asyncio.to_thread(store.upload_file)
    if length is not None and length.isdigit():
        free = shutil.disk_usage(tmp.parent).free
        if int(length) > free:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise StorageError(f"not enough disk space for the upload: {int(length):,} bytes, {free:,} free", 507)
    sha = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            async for chunk in request.stream():
                sha.update(chunk)
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(f.flush)
            await asyncio.to_thread(os.fsync, f.fileno())
        if f"sha256:{sha.hexdigest()}" != digest:
            raise HerdError(f"digest mismatch: the upload is sha256:{sha.hexdigest()}, not {digest}")
        await asyncio.to_thread(store.commit_upload, tmp, digest)
    finally:
        tmp.unlink(missing_ok=True)


def definition_of(body: s.CreateRequest):
    """The model definition of an /api/create request, built from its JSON fields directly.

    No Modelfile text is written and parsed again: a newline or `\"\"\"` in a system prompt, a
    template or a message is then just text (it used to inject lines such as `ADAPTER /any/path`).
    `from` names a stored model; `files` name one uploaded GGUF blob. Paths on the server's disk
    are not accepted: a client names only models and blobs."""
    from ..store import parse_name
    from ..store.modelfile import Modelfile

    if body.quantize:  # an unknown type is a 400 before the stream starts
        from ..quantize.blocks import check_scheme

        check_scheme(body.quantize)
    if body.adapters:
        raise et.Unsupported("adapters are not supported by /api/create")
    if body.files:
        if len(body.files) != 1 or body.from_:
            raise HerdError("give one GGUF file in files, or from: a model name")
        (_, digest), = body.files.items()
        base = check_digest(digest)
    elif body.from_:
        parse_name(body.from_)  # a model name, never a path
        base = body.from_
    else:
        raise HerdError("from or files is required")
    license = [body.license] if isinstance(body.license, str) else list(body.license or [])
    return Modelfile(from_=base, parameters=dict(body.parameters or {}), template=body.template,
                     system=body.system, licenses=license, adapters=[],
                     messages=[m.model_dump(exclude_none=True) for m in body.messages or []])
