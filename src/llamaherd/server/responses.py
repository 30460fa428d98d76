"""OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

What the OpenAI Agents SDK and LangChain's `use_responses_api=True` speak. A thin route, as the
chat completions one: input items become chat messages, the handler generates, and the reply
becomes output items — a `message` with `output_text`, or `function_call`s — in one response
object or as server-sent events (`response.created` ... `response.output_text.delta` ...
`response.completed`, each with its `sequence_number`).

- `instructions` is a system message for this response only (not carried to the next one).
- `previous_response_id` continues a stored response: its input and output come before the new
  input. Responses are kept in memory for the server's lifetime, the latest `MAX_STORED` of them
  (`store: false`: not kept).
- Function tools only (`{"type": "function", "name", "parameters"}`); `tool_choice` "none" offers
  none. `text.format` json_object / json_schema constrain the output as `response_format` does.
- Text input only; reasoning items in the input are skipped (these models do not reason).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from ..engine import types as et
from ..errors import HerdError
from . import schemas as s
from .handler import Final, Handler, Text, parse_keep_alive
from .http import EventStream, message_of, openai_error, parse_body, status_of, unless_disconnected

log = logging.getLogger("llamaherd.server")

MAX_STORED = 1000


class ResponseRequest(s.FiniteWire):
    model: str = Field(description="Model name.")
    input: str | list[dict[str, Any]] = Field(
        description="Text, or a list of input items (messages, function calls and their outputs).")
    instructions: str | None = Field(None, description="A system message for this response only.")
    previous_response_id: str | None = Field(None, description="Continue from this stored response.")
    tools: list[dict[str, Any]] | None = Field(
        None, description="Function tools: {type: function, name, description, parameters}.")
    tool_choice: str | dict[str, Any] | None = Field(None, description="none or auto (default).")
    temperature: float | None = Field(None, description="0-2; 0 is greedy.")
    top_p: float | None = Field(None, description="Nucleus sampling.")
    max_output_tokens: int | None = Field(None, description="Most tokens to generate.")
    stream: bool = Field(False, description="Stream server-sent events.")
    store: bool = Field(True, description="Keep the response for previous_response_id (in memory).")
    text: dict[str, Any] | None = Field(None, description="{format: {type: text | json_object | json_schema, schema}}.")
    metadata: dict[str, Any] | None = Field(None, description="Returned as given.")
    parallel_tool_calls: bool | None = Field(None, description="(ignored)")
    user: str | None = Field(None, description="(ignored)")
    keep_alive: s.KeepAlive = Field(None, description="(extension) as Ollama's keep_alive.")


def _stored(request: Request) -> OrderedDict[str, dict[str, Any]]:
    state = request.app.state
    if not hasattr(state, "responses"):
        state.responses = OrderedDict()
    return state.responses


def _text_of(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (input_text / output_text / text)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise HerdError(f"{where}.content must be a string or a list of parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            texts.append(str(part.get("text", "")))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise et.Unsupported(f"{where}: content part {kind!r} is not supported (text only)")
    return "".join(texts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses input items as chat messages (function calls join the assistant message before them)."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role", "user"), "content": _text_of(item.get("content"), where)})
        elif kind == "function_call":
            try:
                args = json.loads(item.get("arguments") or "{}")
            except ValueError:
                raise HerdError(f"{where}.arguments is not JSON") from None
            call = {"function": {"name": item.get("name", ""), "arguments": args}}
            if out and out[-1]["role"] == "assistant" and not out[-1]["content"]:
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue
        else:
            raise et.Unsupported(f"{where}: input item type {kind!r} is not supported")
    if not out:
        raise HerdError("input must not be empty")
    return out


def chat_tools(tools: list[dict[str, Any]] | None, choice: Any) -> list[dict[str, Any]] | None:
    """Responses function tools as chat tools; None when none are offered."""
    if not tools or choice == "none":
        return None
    out = []
    for i, t in enumerate(tools):
        if t.get("type") != "function":
            raise et.Unsupported(f"tools[{i}]: only function tools are supported, not {t.get('type')!r}")
        fn = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def output_format(text: dict[str, Any] | None) -> str | dict[str, Any] | None:
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema" and isinstance(fmt.get("schema"), dict):
        return fmt["schema"]
    raise HerdError("text.format must be text, json_object, or json_schema with a schema")


def _options(body: ResponseRequest) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if body.temperature is not None:
        if not 0 <= body.temperature <= 2:
            raise HerdError("temperature must be between 0 and 2")
        opts["temperature"] = body.temperature
    if body.top_p is not None:
        opts["top_p"] = body.top_p
    if body.max_output_tokens is not None:
        if body.max_output_tokens < 1:
            raise HerdError("max_output_tokens must be >= 1")
        opts["num_predict"] = body.max_output_tokens
    return opts


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    content = ([{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
               if status == "completed" else [])
    return {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
            "content": content}


def _call_items(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": f"call_{uuid.uuid4().hex[:24]}",
             "name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"]),
             "status": "completed"} for c in calls]


def _usage(final: Final) -> dict[str, Any]:
    p, c = final.done.prompt_eval_count, final.done.eval_count
    return {"input_tokens": p, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": c,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": p + c}


class Draft:
    """One response being made: its id and request, and the response object at any point."""

    def __init__(self, body: ResponseRequest, model: str):
        self.body = body
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def obj(self, status: str, output: list[dict[str, Any]], final: Final | None = None) -> dict[str, Any]:
        b = self.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
                "incomplete_details": incomplete, "instructions": b.instructions,
                "max_output_tokens": b.max_output_tokens, "model": self.model, "output": output,
                "parallel_tool_calls": b.parallel_tool_calls if b.parallel_tool_calls is not None else True,
                "previous_response_id": b.previous_response_id, "reasoning": {"effort": None, "summary": None},
                "store": b.store, "temperature": b.temperature, "top_p": b.top_p,
                "text": {"format": (b.text or {}).get("format") or {"type": "text"}},
                "tool_choice": b.tool_choice or "auto", "tools": b.tools or [], "truncation": "disabled",
                "usage": _usage(final) if final is not None else None, "metadata": b.metadata or {},
                "user": b.user}


def _status(final: Final) -> str:
    return "incomplete" if final.done.reason == "length" and not final.tool_calls else "completed"


def _assistant_message(text: str, final: Final) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if final.tool_calls:
        msg["tool_calls"] = [{"function": c["function"]} for c in final.tool_calls]
    return msg


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def routes() -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/responses")
    async def create(request: Request):
        body = await parse_body(request, ResponseRequest)
        stored = _stored(request)
        history: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            previous = stored.get(body.previous_response_id)
            if previous is None:
                return openai_error(f"Previous response with id '{body.previous_response_id}' not found.", 404,
                                    "previous_response_not_found")
            history = previous["messages"]
        conversation = history + input_messages(body.input)
        messages = ([{"role": "system", "content": body.instructions}] if body.instructions else []) + conversation
        h: Handler = request.app.state.handler
        reply = await h.generate(et.GenerateRequest(
            model=body.model, messages=messages, tools=chat_tools(body.tools, body.tool_choice),
            options=_options(body), format=output_format(body.text), keep_alive=parse_keep_alive(body.keep_alive),
            stream=body.stream),
            moderation=request.headers.get("x-herd-moderation"))
        draft = Draft(body, reply.model)

        def keep(obj: dict[str, Any], text: str, final: Final) -> None:
            if body.store:
                stored[draft.id] = {"response": obj, "messages": conversation + [_assistant_message(text, final)]}
                while len(stored) > MAX_STORED:
                    stored.popitem(last=False)

        if body.stream:
            return EventStream(_events(draft, reply, keep), media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})

        async def collect() -> dict[str, Any]:
            text = []
            async for event in reply.events():
                if isinstance(event, Text):
                    text.append(event.text)
                    continue
                output = _call_items(event.tool_calls) if event.tool_calls else [_message_item("".join(text))]
                obj = draft.obj(_status(event), output, event)
                keep(obj, "".join(text), event)
                return obj

        return JSONResponse(await unless_disconnected(request, collect()))

    @router.get("/responses/{response_id}")
    async def get(request: Request, response_id: str):
        found = _stored(request).get(response_id)
        if found is None:
            return openai_error(f"Response with id '{response_id}' not found.", 404, "not_found")
        return found["response"]

    @router.delete("/responses/{response_id}")
    async def delete(request: Request, response_id: str):
        if _stored(request).pop(response_id, None) is None:
            return openai_error(f"Response with id '{response_id}' not found.", 404, "not_found")
        return {"id": response_id, "object": "response", "deleted": True}

    return router


async def _events(draft: Draft, reply, keep) -> AsyncIterator[bytes]:
    """The streamed events of one response, in OpenAI's order."""
    seq = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal seq
        seq += 1
        return _sse({"type": kind, "sequence_number": seq - 1, **fields})

    yield event("response.created", response=draft.obj("in_progress", []))
    yield event("response.in_progress", response=draft.obj("in_progress", []))
    message: dict[str, Any] | None = None
    text: list[str] = []
    try:
        async for ev in reply.events():
            if isinstance(ev, Text):
                if not ev.text:
                    continue
                if message is None:
                    message = _message_item("", status="in_progress")
                    yield event("response.output_item.added", output_index=0, item=message)
                    yield event("response.content_part.added", item_id=message["id"], output_index=0, content_index=0,
                                part={"type": "output_text", "text": "", "annotations": []})
                text.append(ev.text)
                yield event("response.output_text.delta", item_id=message["id"], output_index=0, content_index=0,
                            delta=ev.text, logprobs=[])
                continue
            output: list[dict[str, Any]] = []
            if message is not None or not ev.tool_calls:
                if message is None:  # an empty reply is still a message
                    message = _message_item("", status="in_progress")
                    yield event("response.output_item.added", output_index=0, item=message)
                    yield event("response.content_part.added", item_id=message["id"], output_index=0,
                                content_index=0, part={"type": "output_text", "text": "", "annotations": []})
                done_item = {**_message_item("".join(text)), "id": message["id"]}
                part = done_item["content"][0]
                yield event("response.output_text.done", item_id=message["id"], output_index=0, content_index=0,
                            text=part["text"], logprobs=[])
                yield event("response.content_part.done", item_id=message["id"], output_index=0, content_index=0,
                            part=part)
                yield event("response.output_item.done", output_index=0, item=done_item)
                output.append(done_item)
            for item in _call_items(ev.tool_calls or []):
                index = len(output)
                yield event("response.output_item.added", output_index=index,
                            item={**item, "arguments": "", "status": "in_progress"})
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=item["arguments"])
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=item["name"], arguments=item["arguments"])
                yield event("response.output_item.done", output_index=index, item=item)
                output.append(item)
            status = _status(ev)
            obj = draft.obj(status, output, ev)
            keep(obj, "".join(text), ev)
            yield event(f"response.{status}", response=obj)
            return
    except Exception as e:  # noqa: BLE001 — the stream has begun: tell the client in-band
        if status_of(e) == 500:
            log.error("stream failed", exc_info=e)
        yield event("error", code=None, message=message_of(e), param=None)
        yield event("response.failed", response={**draft.obj("failed", []), "error": {
            "code": "server_error", "message": message_of(e)}})

