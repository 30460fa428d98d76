"""The FastAPI application of `herd serve`, and its settings.

Settings come from the environment, every HERD_* variable read in `llamaherd.settings` (names and
defaults as Ollama's, with HERD_ for OLLAMA_; `herd serve --help` lists them with their defaults).

Security: the server binds loopback by default. Bound beyond it (HERD_HOST=0.0.0.0) without
HERD_API_KEY it prints a warning, and the management endpoints (create, delete, copy, pull, push,
blobs) refuse clients that are not on this machine. Error messages never show server paths.
Slow clients: a connection that has not sent its headers within HERD_HEADER_TIMEOUT seconds, or
stays idle between requests for 5 s, is closed, and at most HERD_MAX_CONNECTIONS are open at once.
When the server is bound to loopback it also refuses
requests whose Host header is a public name (DNS rebinding: a web page that resolves its own
domain to 127.0.0.1 must not reach the API); a disallowed browser Origin gets 403 before
anything runs, and JSON endpoints take JSON bodies only (see `access`). Model names reach the disk only through the
store's name validation; /api/create accepts model names and uploaded blobs, never server paths.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import secrets
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from .. import settings as envconfig
from ..errors import HerdError
from ..settings import DEFAULT_PORT, parse_host, parse_size  # noqa: F401  (re-exported)
from .access import DEFAULT_ORIGINS, Access, origin_regex
from .handler import Handler
from .http import ClientGone, error_response, hide_paths, openai_error
from .log import AccessLog

log = logging.getLogger("llamaherd.server")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


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
    max_context: int | None = None
    max_body: int = 32 << 20
    num_threads: int | None = None
    home: Path | None = None
    allow_request_templates: bool = False
    max_connections: int = 1024
    header_timeout: float = 10.0
    debug: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        host, port = envconfig.host(env)
        return cls(
            host=host, port=port, origins=envconfig.origins(env), api_key=envconfig.api_key(env),
            max_queue=envconfig.max_queue(env), max_loaded_models=envconfig.max_loaded_models(env),
            max_memory=envconfig.max_memory(env), keep_alive=envconfig.keep_alive(env),
            num_parallel=envconfig.num_parallel(env), context_length=envconfig.context_length(env),
            max_body=envconfig.max_body(env), num_threads=envconfig.num_threads(env),
            home=envconfig.home(env), debug=envconfig.debug(env),
            max_context=envconfig.max_context(env), allow_request_templates=envconfig.allow_request_templates(env),
            max_connections=envconfig.max_connections(env), header_timeout=envconfig.header_timeout(env),
        )

    @property
    def loopback(self) -> bool:
        if self.host in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
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
    """ASGI middleware: Host, Origin and content-type checks (`access.Access`), bearer key, and
    the body size limit."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings
        self.access = Access(settings.origins, check_host=settings.loopback)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        refusal = self.access.refusal(method, path, headers)
        if refusal is not None:
            status, message = refusal
            response = (openai_error(message, status) if path.startswith("/v1/")
                        else JSONResponse({"error": message}, status))
            return await response(scope, receive, send)
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
                keep_alive=settings.keep_alive, context_length=settings.context_length,
                max_context=settings.max_context))
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
        if own is not None:  # a real `herd serve` (tests that pass an engine stay quiet)
            for line in startup_lines(settings, store):
                log.info(line)
        try:
            yield
        finally:
            close = getattr(app.state.handler.engine, "close", None)
            if close is not None:
                await close()

    from .. import __version__
    from . import moderations, ollama, openai, responses, tokenize, ui

    app = FastAPI(title="llamaherd", version=__version__, lifespan=lifespan,
                  description="Ollama- and OpenAI-compatible API over one batching engine.")
    app.state.settings = settings
    from ..safety.moderation import server_moderator

    app.state.handler = Handler(engine, store, server_moderator())
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
        if request.url.path.startswith("/v1/"):  # OpenAI's shape, for SDKs that read error.message
            message = (f"Invalid URL ({request.method} {request.url.path})" if e.status_code in (404, 405)
                       else str(e.detail))
            return openai_error(message, e.status_code, "unknown_url" if e.status_code in (404, 405) else None)
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return error_response(e, openai=request.url.path.startswith("/v1/"))

    app.include_router(ollama.routes())
    app.include_router(openai.routes())
    app.include_router(tokenize.routes())  # /tokenizer_info, /tokenize, /detokenize (lm-eval)
    app.include_router(responses.routes())
    app.include_router(moderations.routes())  # /v1/moderations (llamaherd.safety)
    ui.mount_ui(app)  # the chat page at /ui/
    from .openapi import with_request_bodies

    with_request_bodies(app)  # /openapi.json describes the JSON bodies the routes read
    app.add_middleware(CORSMiddleware, allow_origin_regex=origin_regex(DEFAULT_ORIGINS + settings.origins),
                       allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With"])
    app.add_middleware(Guard, settings=settings)
    app.add_middleware(AccessLog, store_root=getattr(store, "root", settings.home or "."))
    return app


def serve(settings: Settings | None = None, sock=None) -> None:
    """Run the server until interrupted (what `herd serve` does), on `sock` if given (a bound,
    listening socket), else on settings.host:port. Logs to stderr: where it listens, then one line
    per request (`server/log.py`); more with HERD_DEBUG."""
    import uvicorn

    settings = settings or Settings.from_env()
    logging.basicConfig(level=logging.DEBUG if settings.debug else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    app = create_app(settings)
    warning = exposure_warning(settings)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_level="debug" if settings.debug else "warning", timeout_graceful_shutdown=5,
                            **connection_limits(settings))
    server = uvicorn.Server(config)
    server.run(sockets=[sock] if sock is not None else None)


def startup_lines(settings: Settings, store: Any) -> list[str]:
    """What `herd serve` prints once it is ready: its address, the chat page, the store."""
    from .. import __version__
    from .client import store_id

    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{settings.port}"
    page = url.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]") + "/"
    root = Path(getattr(store, "root", settings.home or "."))
    try:
        count = f"{len(store.list())} models"
    except Exception:  # a store that cannot be listed still gets served; its errors come per request
        count = "not readable"
    lines = [f"llamaherd {__version__} listening on {url} (pid {os.getpid()})", f"chat page: {page}",
             f"store: {root} ({count}; id {store_id(root)})"]
    if not settings.loopback:
        lines.append(f"note: bound to {settings.host}, not loopback: other machines can reach this server")
    return lines


def connection_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn's limits against slow clients (slowloris): at most `max_connections` open at once
    (more are answered 503), idle keep-alive connections closed after 5 s, and a connection that has
    not sent its request line and headers within `header_timeout` s closed (`SlowHeaders`)."""
    from .connections import header_timeout_protocol

    return {"limit_concurrency": settings.max_connections, "timeout_keep_alive": 5,
            "http": header_timeout_protocol(settings.header_timeout)}
