"""OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models, /v1/embeddings.

Thin routes, as Ollama's compatibility layer: OpenAI fields become an engine request (options by
Ollama's names), and the handler's events become OpenAI objects or server-sent events ending
with `data: [DONE]`. Errors use OpenAI's error object. Only n = 1 is supported.

`/v1/completions` with `echo: true`, `logprobs` and `max_tokens: 0` scores the prompt: every
token's log-probability given the ones before it (the first has none), which is what
lm-evaluation-harness's `local-completions` backend asks for.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..engine import types as et
from ..errors import HerdError
from . import schemas as s
from .handler import Final, Handler, Text, TokenInfo, parse_keep_alive
from .http import sse_stream, unless_disconnected

FINGERPRINT = "fp_llamaherd"


def handler_of(request: Request) -> Handler:
    return request.app.state.handler


def _options(body) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"),
                         ("frequency_penalty", "frequency_penalty"), ("presence_penalty", "presence_penalty")):
        value = getattr(body, theirs)
        if value is not None:
            opts[ours] = value
    if getattr(body, "temperature", None) is not None and not 0 <= body.temperature <= 2:
        raise HerdError("temperature must be between 0 and 2")
    if body.stop is not None:
        opts["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    max_tokens = getattr(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = body.max_tokens
    if max_tokens is not None:
        if max_tokens < 0:
            raise HerdError("max_tokens must be >= 0")
        opts["num_predict"] = max_tokens
    if (getattr(body, "n", None) or 1) != 1 or (getattr(body, "best_of", None) or 1) != 1:
        raise HerdError("only n = 1 (and best_of = 1) is supported")
    return opts


def _usage(final: Final) -> dict[str, int]:
    p, c = final.done.prompt_eval_count, final.done.eval_count
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish_reason(final: Final) -> str:
    return "tool_calls" if final.tool_calls else final.done.reason


def _chat_logprobs(infos: list[TokenInfo]) -> dict[str, Any]:
    return {"content": [{"token": i.text, "logprob": i.logprob, "bytes": list(i.bytes),
                         "top_logprobs": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.bytes)}
                                          for t in i.top]} for i in infos]}


def _tool_calls(calls: list[dict[str, Any]], streaming: bool) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(calls):
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"])}}
        out.append({"index": i, **call} if streaming else call)
    return out


def _messages(messages: list[s.OAIMessage]) -> list[dict[str, Any]]:
    """OpenAI messages as engine messages (tool-call arguments parsed from their JSON strings)."""
    if not messages:
        raise HerdError("messages must be a non-empty list")
    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                try:
                    args = json.loads(c.function.arguments) if c.function.arguments else {}
                except ValueError:
                    raise HerdError(f"tool call {c.function.name}: arguments are not JSON") from None
                calls.append({"function": {"name": c.function.name, "arguments": args}})
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def _format(rf: s.ResponseFormat | None) -> str | dict | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return "json"
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise HerdError("response_format json_schema needs json_schema.schema")
    return rf.json_schema.schema_


def _tools_and_format(body: s.ChatCompletionRequest) -> tuple[list[dict] | None, str | dict | None]:
    """The tools and output format of a chat request, per its tool_choice: "auto" (the default)
    lets the model choose; "none" sends no tools; "required", or `{"type": "function", "function":
    {"name": ...}}`, makes the output a call (of that tool) by grammar. Anything else is a 400."""
    from ..chat import tools as toolfmt

    choice = body.tool_choice
    format = _format(body.response_format)
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise HerdError("tool_choice needs tools")
        return None, format
    tools = toolfmt.check_tools([t.model_dump() for t in body.tools])
    if choice in (None, "auto"):
        return tools, format
    if choice == "none":
        return None, format
    if choice == "required":
        name = None
    elif (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
          and isinstance(choice["function"].get("name"), str)):
        name = choice["function"]["name"]
    else:
        raise HerdError('tool_choice must be "none", "auto", "required" or {"type": "function", '
                        '"function": {"name": ...}}')
    if format is not None:
        raise HerdError("tool_choice that forces a call cannot be combined with response_format")
    return tools, toolfmt.required_call_schema(tools, name)


def routes() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        from .http import parse_body

        body = await parse_body(request, s.ChatCompletionRequest)
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
            raise HerdError("top_logprobs must be between 0 and 20")
        tools, format = _tools_and_format(body)
        reply = await handler_of(request).generate(et.GenerateRequest(
            model=body.model, messages=_messages(body.messages), tools=tools, options=_options(body),
            format=format, keep_alive=parse_keep_alive(body.keep_alive),
            logprobs=(body.top_logprobs or 0) if body.logprobs else None, stream=body.stream),
            moderation=request.headers.get("x-herd-moderation"))
        cid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), reply.model
        base = {"id": cid, "created": created, "model": model, "system_fingerprint": FINGERPRINT}

        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            def chunk(delta: dict, finish: str | None = None, logprobs=None) -> dict:
                return {**base, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

            async def chunks() -> AsyncIterator[dict]:
                yield chunk({"role": "assistant", "content": ""})
                async for event in reply.events():
                    if isinstance(event, Text):
                        yield chunk({"content": event.text},
                                    logprobs=_chat_logprobs(event.logprobs) if body.logprobs else None)
                        continue
                    if event.tool_calls:
                        yield chunk({"tool_calls": _tool_calls(event.tool_calls, True)})
                    last = chunk({}, _finish_reason(event))
                    if event.safety:  # moderation's verdict or code-shield findings (llamaherd.safety)
                        last["choices"][0]["safety"] = event.safety
                    yield last
                    if include_usage:
                        yield {**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(event)}

            return sse_stream(chunks())

        async def collect() -> dict:
            text, logprobs = [], []
            async for event in reply.events():
                if isinstance(event, Text):
                    text.append(event.text)
                    logprobs.extend(event.logprobs)
                    continue
                message: dict[str, Any] = {"role": "assistant", "content": "".join(text)}
                if event.tool_calls:
                    message["tool_calls"] = _tool_calls(event.tool_calls, False)
                    message["content"] = message["content"] or None
                choice = {"index": 0, "message": message, "finish_reason": _finish_reason(event),
                          "logprobs": _chat_logprobs(logprobs) if body.logprobs else None}
                if event.safety:  # moderation's verdict or code-shield findings (llamaherd.safety)
                    choice["safety"] = event.safety
                return {**base, "object": "chat.completion", "usage": _usage(event), "choices": [choice]}

        return JSONResponse(await unless_disconnected(request, collect()))

    @router.post("/completions")
    async def completions(request: Request):
        from .http import parse_body

        body = await parse_body(request, s.CompletionRequest)
        h = handler_of(request)
        prompts: list[str | list[int]]
        if isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int)):
            prompts = [body.prompt]
        else:
            prompts = list(body.prompt)
        if not prompts:
            raise HerdError("prompt must not be empty")
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise HerdError("logprobs must be between 0 and 20")
        options = _options(body)
        keep_alive = parse_keep_alive(body.keep_alive)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(prompts) != 1:
                raise HerdError("streaming supports one prompt at a time")
            if body.echo:
                raise HerdError("echo is not supported with stream")
            reply = await h.generate(et.GenerateRequest(
                model=body.model, prompt=prompts[0], raw=True, suffix=body.suffix, options=options,
                keep_alive=keep_alive, logprobs=body.logprobs), stop_logprob=True,
                moderation=request.headers.get("x-herd-moderation"))
            base = {"id": cid, "object": "text_completion", "created": created, "model": reply.model,
                    "system_fingerprint": FINGERPRINT}
            include_usage = body.stream_options is not None and body.stream_options.include_usage

            async def chunks() -> AsyncIterator[dict]:
                offset = 0
                async for event in reply.events():
                    if isinstance(event, Text):
                        lp = _completion_logprobs(event.logprobs, offset) if body.logprobs is not None else None
                        offset += len(event.text)
                        yield {**base, "choices": [{"index": 0, "text": event.text, "logprobs": lp,
                                                    "finish_reason": None}]}
                        continue
                    yield {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                "finish_reason": _finish_reason(event)}]}
                    if include_usage:
                        yield {**base, "choices": [], "usage": _usage(event)}

            return sse_stream(chunks())

        async def one(i: int, prompt: str | list[int]) -> tuple[dict, dict[str, int], str]:
            return await _completion(h, body, prompt, i, options, keep_alive, request.headers.get("x-herd-moderation"))

        results = await unless_disconnected(request, asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for _, u, _ in results:
            for k in usage:
                usage[k] += u[k]
        return JSONResponse({"id": cid, "object": "text_completion", "created": created, "model": results[0][2],
                             "system_fingerprint": FINGERPRINT, "choices": [c for c, _, _ in results],
                             "usage": usage})

    @router.get("/models")
    async def models(request: Request):
        listed = await handler_of(request).list_models()
        return {"object": "list", "data": [_model_object(m) for m in listed]}

    @router.get("/models/{name:path}")
    async def model(request: Request, name: str):
        listed = await handler_of(request).list_models()
        for m in listed:
            if m.name == name or m.name == f"{name}:latest":
                return _model_object(m)
        raise et.ModelNotFound(name)

    @router.post("/embeddings")
    async def embeddings(request: Request):
        from .http import parse_body

        body = await parse_body(request, s.EmbeddingRequest)
        if isinstance(body.input, str) or (body.input and isinstance(body.input[0], int)):
            inputs = [body.input]
        else:
            inputs = list(body.input)
        result = await unless_disconnected(request, handler_of(request).embed(et.EmbedRequest(
            model=body.model, inputs=inputs, dimensions=body.dimensions)))
        data = []
        for i, vector in enumerate(result.embeddings):
            value: Any = vector
            if body.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": value, "index": i})
        n = result.prompt_eval_count
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    return router


def _model_object(m) -> dict[str, Any]:
    return {"id": m.name, "object": "model", "created": int(m.modified), "owned_by": "library"}


def _completion_logprobs(infos: list[TokenInfo | None], offset: int, first_text: str | None = None) -> dict[str, Any]:
    """OpenAI's legacy logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for info in infos:
        if info is None:  # the prompt's first token: nothing to condition on
            out["tokens"].append(first_text or "")
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(offset)
            offset += len(first_text or "")
            continue
        out["tokens"].append(info.text)
        out["token_logprobs"].append(info.logprob)
        top: dict[str, float] = {}
        for t in info.top:
            top.setdefault(t.text, t.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(info.text)
    return out


async def _completion(h: Handler, body: s.CompletionRequest, prompt: str | list[int], index: int,
                      options: dict[str, Any], keep_alive, moderation: str | None = None,
                      ) -> tuple[dict, dict[str, int], str]:
    """One choice of a non-streamed completion (with the prompt's logprobs when echoing)."""
    text_parts: list[str] = []
    infos: list[TokenInfo | None] = []
    first_text = None
    prompt_count = completion_count = 0
    finish = "length"
    model = body.model
    if body.echo:
        scored = await h.score(et.ScoreRequest(model=body.model, prompt=prompt, top=body.logprobs or 0,
                                               keep_alive=keep_alive))
        tb = scored.token_bytes
        first_text = tb(scored.tokens[0]).decode("utf-8", "replace")
        infos.append(None)
        for lp in scored.logprobs[1:]:
            raw = tb(lp.token)
            infos.append(TokenInfo(raw.decode("utf-8", "replace"), raw, lp.logprob,
                                   [TokenInfo(tb(t).decode("utf-8", "replace"), tb(t), p) for t, p in lp.top]))
        text_parts.append(prompt if isinstance(prompt, str) else
                          b"".join(tb(t) for t in scored.tokens).decode("utf-8", "replace"))
        prompt_count = len(scored.tokens)
    if not (body.echo and options.get("num_predict") == 0):
        reply = await h.generate(et.GenerateRequest(
            model=body.model, prompt=prompt, raw=True, suffix=body.suffix, options=options, keep_alive=keep_alive,
            logprobs=body.logprobs, stream=False), stop_logprob=True, moderation=moderation)
        model = reply.model
        async for event in reply.events():
            if isinstance(event, Text):
                text_parts.append(event.text)
                infos.extend(event.logprobs)
            else:
                finish = _finish_reason(event)
                prompt_count = max(prompt_count, event.done.prompt_eval_count)
                completion_count = event.done.eval_count
    logprobs = _completion_logprobs(infos, 0, first_text) if body.logprobs is not None else None
    choice = {"index": index, "text": "".join(text_parts), "logprobs": logprobs, "finish_reason": finish}
    return choice, {"prompt_tokens": prompt_count, "completion_tokens": completion_count,
                    "total_tokens": prompt_count + completion_count}, model
