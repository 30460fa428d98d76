"""The FastAPI application of `herd serve`, and its settings.

Settings come from the environment, every HERD_* variable read in `llamaherd.settings` (names and
defaults as Ollama's, with HERD_ for OLLAMA_; `herd serve --help` lists them with their defaults).

Security: the server binds loopback by default. When it is bound to loopback it also refuses
requests whose Host header is not a loopback name (DNS rebinding: a web page that resolves its
own domain to 127.0.0.1 must not reach the API). Model names reach the disk only through the
store's name validation; /api/create accepts model names and uploaded blobs, never server paths.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import os
import secrets
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
from .handler import Handler
from .http import ClientGone, error_response
from .log import AccessLog

log = logging.getLogger("llamaherd.server")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
DEFAULT_ORIGINS = [f"{scheme}://{host}{port}" for scheme in ("http", "https")
                   for host in ("localhost", "127.0.0.1", "[::1]", "0.0.0.0") for port in ("", ":*")]


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


class Guard:
    """ASGI middleware: Host check (loopback binds), bearer key, and the body size limit."""

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
        limit = self.settings.max_body
        if limit is None or path.startswith("/api/blobs/"):
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
    from . import ollama, openai, ui

    app = FastAPI(title="llamaherd", version=__version__, lifespan=lifespan,
                  description="Ollama- and OpenAI-compatible API over one batching engine.")
    app.state.settings = settings
    app.state.handler = Handler(engine, store)
    app.state.blob_dir = Path(getattr(store, "root", settings.home or ".")) / "uploads"

    @app.exception_handler(HerdError)
    async def herd_error(request: Request, e: HerdError):
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
    app.add_middleware(CORSMiddleware, allow_origin_regex=_origin_regex(DEFAULT_ORIGINS + settings.origins),
                       allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type", "User-Agent", "Accept", "X-Requested-With"])
    app.add_middleware(Guard, settings=settings)
    app.add_middleware(AccessLog, store_root=getattr(store, "root", settings.home or "."))
    return app


def serve(settings: Settings | None = None, sock=None) -> None:
    """Run the server until interrupted (what `herd serve` does), on `sock` if given (a bound,
    listening socket), else on settings.host:port. Logs to stderr: where it listens, then one line
    per request (`server/log.py`); more with HERD_DEBUG."""
    import sys

    import uvicorn

    settings = settings or Settings.from_env()
    logging.basicConfig(level=logging.DEBUG if settings.debug else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    if settings.num_threads:
        import torch

        torch.set_num_threads(settings.num_threads)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_level="debug" if settings.debug else "warning", timeout_graceful_shutdown=5)
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
