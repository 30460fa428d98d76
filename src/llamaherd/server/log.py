"""What `herd serve` prints: where it listens, then one line per request, as Ollama's log does.

    llamaherd 0.1.0 listening on http://127.0.0.1:11434 (pid 4242)
    chat page: http://127.0.0.1:11434/
    store: /home/me/.llamaherd (2 models)
    [herd] 2026/11/29 - 12:00:01 | 200 |   1.234s | 127.0.0.1 | POST "/api/chat" | 12 prompt + 30 eval tokens

Every response also carries `X-Herd-Store` (an id of the store the server serves, not its path)
and `X-Herd-Pid`, so that the CLI talks to a server only when it serves the CLI's own store, and
a second `herd serve` on a busy port can say which process holds it.
"""

from __future__ import annotations

import logging
import os
import re
import time

from .client import store_id

log = logging.getLogger("llamaherd.serve")

# A reply's token counts, read from the end of its body: Ollama's final object, or OpenAI's usage.
_COUNTS = (re.compile(rb'"prompt_eval_count":\s*(\d+).*?"eval_count":\s*(\d+)', re.S),
           re.compile(rb'"prompt_tokens":\s*(\d+),\s*"completion_tokens":\s*(\d+)'),
           re.compile(rb'"completion_tokens":\s*(\d+),\s*"prompt_tokens":\s*(\d+)'))


def token_counts(tail: bytes) -> tuple[int, int] | None:
    """(prompt, generated) tokens found at the end of a response body, or None."""
    for i, pattern in enumerate(_COUNTS):
        found = pattern.findall(tail)
        if found:
            a, b = map(int, found[-1])
            return (b, a) if i == 2 else (a, b)
    return None


def duration(seconds: float) -> str:
    """Like Go's time.Duration in Gin's log: "512µs", "12.3ms", "1.234s"."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.3f}s"


class AccessLog:
    """ASGI middleware: the store and pid headers on every response, and one log line per request."""

    def __init__(self, app, store_root):
        self.app = app
        self.headers = [(b"x-herd-store", store_id(store_root).encode()), (b"x-herd-pid", str(os.getpid()).encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, tail = 0, b""

        async def send_logged(message):
            nonlocal status, tail
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            elif message["type"] == "http.response.body":
                tail = (tail + message.get("body", b""))[-4096:]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            self._log(scope, status or 499, time.perf_counter() - start, tail)

    @staticmethod
    def _log(scope, status: int, seconds: float, tail: bytes) -> None:
        client = (scope.get("client") or ("-",))[0]
        path = scope.get("path", "")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        line = (f"[herd] {time.strftime('%Y/%m/%d - %H:%M:%S')} | {status} | {duration(seconds):>9} | "
                f"{client} | {scope.get('method', '')} \"{path}\"")
        if counts := token_counts(tail):
            line += f" | {counts[0]} prompt + {counts[1]} eval tokens"
        log.info(line)
        if log.isEnabledFor(logging.DEBUG):
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
            log.debug("  headers: user-agent=%r content-length=%s origin=%r", headers.get("user-agent"),
                      headers.get("content-length"), headers.get("origin"))
