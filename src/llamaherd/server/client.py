"""A minimal client of a running `herd serve`, for the CLI (standard library only)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from ..errors import HerdError


def server_url() -> str:
    from .app import parse_host

    host, port = parse_host(os.environ.get("HERD_HOST"))
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def server_request(method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    """One JSON request to the server; its JSON answer. HerdError when no server answers or it
    answers an error."""
    url = server_url() + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if key := os.environ.get("HERD_API_KEY"):
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except (ValueError, AttributeError):
            message = e.reason
        raise HerdError(str(message)) from None
    except (urllib.error.URLError, OSError) as e:
        raise HerdError(f"could not reach a herd server at {server_url()} ({e}): start one with `herd serve`") from None
    return json.loads(raw) if raw.strip() else None
