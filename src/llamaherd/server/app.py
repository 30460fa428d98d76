"""The FastAPI application of `herd serve`, and its settings.

Settings come from the environment (names and defaults as Ollama's, with HERD_ for OLLAMA_):

    HERD_HOST               address to bind: host:port, host, :port or a URL   127.0.0.1:11434
    HERD_ORIGINS            more browser origins allowed by CORS (comma-separated, * wildcards);
                            localhost, 127.0.0.1, [::1] and 0.0.0.0 on any port are always allowed
    HERD_API_KEY            if set, every request but GET / needs "Authorization: Bearer <key>"
    HERD_MAX_QUEUE          requests waiting for a slot before the server answers 503      512
    HERD_MAX_LOADED_MODELS  models loaded at once; the least recently used idle one goes     3
    HERD_MAX_MEMORY         bytes of weights + KV cache over loaded models (suffix K/M/G)    unlimited
    HERD_KEEP_ALIVE         how long an idle model stays loaded (seconds or "5m"; <0 forever) 5m
    HERD_NUM_PARALLEL       requests one model decodes together (KV-cache rows)              16
    HERD_CONTEXT_LENGTH     default num_ctx (clipped to the model's)                         4096
    HERD_MAX_BODY           request body size limit in bytes (suffix K/M/G), blob uploads     32M
                            (POST /api/blobs) too: raise it to upload model files
    HERD_ALLOW_REQUEST_TEMPLATES  1: accept `template` in requests (vLLM's                     0
                            --trust-request-chat-template); stored templates always apply
    HERD_MAX_CONNECTIONS    open connections before new ones are refused (slowloris)         1024
    HERD_HEADER_TIMEOUT     seconds a client has to send its request line and headers        10
    HERD_NUM_THREADS        torch CPU threads                                                torch's default
    HERD_HOME               the model store                                                  ~/.llamaherd

Security: the server binds loopback by default. Bound beyond it (HERD_HOST=0.0.0.0) without
HERD_API_KEY it prints a warning, and the management endpoints (create, delete, copy, pull, push,
blobs) refuse clients that are not on this machine. Error messages never show server paths.
Slow clients: a connection that has not sent its headers within HERD_HEADER_TIMEOUT seconds, or
stays idle between requests for 5 s, is closed, and at most HERD_MAX_CONNECTIONS are open at once.

The server binds loopback by default. When it is bound to loopback it also refuses
requests whose Host header is not a loopback name (DNS rebinding: a web page that resolves its
own domain to 127.0.0.1 must not reach the API). Model names reach the disk only through the
store's name validation; /api/create accepts model names and uploaded blobs, never server paths.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
import os
import re
import secrets
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..errors import HerdError
from .handler import Handler, parse_keep_alive
from .http import ClientGone, error_response, hide_paths

log = logging.getLogger("llamaherd.server")

DEFAULT_PORT = 11434
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
DEFAULT_ORIGINS = [f"{scheme}://{host}{port}" for scheme in ("http", "https")
                   for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0") for port in ("", ":*")]


def parse_host(value: str | None) -> tuple[str, int]:
    """HERD_HOST as Ollama reads OLLAMA_HOST: "host:port", "host", ":port", "http://host:port", "[::1]:port"."""
    value = (value or "").strip()
    if not value:
        return "127.0.0.1", DEFAULT_PORT
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise HerdError(f"HERD_HOST {value!r}: bad port") from None
    host = parts.hostname or "127.0.0.1"
    return host, port


def parse_size(value: str | None, default: int | None) -> int | None:
    if value is None or not value.strip():
        return default
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", value, re.IGNORECASE)
    if not m:
        raise HerdError(f"bad size {value!r}: give bytes, or a number with K, M or G")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def _int(env: dict, name: str, default: int, lo: int = 1) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HerdError(f"{name} must be an integer, got {raw!r}") from None
    if value < lo:
        raise HerdError(f"{name} must be >= {lo}, got {value}")
    return value


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    origins: list[str] = field(default_factory=list)  # beyond DEFAULT_ORIGINS
    api_key: str | None = None
    max_queue: int = 512
    max_loaded_models: int = 3
    max_memory: int | None = None
    keep_alive: float = 300.0
    num_parallel: int = 16
    context_length: int = 4096
    max_body: int = 32 << 20
    num_threads: int | None = None
    home: Path | None = None
    allow_request_templates: bool = False
    max_connections: int = 1024
    header_timeout: float = 10.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        host, port = parse_host(env.get("HERD_HOST"))
        keep_alive = parse_keep_alive(env.get("HERD_KEEP_ALIVE"))
        threads = env.get("HERD_NUM_THREADS")
        return cls(
            host=host, port=port,
            origins=[o.strip() for o in env.get("HERD_ORIGINS", "").split(",") if o.strip()],
            api_key=env.get("HERD_API_KEY") or None,
            max_queue=_int(env, "HERD_MAX_QUEUE", 512, lo=0),
            max_loaded_models=_int(env, "HERD_MAX_LOADED_MODELS", 3),
            max_memory=parse_size(env.get("HERD_MAX_MEMORY"), None),
            keep_alive=300.0 if keep_alive is None else keep_alive,
            num_parallel=_int(env, "HERD_NUM_PARALLEL", 16),
            context_length=_int(env, "HERD_CONTEXT_LENGTH", 4096),
            max_body=parse_size(env.get("HERD_MAX_BODY"), 32 << 20),
            num_threads=_int(env, "HERD_NUM_THREADS", 0) if threads else None,
            home=Path(env["HERD_HOME"]).expanduser() if env.get("HERD_HOME") else None,
            allow_request_templates=env.get("HERD_ALLOW_REQUEST_TEMPLATES", "").strip().lower() in ("1", "true", "yes"),
            max_connections=_int(env, "HERD_MAX_CONNECTIONS", 1024),
            header_timeout=float(_int(env, "HERD_HEADER_TIMEOUT", 10)),
        )

    @property
    def loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False


def _origin_regex(patterns: list[str]) -> str:
    return "|".join(fnmatch.translate(p) for p in patterns)


def _host_allowed(host_header: str) -> bool:
    """A Host header naming the loopback interface (any port)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if host in ("localhost", "") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# What changes the store: refused to clients on other machines unless a key is required.
MANAGEMENT = ("/api/create", "/api/delete", "/api/copy", "/api/pull", "/api/push", "/api/blobs/")


def _is_loopback_client(scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0]).split("%")[0]).is_loopback
    except ValueError:
        return False


def exposure_warning(settings: "Settings") -> str | None:
    """The warning `herd serve` prints when it is reachable from other machines without a key."""
    if settings.loopback or settings.api_key:
        return None
    return (f"WARNING: listening on {settings.host}:{settings.port}, beyond this machine, without HERD_API_KEY: "
            "anyone who can reach this port can run the models. Model management (create, delete, copy, "
            "pull, push, blobs) is refused to other machines. Set HERD_API_KEY=<a secret> to require "
            "\"Authorization: Bearer <secret>\" on every request and allow management with it.")


class Guard:
    """ASGI middleware: Host check (loopback binds), bearer key, management endpoints only from
    this machine when there is no key, and the body size limit (uploads included)."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if self.settings.loopback and not _host_allowed(headers.get("host", "localhost")):
            return await JSONResponse({"error": "forbidden host"}, 403)(scope, receive, send)
        key = self.settings.api_key
        if key and method != "OPTIONS" and not (path == "/" and method in ("GET", "HEAD")):
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
                return await JSONResponse({"error": "unauthorized: a valid API key is required"}, 401,
                                          headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        if not key and path.startswith(MANAGEMENT) and not _is_loopback_client(scope):
            return await JSONResponse({"error": "model management is only allowed from this machine when the "
                                                "server has no HERD_API_KEY"}, 403)(scope, receive, send)
        limit = self.settings.max_body
        if limit is None:
            return await self.app(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await JSONResponse({"error": f"request body too large (limit {limit} bytes)"}, 413)(
                scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await JSONResponse({"error": f"request body too large (limit {limit} bytes)"}, 413)(scope, receive, send)


class BodyTooLarge(Exception):
    pass


def create_app(settings: Settings | None = None, engine: Any = None, store: Any = None) -> FastAPI:
    """The server application.

    Args:
        settings: default `Settings.from_env()`.
        engine: an `EngineAPI`; default a `llamaherd.engine.models.Engine` over `store`, made at startup.
        store: a `llamaherd.store.Store`; default one at `settings.home` ($HERD_HOME).
    """
    settings = settings or Settings.from_env()
    if store is None:
        from ..store import Store

        store = Store(settings.home)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = None
        if app.state.handler.engine is None:
            from ..engine.models import Engine, EngineConfig, store_resolver

            own = Engine(store_resolver(store), EngineConfig(
                num_parallel=settings.num_parallel, max_queue=settings.max_queue,
                max_loaded=settings.max_loaded_models, max_memory=settings.max_memory,
                keep_alive=settings.keep_alive, context_length=settings.context_length))
            app.state.handler.engine = own
        clean = getattr(store, "clean_temporary", None)
        if clean is not None:  # what killed uploads left, and blobs no model uses (as Ollama prunes)
            try:
                await asyncio.to_thread(clean)
                await asyncio.to_thread(store.prune)
            except (HerdError, OSError) as e:  # a read-only store still serves what it holds
                log.warning("could not clean the model store: %s", e)
        start = getattr(app.state.handler.engine, "start", None)
        if start is not None:
            await start()
        try:
            yield
        finally:
            close = getattr(app.state.handler.engine, "close", None)
            if close is not None:
                await close()

    from .. import __version__
    from . import ollama, openai, ui

    app = FastAPI(title="llamaherd", version=__version__, lifespan=lifespan,
                  description="Ollama- and OpenAI-compatible API over one batching engine.")
    app.state.settings = settings
    app.state.handler = Handler(engine, store)
    root = getattr(store, "root", None)
    if root is not None:
        hide_paths(root)

    @app.exception_handler(HerdError)
    async def herd_error(request: Request, e: HerdError):
        return error_response(e, openai=request.url.path.startswith("/v1/"))

    @app.exception_handler(OSError)  # a storage fault (disk full, read-only store): 503 / 507, no path
    async def os_error(request: Request, e: OSError):
        return error_response(e, openai=request.url.path.startswith("/v1/"))

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, e: BodyTooLarge):
        return JSONResponse({"error": f"request body too large (limit {settings.max_body} bytes)"}, 413)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return error_response(e, openai=request.url.path.startswith("/v1/"))

    app.include_router(ollama.routes())
    app.include_router(openai.routes())
    ui.mount_ui(app)  # the chat page at /ui/
    from .openapi import with_request_bodies

    with_request_bodies(app)  # /openapi.json describes the JSON bodies the routes read
    app.add_middleware(CORSMiddleware, allow_origin_regex=_origin_regex(DEFAULT_ORIGINS + settings.origins),
                       allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With"])
    app.add_middleware(Guard, settings=settings)
    return app


def serve(settings: Settings | None = None) -> None:
    """Run the server until interrupted (what `herd serve` does)."""
    import uvicorn

    settings = settings or Settings.from_env()
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    app = create_app(settings)
    warning = exposure_warning(settings)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    log.info("llamaherd listening on %s:%d", settings.host, settings.port)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5, **connection_limits(settings))


def connection_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn's limits against slow clients (slowloris): at most `max_connections` open at once
    (more are answered 503), idle keep-alive connections closed after 5 s, and a connection that has
    not sent its request line and headers within `header_timeout` s closed (`SlowHeaders`)."""
    from .connections import header_timeout_protocol

    return {"limit_concurrency": settings.max_connections, "timeout_keep_alive": 5,
            "http": header_timeout_protocol(settings.header_timeout)}
