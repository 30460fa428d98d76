"""HTTP plumbing shared by the routes: bodies in, errors out, NDJSON and server-sent events.

Errors: a `HerdError` is the client's mistake — 400 with `{"error": "..."}` (404 for an unknown
model, 503 when the queue is full); the OpenAI routes wrap the message in OpenAI's error object.
Anything else is a bug: 500, logged with its traceback, and the server goes on.

Streams end early when the client goes away: the response notices the disconnect, stops
iterating, and the generation is cancelled (its KV-cache row is freed on the next step).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import json
import logging
import math
import re
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from ..engine.types import ModelNotFound, QueueFull
from ..errors import HerdError

log = logging.getLogger("llamaherd.server")

T = TypeVar("T", bound=BaseModel)


# Storage faults are the server's condition, not a bug: a clear status and message (no path).
STORAGE_ERRORS = {
    errno.ENOSPC: (507, "no space left on the server's disk"),
    errno.EDQUOT: (507, "the server's disk quota is used up"),
    errno.EROFS: (503, "the server's model store is on a read-only file system"),
    errno.EACCES: (503, "the server may not write to its model store (permission denied)"),
    errno.EPERM: (503, "the server may not write to its model store (operation not permitted)"),
    errno.EIO: (503, "the server's disk failed to read or write (I/O error)"),
}
_hidden: dict[str, str] = {}  # server paths -> what messages say instead


def hide_paths(store_root) -> None:
    """Never show the server's paths in error messages: the store's (blob paths become "blob
    sha256:..."), the home folder's and the working folder's."""
    _hidden[str(Path(store_root).expanduser().resolve())] = "$HERD_HOME"
    _hidden[str(Path(store_root).expanduser())] = "$HERD_HOME"
    _hidden[str(Path.home())] = "~"


def redact(message: str) -> str:
    message = _BLOB_PATH.sub(lambda m: f"blob sha256:{m[1]}", message)
    for path, shown in sorted(_hidden.items(), key=lambda kv: -len(kv[0])):
        if len(path) > 1:
            message = message.replace(path, shown)
    return message


_BLOB_PATH = re.compile(r"\S*/blobs/sha256-([0-9a-f]{64})")


def status_of(e: BaseException) -> int:
    from ..store import ModelNotFound as StoreModelNotFound

    if isinstance(e, (ModelNotFound, StoreModelNotFound)):
        return 404
    if isinstance(e, QueueFull):
        return 503
    if isinstance(e, HerdError):
        return getattr(e, "status", 400)  # store.StorageError: 503 / 507
    if isinstance(e, OSError) and e.errno in STORAGE_ERRORS:
        return STORAGE_ERRORS[e.errno][0]
    return 500


def message_of(e: BaseException) -> str:
    if isinstance(e, HerdError):
        return redact(str(e))
    if isinstance(e, OSError) and e.errno in STORAGE_ERRORS:
        return STORAGE_ERRORS[e.errno][1]
    return "internal server error"


def validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return f"invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}"
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"{where}: {err['msg']}" + ("" if len(e.errors()) == 1 else f" (and {len(e.errors()) - 1} more errors)")


async def parse_body(request: Request, schema: type[T]) -> T:
    """The JSON body, validated against `schema`; HerdError (400) when it does not parse or fit."""
    body = await request.body()
    if not body.strip():
        raise HerdError("missing request body")
    try:
        return schema.model_validate_json(body)
    except ValidationError as e:
        raise HerdError(validation_message(e)) from None


def openai_error(message: str, status: int, code: str | None = None) -> JSONResponse:
    """OpenAI's error object: `type` invalid_request_error for the client's mistakes (404 too, as
    OpenAI answers an unknown model), authentication_error for 401, server_error for 5xx."""
    kind = ("authentication_error" if status == 401 else "invalid_request_error" if status < 500
            else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status)


def error_response(e: BaseException, openai: bool = False) -> JSONResponse:
    from ..store import ModelNotFound as StoreModelNotFound

    status = status_of(e)
    if status == 500 or (status >= 500 and not isinstance(e, HerdError)):
        log.error("request failed", exc_info=e)
    message = message_of(e)
    if openai:
        code = ("model_not_found" if isinstance(e, (ModelNotFound, StoreModelNotFound))
                else "server_busy" if status == 503 else None)
        return openai_error(message, status, code)
    return JSONResponse({"error": message}, status)


def now_rfc3339(t: float | None = None) -> str:
    """Ollama's timestamp format (UTC, nanosecond-style fraction)."""
    when = dt.datetime.now(dt.timezone.utc) if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc)
    return when.isoformat().replace("+00:00", "Z")


FOREVER = "2318-08-08T00:00:00Z"  # what Ollama shows for a model kept forever
_FOREVER_TS = dt.datetime(2318, 8, 8, tzinfo=dt.timezone.utc).timestamp()


def expiry_rfc3339(t: float) -> str:
    # A huge keep_alive (say 1e300 s) gives a time no datetime can hold: /api/ps failed with a 500
    # for as long as the model stayed loaded. Anything past Ollama's "forever" date is forever.
    return FOREVER if math.isinf(t) or t >= _FOREVER_TS else now_rfc3339(t)


def dump(model: BaseModel | dict) -> dict[str, Any]:
    return model.model_dump(exclude_none=True, by_alias=True) if isinstance(model, BaseModel) else model


def ndjson_line(obj: BaseModel | dict) -> bytes:
    return (json.dumps(dump(obj), ensure_ascii=False) + "\n").encode()


def sse_event(obj: BaseModel | dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(dump(obj), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class EventStream(StreamingResponse):
    """A streaming response that always watches for the client leaving (whatever the server's ASGI
    spec version), so that a disconnect cancels the generation at once, even while nothing is sent."""

    async def __call__(self, scope, receive, send) -> None:
        scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.0"}}
        await super().__call__(scope, receive, send)


def ndjson_stream(chunks: AsyncIterator[BaseModel | dict], on_error=None) -> EventStream:
    """Stream NDJSON; an error after the stream began becomes a last `{"error": ...}` line."""

    async def body():
        try:
            async for chunk in chunks:
                yield ndjson_line(chunk)
        except Exception as e:  # noqa: BLE001 — the status line is sent; tell the client in-band
            if status_of(e) == 500:
                log.error("stream failed", exc_info=e)
            yield ndjson_line({"error": message_of(e)})

    return EventStream(body(), media_type="application/x-ndjson")


def sse_stream(chunks: AsyncIterator[BaseModel | dict]) -> EventStream:
    """Stream server-sent events ending with `data: [DONE]`."""

    async def body():
        try:
            async for chunk in chunks:
                yield sse_event(chunk)
        except Exception as e:  # noqa: BLE001
            if status_of(e) == 500:
                log.error("stream failed", exc_info=e)
            yield sse_event({"error": {"message": message_of(e), "type": "api_error", "param": None,
                                       "code": None}})
        yield sse_event("[DONE]")

    return EventStream(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[Any], poll: float = 0.25) -> Any:
    """Await `work`, cancelling it if the client disconnects first (then raise ClientGone)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 — it was abandoned
                pass
