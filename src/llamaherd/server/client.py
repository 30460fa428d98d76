"""A minimal client of a running `herd serve`, for the CLI (standard library only).

`server_available` is the CLI's quick probe; `server_request` sends one JSON request and
`server_stream` reads a streamed NDJSON answer. Requests never go through an HTTP proxy: the
server is the user's own, usually on loopback.
"""

from __future__ import annotations

import functools
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from .. import settings
from ..errors import HerdError

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(HerdError):
    """The server answered an error; `status` is its HTTP status (0 for an error mid-stream)."""

    def __init__(self, message: str, status: int = 0, headers=None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def server_url() -> str:
    host, port = settings.host()
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _open(method: str, path: str, body: dict[str, Any] | None, timeout: float | None):
    """The server's response to one request; ServerError for an error answer, HerdError for none."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server_url() + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    if key := settings.api_key():
        req.add_header("Authorization", f"Bearer {key}")
    try:
        return _opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except (ValueError, AttributeError):
            message = e.reason
        raise ServerError(str(message), e.code, e.headers) from None
    except (urllib.error.URLError, OSError) as e:
        raise HerdError(f"could not reach a herd server at {server_url()} ({e}): start one with `herd serve`") from None


def server_request(method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = 30.0) -> Any:
    """One JSON request to the server; its JSON answer (None for an empty one)."""
    with _open(method, path, body, timeout) as resp:
        raw = resp.read()
    return json.loads(raw) if raw.strip() else None


def server_stream(method: str, path: str, body: dict[str, Any] | None = None,
                  timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """The objects of a streamed NDJSON answer, as they arrive. An `{"error": ...}` line (an error
    after the stream began) raises ServerError. Closing the iterator closes the connection, which
    cancels the request on the server."""
    with _open(method, path, body, timeout) as resp:
        for line in resp:
            if not line.strip():
                continue
            obj = json.loads(line)
            if "error" in obj:
                raise ServerError(str(obj["error"]))
            yield obj


def store_id(root) -> str:
    """An id of a store folder that names it without showing its path (the `X-Herd-Store` header)."""
    import hashlib
    from pathlib import Path

    return hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:16]


@functools.cache
def server_identity(timeout: float = 0.3) -> dict[str, str] | None:
    """Who answers at HERD_HOST (GET /api/version within `timeout` seconds): None when nothing
    does, else `{"store": id, "pid": pid}` from its headers (empty for a server that does not send
    them). Asked once per process. A 401 counts as an answer: the commands then say the key is wrong."""
    try:
        with _open("GET", "/api/version", None, timeout) as resp:
            headers = resp.headers
    except ServerError as e:
        if e.status != 401:
            return None
        headers = e.headers
    except HerdError:
        return None
    return {k: headers[f"X-Herd-{k.title()}"] for k in ("store", "pid") if headers.get(f"X-Herd-{k.title()}")}


def server_available(timeout: float = 0.3) -> bool:
    """Whether a server answers at HERD_HOST (see `server_identity`)."""
    return server_identity(timeout) is not None
